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


def drive(
    chunks: list[bytes], now: float = 0.0, stream_over: int = -1, **options: float
) -> tuple[list[bytes], bytes]:
    """Feed ``chunks`` one by one, answering every request as soon as it is handed out.

    A request handed out at its head (a streamed body, see ``stream_over``)
    is answered when its body has ended, with the body it gathered, or with
    the refusal its body met. Returns what the requests were (method and
    target) and every byte the connection asked to write, dates masked.
    """
    conn = ServerConnection(HttpLimits(max_body_size=1000), stream_over=stream_over, **options)
    seen: list[bytes] = []
    out: list[bytes] = []
    gathered: list[bytes] = []

    def serve(request: HttpRequest | None) -> None:
        while request is not None:
            stream = request.body_stream
            if stream is not None:
                if conn.stream is not stream:
                    return  # its turn has not come
                if not gathered:
                    gathered.append(b"")
                    out.append(conn.want_body())
                gathered.extend(stream.take())
                if stream.error is not None:
                    seen.append(request.method + b" " + request.target)
                    out.extend(conn.respond_error(stream.error.status, stream.error.reason))
                    gathered.clear()
                    break
                if not stream.ended:
                    return  # the rest of its body is still to come
                request.body = b"".join(gathered)
                gathered.clear()
            seen.append(request.method + b" " + request.target)
            out.append(answer(conn, request))
            request = conn.next_request()
        out.extend(conn.outgoing)
        conn.outgoing.clear()

    for chunk in chunks:
        if conn.must_close or conn.half_close:
            break
        request = conn.receive_data(chunk, now)
        serve(request or conn.active)
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


# -- body deadlines ------------------------------------------------------------------

_POST_HEAD = b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n"
_CHUNKED_HEAD = b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


def body_limits(timeout: float = 1.0, deadline: float = 5.0) -> HttpLimits:
    return HttpLimits(body_timeout=timeout, body_deadline=deadline)


def refusal_status(conn: ServerConnection) -> int | None:
    """The status of the refusal the connection asks to write, if any."""
    if not conn.outgoing:
        return None
    (refusal,) = conn.outgoing
    assert conn.half_close
    assert b"connection: close\r\n" in refusal
    return int(refusal[9:12])


def test_limits_take_body_times() -> None:
    conn = ServerConnection(HttpLimits(body_timeout=2.5, body_deadline=0.0))
    assert (conn.body_timeout, conn.body_deadline) == (2.5, 0.0)
    for bad in ({"body_timeout": 0.0}, {"body_timeout": -1.0}, {"body_deadline": -0.5}):
        with pytest.raises(ValueError, match="body_"):
            HttpLimits(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="body_timeout"):
        HttpLimits(body_timeout=float("nan"))


@pytest.mark.parametrize("head", [_POST_HEAD, _CHUNKED_HEAD], ids=["length", "chunked"])
def test_a_body_that_pauses_longer_than_body_timeout_gets_408(head: bytes) -> None:
    conn = ServerConnection(body_limits(timeout=1.0), header_timeout=60.0)
    first = b"abc" if head is _POST_HEAD else b"3\r\nabc\r\n"
    assert conn.receive_data(head + first, 100.0) is None
    conn.check_timeouts(100.9)
    assert refusal_status(conn) is None
    assert conn.receive_data(first[:1], 100.9) is None  # a read restarts the pause
    conn.check_timeouts(101.8)
    assert refusal_status(conn) is None
    conn.check_timeouts(102.0)
    assert refusal_status(conn) == 408
    assert conn.outgoing[0].endswith(b"408 Request Timeout: request body paused too long\n")


def test_the_wait_for_the_first_body_byte_counts_as_a_pause() -> None:
    conn = ServerConnection(body_limits(timeout=1.0), header_timeout=60.0)
    conn.receive_data(_POST_HEAD[:-2], 0.0)  # the head is not complete: the header deadline
    conn.check_timeouts(30.0)
    assert refusal_status(conn) is None
    conn.receive_data(b"\r\n", 30.0)
    conn.check_timeouts(31.1)
    assert refusal_status(conn) == 408


