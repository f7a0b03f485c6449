"""The proxy as a user runs it: ``pitcher serve`` in front of real split services.

Each transport gets its own proxy and backends (module-scoped, so they start
once); every test talks to the proxy over a raw socket and checks what the
echo service says it received.
"""

from __future__ import annotations

import base64
import collections
import email.utils
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass

import pytest

from tests.proxy.conftest import (
    Backend,
    Launcher,
    Proxy,
    build_request,
    can_connect,
    child_pids,
    established_connections,
    free_port,
    get,
    pitcher_command,
    toml_config,
    wait_until,
)

WEIGHTS = {"heavy": 3, "light": 1}


@dataclass
class Site:
    transport: str
    proxy: Proxy
    echo: Backend


@pytest.fixture(scope="module", params=["tcp", "unix", "udp", "zmq+tcp"])
def site(request: pytest.FixtureRequest, module_launcher: Launcher) -> Site:
    transport = request.param
    echo = module_launcher.echo_backend(transport)
    heavy = module_launcher.test_backend(transport, name="heavy")
    light = module_launcher.test_backend(transport, name="light")
    routes = [
        {"name": "any-echo", "prefix": "/echo/", "cluster": "echo"},
        {"name": "strip", "prefix": "/strip/", "cluster": "echo", "strip_prefix": True},
        {"name": "weighted", "prefix": "/weighted/", "cluster": "weighted"},
        {"name": "exact", "host": "api.example.com", "prefix": "/", "cluster": "echo"},
        {"name": "wildcard", "host": "*.example.com", "prefix": "/", "cluster": "echo"},
        {"name": "only-exact", "host": "only.example.com", "prefix": "/only/", "cluster": "echo"},
    ]
    clusters = {
        "echo": {"nodes": [echo.uri]},
        "weighted": {
            "balance": "weighted",
            "nodes": [
                {"uri": heavy.uri, "weight": WEIGHTS["heavy"]},
                {"uri": light.uri, "weight": WEIGHTS["light"]},
            ],
        },
    }
    proxy = module_launcher.proxy(toml_config(routes, clusters))
    return Site(transport, proxy, echo)


def received_headers(body: dict) -> list[tuple[str, str]]:
    return [(name, value) for name, value in body["headers"]]


# ------------------------------------------------------------------ requests


def test_get_with_query_reaches_the_backend(site: Site) -> None:
    response = get(site.proxy, "/echo/some/path?a=1&b=two%20words")
    assert response.status == 200
    assert response.header("content-type") == "application/json"
    body = response.json()
    assert body["method"] == "GET"
    assert body["path"] == "/echo/some/path"
    assert body["query"] == "a=1&b=two%20words"
    assert body["route"] == "any-echo"
    assert body["body"] == ""


def test_post_with_content_length_body(site: Site) -> None:
    payload = json.dumps({"greeting": "hello", "n": 42}).encode()
    response = get(
        site.proxy,
        "/echo/submit",
        method="POST",
        headers=[("Content-Type", "application/json")],
        body=payload,
    )
    assert response.status == 200
    body = response.json()
    assert body["method"] == "POST"
    assert body["body"].encode() == payload
    assert ("content-type", "application/json") in received_headers(body)


def test_binary_body_arrives_intact(site: Site) -> None:
    payload = bytes(range(256)) * 4
    response = get(site.proxy, "/echo/bin", method="PUT", body=payload)
    assert response.status == 200
    body = response.json()
    assert body["body_encoding"] == "base64"
    assert base64.b64decode(body["body"]) == payload


def test_chunked_body_arrives_dechunked(site: Site) -> None:
    chunks = [b"Hello, ", b"chunked ", b"world", b"!" * 300]
    encoded = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    with site.proxy.connect() as client:
        client.send(
            build_request("POST", "/echo/chunked", [("Transfer-Encoding", "chunked")]) + encoded
        )
        response = client.response()
    assert response.status == 200
    body = response.json()
    assert body["body"].encode() == b"".join(chunks)
    names = {name for name, _ in received_headers(body)}
    # The backend gets a whole body, so framing headers of the client hop must not reach it.
    assert "transfer-encoding" not in names


