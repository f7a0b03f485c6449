"""Minimal echo backends for the benchmarks, one per protocol, equal in work.

Both answer ``200`` with ``content-type: text/plain`` and the body ``hello``
plus the request path, so the proxy in front of each forwards the same bytes:

* ``pitcher``: a split service over a Pitcher transport (tcp:// or unix://),
  written against the transport layer so the SDK's conveniences cost nothing;
* ``http``: an HTTP/1.1 server on uvloop + httptools, the backend nginx proxies to.

Two more serve the transport benchmark, which sends opaque payloads:

* ``frames``: a Pitcher transport server whose handler returns the payload;
* ``raw``: the floor for a carrier: a plain uvloop protocol that writes back
  every byte it reads, on ``tcp://`` or ``unix://``.

Run e.g. ``python bench/echo_backends.py pitcher unix:///tmp/x.sock`` or
``python bench/echo_backends.py http 127.0.0.1:9001``; each prints ``ready
ADDRESS`` once it listens and stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import httptools
import uvloop

from pitcher_rpc.codec import decode_request, encode_response
from transports.registry import transport_for

_NAMES = (b"content-type",)
_VALUES = (b"text/plain",)


async def frame_echo(payload: bytes) -> bytes:
    return payload


class _RawEcho(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def pitcher_handler(payload: bytes) -> bytes:
    request = decode_request(payload)
    return encode_response(200, _NAMES, _VALUES, b"hello " + request.path)


class _HttpEcho(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_message_complete(self) -> None:
        body = b"hello " + self.url.split(b"?", 1)[0]
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )


async def main(kind: str, address: str) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    if kind in ("pitcher", "frames"):
        handler = pitcher_handler if kind == "pitcher" else frame_echo
        server = await transport_for(address).serve(address, handler)
        print("ready", server.address, flush=True)
        await stop.wait()
        await server.close(1.0)
    elif kind == "raw":
        if address.startswith("unix://"):
            raw = await loop.create_unix_server(_RawEcho, address[len("unix://") :])
        else:
            host, _, port = address[len("tcp://") :].rpartition(":")
            raw = await loop.create_server(_RawEcho, host, int(port))
        print("ready", address, flush=True)
        await stop.wait()
        raw.close()
    else:
        host, _, port = address.rpartition(":")
        http_server = await loop.create_server(_HttpEcho, host, int(port), backlog=1024)
        print("ready", address, flush=True)
        await stop.wait()
        http_server.close()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], sys.argv[2]))