@pytest.mark.parametrize("head", [_POST_HEAD, _CHUNKED_HEAD], ids=["length", "chunked"])
def test_a_trickled_body_gets_408_at_body_deadline(head: bytes) -> None:
    # One byte every half second never pauses for body_timeout; the whole body is late.
    conn = ServerConnection(body_limits(timeout=1.0, deadline=3.0), header_timeout=60.0)
    body = b"0123456789" if head is _POST_HEAD else b"a\r\n0123456789\r\n0\r\n\r\n"
    conn.receive_data(head[:10], 0.0)  # the head's time is not the body's
    conn.receive_data(head[10:], 5.0)
    now = 5.0
    for byte in body[:6]:
        now += 0.5
        conn.check_timeouts(now)
        assert refusal_status(conn) is None, now
        conn.receive_data(bytes([byte]), now)
    conn.check_timeouts(8.1)
    assert refusal_status(conn) == 408
    assert conn.outgoing[0].endswith(b"request body not received in time\n")


def test_body_deadline_zero_is_no_limit() -> None:
    conn = ServerConnection(body_limits(timeout=1.0, deadline=0.0))
    conn.receive_data(_POST_HEAD, 0.0)
    request = None
    now = 0.0
    for byte in b"0123456789":  # 9 s in all: body_limits' default deadline would say 408
        now += 0.9
        conn.check_timeouts(now)
        assert refusal_status(conn) is None
        request = conn.receive_data(bytes([byte]), now) or request
    assert request is not None and request.body == b"0123456789"


def test_a_timely_body_is_untouched() -> None:
    conn = ServerConnection(body_limits(timeout=1.0, deadline=2.0))
    conn.receive_data(_POST_HEAD + b"01234", 0.0)
    conn.check_timeouts(0.9)
    request = conn.receive_data(b"56789", 1.9)
    assert request is not None and request.body == b"0123456789"
    conn.check_timeouts(2.5)
    assert refusal_status(conn) is None and not conn.must_close