def test_chunked_body_sent_in_pieces_with_trailers(site: Site) -> None:
    with site.proxy.connect() as client:
        client.send(
            build_request(
                "POST", "/echo/pieces", [("Transfer-Encoding", "chunked"), ("Trailer", "X-Sum")]
            )
        )
        for piece in (b"5\r\nab", b"cde\r\n", b"3;ext=1\r\nfgh\r\n", b"0\r\nX-Sum: 8\r\n\r\n"):
            client.send(piece)
            time.sleep(0.01)
        response = client.response()
    assert response.status == 200
    body = response.json()
    assert body["body"] == "abcdefgh"
    names = {name for name, _ in received_headers(body)}
    assert not names & {"trailer", "x-sum", "transfer-encoding"}


# ------------------------------------------------------------------ headers


@pytest.mark.parametrize(
    "connection",
    ["keep-alive, X-Secret-Hop", "Upgrade, x-secret-hop"],
    ids=["keep-alive", "upgrade"],
)
def test_end_to_end_headers_are_forwarded_and_hop_by_hop_ones_are_not(
    site: Site, connection: str
) -> None:
    response = get(
        site.proxy,
        "/echo/headers",
        headers=[
            ("X-Custom", "one"),
            ("X-Custom", "two"),
            ("Accept", "text/plain"),
            ("Connection", connection),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Upgrade", "websocket"),
            ("Proxy-Authorization", "Basic c2VjcmV0"),
            ("Proxy-Connection", "keep-alive"),
            ("X-Secret-Hop", "must not pass"),
        ],
    )
    assert response.status == 200
    headers = received_headers(response.json())
    names = [name for name, _ in headers]
    assert [value for name, value in headers if name == "x-custom"] == ["one", "two"]
    assert ("accept", "text/plain") in headers
    assert ("host", "localhost") in headers
    for hop in (
        "connection",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
        "x-secret-hop",
    ):
        assert hop not in names, f"{hop} was forwarded"


def test_x_forwarded_for_is_added(site: Site) -> None:
    headers = received_headers(get(site.proxy, "/echo/xff").json())
    assert ("x-forwarded-for", "127.0.0.1") in headers
    assert ("x-forwarded-proto", "http") in headers


def test_x_forwarded_for_is_appended_and_proto_replaced(site: Site) -> None:
    response = get(
        site.proxy,
        "/echo/xff",
        headers=[("X-Forwarded-For", "203.0.113.7"), ("X-Forwarded-Proto", "https")],
    )
    headers = received_headers(response.json())
    assert [v for n, v in headers if n == "x-forwarded-for"] == ["203.0.113.7, 127.0.0.1"]
    # Only the proxy knows how the client reached it.
    assert [v for n, v in headers if n == "x-forwarded-proto"] == ["http"]


def test_x_forwarded_for_keeps_every_hop_of_repeated_fields(site: Site) -> None:
    # Repeated fields are one comma-separated list (RFC 9110 §5.3): no hop may be lost.
    response = get(
        site.proxy,
        "/echo/xff",
        headers=[("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-For", "203.0.113.7")],
    )
    headers = received_headers(response.json())
    assert [v for n, v in headers if n == "x-forwarded-for"] == [
        "198.51.100.1, 203.0.113.7, 127.0.0.1"
    ]


def test_valid_request_id_is_kept_and_returned(site: Site) -> None:
    response = get(site.proxy, "/echo/rid", headers=[("X-Request-Id", "trace-42.a:b/c=")])
    assert response.header("x-request-id") == "trace-42.a:b/c="
    headers = received_headers(response.json())
    assert [v for n, v in headers if n == "x-request-id"] == ["trace-42.a:b/c="]


def test_repeated_request_id_reaches_the_backend_once(site: Site) -> None:
    response = get(
        site.proxy, "/echo/rid", headers=[("X-Request-Id", "first-1"), ("X-Request-Id", "second-2")]
    )
    forwarded = [v for n, v in received_headers(response.json()) if n == "x-request-id"]
    assert len(forwarded) == 1
    assert response.all("x-request-id") == forwarded


