"""The request limit per connection (``keepalive_requests``), without a socket.

The N-th answer on a connection says ``connection: close`` and the connection
ends after it; nothing pipelined behind it is answered (RFC 9112 §9.6), and
if something was, the connection lingers instead of closing under the client.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pitcher_rpc.http.connection import CONTINUE, LINGER_SECONDS, ServerConnection

from .test_connection import drive

GET = b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n"


def requests(count: int, start: int = 1) -> bytes:
    return b"".join(GET % number for number in range(start, start + count))


def serve_one(conn: ServerConnection, data: bytes, now: float = 0.0) -> bytes:
    """Send ``data`` (one request) and answer it; the answer's head."""
    request = conn.receive_data(data, now)
    assert request is not None
    return conn.respond(200, b"", b"ok")[0]


def test_the_nth_answer_says_close_and_ends_the_connection() -> None:
    conn = ServerConnection(keepalive_requests=3)
    for number in (1, 2):
        head = serve_one(conn, GET % number)
        assert b"connection: close" not in head
        assert not conn.must_close and not conn.half_close
    head = serve_one(conn, GET % 3)
    assert b"connection: close\r\n" in head
    # Nothing came behind it: nothing unread can turn the close into a reset.
    assert conn.must_close and not conn.half_close
    assert conn.next_request() is None


def test_one_means_every_answer_closes() -> None:
    conn = ServerConnection(keepalive_requests=1)
    assert b"connection: close\r\n" in serve_one(conn, GET % 1)
    assert conn.must_close


def test_zero_means_never() -> None:
    conn = ServerConnection(keepalive_requests=0)
    for number in range(3000):
        head = serve_one(conn, GET % number)
        assert b"connection: close" not in head, number
    assert not conn.must_close and not conn.half_close
    # And no limit is what the core does unless told otherwise.
    conn = ServerConnection()
    for number in range(3000):
        serve_one(conn, GET % number)
    assert not conn.must_close


def test_errors_and_early_answers_count_like_any_answer() -> None:
    conn = ServerConnection(keepalive_requests=2)
    conn.receive_data(GET % 1, 0.0)
    head = conn.respond_error(404, "no route")[0]
    assert b"connection: close" not in head
    conn.receive_data(GET % 2, 0.0)
    head = conn.respond_error(503, "no node")[0]
    assert b"connection: close\r\n" in head and conn.must_close


def test_http10_keep_alive_requests_count_too() -> None:
    conn = ServerConnection(keepalive_requests=2)
    request = b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    head = serve_one(conn, request)
    assert b"connection: keep-alive\r\n" in head
    head = serve_one(conn, request)
    assert b"connection: close\r\n" in head
    assert b"keep-alive" not in head
    assert conn.must_close


