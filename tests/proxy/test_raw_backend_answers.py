"""What the proxy relays of a backend's answer, written by hand on a real transports server.

The SDK refuses to send a status or header the proxy would refuse, so its
services cannot test the proxy's own checks (docs/wire.md 8.3). This backend
is a bare transport handler that writes whatever RESPONSE payload the
request asks for, built with the generated ``pitcher_pb2.Response``: the
proxy is the only judge. Each answer is asked for on two routes: one the
proxy relays as it is, one whose answers a module edits (the other way
through the proxy's header code). After every refusal the client's
connection must still serve the next request.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator, Sequence

import pytest

from tests.proxy.conftest import SERVE_HANDLER, HttpResponse, Launcher, Proxy, RawClient

# The request's query is base64url of JSON: {"status": N, "headers": [[name,
# value], ...], "body": text}, names, values and body as latin-1 text, so any
# byte may be sent. The handler answers at once with exactly that Response.
RAW_ANSWERS = """
import asyncio, base64, json, sys
from pitcher_rpc.pb import pitcher_pb2


def handler(payload):
    request = pitcher_pb2.Request.FromString(payload)
    spec = json.loads(base64.urlsafe_b64decode(request.query))
    response = pitcher_pb2.Response(status=spec["status"], body=spec["body"].encode("latin-1"))
    for name, value in spec["headers"]:
        response.header_names.append(name.encode("latin-1"))
        response.header_values.append(value.encode("latin-1"))
    return response.SerializeToString()