def test_a_pipelined_bodys_deadlines_count_from_the_answer_ahead_of_it() -> None:
    conn = ServerConnection(body_limits(timeout=1.0, deadline=3.0), header_timeout=60.0)
    first = conn.receive_data(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n" + _POST_HEAD + b"ab", 0.0)
    assert first is not None
    conn.check_timeouts(50.0)
    assert refusal_status(conn) is None, "not its turn: the request ahead is being answered"
    conn.respond(200, b"", b"", 50.0)
    assert conn.next_request() is None
    conn.check_timeouts(50.9)
    assert refusal_status(conn) is None
    conn.check_timeouts(51.1)
    assert refusal_status(conn) == 408


def test_a_pipelined_body_trickled_behind_an_answer_gets_408_at_its_deadline() -> None:
    conn = ServerConnection(body_limits(timeout=1.0, deadline=2.0), header_timeout=60.0)
    first = conn.receive_data(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n", 0.0)
    assert first is not None
    conn.receive_data(_POST_HEAD, 0.1)  # the next head arrives while /1 is answered
    conn.respond(200, b"", b"", 0.2)
    for step in range(1, 5):
        conn.check_timeouts(0.2 + step * 0.5)
        assert refusal_status(conn) is None
        conn.receive_data(b"x", 0.2 + step * 0.5)
    conn.check_timeouts(2.3)
    assert refusal_status(conn) == 408


def test_a_body_that_came_with_its_head_in_the_read_completing_another_is_timed() -> None:
    conn = ServerConnection(body_limits(timeout=1.0), header_timeout=60.0)
    first = conn.receive_data(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n", 0.0)
    assert first is not None
    conn.respond(200, b"", b"", 0.0)
    assert conn.receive_data(_POST_HEAD[:10], 0.5) is None
    request = conn.receive_data(_POST_HEAD[10:] + b"0123456789" + _POST_HEAD + b"abc", 0.6)
    assert request is not None and request.body == b"0123456789"
    conn.respond(200, b"", b"")
    conn.check_timeouts(1.5)
    assert refusal_status(conn) is None
    conn.check_timeouts(1.7)
    assert refusal_status(conn) == 408


def test_a_body_behind_100_continue_is_timed_from_the_interim_answer() -> None:
    conn = ServerConnection(body_limits(timeout=1.0), header_timeout=60.0)
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
    conn.receive_data(head, 0.0)
    assert conn.outgoing == [CONTINUE]
    conn.outgoing.clear()
    conn.check_timeouts(1.1)
    assert refusal_status(conn) == 408


def test_request_timeout_still_bounds_the_whole_request() -> None:
    # The admin API's rule: the whole request within request_timeout, body included.
    conn = ServerConnection(body_limits(timeout=5.0), header_timeout=3.0, request_timeout=3.0)
    conn.receive_data(_POST_HEAD, 0.0)
    for now in (1.0, 2.0, 3.0):
        conn.receive_data(b"x", now)
    conn.check_timeouts(3.1)
    assert refusal_status(conn) == 408


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
    b"GET /empty-host HTTP/1.1\r\nHost:\r\n\r\n",
    b"GET http://u@y.example/userinfo HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /bad-v6 HTTP/1.1\r\nHost: [1:2:3]\r\n\r\n",
    b"OPTIONS http://y.example HTTP/1.0\r\n\r\n",
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


@pytest.mark.parametrize("stream_over", [-1, 0, 3], ids=["whole", "stream-all", "stream-over-3"])
@pytest.mark.parametrize("ending", _ENDINGS, ids=range(len(_ENDINGS)))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=40))
def test_any_split_gives_the_same_requests_and_answers(
    ending: bytes, stream_over: int, cuts: list[int]
) -> None:
    # Streamed or not (a body whose head came in an earlier read than its
    # end is handed out at the head), the requests and answers are the same.
    data = _STREAM + ending
    whole = drive([data])
    pieces = drive(_splits(data, cuts), stream_over=stream_over)
    byte_by_byte = (
        drive([data[i : i + 1] for i in range(len(data))], stream_over=stream_over)
        if not cuts
        else whole
    )
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
    streamed = drive(_splits(data, cuts), stream_over=0)
    assert (streamed[0], _without_continue(streamed[1])) == drive([data])


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


# The deadlines hold whatever the split and the pace -------------------------------------

# (head, body) of each request of a stream, so that a model knows where each
# request's head and body begin and end.
_TIMED_REQUESTS = [
    (b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", b""),
    (b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\n\r\n", b"1234567"),
    (
        b"PUT /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"3;e=1\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\n",
    ),
    (b"HEAD /d HTTP/1.1\r\nHost: x\r\n\r\n", b""),
    (b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n", b"ok"),
    (b"GET http://y.example/f HTTP/1.1\r\nHost: x\r\n\r\n", b""),
    (b"POST /g HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 3\r\n\r\n", b"xyz"),
]
_HEADER_TIMEOUT = 3.0
_BODY_TIMEOUT = 1.0
_BODY_DEADLINE = 2.5


class _Span:
    __slots__ = ("body_starts", "end", "start", "target")

    def __init__(self, start: int, body_starts: int, end: int, target: bytes) -> None:
        self.start = start
        self.body_starts = body_starts
        self.end = end
        self.target = target


def _timed_stream() -> tuple[bytes, list[_Span]]:
    spans = []
    offset = 0
    for head, body in _TIMED_REQUESTS:
        target = head.split(b" HTTP/")[0]
        spans.append(_Span(offset, offset + len(head), offset + len(head) + len(body), target))
        offset += len(head) + len(body)
    return b"".join(head + body for head, body in _TIMED_REQUESTS), spans


def _drive_timed(
    pieces: list[tuple[float, bytes]], stream_over: int = -1
) -> tuple[list[bytes], int | None]:
    """Feed each piece at its time, checking the deadlines first; answer requests at once.

    A streamed request (``stream_over``) is answered once its body has ended;
    a refusal of its body is read from its stream.
    """
    conn = ServerConnection(
        HttpLimits(body_timeout=_BODY_TIMEOUT, body_deadline=_BODY_DEADLINE),
        header_timeout=_HEADER_TIMEOUT,
        keepalive_timeout=1e9,
        stream_over=stream_over,
    )
    seen: list[bytes] = []
    for now, piece in pieces:
        conn.check_timeouts(now)
        if conn.outgoing:
            (refusal,) = conn.outgoing
            return seen, int(refusal[9:12])
        if conn.stream is not None and conn.stream.error is not None:
            return seen, conn.stream.error.status
        request = conn.receive_data(piece, now) or conn.active
        while request is not None:
            stream = request.body_stream
            if stream is not None:
                stream.take()
                if not stream.ended:
                    break
            seen.append(request.method + b" " + request.target)
            conn.respond(200, b"", b"", now)
            request = conn.next_request()
        assert conn.outgoing in ([], [CONTINUE]), conn.outgoing
        conn.outgoing.clear()
    return seen, None


def _expected(spans: list[_Span], pieces: list[tuple[float, bytes]]) -> tuple[list[bytes], int]:
    """What the deadlines say, from where each request's bytes fall among the pieces."""
    arrival: list[float] = []  # the time of each byte's read
    for now, piece in pieces:
        arrival += [now] * len(piece)
    consumed = 0
    last_read = 0.0
    for now, piece in pieces:
        for span in spans:
            if span.start < consumed < span.end:
                if consumed < span.body_starts:
                    late = now - arrival[span.start] > _HEADER_TIMEOUT
                else:
                    head_done = arrival[span.body_starts - 1]
                    late = (
                        now - last_read > _BODY_TIMEOUT or now - head_done > _BODY_DEADLINE
                    ) and span.end > span.body_starts
                if late:
                    done = [s.target for s in spans if s.end <= consumed]
                    return done, 408
        consumed += len(piece)
        last_read = now
    return [span.target for span in spans], 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=30),
    gaps=st.lists(st.sampled_from([0.0, 0.3, 0.9, 1.2, 2.0, 3.5]), min_size=31, max_size=31),
)
def test_deadlines_hold_however_the_bytes_are_split_and_paced(
    cuts: list[int], gaps: list[float]
) -> None:
    stream, spans = _timed_stream()
    pieces = []
    now = 0.0
    for gap, piece in zip(gaps, _splits(stream, cuts), strict=False):
        now += gap
        pieces.append((now, piece))
    expected_seen, expected_status = _expected(spans, pieces)
    seen, status = _drive_timed(pieces)
    assert (seen, status or 0) == (expected_seen, expected_status)
    # The same deadlines when every body is streamed (handed out at its head).
    seen, status = _drive_timed(pieces, stream_over=0)
    assert (seen, status or 0) == (expected_seen, expected_status)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=30))
