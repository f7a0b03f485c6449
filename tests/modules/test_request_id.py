"""request_id: kept or made, forwarded once, echoed; switchable; through a real proxy."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys

import pytest

from pitcher_rpc.proxy.server import ProxyServer
from pitcher_rpc.sdk import Request, Response, Service
from tests.inprocess import (
    assert_module_refuses,
    check_through_proxy,
)

CONFIG = """
[server]
listen = "127.0.0.1:0"
{modules}
[[routes]]
name = "api"
prefix = "/api/"
cluster = "backend"

[clusters.backend]
nodes = ["{node}"]
"""

app = Service("request-id-test")


@app.route("/api/")
def answer(request: Request) -> Response:
    extra = []
    if request.path.endswith("/own-id"):
        extra = [("x-request-id", "from-the-backend")]
    return Response(200, json.dumps(request.headers.items_list()), extra)


Fields = list[tuple[str, str]]


async def get(port: int, path: str, headers: str = "") -> tuple[int, Fields, Fields]:
    """Status, response header fields, and the request fields the backend saw."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\n{headers}Connection: close\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    fields = [tuple(line.lower().split(": ", 1)) for line in lines[1:]]
    seen = json.loads(body) if body.startswith(b"[") else []
    return int(lines[0].split()[1]), fields, [(n, v) for n, v in seen]  # type: ignore[misc]


def values(fields: Fields, name: str) -> list[str]:
    return [value for field, value in fields if field == name]


ID_SHAPE = re.compile(r"[0-9a-f]{12}-[0-9a-f]+")


def test_on_by_default_keeps_a_valid_id_and_makes_the_others() -> None:
    async def check(proxy: ProxyServer, port: int) -> None:
        status, response, seen = await get(port, "/api/a", "X-Request-Id: trace-42.a:b/c=\r\n")
        assert status == 200
        assert values(response, "x-request-id") == ["trace-42.a:b/c="]
        assert values(seen, "x-request-id") == ["trace-42.a:b/c="]

        made = set()
        for sent in ("", "X-Request-Id: has space\r\n", f"X-Request-Id: {'x' * 129}\r\n"):
            _, response, seen = await get(port, "/api/a", sent)
            [request_id] = values(response, "x-request-id")
            assert ID_SHAPE.fullmatch(request_id)
            assert values(seen, "x-request-id") == [request_id]
            made.add(request_id)
        assert len(made) == 3

        # Only the first of repeated fields counts; the backend sees one.
        _, response, seen = await get(port, "/api/a", "X-Request-Id: one\r\nX-Request-Id: two\r\n")
        assert values(seen, "x-request-id") == ["one"] == values(response, "x-request-id")

        # A request no route takes is answered with its id all the same.
        status, response, _ = await get(port, "/nowhere", "X-Request-Id: lost-1\r\n")
        assert status == 404 and values(response, "x-request-id") == ["lost-1"]

        # The backend's own id header is relayed, not doubled.
        _, response, _ = await get(port, "/api/own-id", "X-Request-Id: mine\r\n")
        assert values(response, "x-request-id") == ["from-the-backend"]

    check_through_proxy(app, CONFIG, check, modules="")


def test_custom_header_untrusted_and_not_echoed() -> None:
    modules = """
[modules.request_id]
header = "X-Trace-Id"
trust_incoming = false
echo = false
"""

    async def check(proxy: ProxyServer, port: int) -> None:
        sent = "X-Trace-Id: forged\r\nX-Request-Id: other\r\n"
        _, response, seen = await get(port, "/api/a", sent)
        [trace] = values(seen, "x-trace-id")
        assert trace != "forged" and ID_SHAPE.fullmatch(trace)
        # Not this module's header: it passes through as sent.
        assert values(seen, "x-request-id") == ["other"]
        assert values(response, "x-trace-id") == [] == values(response, "x-request-id")

    check_through_proxy(app, CONFIG, check, modules=modules)


def test_switched_off_the_client_header_passes_untouched_and_none_is_made() -> None:
    async def check(proxy: ProxyServer, port: int) -> None:
        _, response, seen = await get(port, "/api/a", "X-Request-Id: has space\r\n")
        assert values(seen, "x-request-id") == ["has space"]
        assert values(response, "x-request-id") == []
        _, response, seen = await get(port, "/api/a")
        assert values(seen, "x-request-id") == [] == values(response, "x-request-id")

        proxy.set_module("request_id", True)
        _, response, seen = await get(port, "/api/a")
        assert values(seen, "x-request-id") == values(response, "x-request-id") != []

    check_through_proxy(app, CONFIG, check, modules="[modules.request_id]\nenabled = false\n")


def test_ids_made_by_two_processes_differ() -> None:
    script = "from pitcher_rpc.modules.request_id import new_request_id as n; print(n(), n())"
    made = [
        subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True
        ).stdout.split()
        for _ in range(2)
    ]
    assert len({request_id for pair in made for request_id in pair}) == 4
    assert made[0][0].split("-")[0] == made[0][1].split("-")[0]  # one prefix per process
    assert made[0][0].split("-")[0] != made[1][0].split("-")[0]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ('header = "x forwarded"', "is not an HTTP header name"),
        ('header = "X-Forwarded-For"', "managed by the proxy itself"),
        ('header = "content-length"', "managed by the proxy itself"),
        ("echo = 1", "echo must be true or false"),
        ("trust_incoming = 'yes'", "trust_incoming must be true or false"),
        ("prefix = 'a'", "unknown key 'prefix'"),
    ],
)
def test_bad_settings_are_refused_with_their_line(section: str, message: str) -> None:
    assert_module_refuses("request_id", section, message)
