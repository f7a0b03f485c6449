"""Malformed, oversized and slow requests sent through a running proxy.

Every refusal must carry the status the request earns and then close the
connection: after a framing error the proxy cannot know where the next
request would start, so it must not try (RFC 9112 §9.6, §11.2).
"""

from __future__ import annotations

import contextlib
import select
import socket
import time

import pytest

from tests.proxy.conftest import Launcher, Proxy, RawClient, build_request, toml_config

HEADER_TIMEOUT = 0.5
BODY_TIMEOUT = 0.5
KEEPALIVE_TIMEOUT = 0.6
MAX_BODY = 64
MAX_REQUEST_LINE = 256
MAX_HEADER_SIZE = 512
MAX_HEADERS = 10


@pytest.fixture(scope="module")
def proxy(module_launcher: Launcher) -> Proxy:
    echo = module_launcher.echo_backend("tcp")
    return module_launcher.proxy(
        toml_config(
            [{"name": "echo", "prefix": "/", "cluster": "echo"}],
            {"echo": {"nodes": [echo.uri]}},
            server={
                "header_timeout": HEADER_TIMEOUT,
                "body_timeout": BODY_TIMEOUT,
                "keepalive_timeout": KEEPALIVE_TIMEOUT,
                "max_body_size": MAX_BODY,
                "max_request_line": MAX_REQUEST_LINE,
                "max_header_size": MAX_HEADER_SIZE,
                "max_headers": MAX_HEADERS,
            },
        )
    )


def head(*lines: str, request_line: str = "GET /x HTTP/1.1") -> bytes:
    return ("\r\n".join((request_line, *lines)) + "\r\n\r\n").encode("latin-1")


BAD_REQUESTS = {
    "content-length-and-transfer-encoding": (
        head(
            "Host: x",
            "Content-Length: 5",
            "Transfer-Encoding: chunked",
            request_line="POST / HTTP/1.1",
        )
        + b"0\r\n\r\n",
        400,
    ),
    "duplicate-content-length": (
        head("Host: x", "Content-Length: 3", "Content-Length: 3", request_line="POST / HTTP/1.1")
        + b"abc",
        400,
    ),
    "content-length-list": (
        head("Host: x", "Content-Length: 3, 3", request_line="POST / HTTP/1.1") + b"abc",
        400,
    ),
    "non-numeric-content-length": (
        head("Host: x", "Content-Length: abc", request_line="POST / HTTP/1.1"),
        400,
    ),
    "negative-content-length": (
        head("Host: x", "Content-Length: -1", request_line="POST / HTTP/1.1"),
        400,
    ),
    "unknown-transfer-coding": (
        head("Host: x", "Transfer-Encoding: gzip, chunked", request_line="POST / HTTP/1.1")
        + b"0\r\n\r\n",
        501,
    ),
    "chunked-not-last": (
        head("Host: x", "Transfer-Encoding: chunked, gzip", request_line="POST / HTTP/1.1"),
        400,
    ),
    "transfer-encoding-on-http-1.0": (
        head("Transfer-Encoding: chunked", request_line="POST / HTTP/1.0") + b"0\r\n\r\n",
        400,
    ),
    "missing-host": (head("Accept: */*"), 400),
    "duplicate-host": (head("Host: a.test", "Host: b.test"), 400),
    "invalid-host": (head("Host: a b"), 400),
    "empty-host": (head("Host:"), 400),
    "empty-host-on-http-1.0": (head("Host:", request_line="GET / HTTP/1.0"), 400),
    "host-not-an-ipv6-address": (head("Host: [1:2:3]"), 400),
    "empty-authority-in-absolute-form": (
        head("Host: x", request_line="GET http:///x HTTP/1.1"),
        400,
    ),
    "header-name-with-space": (head("Host: x", "Bad Name: 1"), 400),
    "header-name-with-at-sign": (head("Host: x", "Bad@Name: 1"), 400),
    "space-before-colon": (head("Host: x", "X-A : 1"), 400),
    "control-char-in-value": (head("Host: x", "X-A: a\x01b"), 400),
    "nul-in-value": (head("Host: x", "X-A: a\x00b"), 400),
    "obs-fold": (head("Host: x", "X-A: first", "  folded"), 400),
    "bare-lf": (b"GET / HTTP/1.1\nHost: x\n\n", 400),
    "fragment-in-target": (head("Host: x", request_line="GET /a#frag HTTP/1.1"), 400),
    "bad-percent-escape": (head("Host: x", request_line="GET /a%zz HTTP/1.1"), 400),
    "userinfo-in-absolute-form": (
        head("Host: x", request_line="GET http://user@x/ HTTP/1.1"),
        400,
    ),
    "connect": (head("Host: x:443", request_line="CONNECT x:443 HTTP/1.1"), 501),
    "http-2-preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    "http-1.2": (head("Host: x", request_line="GET / HTTP/1.2"), 505),
    "unknown-expectation": (head("Host: x", "Expect: teapot"), 417),
    "oversize-request-line": (
        head("Host: x", request_line=f"GET /{'a' * MAX_REQUEST_LINE} HTTP/1.1"),
        414,
    ),
    "too-many-headers": (
        head("Host: x", *(f"X-H{i}: {i}" for i in range(MAX_HEADERS))),
        431,
    ),
    "header-section-too-large": (head("Host: x", f"X-Big: {'b' * MAX_HEADER_SIZE}"), 431),
    "oversize-body-by-content-length": (
        head("Host: x", f"Content-Length: {MAX_BODY + 1}", request_line="POST / HTTP/1.1")
        + b"z" * (MAX_BODY + 1),
        413,
    ),
    "oversize-chunked-body": (
        head("Host: x", "Transfer-Encoding: chunked", request_line="POST / HTTP/1.1")
        + b"%x\r\n%s\r\n0\r\n\r\n" % (MAX_BODY + 1, b"z" * (MAX_BODY + 1)),
        413,
    ),
    "bad-chunk-size": (
        head("Host: x", "Transfer-Encoding: chunked", request_line="POST / HTTP/1.1")
        + b"xyz\r\nabc\r\n0\r\n\r\n",
        400,
    ),
}


