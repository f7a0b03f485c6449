"""Fields the proxy owns on each side: the service never sees Expect, the client one Date."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time

from pitcher_rpc.proxy.server import ProxyServer
from pitcher_rpc.sdk.echo import app as echo_app
from pitcher_rpc.sdk.service import Request, Response, Service
from tests.inprocess import check_through_proxy

TEMPLATE = """
[server]
listen = "127.0.0.1:0"
[[routes]]
prefix = "/"
cluster = "app"
[clusters.app]
nodes = ["{node}"]
"""

dated = Service("dated")


@dated.route("/")
def stale_date(request: Request) -> Response:
    # A service whose clock is a day behind, and which writes its own Date.
    return Response(200, b"ok", [("Date", "Mon, 01 Jan 2001 00:00:00 GMT"), ("X-Kept", "1")])


async def exchange(port: int, request: bytes) -> tuple[bytes, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"HTTP/1.1 100 "):
            head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        return head, await reader.readexactly(length)
    finally:
        writer.close()


def test_the_client_gets_one_date_the_proxy_s() -> None:
    async def check(proxy: ProxyServer, port: int) -> None:
        head, body = await exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert body == b"ok"
        dates = [
            line.split(b":", 1)[1].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"date:")
        ]
        assert len(dates) == 1, head
        when = email.utils.parsedate_to_datetime(dates[0].decode())
        assert abs(when.timestamp() - time.time()) < 5
        assert b"\r\nX-Kept: 1\r\n" in head

    check_through_proxy(dated, TEMPLATE, check)


def test_expect_is_answered_by_the_proxy_and_not_forwarded() -> None:
    async def check(proxy: ProxyServer, port: int) -> None:
        request = (
            b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\nX-Other: 1\r\n\r\nhello"
        )
        head, body = await exchange(port, request)
        assert head.startswith(b"HTTP/1.1 200 "), head
        seen = json.loads(body)
        names = [name for name, _ in seen["headers"]]
        assert "expect" not in names and "x-other" in names
        assert seen["body"] == "hello"

    check_through_proxy(echo_app, TEMPLATE, check)
