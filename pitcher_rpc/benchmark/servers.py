"""Echo servers for benchmarks, one process each: ``python -m pitcher_rpc.benchmark.servers``.

Kinds:

* ``floor``: the cheapest echo a carrier allows, with no Pitcher framing: a
  plain uvloop protocol writing back what it reads (tcp://, unix://), a plain
  datagram protocol (udp://), a plain zmq.asyncio ROUTER (zmq+tcp://, zmq+ipc://).
* ``frames``: a Pitcher transport server whose handler returns the payload at once.
* ``pitcher``: a Pitcher split service answering ``200 hello <path>`` as a
  protobuf Response, the backend the proxy is measured with.
* ``http``: the same answer over HTTP/1.1 (uvloop + httptools), the backend
  nginx is measured with.

Each prints ``ready ADDRESS`` once it listens and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

import httptools
import uvloop

from transports.registry import parse_address, transport_for

from ..codec import decode_request, encode_response

_NAMES = (b"content-type",)
_VALUES = (b"text/plain",)


def frame_echo(payload: bytes) -> bytes:
    # A plain function, as a service that answers at once is written for the
    # servers: no coroutine per request (see transports/handlers.py).
    return payload


async def pitcher_echo(payload: bytes) -> bytes:
    request = decode_request(payload)
    return encode_response(200, _NAMES, _VALUES, b"hello " + request.path)


class _StreamEcho(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class _DatagramEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(data, addr)


class _HttpEcho(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_message_complete(self) -> None:
        body = b"hello " + self.url.split(b"?", 1)[0]
        self.transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s"
            % (len(body), body)
        )


async def _zmq_echo(socket: Any) -> None:
    while True:
        await socket.send_multipart(await socket.recv_multipart())


async def _zmq_floor(address: str, endpoint: str, stop: asyncio.Event) -> None:
    import zmq
    import zmq.asyncio

    context = zmq.asyncio.Context()
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 0)
    if "[" in endpoint:
        socket.setsockopt(zmq.IPV6, 1)
    socket.bind(endpoint)
    print("ready", address, flush=True)
    echo = asyncio.get_running_loop().create_task(_zmq_echo(socket), name="zmq floor echo")
    try:
        await stop.wait()
    finally:
        echo.cancel()
        socket.close(0)
        context.term()


async def serve(kind: str, address: str) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    parsed = parse_address(address) if "://" in address else None
    if kind in ("frames", "pitcher"):
        handler = frame_echo if kind == "frames" else pitcher_echo
        server = await transport_for(address).serve(address, handler)
        print("ready", server.address, flush=True)
        await stop.wait()
        await server.close(1.0)
        return
    if kind == "http":
        host, _, port = address.rpartition(":")
        http = await loop.create_server(_HttpEcho, host.strip("[]"), int(port), backlog=4096)
        print("ready", address, flush=True)
        await stop.wait()
        http.close()
        return
    assert kind == "floor" and parsed is not None, f"unknown kind {kind!r}"
    if parsed.scheme.startswith("zmq+"):
        await _zmq_floor(address, address.removeprefix("zmq+"), stop)
        return
    if parsed.scheme == "udp":
        endpoint, _ = await loop.create_datagram_endpoint(
            _DatagramEcho, local_addr=(parsed.host, parsed.port)
        )
        closer: Any = endpoint
    elif parsed.scheme == "unix":
        if os.path.exists(parsed.path):
            os.unlink(parsed.path)
        closer = await loop.create_unix_server(_StreamEcho, parsed.path, backlog=4096)
    else:
        closer = await loop.create_server(_StreamEcho, parsed.host, parsed.port, backlog=4096)
    print("ready", address, flush=True)
    await stop.wait()
    closer.close()


def main() -> None:
    kind, address = sys.argv[1], sys.argv[2]
    uvloop.run(serve(kind, address))


if __name__ == "__main__":
    main()
