"""A bare HTTP/1.1 echo for nginx to front: uvloop + httptools, the SDK echo's JSON.

The baseline service of bench_pair.py: it answers every request with the
same JSON document the SDK echo (``pitcher_rpc/sdk/echo.py``) returns (method,
path, query, headers, body, route, client), with nothing but httptools between
the socket and the answer. ``route`` is ``--route`` (default ``echo``, the
name bench_pair gives Pitcher's route); ``client`` is the peer's ``ip:port``
over TCP and empty over a Unix socket (nginx sends the client's address in
X-Forwarded-For, which the document shows).

    python bench/bare_http_echo.py --listen unix:///tmp/http-echo.sock

Prints ``ready ADDRESS`` once listening; stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
from typing import Any
from urllib.parse import parse_qsl

import httptools
import uvloop

_dumps = json.dumps
_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n"
_CLOSE = b"connection: close\r\n"


class HttpEcho(asyncio.Protocol):
    __slots__ = ("body", "client", "headers", "parser", "route", "transport", "url")

    def __init__(self, route: str) -> None:
        self.route = route
        self.transport: Any = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.body = b""
        self.client = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.client = f"{peer[0]}:{peer[1]}"

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n" + _CLOSE)
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.body = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        path, _, query_bytes = self.url.partition(b"?")
        body = self.body
        try:
            text = body.decode("utf-8")
            encoding = "utf-8"
        except UnicodeDecodeError:
            text = base64.b64encode(body).decode()
            encoding = "base64"
        query = query_bytes.decode("latin-1")
        # The echo application's own work (its ?sleep= look-up), as the SDK echo does it.
        if "sleep" in query or "%" in query:
            dict(parse_qsl(query, keep_blank_values=True)).get("sleep")
        document = _dumps(
            {
                "method": self.parser.get_method().decode("latin-1"),
                "path": path.decode("latin-1"),
                "query": query,
                "headers": self.headers,
                "body": text,
                "body_encoding": encoding,
                "route": self.route,
                "client": self.client,
            }
        ).encode()
        keep_alive = self.parser.should_keep_alive()
        self.transport.write(_HEAD % (len(document), b"" if keep_alive else _CLOSE) + document)
        if not keep_alive:
            self.transport.close()


async def serve(listen: str, route: str) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    if listen.startswith("unix://"):
        path = listen.removeprefix("unix://")
        if os.path.exists(path):
            os.unlink(path)
        server = await loop.create_unix_server(lambda: HttpEcho(route), path, backlog=4096)
    else:
        host, _, port = listen.removeprefix("tcp://").rpartition(":")
        server = await loop.create_server(
            lambda: HttpEcho(route), host.strip("[]"), int(port), backlog=4096
        )
    print("ready", listen, flush=True)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="unix:///path or tcp://host:port")
    parser.add_argument("--route", default="echo", help="the route name the document shows")
    args = parser.parse_args()
    uvloop.run(serve(args.listen, args.route))


if __name__ == "__main__":
    main()