@pytest.mark.parametrize(
    "sent",
    [None, "has space", "x" * 129, "semi;colon", ""],
    ids=["absent", "space", "too-long", "semicolon", "empty"],
)
def test_missing_or_invalid_request_id_is_replaced(site: Site, sent: str | None) -> None:
    headers = [] if sent is None else [("X-Request-Id", sent)]
    first = get(site.proxy, "/echo/rid", headers=headers)
    second = get(site.proxy, "/echo/rid", headers=headers)
    generated = first.header("x-request-id")
    assert generated and generated != sent
    assert re.fullmatch(r"[A-Za-z0-9._:+/=-]{1,128}", generated)
    assert [v for n, v in received_headers(first.json()) if n == "x-request-id"] == [generated]
    assert second.header("x-request-id") != generated


# ------------------------------------------------------------------ connections


def test_keep_alive_serves_several_requests_on_one_connection(site: Site) -> None:
    with site.proxy.connect() as client:
        local = client.sock.getsockname()
        for index in range(5):
            response = client.request("GET", f"/echo/ka/{index}")
            assert response.status == 200
            assert response.header("connection") is None
            assert response.json()["path"] == f"/echo/ka/{index}"
        # The same socket throughout: nothing reconnected behind our back.
        assert client.sock.getsockname() == local
        assert not client.is_closed(timeout=0.05)


def test_pipelined_requests_are_answered_in_order(site: Site) -> None:
    # Later requests are faster, so a proxy answering as backends finish would reorder them.
    count = 10
    batch = b"".join(
        build_request(
            "POST" if index % 3 == 0 else "GET",
            f"/echo/pipe/{index}?sleep={(count - index) * 0.004:.3f}",
            body=f"body-{index}".encode() if index % 3 == 0 else b"",
        )
        for index in range(count)
    )
    with site.proxy.connect() as client:
        client.send(batch)
        for index in range(count):
            response = client.response()
            assert response.status == 200
            body = response.json()
            assert body["path"] == f"/echo/pipe/{index}"
            if index % 3 == 0:
                assert body["body"] == f"body-{index}"
        assert client.request("GET", "/echo/after").json()["path"] == "/echo/after"


def test_long_pipelined_burst_is_answered_in_order(site: Site) -> None:
    # More than the proxy queues before it stops reading: reading must resume.
    count = 100
    with site.proxy.connect() as client:
        client.send(b"".join(build_request("GET", f"/echo/burst/{i}") for i in range(count)))
        for index in range(count):
            assert client.response().json()["path"] == f"/echo/burst/{index}"


def test_pipelined_mix_of_routed_and_unrouted_requests_keeps_order(site: Site) -> None:
    paths = ["/echo/a", "/nowhere/1", "/echo/b", "/nowhere/2", "/nowhere/3", "/echo/c"]
    with site.proxy.connect() as client:
        client.send(b"".join(build_request("GET", path) for path in paths))
        for path in paths:
            response = client.response()
            if path.startswith("/echo/"):
                assert response.status == 200
                assert response.json()["path"] == path
            else:
                assert response.status == 404


def test_half_closed_client_still_gets_every_answer(site: Site) -> None:
    with site.proxy.connect() as client:
        client.send(
            build_request("GET", "/echo/half/1?sleep=0.05") + build_request("GET", "/echo/half/2")
        )
        client.sock.shutdown(socket.SHUT_WR)
        assert client.response().json()["path"] == "/echo/half/1"
        assert client.response().json()["path"] == "/echo/half/2"
        assert client.is_closed()


def test_upgrade_request_with_a_body_is_served_as_an_ordinary_one(site: Site) -> None:
    # The proxy ignores Upgrade (RFC 9110 §7.8); the body and the next request must survive.
    with site.proxy.connect() as client:
        client.send(
            build_request(
                "POST",
                "/echo/upgrade",
                [("Connection", "Upgrade"), ("Upgrade", "websocket")],
                body=b"upgrade-body",
            )
            + build_request("GET", "/echo/after-upgrade")
        )
        first = client.response()
        assert first.status == 200
        assert first.json()["body"] == "upgrade-body"
        assert first.header("upgrade") is None
        assert client.response().json()["path"] == "/echo/after-upgrade"


