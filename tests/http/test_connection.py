"""The sans-IO HTTP/1.1 server connection, without a socket: bytes and a clock in, bytes out."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pitcher_rpc.http.connection import (
    CONTINUE,
    LINGER_BYTES,
    LINGER_SECONDS,
    PIPELINE_HIGH,
    PIPELINE_LOW,
    ServerConnection,
)
from pitcher_rpc.http.request import HttpLimits, HttpRequest

_DATE = re.compile(rb"date: [^\r]*\r\n")


def answer(conn: ServerConnection, request: HttpRequest) -> bytes:
    """Answer ``request`` with its method, target and body, as a service would."""
    body = request.method + b" " + request.target + b" " + request.body
    return b"".join(conn.respond(200, b"x-seen: %d\r\n" % len(request.body), body))


def drive(chunks: list[bytes], now: float = 0.0, **options: float) -> tuple[list[bytes], bytes]:
    """Feed ``chunks`` one by one, answering every request as soon as it is handed out.

    Returns what the requests were (method and target) and every byte the
    connection asked to write, dates masked.
    """
    conn = ServerConnection(HttpLimits(max_body_size=1000), **options)
    seen: list[bytes] = []
    out: list[bytes] = []

    def serve(request: HttpRequest | None) -> None:
        while request is not None:
            seen.append(request.method + b" " + request.target)
            out.append(answer(conn, request))
            request = conn.next_request()
        out.extend(conn.outgoing)
        conn.outgoing.clear()

    for chunk in chunks:
        if conn.must_close or conn.half_close:
            break
        serve(conn.receive_data(chunk, now))
    return seen, _DATE.sub(b"date: -\r\n", b"".join(out))


def test_one_request_one_answer() -> None:
    conn = ServerConnection()
    request = conn.receive_data(b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\n\r\n", 1.0)
    assert request is not None
    assert (request.method, request.path, request.query) == (b"GET", b"/a", b"b=1")
    assert conn.active is request
    head, body = conn.respond(200, b"content-type: text/plain\r\n", b"hello")
    assert head.startswith(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ndate: ")
    assert head.endswith(b"content-length: 5\r\n\r\n")
    assert body == b"hello"
    assert conn.active is None
    assert not conn.must_close
    assert conn.next_request() is None


def test_pipelined_requests_are_handed_out_in_order_one_at_a_time() -> None:
    conn = ServerConnection()
    first = conn.receive_data(
        b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /3 HTTP/1.1\r\nHost: x\r\n\r\n",
        0.0,
    )
    assert first is not None and first.path == b"/1"
    assert conn.waiting == 2
    assert conn.next_request() is None, "the second must wait for the first's answer"
    conn.respond(200, b"", b"")
    second = conn.next_request()
    assert second is not None and second.path == b"/2"
    conn.respond(200, b"", b"")
    third = conn.next_request()
    assert third is not None and third.path == b"/3"


def test_http10_gets_keep_alive_only_when_it_asked() -> None:
    conn = ServerConnection()
    conn.receive_data(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", 0.0)
    (head, _) = conn.respond(200, b"", b"ok")
    assert b"connection: keep-alive\r\n" in head
    assert not conn.must_close
    conn.receive_data(b"GET / HTTP/1.0\r\n\r\n", 0.0)
    (head, _) = conn.respond(200, b"", b"ok")
    assert b"connection: close\r\n" in head
    assert conn.must_close


def test_connection_close_ends_after_the_answer() -> None:
    conn = ServerConnection()
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 0.0)
    (head, _) = conn.respond(200, b"", b"ok")
    assert b"connection: close\r\n" in head
    assert conn.must_close
    assert conn.next_request() is None


def test_head_gets_the_length_but_no_body() -> None:
    conn = ServerConnection()
    conn.receive_data(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n", 0.0)
    chunks = conn.respond(200, b"", b"12345")
    assert len(chunks) == 1
    assert b"content-length: 5\r\n" in chunks[0]


@pytest.mark.parametrize("status", [204, 304])
def test_no_content_statuses_have_no_length_and_no_body(status: int) -> None:
    conn = ServerConnection()
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 0.0)
    chunks = conn.respond(status, b"", b"ignored")
    assert len(chunks) == 1
    assert b"content-length" not in chunks[0]


def test_draining_and_no_keepalive_close_after_the_answer() -> None:
    conn = ServerConnection()
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 0.0)
    conn.draining = True
    (head, _) = conn.respond(200, b"", b"ok")
    assert b"connection: close\r\n" in head and conn.must_close
    conn = ServerConnection(keepalive_timeout=0)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 0.0)
    (head, _) = conn.respond(200, b"", b"ok")
    assert b"connection: close\r\n" in head and conn.must_close


def test_error_answer_is_plain_text() -> None:
    conn = ServerConnection()
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 0.0)
    head, body = conn.respond_error(404, "no route", b"retry-after: 1\r\n")
    assert head.startswith(b"HTTP/1.1 404 Not Found\r\ncontent-type: text/plain; charset=utf-8\r\n")
    assert b"retry-after: 1\r\n" in head
    assert body == b"404 Not Found: no route\n"


def test_expect_continue_is_answered_when_nothing_is_ahead() -> None:
    conn = ServerConnection()
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
    assert conn.receive_data(head, 0.0) is None
    assert conn.outgoing == [CONTINUE]
    conn.outgoing.clear()
    request = conn.receive_data(b"abc", 0.0)
    assert request is not None and request.body == b"abc"
    assert conn.outgoing == []


def test_expect_continue_waits_for_the_request_ahead() -> None:
    conn = ServerConnection()
    first = conn.receive_data(
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n",
        0.0,
    )
    assert first is not None
    assert conn.outgoing == [], "100 Continue before the first answer would be out of order"
    conn.respond(200, b"", b"")
    assert conn.next_request() is None
    assert conn.outgoing == [CONTINUE]


def test_no_continue_when_the_body_came_with_the_head() -> None:
    conn = ServerConnection()
    request = conn.receive_data(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\nabc", 0.0
    )
    assert request is not None
    assert conn.outgoing == []


def test_a_refusal_is_answered_in_turn_then_the_connection_lingers() -> None:
    conn = ServerConnection()
    first = conn.receive_data(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\n\r\n", 0.0)
    assert first is not None and first.path == b"/1"
    assert conn.outgoing == [], "the refusal waits for the answer ahead of it"
    assert not conn.wants_read, "nothing more is read from a refused stream"
    conn.respond(200, b"", b"")
    assert conn.next_request() is None
    (refusal,) = conn.outgoing
    assert refusal.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"connection: close\r\n" in refusal
    assert refusal.endswith(b"400 Bad Request: missing Host header\n")
    assert conn.half_close and not conn.must_close
    conn.lingering(10.0)
    assert conn.wants_read, "a lingering connection reads and drops"
    assert conn.receive_data(b"x" * 100, 10.5) is None
    assert not conn.must_close
    conn.check_timeouts(10.0 + LINGER_SECONDS + 0.1)
    assert conn.must_close


def test_lingering_stops_after_enough_bytes() -> None:
    conn = ServerConnection()
    conn.receive_data(b"BAD\r\n\r\n", 0.0)
    assert conn.half_close
    conn.lingering(0.0)
    conn.receive_data(b"x" * LINGER_BYTES, 0.1)
    assert not conn.must_close
    conn.receive_data(b"x", 0.1)
    assert conn.must_close


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 40000 + b"\r\nY: z\r\n", 431),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n", 413),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
    ],
)
def test_refusals_carry_the_parsers_status(data: bytes, status: int) -> None:
    conn = ServerConnection()
    assert conn.receive_data(data, 0.0) is None
    (refusal,) = conn.outgoing
    assert refusal.startswith(b"HTTP/1.1 %d " % status)
    assert conn.half_close


def test_water_marks_pause_and_resume_reading() -> None:
    conn = ServerConnection()
    one = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    assert conn.receive_data(one * (PIPELINE_HIGH + 2), 0.0) is not None
    assert conn.waiting == PIPELINE_HIGH + 1
    assert not conn.wants_read
    while conn.waiting >= PIPELINE_LOW:
        assert not conn.can_resume_read()
        conn.respond(200, b"", b"")
        assert conn.next_request() is not None
    assert conn.can_resume_read()


def test_a_client_that_does_not_read_is_not_read_from() -> None:
    conn = ServerConnection()
    conn.pause_writing()
    assert not conn.wants_read and not conn.can_resume_read()
    conn.resume_writing()
    assert conn.wants_read and conn.can_resume_read()


def test_header_deadline_refuses_with_408() -> None:
    conn = ServerConnection(header_timeout=5.0)
    assert conn.receive_data(b"GET / HTTP/1.1\r\nHo", 100.0) is None
    conn.check_timeouts(104.0)
    assert not conn.outgoing
    conn.receive_data(b"st: x\r\n", 104.5)  # trickling bytes do not reset the deadline
    conn.check_timeouts(105.5)
    (refusal,) = conn.outgoing
    assert refusal.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert conn.half_close


def test_idle_keepalive_connection_closes_after_its_timeout() -> None:
    conn = ServerConnection(keepalive_timeout=2.0, now=0.0)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 1.0)
    conn.check_timeouts(50.0)
    assert not conn.must_close, "a request being answered is not idle"
    conn.respond(200, b"", b"")
    conn.check_timeouts(2.5)
    assert not conn.must_close
    conn.check_timeouts(3.5)
    assert conn.must_close
    assert conn.outgoing == [], "an idle close says nothing"


def test_half_close_after_requests_answers_them_then_closes() -> None:
    conn = ServerConnection()
    first = conn.receive_data(
        b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n", 0.0
    )
    assert first is not None
    assert conn.receive_eof() is True
    conn.respond(200, b"", b"")
    second = conn.next_request()
    assert second is not None and second.path == b"/2"
    conn.respond(200, b"", b"")
    assert conn.next_request() is None
    assert conn.must_close


def test_eof_with_nothing_pending_closes_at_once() -> None:
    conn = ServerConnection()
    assert conn.receive_eof() is False
    assert conn.must_close


def test_drain_closes_only_quiet_connections() -> None:
    conn = ServerConnection(now=0.0)
    conn.receive_data(b"GET / HTTP/1.1\r\n", 1.0)
    assert not conn.close_if_idle(10.0, 0.5), "a request is arriving"
    conn = ServerConnection(now=0.0)
    assert not conn.close_if_idle(0.2, 0.5)
    assert conn.close_if_idle(0.6, 0.5) and conn.must_close


# Any split of the same bytes gives the same requests and the same answers --------------

_STREAM = (
    b"GET /a HTTP/1.1\r\nHost: x\r\nX-One: 1\r\n\r\n"
    b"POST /b?q=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    b"\r\n"  # an empty line between requests, which RFC 9112 §2.2 lets a server skip
    b"PUT /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nTrailer: t\r\n\r\n"
    b"HEAD /d HTTP/1.1\r\nHost: x\r\n\r\n"
    b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\nok"
    b"GET /f HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n"
    b"GET http://y.example/g HTTP/1.1\r\nHost: x\r\n\r\n"
)
_ENDINGS = [
    b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\nGET /ignored HTTP/1.1\r\n\r\n",
    b"GET /bad HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n",
    b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01",
    b"GET /open HTTP/1.1\r\nHost: x\r\n\r\n",
]


def _splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    pieces = []
    start = 0
    for point in [*points, len(data)]:
        pieces.append(data[start:point])
        start = point
    return [piece for piece in pieces if piece]


def _without_continue(output: bytes) -> bytes:
    # Whether 100 Continue is sent depends on whether the body came with the
    # head, which is what splitting changes; everything else must not change.
    return output.replace(CONTINUE, b"")


@pytest.mark.parametrize("ending", _ENDINGS, ids=range(len(_ENDINGS)))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=40))
def test_any_split_gives_the_same_requests_and_answers(ending: bytes, cuts: list[int]) -> None:
    data = _STREAM + ending
    whole = drive([data])
    pieces = drive(_splits(data, cuts))
    byte_by_byte = drive([data[i : i + 1] for i in range(len(data))]) if not cuts else whole
    assert pieces[0] == whole[0]
    assert _without_continue(pieces[1]) == _without_continue(whole[1])
    assert _without_continue(byte_by_byte[1]) == _without_continue(whole[1])


def test_the_stream_itself_is_answered_as_expected() -> None:
    seen, output = drive([_STREAM + _ENDINGS[0]])
    assert seen == [
        b"GET /a",
        b"POST /b?q=1",
        b"PUT /c",
        b"HEAD /d",
        b"POST /e",
        b"GET /f",
        b"OPTIONS *",
        b"GET http://y.example/g",
        b"GET /last",
    ]
    assert output.count(b"HTTP/1.1 200 OK\r\n") == 9
    assert b"PUT /c abcde" in output
    assert b"HEAD /d" not in output, "a HEAD answer has no body"
    assert output.endswith(b"connection: close\r\n\r\nGET /last ")


@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 400), max_size=10))
@settings(max_examples=300, deadline=None)
def test_any_bytes_split_anyhow_give_the_same_result(data: bytes, cuts: list[int]) -> None:
    assert drive(_splits(data, cuts)) == drive([data])


def test_a_finished_connection_leaves_no_garbage_for_the_cyclic_collector() -> None:
    import gc

    gc.collect()
    gc.disable()
    try:
        for _ in range(50):
            conn = ServerConnection()
            conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /", 0.0)
            conn.respond(200, b"", b"ok")
            conn.abandon()
            del conn
        assert gc.collect() == 0
    finally:
        gc.enable()