def test_a_timely_client_is_never_refused(cuts: list[int]) -> None:
    # The whole stream within 2 s, whole, in pieces and byte by byte: no pause reaches
    # body_timeout, no head header_timeout, no body body_deadline.
    stream, spans = _timed_stream()
    everything = ([span.target for span in spans], None)
    assert _drive_timed([(0.0, stream)]) == everything
    pieces = _splits(stream, cuts)
    assert _drive_timed([(i * 2.0 / len(pieces), p) for i, p in enumerate(pieces)]) == everything
    single = [stream[i : i + 1] for i in range(len(stream))]
    assert _drive_timed([(i * 2.0 / len(single), p) for i, p in enumerate(single)]) == everything


def test_a_stall_anywhere_in_a_body_is_408_and_nowhere_else() -> None:
    # Byte by byte with no wait, then a stall of body_timeout and a little more at every
    # offset in turn: 408 exactly where a body (not a head, not between requests) is arriving.
    stream, spans = _timed_stream()
    for cut in range(1, len(stream)):
        pieces = [(0.0, stream[i : i + 1]) for i in range(cut)] + [(_BODY_TIMEOUT + 0.1, b"")]
        in_body = any(
            span.body_starts <= cut < span.end and span.end > span.body_starts for span in spans
        )
        for stream_over in (-1, 0):
            seen, status = _drive_timed(pieces, stream_over)
            assert status == (408 if in_body else None), (cut, stream_over)
            assert seen == [span.target for span in spans if span.end <= cut], (cut, stream_over)
