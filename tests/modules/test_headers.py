"""headers: add, set and remove headers both ways, globally and per route, through a real proxy."""

from __future__ import annotations

import asyncio
import json

import pytest

from pitcher_rpc.proxy.server import ProxyServer
from pitcher_rpc.sdk import Request, Response, Service
from tests.inprocess import assert_points_at_key, check_through_proxy, module_error

CONFIG = """
[server]
listen = "127.0.0.1:0"

[modules.headers]
request_set = {{ "x-env" = "test" }}
request_remove = ["x-debug"]
response_remove = ["x-internal"]

[modules.headers.route.api]
request_add = {{ "x-api" = "1" }}
response_set = {{ "cache-control" = "no-store" }}

[[routes]]
name = "api"
prefix = "/api/"
cluster = "backend"

[[routes]]
name = "web"
prefix = "/"
cluster = "backend"

[clusters.backend]
nodes = ["{node}"]
"""

app = Service("headers-test")


@app.route("/")
def answer(request: Request) -> Response:
    return Response(
        200,
        json.dumps(request.headers.items_list()),
        [("x-internal", "secret"), ("cache-control", "max-age=60"), ("x-kept", "yes")],
    )


async def get(port: int, path: str, headers: str = "") -> tuple[dict[str, str], list]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\n{headers}Connection: close\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    fields = dict(
        line.decode().lower().split(": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line
    )
    return fields, json.loads(body)


def test_headers_are_changed_both_ways_globally_and_per_route() -> None:
    async def check(proxy: ProxyServer, port: int) -> None:
        sent = "X-Env: prod\r\nX-Debug: 1\r\n"
        response, seen = await get(port, "/api/x", sent)
        seen_names = [name for name, _ in seen]
        assert ["x-env", "test"] in seen and ["x-env", "prod"] not in seen
        assert "x-debug" not in seen_names and ["x-api", "1"] in seen
        assert "x-internal" not in response and response["x-kept"] == "yes"
        assert response["cache-control"] == "no-store"

        response, seen = await get(port, "/web", sent)
        assert ["x-env", "test"] in seen and "x-api" not in [n for n, _ in seen]
        assert response["cache-control"] == "max-age=60"

    check_through_proxy(app, CONFIG, check)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ('request_set = { "content-length" = "1" }', "managed by the proxy"),
        ('request_set = { "bad name" = "1" }', "is not a header name"),
        ('response_add = { "x-a" = "line\\nbreak" }', "not a valid header value"),
        ("request_remove = 3", "must be an array"),
        ('colour = "red"', "unknown key 'colour'"),
    ],
)
def test_bad_rules_are_refused_with_their_line(section: str, message: str) -> None:
    text = (
        f"[modules.headers]\n{section}\n"
        '[[routes]]\ncluster = "a"\n[clusters.a]\nnodes = ["tcp://127.0.0.1:1"]\n'
    )
    error = module_error(text, "h.toml", "headers")
    assert_points_at_key(error)
    errors = error.text
    assert message in errors
