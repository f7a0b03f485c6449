"""The HTTP core's edges through a running proxy: body deadlines, absolute-form targets,
fields named in Connection, and the Host rules.

A ``pitcher serve`` process before an echo service, both on loopback; every
client is a raw socket, so the bytes on the wire are exactly the test's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest

from pitcher_rpc.process.admin import AdminRequest, AdminResponse, AdminServer
from pitcher_rpc.process.admin_http import BODY_TIMEOUT as ADMIN_BODY_TIMEOUT
from tests.proxy.conftest import (
    HttpResponse,
    Launcher,
    Proxy,
    RawClient,
    build_request,
    toml_config,
)

# Small values, so that the deadlines show within a test's time. The proxy's
# sweep looks at the connections every min(header_timeout, keepalive_timeout) / 4.
HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 0.5
BODY_DEADLINE = 1.5
SWEEP = HEADER_TIMEOUT / 4
# Scheduling on a busy two-core machine: how late an answer may be and still count.
SLACK = 0.6


@pytest.fixture(scope="module")
def proxy(module_launcher: Launcher) -> Proxy:
    echo = module_launcher.echo_backend("tcp")
    return module_launcher.proxy(
        toml_config(
            [
                {"name": "a", "host": "a.example", "prefix": "/", "cluster": "echo"},
                {"name": "b", "host": "b.example", "prefix": "/", "cluster": "echo"},
                {"name": "v6", "host": "[::1]", "prefix": "/", "cluster": "echo"},
                {"name": "any", "prefix": "/", "cluster": "echo"},
            ],
            {"echo": {"nodes": [echo.uri]}},
            server={
                "header_timeout": HEADER_TIMEOUT,
                "keepalive_timeout": 5.0,
                "body_timeout": BODY_TIMEOUT,
                "body_deadline": BODY_DEADLINE,
                "max_body_size": 1 << 20,
            },
        )
    )


def head(request_line: str, *lines: str) -> bytes:
    return ("\r\n".join((request_line, *lines)) + "\r\n\r\n").encode("latin-1")


def seen(response: HttpResponse) -> dict[str, Any]:
    """What the echo service received: route, path, body and headers (a list of pairs)."""
    assert response.status == 200, response.body
    answer: dict[str, Any] = response.json()
    return answer


def header_values(answer: dict[str, Any], name: str) -> list[str]:
    return [value for key, value in answer["headers"] if key.lower() == name]


def assert_408_and_closed(client: RawClient, started: float, low: float, high: float) -> None:
    response = client.response()
    elapsed = time.monotonic() - started
    assert response.status == 408, response.body
    assert response.header("connection") == "close"
    assert low <= elapsed <= high, elapsed
    assert client.is_closed(), "the connection stayed open after a 408"


# -- body deadlines -------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_body_that_stops_gets_408_within_body_timeout(proxy: Proxy, framing: str) -> None:
    if framing == "length":
        start = head("POST /stall HTTP/1.1", "Host: x", "Content-Length: 10") + b"abc"
    else:
        start = head("POST /stall HTTP/1.1", "Host: x", "Transfer-Encoding: chunked") + b"3\r\nab"
    with proxy.connect() as client:
        client.send(start)
        started = time.monotonic()
        assert_408_and_closed(client, started, BODY_TIMEOUT * 0.8, BODY_TIMEOUT + SWEEP + SLACK)


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_trickled_body_gets_408_at_body_deadline(proxy: Proxy, framing: str) -> None:
    # A byte every fifth of a second never pauses for body_timeout; the whole body is late.
    if framing == "length":
        start = head("POST /trickle HTTP/1.1", "Host: x", "Content-Length: 1000")
    else:
        start = head("POST /trickle HTTP/1.1", "Host: x", "Transfer-Encoding: chunked")
        start += b"3e8\r\n"
    with proxy.connect() as client:
        client.send(start)
        started = time.monotonic()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while time.monotonic() - started < BODY_DEADLINE + 2.0:
                if client.is_closed(timeout=BODY_TIMEOUT / 2.5) or client.buffer:
                    break
                client.send(b"z")
        assert_408_and_closed(client, started, BODY_DEADLINE * 0.9, BODY_DEADLINE + SWEEP + SLACK)


def test_a_body_sent_in_pieces_in_time_is_untouched(proxy: Proxy) -> None:
    body = b"0123456789" * 4
    with proxy.connect() as client:
        client.send(head("POST /pieces HTTP/1.1", "Host: x", f"Content-Length: {len(body)}"))
        for index in range(0, len(body), 10):
            time.sleep(BODY_TIMEOUT / 3)  # four pauses, one second in all: within both
            client.send(body[index : index + 10])
        answer = seen(client.response())
        assert answer["body"] == body.decode()
        # The connection goes on serving.
        assert seen(client.request("GET", "/after"))["path"] == "/after"


def test_a_large_body_arriving_with_its_head_is_untouched(proxy: Proxy) -> None:
    body = b"b" * 300_000
    with proxy.connect() as client:
        answer = seen(client.request("POST", "/big", body=body))
        assert len(answer["body"]) == len(body)
        assert not client.is_closed(timeout=BODY_TIMEOUT + SWEEP + 0.2), "no deadline after it"


def test_a_pipelined_request_whose_body_stops_gets_408_after_the_answer_ahead(
    proxy: Proxy,
) -> None:
    with proxy.connect() as client:
        client.send(
            build_request("GET", "/first?sleep=0.3")
            + head("POST /second HTTP/1.1", "Host: x", "Content-Length: 10")
            + b"abc"
        )
        started = time.monotonic()
        first = client.response()
        assert seen(first)["path"] == "/first"
        # The second request's deadlines count from the first one's answer (0.3 s).
        assert_408_and_closed(
            client, started, 0.3 + BODY_TIMEOUT * 0.8, 0.3 + BODY_TIMEOUT + SWEEP + SLACK
        )


def test_the_second_request_on_a_connection_has_its_body_timed_too(proxy: Proxy) -> None:
    with proxy.connect() as client:
        assert seen(client.request("POST", "/one", body=b"x"))["body"] == "x"
        client.send(head("POST /two HTTP/1.1", "Host: x", "Content-Length: 5") + b"ab")
        started = time.monotonic()
        assert_408_and_closed(client, started, BODY_TIMEOUT * 0.8, BODY_TIMEOUT + SWEEP + SLACK)


def test_the_admin_api_has_a_body_timeout_of_its_own() -> None:
    async def sink(request: AdminRequest) -> AdminResponse:
        return AdminResponse(200, "ok")

    # A long header_timeout, which also bounds an admin request as a whole:
    # the body's pause is what ends this one.
    server = AdminServer(header_timeout=30.0)
    server.route("POST", "/sink", sink)

    def client(address: tuple[str, int]) -> tuple[HttpResponse, bool, float]:
        with RawClient.connect(*address) as raw:
            raw.send(build_request("POST", "/sink", [("Content-Length", "10")]) + b"abc")
            started = time.monotonic()
            response = raw.response()
            return response, raw.is_closed(), time.monotonic() - started

    async def scenario() -> None:
        await server.start("127.0.0.1", 0)
        try:
            response, closed, elapsed = await asyncio.to_thread(client, server.address)
        finally:
            await server.stop()
        assert response.status == 408
        assert response.header("content-type") == "application/json"
        assert closed
        # The admin sweep runs every second at most.
        assert ADMIN_BODY_TIMEOUT * 0.9 <= elapsed <= ADMIN_BODY_TIMEOUT + 1.0 + SLACK

    asyncio.run(asyncio.wait_for(scenario(), 10.0))


# -- absolute-form targets --------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "route", "host"),
    [
        ("http://a.example/x?q=1", "a", "a.example"),
        ("http://A.Example:8080/x?q=1", "a", "A.Example:8080"),
        ("https://a.example/x?q=1", "a", "a.example"),
        ("http://a.example./x?q=1", "a", "a.example."),
        ("http://[::1]:81/x?q=1", "v6", "[::1]:81"),
        ("http://c.example/x?q=1", "any", "c.example"),
    ],
)
def test_absolute_form_routes_and_forwards_by_the_targets_authority(
    proxy: Proxy, target: str, route: str, host: str
) -> None:
    with proxy.connect() as client:
        client.send(head(f"GET {target} HTTP/1.1", "Host: b.example", "Accept: */*"))
        answer = seen(client.response())
    assert answer["route"] == route
    assert (answer["path"], answer["query"]) == ("/x", "q=1")
    # The backend sees the host routing used, once, where the client's Host was.
    assert header_values(answer, "host") == [host]
    assert [key for key, _ in answer["headers"]][:2] == ["host", "accept"]


def test_absolute_form_on_http10_without_host_is_forwarded_with_one(proxy: Proxy) -> None:
    with proxy.connect() as client:
        client.send(head("GET http://a.example/old HTTP/1.0"))
        answer = seen(client.response())
    assert answer["route"] == "a"
    assert header_values(answer, "host") == ["a.example"]


def test_options_with_an_empty_absolute_path_is_options_asterisk(proxy: Proxy) -> None:
    # RFC 9112 §3.2.4: both ask about the server as a whole, so both get one answer.
    with proxy.connect() as client:
        client.send(head("OPTIONS * HTTP/1.1", "Host: a.example"))
        star = client.response()
    with proxy.connect() as client:
        client.send(head("OPTIONS http://a.example HTTP/1.1", "Host: b.example"))
        absolute = client.response()
    assert (absolute.status, absolute.body) == (star.status, star.body)


BAD_TARGETS = {
    "userinfo": "http://user:pw@a.example/x",
    "empty userinfo": "http://@a.example/x",
    "empty authority": "http:///x",
    "port only": "http://:80/x",
    "not an IPv6 address": "http://[1:2:3]/x",
    "IPv6 zone": "http://[fe80::1%25eth0]/x",
    "other scheme": "ftp://a.example/x",
    "authority-form": "a.example:80",
}


@pytest.mark.parametrize("target", BAD_TARGETS.values(), ids=BAD_TARGETS.keys())
def test_invalid_absolute_form_is_400(proxy: Proxy, target: str) -> None:
    with proxy.connect() as client:
        client.send(head(f"GET {target} HTTP/1.1", "Host: a.example"))
        response = client.response()
        assert response.status == 400, response.body
        assert client.is_closed()


# -- fields named in Connection -------------------------------------------------------------


def test_x_forwarded_for_named_in_connection_does_not_reach_the_chain(proxy: Proxy) -> None:
    with proxy.connect() as client:
        client.send(
            head(
                "GET /xff HTTP/1.1",
                "Host: x",
                "X-Forwarded-For: 203.0.113.66",
                "Connection: X-Forwarded-For",
            )
        )
        answer = seen(client.response())
    chain = ", ".join(header_values(answer, "x-forwarded-for"))
    assert "203.0.113.66" not in chain
    assert chain == "127.0.0.1"


def test_fields_named_in_connection_and_hop_by_hop_ones_never_reach_the_backend(
    proxy: Proxy,
) -> None:
    with proxy.connect() as client:
        client.send(
            head(
                "GET /hop HTTP/1.1",
                "Host: a.example",
                "Connection: X-Secret, keep-alive",
                "connection: TE, x-forwarded-proto, Host",
                "X-Secret: s",
                "Keep-Alive: timeout=5",
                "TE: trailers",
                "Upgrade: websocket",
                "Proxy-Authorization: Basic eDp5",
                "Trailer: X-T",
                "X-Forwarded-Proto: https",
                "X-Kept: k",
            )
        )
        answer = seen(client.response())
    names = [key.lower() for key, _ in answer["headers"]]
    for dropped in (
        "connection",
        "x-secret",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
        "trailer",
    ):
        assert dropped not in names, answer["headers"]
    assert header_values(answer, "x-forwarded-proto") == ["http"]
    assert header_values(answer, "x-kept") == ["k"]
    # Host is routing's; naming it in Connection does not take it from the backend.
    assert answer["route"] == "a"
    assert header_values(answer, "host") == ["a.example"]


# -- Host -----------------------------------------------------------------------------------


BAD_HOSTS = {
    "missing on 1.1": head("GET /h HTTP/1.1", "Accept: */*"),
    "empty on 1.1": head("GET /h HTTP/1.1", "Host:"),
    "whitespace only": head("GET /h HTTP/1.1", "Host:  "),
    "empty on 1.0": head("GET /h HTTP/1.0", "Host:"),
    "two fields": head("GET /h HTTP/1.1", "Host: a.example", "Host: a.example"),
    "two fields on 1.0": head("GET /h HTTP/1.0", "Host: a.example", "Host: b.example"),
    "empty then valid": head("GET /h HTTP/1.1", "Host:", "Host: a.example"),
    "with a path": head("GET /h HTTP/1.1", "Host: a.example/x"),
    "with userinfo": head("GET /h HTTP/1.1", "Host: u@a.example"),
    "not an IPv6 address": head("GET /h HTTP/1.1", "Host: [::1::2]"),
    "bad port": head("GET /h HTTP/1.1", "Host: a.example:8o"),
    "with a scheme": head("GET /h HTTP/1.1", "Host: http://a.example"),
}


@pytest.mark.parametrize("raw", BAD_HOSTS.values(), ids=BAD_HOSTS.keys())
def test_host_rules_refuse_with_400(proxy: Proxy, raw: bytes) -> None:
    with proxy.connect() as client:
        client.send(raw)
        response = client.response()
        assert response.status == 400, response.body
        assert response.header("connection") == "close"
        assert client.is_closed()


def test_http10_without_host_is_served(proxy: Proxy) -> None:
    with proxy.connect() as client:
        client.send(head("GET /old HTTP/1.0"))
        answer = seen(client.response())
    assert answer["route"] == "any"
    assert header_values(answer, "host") == []


def test_an_empty_host_after_a_good_request_is_refused_in_turn(proxy: Proxy) -> None:
    with proxy.connect() as client:
        client.send(
            build_request("GET", "/good", host="a.example") + head("GET /h HTTP/1.1", "Host:")
        )
        assert seen(client.response())["route"] == "a"
        assert client.response().status == 400
        assert client.is_closed()