"""

CONFIG = """
[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[[routes]]
name = "plain"
prefix = "/plain/"
cluster = "raw"
[[routes]]
name = "edited"
prefix = "/edited/"
cluster = "raw"
[clusters.raw]
nodes = ["{node}"]
[modules.headers.route.edited]
response_add = {{ "x-edited" = "yes" }}
"""

ROUTES = ["plain", "edited"]
GOOD = [("x-good", "1"), ("content-type", "text/plain")]


@pytest.fixture(scope="module")
def proxy(module_launcher: Launcher) -> Iterator[Proxy]:
    backend = module_launcher.script_backend(RAW_ANSWERS + SERVE_HANDLER)
    yield module_launcher.proxy(CONFIG.format(node=backend.uri))


def target(route: str, status: int = 200, headers: Sequence[tuple[str, str]] = (), body=b"ok"):
    spec = {"status": status, "headers": [list(pair) for pair in headers]}
    spec["body"] = body.decode("latin-1")
    return f"/{route}/x?" + base64.urlsafe_b64encode(json.dumps(spec).encode()).decode()


def fetch(client: RawClient, route: str, status: int = 200, headers=(), body=b"ok"):
    return client.request("GET", target(route, status, headers, body))


def assert_served(response: HttpResponse, route: str) -> None:
    assert response.status == 200, response.body
    assert response.header("x-edited") == ("yes" if route == "edited" else None)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("x-bad", "a\rb"),
        ("x-bad", "a\nb"),
        ("x-bad", "a\r\nx-injected: 1"),
        ("x-bad", "a\nx-injected: 1"),
        ("x-bad\r\nx-injected", "1"),
        ("x-bad", "nul\x00byte"),
        ("x-bad", "bell\x07"),
        ("x-bad", "del\x7f"),
        ("x-bad", " leading space"),
        ("x-bad", "trailing tab\t"),
        ("bad name", "x"),
        ("bad(name)", "x"),
        ("bad:name", "x"),
        ("", "x"),
        ("x-caf\xe9", "x"),
        ("bad\x00name", "x"),
    ],
    ids=[
        "cr",
        "lf",
        "crlf-injection",
        "lf-injection",
        "name-injection",
        "nul",
        "bel",
        "del",
        "leading-ws",
        "trailing-ws",
        "name-space",
        "name-paren",
        "name-colon",
        "empty-name",
        "name-non-ascii",
        "name-nul",
    ],
)
def test_one_invalid_header_fails_the_whole_response_and_the_connection_stays_usable(
    proxy: Proxy, route: str, name: str, value: str
) -> None:
    bad = [GOOD[0], (name, value), GOOD[1]]
    with proxy.connect() as client:
        # The same block without the bad header first: the proxy keeps the
        # header lines of a block it has seen, and must not mistake this one.
        good = fetch(client, route, headers=GOOD)
        assert_served(good, route)
        assert good.header("x-good") == "1"
        refused = fetch(client, route, headers=bad, body=b"secret body")
        assert refused.status == 502, refused.body
        assert b"backend answered with an invalid header" in refused.body
        # Nothing of the backend's answer reaches the client.
        assert b"x-good" not in refused.raw_head
        assert b"x-injected" not in refused.raw_head
        assert b"secret body" not in refused.body
        assert refused.header("connection") is None
        assert_served(fetch(client, route, headers=GOOD), route)
        assert not client.is_closed(timeout=0.05)


@pytest.mark.parametrize("route", ROUTES)
def test_a_header_block_too_large_to_be_kept_is_checked_every_time(
    proxy: Proxy, route: str
) -> None:
    big = [("x-big", "b" * 2000), *GOOD]
    with proxy.connect() as client:
        for _ in range(2):
            response = fetch(client, route, headers=big)
            assert_served(response, route)
            assert response.header("x-big") == "b" * 2000
        refused = fetch(client, route, headers=[*big, ("x-bad", "a\r\nx-injected: 1")])
        assert refused.status == 502, refused.body
        assert b"x-big" not in refused.raw_head and b"x-injected" not in refused.raw_head
        assert_served(fetch(client, route, headers=big), route)


@pytest.mark.parametrize("route", ROUTES)
def test_every_valid_name_and_value_is_relayed_as_sent(proxy: Proxy, route: str) -> None:
    headers = [
        ("X-Token-!#$%&'*+-.^_`|~09", "token"),
        ("X-Mixed-Case", "Kept As Sent"),
        ("x-empty", ""),
        ("x-obs-text", "caf\xe9 \x80\xff"),
        ("x-inner-space", "a \t b"),
        ("x-repeated", "1"),
        ("x-repeated", "2"),
    ]
    with proxy.connect() as client:
        response = fetch(client, route, headers=headers)
        assert_served(response, route)
        for name, value in headers:
            line = f"\r\n{name}: {value}\r\n".encode("latin-1")
            assert line in response.raw_head + b"\r\n", (name, response.raw_head)
        assert response.all("x-repeated") == ["1", "2"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("status", [0, 1, 100, 101, 103, 199, 600, 999, 0xFFFFFFFF])
def test_a_status_that_is_no_final_http_status_gives_502(
    proxy: Proxy, route: str, status: int
) -> None:
    with proxy.connect() as client:
        response = fetch(client, route, status, GOOD, b"not relayed")
        assert response.status == 502
        assert f"backend answered with status {status}".encode() in response.body
        assert b"x-good" not in response.raw_head
        assert_served(fetch(client, route), route)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("status", [200, 299, 418, 599])
def test_a_final_status_is_relayed(proxy: Proxy, route: str, status: int) -> None:
    with proxy.connect() as client:
        response = fetch(client, route, status, GOOD, b"relayed")
        assert (response.status, response.body) == (status, b"relayed")
        assert response.header("x-good") == "1"


@pytest.mark.parametrize("route", ROUTES)
def test_framing_and_hop_by_hop_fields_from_the_backend_are_replaced(
    proxy: Proxy, route: str
) -> None:
    body = b"0123456789"
    headers = [
        ("Content-Length", "99999"),
        ("content-length", "3"),
        ("Transfer-Encoding", "chunked"),
        ("Connection", "close, X-Private"),
        ("X-Private", "for this hop only"),
        ("Keep-Alive", "timeout=1"),
        ("Proxy-Connection", "close"),
        ("Upgrade", "h2c"),
        ("TE", "trailers"),
        ("Trailer", "x-checksum"),
        ("Date", "Mon, 01 Jan 2001 00:00:00 GMT"),
        ("x-kept", "yes"),
    ]
    with proxy.connect() as client:
        response = fetch(client, route, headers=headers, body=body)
        assert_served(response, route)
        # The client read exactly the body by the proxy's one Content-Length
        # (RawClient refuses two, or any Transfer-Encoding).
        assert response.body == body
        assert response.all("content-length") == [str(len(body))]
        for name in ("connection", "x-private", "keep-alive", "proxy-connection"):
            assert response.header(name) is None, name
        for name in ("upgrade", "te", "trailer"):
            assert response.header(name) is None, name
        [date] = response.all("date")
        assert "2001" not in date
        assert response.header("x-kept") == "yes"
        # The backend's "Connection: close" closed nothing: the next request is served.
        assert_served(fetch(client, route, headers=GOOD), route)
        assert not client.is_closed(timeout=0.05)
