"""Streamed bodies in the sans-IO connection: request bodies handed out at the head, answers
sent piece by piece. No socket: bytes and a clock in, bytes out."""

from __future__ import annotations

import re

import pytest

from pitcher_rpc.http.connection import CONTINUE, STREAM_BUFFER_HIGH, ServerConnection
from pitcher_rpc.http.request import HttpLimits

_DATE = re.compile(rb"date: [^\r]*\r\n")
_CHUNKED_HEAD = b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


def _connection(
    stream_over: int = 16, max_body_size: int = 1000, **options: float
) -> ServerConnection:
    return ServerConnection(
        HttpLimits(max_body_size=max_body_size, body_timeout=1.0, body_deadline=5.0),
        stream_over=stream_over,
        keepalive_timeout=60.0,
        **options,
    )


def _masked(data: bytes | list[bytes]) -> bytes:
    joined = data if isinstance(data, bytes) else b"".join(data)
    return _DATE.sub(b"", joined)


# Streamed request bodies -----------------------------------------------------------------


def test_a_large_body_is_handed_out_at_its_head_then_arrives_piece_by_piece() -> None:
    conn = _connection()
    request = conn.receive_data(
        b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n" + b"a" * 10, 0.0
    )
    assert request is not None and request.body_stream is not None
    assert request.body == b"" and request.content_length == 40
    stream = conn.stream
    assert stream is request.body_stream
    assert stream.take() == [b"a" * 10]
    assert conn.receive_data(b"b" * 20, 0.1) is None
    assert stream.take() == [b"b" * 20] and not stream.ended
    conn.receive_data(b"c" * 10 + b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n", 0.2)
    assert stream.ended and stream.take() == [b"c" * 10] and stream.received == 40
    assert conn.waiting == 1, "the next request waits for this answer"
    head = b"".join(conn.respond(200, b"", b"ok", 0.3))
    assert b"connection: close" not in head, "a body that ended keeps the connection"
    following = conn.next_request()
    assert following is not None and following.path == b"/next"
    assert following.body_stream is None and conn.stream is None


def test_small_bodies_and_bodies_complete_with_their_head_are_handed_out_whole() -> None:
    conn = _connection(stream_over=16)
    small = conn.receive_data(
        b"POST /s HTTP/1.1\r\nHost: x\r\nContent-Length: 16\r\n\r\n" + b"s" * 16, 0
    )
    assert small is not None and small.body_stream is None and small.body == b"s" * 16
    conn.respond(200, b"", b"")
    # Chunked, and over the threshold, but whole in the read that carried the head.
    whole = conn.receive_data(_CHUNKED_HEAD + b"14\r\n" + b"w" * 20 + b"\r\n0\r\n\r\n", 1)
    assert whole is not None and whole.body_stream is None and whole.body == b"w" * 20
    assert conn.stream is None and not conn.parser.in_request


def test_a_negative_threshold_never_streams() -> None:
    conn = ServerConnection(HttpLimits(max_body_size=1 << 20))
    assert conn.receive_data(_CHUNKED_HEAD + b"5\r\nhello\r\n", 0) is None
    request = conn.receive_data(b"0\r\n\r\n", 0)
    assert request is not None and request.body == b"hello" and request.body_stream is None


def test_max_body_size_bounds_a_streamed_body_as_a_total() -> None:
    conn = _connection(max_body_size=100)
    request = conn.receive_data(_CHUNKED_HEAD, 0)
    assert request is not None and conn.stream is not None
    for _ in range(3):
        conn.receive_data(b"20\r\n" + b"x" * 32 + b"\r\n", 0)
    stream = conn.stream
    assert stream.error is None and stream.received == 96
    conn.receive_data(b"20\r\n" + b"x" * 32 + b"\r\n", 0)
    assert stream.error is not None and stream.error.status == 413
    assert not conn.outgoing, "the request is answered by its owner, not by a queued refusal"
    assert not conn.wants_read
    answer = _masked(conn.respond_error(413, stream.error.reason))
    assert answer.startswith(b"HTTP/1.1 413 ") and b"connection: close\r\n" in answer
    assert conn.half_close, "the client may still be sending: lingering close"
    assert conn.next_request() is None and not conn.outgoing


def test_a_refusal_in_a_body_whose_head_came_in_the_same_read_reaches_its_request() -> None:
    conn = _connection(max_body_size=10)
    request = conn.receive_data(_CHUNKED_HEAD + b"20\r\n" + b"x" * 20, 0)
    assert request is not None and request.body_stream is not None
    assert request.body_stream.error is not None and request.body_stream.error.status == 413
    assert not conn.outgoing


def test_a_bad_chunk_inside_a_streamed_body_is_its_error() -> None:
    conn = _connection()
    conn.receive_data(_CHUNKED_HEAD, 0)
    conn.receive_data(b"5\r\nhello\r\n", 0)
    conn.receive_data(b"zz\r\n", 0)
    assert conn.stream is not None and conn.stream.error is not None
    assert conn.stream.error.status == 400 and conn.stream.take() == [b"hello"]


def test_expect_continue_goes_out_when_the_owner_wants_the_body() -> None:
    conn = _connection()
    request = conn.receive_data(
        b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\nExpect: 100-continue\r\n\r\n", 0
    )
    assert request is not None and request.body_stream is not None
    assert not conn.outgoing, "not before the owner asks for the body"
    assert conn.want_body() == CONTINUE
    assert conn.want_body() == b"", "once"


def test_expect_continue_is_not_sent_once_the_body_started_or_if_never_wanted() -> None:
    conn = _connection()
    conn.receive_data(
        b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\nExpect: 100-continue\r\n\r\n", 0
    )
    conn.receive_data(b"x", 0)
    assert conn.want_body() == b""
    conn = _connection()
    conn.receive_data(
        b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\nExpect: 100-continue\r\n\r\n", 0
    )
    # Answered (a 404, a module's 429) without asking for the body: no 100, and the
    # connection closes after the answer (RFC 9110 §10.1.1).
    answer = _masked(conn.respond_error(404, "no route"))
    assert CONTINUE not in answer and b"connection: close" in answer
    assert conn.half_close and not conn.outgoing


def test_a_streamed_request_behind_another_waits_unread_until_its_turn() -> None:
    conn = _connection()
    first = conn.receive_data(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", 0)
    assert first is not None
    conn.receive_data(
        b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\nExpect: 100-continue\r\n\r\n"
        + b"y" * 5,
        0.1,
    )
    assert conn.waiting == 1 and conn.stream is None
    assert not conn.wants_read, "its body is not read while its turn has not come"
    assert not conn.outgoing, "no 100 Continue for a request that is not being served"
    conn.respond(200, b"", b"a", 2.0)
    second = conn.next_request()
    assert second is not None and conn.stream is second.body_stream
    assert conn.can_resume_read() and conn.wants_read
    assert conn.want_body() == b"", "a body byte came already: the client is sending"
    assert conn.stream.take() == [b"y" * 5]
    conn.check_timeouts(2.9)
    assert conn.stream.error is None, "its body's clock counts from the answer ahead"
    conn.check_timeouts(3.1)
    assert conn.stream.error is not None and conn.stream.error.status == 408


def test_reading_stops_while_the_owner_holds_the_body_back() -> None:
    conn = _connection()
    conn.receive_data(_CHUNKED_HEAD, 0)
    assert conn.wants_read
    conn.pause_body(0.5)
    assert not conn.wants_read and not conn.can_resume_read()
    conn.check_timeouts(30.0)
    assert conn.stream is not None and conn.stream.error is None, "a pause of ours is not late"
    conn.resume_body(30.0)
    assert conn.wants_read and conn.can_resume_read()
    conn.check_timeouts(30.9)
    assert conn.stream.error is None
    conn.check_timeouts(31.1)
    assert (
        conn.stream.error is not None and conn.stream.error.reason == "request body paused too long"
    )


def test_the_body_deadline_leaves_out_the_time_held_back() -> None:
    conn = _connection()
    conn.receive_data(_CHUNKED_HEAD, 0)
    for step in range(1, 5):
        conn.receive_data(b"1\r\nx\r\n", step * 0.9)
    conn.pause_body(3.6)
    conn.resume_body(13.6)  # ten seconds held back: the deadline moves by as much
    conn.receive_data(b"1\r\nx\r\n", 14.5)
    conn.check_timeouts(14.9)
    assert conn.stream is not None and conn.stream.error is None
    conn.receive_data(b"1\r\nx\r\n", 15.4)
    conn.check_timeouts(15.1 + 0.1)
    assert conn.stream.error is not None
    assert conn.stream.error.reason == "request body not received in time"


def test_pieces_not_taken_stop_reading_beyond_the_high_mark() -> None:
    conn = _connection(max_body_size=1 << 22)
    conn.receive_data(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 4000000\r\n\r\n", 0)
    conn.receive_data(b"z" * (STREAM_BUFFER_HIGH - 1), 0)
    assert conn.wants_read
    conn.receive_data(b"z", 0)
    assert not conn.wants_read
    conn.check_timeouts(50.0)
    assert conn.stream is not None and conn.stream.error is None, "not the client's doing"
    conn.stream.take()
    assert conn.can_resume_read()


def test_the_client_closing_inside_a_streamed_body_is_an_error_on_it() -> None:
    conn = _connection()
    conn.receive_data(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\nabc", 0)
    assert conn.receive_eof()
    assert conn.stream is not None and conn.stream.error is not None
    assert conn.stream.error.status == 400
    conn.respond_error(400, conn.stream.error.reason)
    assert conn.must_close


# Streamed answers ------------------------------------------------------------------------


def _serve(conn: ServerConnection, raw: bytes) -> None:
    request = conn.receive_data(raw, 0)
    assert request is not None


def test_a_known_length_is_sent_as_content_length_and_the_connection_kept() -> None:
    conn = _connection()
    _serve(conn, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    head = _masked(conn.respond_head(200, b"x-a: 1\r\n", 10))
    assert head == b"HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 10\r\n\r\n"
    assert conn.response_open
    assert conn.response_data(b"12345") == [b"12345"]
    # The piece that completes the length waits for the end to be confirmed.
    assert conn.response_data(b"67890") == []
    assert conn.response_sent == 5
    assert conn.response_end(1.0) == [b"67890"]
    assert conn.response_sent == 10 and conn.active is None and not conn.must_close
    assert conn.receive_data(b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n", 1.1) is not None


def test_an_unknown_length_is_chunked_on_http11() -> None:
    conn = _connection()
    _serve(conn, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    head = _masked(conn.respond_head(200, b"", None))
    assert head == b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    assert conn.response_data(b"a" * 26) == [b"1a\r\n", b"a" * 26, b"\r\n"]
    assert conn.response_data(b"") == []
    assert conn.response_end() == [b"0\r\n\r\n"]
    assert conn.response_sent == 4 + 26 + 2 + 5, "every byte after the head, framing too"
    assert not conn.must_close and not conn.half_close


def test_an_unknown_length_ends_with_the_connection_on_http10() -> None:
    conn = _connection()
    _serve(conn, b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    head = _masked(conn.respond_head(200, b"", None))
    assert head == b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n"
    assert conn.response_data(b"abc") == [b"abc"]
    assert conn.response_end() == []
    assert conn.must_close, "the close is what ends the body"


def test_http10_keep_alive_with_a_known_length() -> None:
    conn = _connection()
    _serve(conn, b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    head = _masked(conn.respond_head(200, b"", 3))
    assert head == b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: keep-alive\r\n\r\n"
    assert conn.response_data(b"abc") == []
    assert conn.response_end() == [b"abc"] and not conn.must_close


@pytest.mark.parametrize("size", [None, 7])
def test_head_and_no_content_statuses_send_no_body(size: int | None) -> None:
    conn = _connection()
    _serve(conn, b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
    head = _masked(conn.respond_head(200, b"", size))
    expected = b"" if size is None else b"content-length: 7\r\n"
    assert head == b"HTTP/1.1 200 OK\r\n" + expected + b"\r\n"
    assert not conn.response_open
    assert conn.response_end() == [] and not conn.must_close
    _serve(conn, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _masked(conn.respond_head(204, b"", None)) == b"HTTP/1.1 204 No Content\r\n\r\n"
    assert not conn.response_open


def test_a_body_longer_than_its_length_is_cut_never_completed() -> None:
    conn = _connection()
    _serve(conn, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.respond_head(200, b"", 6)
    assert conn.response_data(b"abc") == [b"abc"]
    assert conn.response_data(b"def") == [], "held: it completes the length"
    assert conn.response_data(b"g") is None, "one byte too many: the last piece never goes"
    conn.response_cut()
    assert conn.must_close and conn.response_sent == 3
    conn = _connection()
    _serve(conn, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.respond_head(200, b"", 2)
    assert conn.response_data(b"abc") is None


def test_a_body_shorter_than_its_length_is_cut() -> None:
    conn = _connection()
    _serve(conn, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.respond_head(200, b"", 6)
    conn.response_data(b"abc")
    assert conn.response_end() is None
    conn.response_cut()
    assert conn.must_close and conn.active is None


def test_a_chunked_answer_cut_midway_closes_without_the_last_chunk() -> None:
    conn = _connection()
    _serve(conn, b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.respond_head(200, b"", None)
    conn.response_data(b"abc")
    conn.response_cut()
    assert conn.must_close and conn.next_request() is None and not conn.outgoing


def test_answering_before_the_request_body_ended_drops_the_rest_and_closes_after() -> None:
    conn = _connection()
    request = conn.receive_data(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab", 0)
    assert request is not None and request.body_stream is not None
    head = _masked(conn.respond_head(200, b"", None))
    assert b"connection: close\r\n" in head and b"transfer-encoding: chunked" in head
    assert conn.wants_read, "the rest of the body is read and dropped, not left to block the client"
    conn.receive_data(b"c" * 50, 0.1)
    assert request.body_stream.take() == [] and request.body_stream.error is None
    conn.check_timeouts(100.0)
    assert request.body_stream.error is None, "no deadline for a body that is being dropped"
    assert conn.response_data(b"out") == [b"3\r\n", b"out", b"\r\n"]
    assert conn.response_end() == [b"0\r\n\r\n"]
    assert conn.half_close and not conn.must_close, "lingering: the client is still sending"


def test_the_request_limit_and_draining_close_after_a_streamed_answer() -> None:
    conn = _connection(keepalive_requests=1)
    _serve(conn, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"connection: close" in conn.respond_head(200, b"", None)
    conn.response_end()
    assert conn.must_close
    conn = _connection()
    _serve(conn, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.draining = True
    assert b"connection: close" in conn.respond_head(200, b"", 0)
    assert conn.response_end() == [] and conn.must_close


def test_an_upgrade_request_with_a_streamed_body_is_an_ordinary_one() -> None:
    conn = _connection(stream_over=0)
    request = conn.receive_data(
        b"POST /b HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
        b"Content-Length: 5\r\n\r\nab",
        0,
    )
    assert request is not None and conn.stream is not None
    conn.receive_data(b"cde", 0)
    assert conn.stream.ended and conn.stream.take() == [b"ab", b"cde"]
    conn.respond(200, b"", b"")
    assert conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 0) is not None


def test_the_lingering_close_after_an_early_answer_takes_the_rest_of_the_body() -> None:
    # A client that sends its whole body before reading must reach the answer: the
    # close after it reads and drops up to what the body may still bring.
    conn = _connection(max_body_size=8 << 20)
    conn.receive_data(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 6000000\r\n\r\n", 0)
    conn.receive_data(b"a" * 1000, 0)
    conn.respond_error(413, "request larger than the backend accepts")
    assert conn.half_close
    conn.lingering(0.0)
    for _ in range(5):
        conn.receive_data(b"b" * 1_000_000, 0.1)
    assert not conn.must_close, "5 MB of the body's 6 MB dropped, not cut at LINGER_BYTES"
    conn.receive_data(b"c" * (8 << 20), 0.2)
    assert conn.must_close, "never more than max_body_size"