def test_head_gets_headers_but_no_body(site: Site) -> None:
    with site.proxy.connect() as client:
        head = client.request("HEAD", "/echo/head")
        assert head.status == 200
        assert int(head.header("content-length") or 0) > 0
        assert head.body == b""
        # Had any body bytes followed the head, this response would not parse.
        follow = client.request("GET", "/echo/after-head")
        assert follow.status == 200
        assert follow.json()["path"] == "/echo/after-head"


def test_head_to_an_unrouted_path_gets_no_body(site: Site) -> None:
    with site.proxy.connect() as client:
        response = client.request("HEAD", "/nowhere")
        assert response.status == 404
        assert response.body == b""
        assert client.request("GET", "/echo/after").json()["path"] == "/echo/after"


def test_connection_close_closes_after_the_response(site: Site) -> None:
    with site.proxy.connect() as client:
        client.send(
            build_request("GET", "/echo/close", [("Connection", "close")])
            + build_request("GET", "/echo/ignored")
        )
        response = client.response()
        assert response.status == 200
        assert response.header("connection") == "close"
        assert response.json()["path"] == "/echo/close"
        assert client.is_closed()


def test_http_1_0_without_keep_alive_closes(site: Site) -> None:
    with site.proxy.connect() as client:
        response = client.request("GET", "/echo/old", host=None, version="1.0")
        assert response.status == 200
        assert response.header("connection") == "close"
        assert response.json()["path"] == "/echo/old"
        assert client.is_closed()


def test_http_1_0_keep_alive_is_honoured_and_announced(site: Site) -> None:
    # An HTTP/1.0 client only reuses a connection whose response says keep-alive
    # (RFC 9112 §9.3 and Appendix C.2.2), as nginx and HAProxy answer.
    with site.proxy.connect() as client:
        for index in range(2):
            response = client.request(
                "GET",
                f"/echo/old/{index}",
                [("Connection", "keep-alive")],
                host=None,
                version="1.0",
            )
            assert response.status == 200
            assert response.json()["path"] == f"/echo/old/{index}"
            assert (response.header("connection") or "").lower() == "keep-alive"


def test_responses_carry_a_date(site: Site) -> None:
    # RFC 9110 §6.6.1: a recipient with a clock that forwards a response
    # without Date must add one; so must the proxy on the answers it makes.
    relayed = get(site.proxy, "/echo/date")
    refused = get(site.proxy, "/nowhere")
    for response in (relayed, refused):
        date = response.header("date")
        assert date is not None, response.raw_head
        parsed = email.utils.parsedate_to_datetime(date)
        assert abs(parsed.timestamp() - time.time()) < 5


# ------------------------------------------------------------------ routing


@pytest.mark.parametrize(
    ("path", "expected_path", "expected_query"),
    [
        ("/strip/users/7?full=1", "/users/7", "full=1"),
        ("/strip/", "/", ""),
        ("/strip//double", "/double", ""),
    ],
)
def test_strip_prefix_route(site: Site, path: str, expected_path: str, expected_query: str) -> None:
    response = get(site.proxy, path)
    assert response.status == 200
    body = response.json()
    assert body["route"] == "strip"
    assert body["path"] == expected_path
    assert body["query"] == expected_query


@pytest.mark.parametrize(
    ("host", "path", "route"),
    [
        ("api.example.com", "/x", "exact"),
        ("API.Example.COM:8080", "/x", "exact"),
        ("v1.example.com", "/x", "wildcard"),
        ("a.b.example.com:81", "/x", "wildcard"),
        ("example.com", "/echo/x", "any-echo"),
        ("other.test", "/echo/x", "any-echo"),
        ("127.0.0.1:9", "/echo/x", "any-echo"),
        ("[::1]:9", "/echo/x", "any-echo"),
        ("only.example.com", "/only/x", "only-exact"),
    ],
)
def test_host_based_routing(site: Site, host: str, path: str, route: str) -> None:
    response = get(site.proxy, path, host=host)
    assert response.status == 200
    assert response.json()["route"] == route