def assert_refused_and_closed(client: RawClient, status: int) -> None:
    response = client.response()
    assert response.status == status, response.body
    assert response.header("connection") == "close"
    assert response.body.startswith(f"{status} ".encode())
    assert client.is_closed(), "the connection stayed open after a refusal"


@pytest.mark.parametrize(("raw", "status"), BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_request_is_refused_and_the_connection_closed(
    proxy: Proxy, raw: bytes, status: int
) -> None:
    with proxy.connect() as client:
        client.send(raw)
        assert_refused_and_closed(client, status)


@pytest.mark.parametrize(("raw", "status"), BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_request_sent_byte_by_byte_gets_the_same_answer(
    proxy: Proxy, raw: bytes, status: int
) -> None:
    # Limits and checks must hold however the bytes are split across reads.
    with proxy.connect() as client:
        try:
            for index in range(0, len(raw), 7):
                client.send(raw[index : index + 7])
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before everything was sent: the answer is what counts
        assert_refused_and_closed(client, status)


def test_limits_are_not_refusals_just_below_them(proxy: Proxy) -> None:
    body = b"y" * MAX_BODY
    headers = [(f"X-H{i}", str(i)) for i in range(MAX_HEADERS - 2)]
    with proxy.connect() as client:
        response = client.request("POST", "/fits", headers, body=body)
        assert response.status == 200
        assert response.json()["body"] == body.decode()
        assert not client.is_closed(timeout=0.05)


def test_pipelined_good_request_then_bad_one_get_answers_in_order(proxy: Proxy) -> None:
    with proxy.connect() as client:
        client.send(
            build_request("GET", "/first?sleep=0.05")
            + build_request("GET", "/second")
            + b"GET /third HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\n\r\n"
            + build_request("GET", "/never")
        )
        first = client.response()
        assert first.status == 200
        assert first.json()["path"] == "/first"
        second = client.response()
        assert second.status == 200
        assert second.json()["path"] == "/second"
        assert_refused_and_closed(client, 400)


def test_good_request_then_bad_one_in_separate_sends(proxy: Proxy) -> None:
    with proxy.connect() as client:
        assert client.request("GET", "/ok").status == 200
        client.send(head(request_line="GET /no-host HTTP/1.1"))
        assert_refused_and_closed(client, 400)


def test_slow_request_head_gets_408(proxy: Proxy) -> None:
    with proxy.connect() as client:
        client.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        response = client.response()
        elapsed = time.monotonic() - started
        assert response.status == 408
        assert response.header("connection") == "close"
        assert HEADER_TIMEOUT * 0.8 <= elapsed < HEADER_TIMEOUT + 1.0
        assert client.is_closed()


def test_trickled_request_head_still_gets_408(proxy: Proxy) -> None:
    # A byte now and then must not reset the clock (slowloris).
    with proxy.connect() as client:
        client.send(b"GET /trickle HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while time.monotonic() - started < HEADER_TIMEOUT + 1.5:
                readable, _, _ = select.select([client.sock], [], [], HEADER_TIMEOUT / 5)
                if readable:
                    break
                client.send(b"X")
        response = client.response()
        assert response.status == 408
        assert time.monotonic() - started < HEADER_TIMEOUT + 1.0


def test_slow_body_gets_408(proxy: Proxy) -> None:
    with proxy.connect() as client:
        client.send(head("Host: x", "Content-Length: 10", request_line="POST /slow-body HTTP/1.1"))
        client.send(b"abc")
        started = time.monotonic()
        response = client.response()
        assert response.status == 408
        assert time.monotonic() - started < BODY_TIMEOUT + 1.0
        assert client.is_closed()


def test_idle_keep_alive_connection_is_closed_silently(proxy: Proxy) -> None:
    with proxy.connect() as client:
        assert client.request("GET", "/before-idle").status == 200
        started = time.monotonic()
        assert client.is_closed(timeout=KEEPALIVE_TIMEOUT + 1.5)
        elapsed = time.monotonic() - started
        assert KEEPALIVE_TIMEOUT * 0.8 <= elapsed < KEEPALIVE_TIMEOUT + 1.0
        assert client.buffer == b""


def test_connection_that_never_sends_is_closed_silently(proxy: Proxy) -> None:
    with proxy.connect() as client:
        started = time.monotonic()
        assert client.is_closed(timeout=KEEPALIVE_TIMEOUT + 1.5)
        assert time.monotonic() - started < KEEPALIVE_TIMEOUT + 1.0
        assert client.buffer == b""


def test_blank_lines_between_requests_do_not_start_a_request(proxy: Proxy) -> None:
    # RFC 9112 §2.2 lets a server skip them; they must not turn an idle close into a 408.
    with proxy.connect() as client:
        assert client.request("GET", "/one").status == 200
        client.send(b"\r\n")
        assert client.request("GET", "/two").json()["path"] == "/two"


def test_expect_100_continue_gets_an_interim_response(proxy: Proxy) -> None:
    with proxy.connect() as client:
        client.send(
            head(
                "Host: x",
                "Content-Length: 5",
                "Expect: 100-continue",
                request_line="POST /continue HTTP/1.1",
            )
        )
        interim = client.response()
        assert interim.status == 100
        client.send(b"hello")
        final = client.response()
        assert final.status == 200
        assert final.json()["body"] == "hello"


def test_expect_100_continue_with_oversize_body_gets_413_without_100(proxy: Proxy) -> None:
    with proxy.connect() as client:
        client.send(
            head(
                "Host: x",
                f"Content-Length: {MAX_BODY * 10}",
                "Expect: 100-continue",
                request_line="POST /too-big HTTP/1.1",
            )
        )
        assert_refused_and_closed(client, 413)


def test_proxy_survives_the_abuse(proxy: Proxy) -> None:
    assert proxy.process.alive()
    with proxy.connect() as client:
        assert client.request("GET", "/still-here").status == 200


def test_a_refusal_survives_a_client_that_keeps_sending(proxy: Proxy) -> None:
    # The client is still sending its body after the proxy has refused it.
    # Had the proxy closed at once, those bytes would meet a closed socket and
    # draw a reset, and Linux then drops what the client had received but not
    # yet read: the 413 itself. The proxy half-closes and goes on reading.
    with proxy.connect() as client:
        client.send(
            head("Host: x", "Content-Length: 100000", request_line="POST /big HTTP/1.1")
            + b"z" * 100
        )
        time.sleep(0.2)  # the proxy has refused the request by now
        client.send(b"z" * 65536)
        time.sleep(0.2)  # a reset, if one came, has arrived by now
        client.sock.shutdown(socket.SHUT_WR)
        assert_refused_and_closed(client, 413)