def test_http10_and_11_requests_share_one_count() -> None:
    conn = ServerConnection(keepalive_requests=3)
    serve_one(conn, b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    serve_one(conn, GET % 2)
    head = serve_one(conn, b"HEAD / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert b"connection: close\r\n" in head and conn.must_close


def test_pipelined_requests_behind_the_last_get_no_answer_and_the_connection_lingers() -> None:
    conn = ServerConnection(keepalive_requests=2)
    first = conn.receive_data(requests(5), 1.0)
    assert first is not None and first.path == b"/1"
    conn.respond(200, b"", b"one")
    second = conn.next_request()
    assert second is not None and second.path == b"/2"
    head = conn.respond(200, b"", b"two")[0]
    assert b"connection: close\r\n" in head
    # /3../5 are never answered: the client sends them again elsewhere.
    assert conn.next_request() is None
    assert conn.waiting == 0 and conn.outgoing == []
    # More may be on its way: shut our side and read until the client closes,
    # rather than close with unread bytes (a reset that may destroy the answer).
    assert conn.half_close and not conn.must_close
    conn.lingering(2.0)
    assert conn.wants_read
    assert conn.receive_data(requests(3, start=6), 2.5) is None
    assert conn.outgoing == [] and not conn.must_close
    assert conn.receive_eof() is False  # the client read our close and went
    conn = ServerConnection(keepalive_requests=2)
    conn.receive_data(requests(4), 1.0)
    conn.respond(200, b"", b"")
    conn.next_request()
    conn.respond(200, b"", b"")
    conn.lingering(2.0)
    conn.check_timeouts(2.0 + LINGER_SECONDS + 0.1)
    assert conn.must_close, "the linger ends by itself"


def test_part_of_a_request_behind_the_last_also_lingers() -> None:
    conn = ServerConnection(keepalive_requests=1)
    request = conn.receive_data(GET % 1 + b"GET /2 HTTP/1.1\r\nHo", 0.0)
    assert request is not None
    head = conn.respond(200, b"", b"")[0]
    assert b"connection: close\r\n" in head
    assert conn.half_close and not conn.must_close


def test_a_client_that_has_pipelined_before_gets_a_lingering_close() -> None:
    # Nothing is behind the last request when it is answered, but this client
    # pipelines: its next request may be on the wire (nginx's heuristic).
    conn = ServerConnection(keepalive_requests=3)
    conn.receive_data(requests(2), 0.0)
    conn.respond(200, b"", b"")
    conn.next_request()
    conn.respond(200, b"", b"")
    head = serve_one(conn, GET % 3)
    assert b"connection: close\r\n" in head
    assert conn.half_close and not conn.must_close


def test_a_client_that_sent_its_last_bytes_is_closed_without_lingering() -> None:
    conn = ServerConnection(keepalive_requests=1)
    conn.receive_data(requests(3), 0.0)
    assert conn.receive_eof() is True
    head = conn.respond(200, b"", b"")[0]
    assert b"connection: close\r\n" in head
    assert conn.must_close and not conn.half_close
    assert conn.next_request() is None


def test_a_body_behind_the_last_request_is_not_asked_for() -> None:
    conn = ServerConnection(keepalive_requests=1)
    conn.receive_data(
        GET % 1
        + b"POST /2 HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n",
        0.0,
    )
    conn.respond(200, b"", b"")
    assert conn.next_request() is None
    assert CONTINUE not in conn.outgoing


def test_a_refusal_behind_the_last_request_is_not_answered() -> None:
    conn = ServerConnection(keepalive_requests=1)
    request = conn.receive_data(GET % 1 + b"GET /2 HTTP/1.1\r\n\r\n", 0.0)  # no Host: 400
    assert request is not None
    conn.respond(200, b"", b"")
    assert conn.next_request() is None
    assert conn.outgoing == [] and conn.half_close


def test_a_drain_with_requests_behind_the_answer_lingers_too() -> None:
    conn = ServerConnection()
    conn.receive_data(requests(3), 0.0)
    conn.draining = True
    head = conn.respond(200, b"", b"")[0]
    assert b"connection: close\r\n" in head
    assert conn.half_close and not conn.must_close and conn.next_request() is None


def test_a_client_that_asked_to_close_is_closed_at_once() -> None:
    # It promised to send nothing more (RFC 9112 §9.6); what it sent anyway
    # the parser dropped, read already: no unread byte can cause a reset.
    conn = ServerConnection(keepalive_requests=5)
    conn.receive_data(b"GET /1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" + requests(2), 0)
    head = conn.respond(200, b"", b"")[0]
    assert b"connection: close\r\n" in head
    assert conn.must_close and not conn.half_close


def _answers(out: bytes) -> list[bytes]:
    return out.split(b"HTTP/1.1 ")[1:]


@settings(max_examples=60, deadline=None)
@given(
    limit=st.integers(min_value=1, max_value=7),
    cuts=st.lists(st.integers(min_value=0, max_value=6 * len(GET % 1)), max_size=6),
)
def test_any_split_gives_the_same_answers_up_to_the_limit(limit: int, cuts: list[int]) -> None:
    stream = requests(6)
    points = sorted(set(cuts))
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    seen, out = drive([chunk for chunk in chunks if chunk], keepalive_requests=limit)
    expected = min(limit, 6)
    assert seen == [b"GET /%d" % number for number in range(1, expected + 1)]
    answers = _answers(out)
    assert len(answers) == expected
    closing = [b"connection: close\r\n" in answer for answer in answers]
    assert closing == [False] * (expected - 1) + [limit <= 6]