@pytest.mark.parametrize(
    ("host", "path"),
    [
        ("localhost", "/nothing/here"),
        ("localhost", "/"),
        # An existing host owns its paths: no fall back to the "*" routes.
        ("only.example.com", "/echo/x"),
    ],
)
def test_unrouted_request_is_404_and_the_connection_stays_usable(
    site: Site, host: str, path: str
) -> None:
    with site.proxy.connect() as client:
        response = client.request("GET", path, host=host)
        assert response.status == 404
        assert response.header("connection") is None
        assert client.request("GET", "/echo/next").status == 200


def test_absolute_form_target_routes_by_its_authority(site: Site) -> None:
    with site.proxy.connect() as client:
        client.send(b"GET http://api.example.com/abs?q=1 HTTP/1.1\r\nHost: ignored.test\r\n\r\n")
        response = client.response()
    assert response.status == 200
    body = response.json()
    assert body["route"] == "exact"
    assert body["path"] == "/abs"
    assert body["query"] == "q=1"


def test_weighted_round_robin_follows_the_weights(site: Site) -> None:
    total = 60
    served: collections.Counter[str] = collections.Counter()
    sequence = []
    with site.proxy.connect() as client:
        for index in range(total):
            response = client.request("GET", f"/weighted/{index}")
            assert response.status == 200
            name = response.json()["backend"]
            served[name] += 1
            sequence.append(name)
    weight_sum = sum(WEIGHTS.values())
    assert served == {name: total * w // weight_sum for name, w in WEIGHTS.items()}
    # Smooth: the light node is never starved for longer than one cycle.
    assert max(len(run) for run in "".join(n[0] for n in sequence).split("l")) <= 3


def test_requests_on_many_connections_share_the_backend_connection(site: Site) -> None:
    for index in range(5):
        assert get(site.proxy, f"/echo/fresh/{index}").status == 200
    if site.transport == "tcp":
        count = established_connections(site.echo.port)
        if count is not None:
            assert count == 1


# ------------------------------------------------------------------ the demo


def fetch(url: str) -> tuple[int, bytes]:
    curl = shutil.which("curl")
    if curl:
        result = subprocess.run(
            [curl, "-sS", "--max-time", "3", "-o", "-", "-w", "\n%{http_code}", url],
            capture_output=True,
            timeout=5,
            check=True,
        )
        body, _, code = result.stdout.rpartition(b"\n")
        return int(code), body
    host_port = url.split("/")[2]
    host, _, port = host_port.rpartition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=3)
    try:
        connection.request("GET", "/" + url.split("/", 3)[3])
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def test_demo_serves_every_transport_and_stops_cleanly_on_sigterm(launcher: Launcher) -> None:
    port = free_port()
    demo = launcher.spawn([*pitcher_command(), "demo", "--listen", f"127.0.0.1:{port}"])

    def listening() -> bool:
        assert demo.alive(), demo.output
        return can_connect(f"tcp://127.0.0.1:{port}")

    wait_until(listening, 5.0, "the demo proxy")
    unix_line = demo.wait_for_line("unix://", stream="stdout")
    socket_path = unix_line.split("unix://", 1)[1].strip()
    for route in ("tcp", "unix", "udp", "zmq"):
        status, body = fetch(f"http://127.0.0.1:{port}/{route}/hello?name=demo")
        assert status == 200, body
        answer = json.loads(body)
        assert answer["path"] == f"/{route}/hello"
        assert answer["query"] == "name=demo"
        assert answer["route"] == route
        assert answer["method"] == "GET"
    # The FastAPI app (the test extra installs FastAPI), served over frames.
    status, body = fetch(f"http://127.0.0.1:{port}/asgi/hello?name=demo")
    assert status == 200, body
    assert json.loads(body) == {"hello": "demo", "served_by": "FastAPI, over Pitcher frames"}
    status, body = fetch(f"http://127.0.0.1:{port}/asgi/items/7?q=x")
    assert (status, json.loads(body)) == (200, {"item_id": 7, "q": "x"})
    status, body = fetch(f"http://127.0.0.1:{port}/asgi/items/-1")
    assert (status, json.loads(body)) == (404, {"detail": "no such item"})
    children = child_pids(demo.pid)

    started = time.monotonic()
    demo.signal(signal.SIGTERM)
    returncode = demo.popen.wait(5.0)
    assert time.monotonic() - started < 3.0
    assert returncode == 0, demo.output
    assert not [pid for pid in children if os.path.exists(f"/proc/{pid}")]
    assert not can_connect(f"tcp://127.0.0.1:{port}")
    # The demo's temporary socket directory goes with it.
    assert not os.path.exists(os.path.dirname(socket_path))


# ------------------------------------------------------------------ shutdown


def test_sigterm_drains_in_flight_requests_then_exits(launcher: Launcher) -> None:
    backend = launcher.test_backend("tcp")
    proxy = launcher.proxy(
        toml_config(
            [{"name": "main", "prefix": "/", "cluster": "main"}], {"main": {"nodes": [backend.uri]}}
        )
    )
    with proxy.connect() as idle, proxy.connect() as busy:
        assert idle.request("GET", "/idle").status == 200
        busy.send(build_request("GET", "/busy?sleep=0.5&mark=busy"))
        launcher.wait_for_mark("busy")
        started = time.monotonic()
        proxy.process.signal(signal.SIGTERM)
        # An idle keep-alive connection is closed at once, without a response.
        assert idle.is_closed(timeout=1.0)
        response = busy.response()
        assert response.status == 200
        assert response.json()["path"] == "/busy"
        assert busy.is_closed()
    assert proxy.process.popen.wait(3.0) == 0
    assert time.monotonic() - started < 2.0
    assert not can_connect(f"tcp://{proxy.host}:{proxy.port}")
    # The last response on a connection the server is about to close says so
    # (RFC 9112 §9.6), so that the client sends nothing more into it.
    assert response.header("connection") == "close"


def test_keepalive_timeout_zero_turns_keep_alive_off(launcher: Launcher) -> None:
    # As nginx's keepalive_timeout 0: the response must say the connection
    # ends, or a client reuses it and races the close.
    echo = launcher.echo_backend("tcp")
    proxy = launcher.proxy(
        toml_config(
            [{"name": "echo", "prefix": "/", "cluster": "echo"}],
            {"echo": {"nodes": [echo.uri]}},
            server={"keepalive_timeout": 0},
        )
    )
    with proxy.connect() as client:
        response = client.request("GET", "/once")
        assert response.status == 200
        assert client.is_closed(timeout=1.0)
        assert response.header("connection") == "close"


# ------------------------------------------------------------------ reload


def test_sighup_reloads_the_config_and_keeps_the_old_one_when_invalid(
    launcher: Launcher,
) -> None:
    echo = launcher.echo_backend("tcp")
    clusters = {"echo": {"nodes": [echo.uri]}}
    proxy = launcher.proxy(
        toml_config([{"name": "a", "prefix": "/a/", "cluster": "echo"}], clusters)
    )
    # A connection opened before the reload is served by the new routes too.
    with proxy.connect() as client:
        assert client.request("GET", "/a/x").status == 200
        assert client.request("GET", "/b/x").status == 404

        with open(proxy.config_path, "w", encoding="utf-8") as file:
            file.write(toml_config([{"name": "b", "prefix": "/b/", "cluster": "echo"}], clusters))
        proxy.process.signal(signal.SIGHUP)
        proxy.process.wait_for_line("generation 2")
        response = client.request("GET", "/b/x")
        assert response.status == 200
        assert response.json()["route"] == "b"
        assert client.request("GET", "/a/x").status == 404

        with open(proxy.config_path, "w", encoding="utf-8") as file:
            file.write('[[routes]]\nprefix = "/c/"\ncluster = "missing"\n')
        proxy.process.signal(signal.SIGHUP)
        line = proxy.process.wait_for_line("reload refused")
        assert "generation 2" in line
        proxy.process.wait_for_line("routes[0].cluster")
        assert client.request("GET", "/b/x").status == 200
    assert proxy.process.alive()
