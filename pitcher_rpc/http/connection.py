"""A sans-IO HTTP/1.1 server connection: bytes in, requests out; answers in, bytes out.

No sockets, no asyncio and no clock of its own: the caller feeds what it
reads with the time it read it (:meth:`ServerConnection.receive_data`),
answers the request it is handed (:meth:`respond`), writes the bytes it gets
back, and asks at its own pace whether a deadline has passed
(:meth:`check_timeouts`). Everything HTTP/1.1 says about a connection lives
here, once, for the proxy's frontend and the admin API alike:

- pipelining: requests are handed out one at a time, in order; the next one
  only after the previous one was answered (RFC 9112 §9.3.2);
- keep-alive and HTTP/1.0 (``connection: keep-alive`` only where 1.0 needs
  it), HEAD (the length of the body that would have been sent, no body),
  responses that carry no content (1xx, 204, 304);
- ``Expect: 100-continue``: answered once nothing is ahead of the request
  and its body has not started;
- refusals (the parser's 400, 408, 413, 414, 431, 505...): the refusal is
  answered in its turn, the connection is half-closed and what the client
  still sends is read and dropped for a while (RFC 9112 §9.6, nginx's
  lingering close), so that a reset does not destroy the answer;
- water marks: reading should pause while too many requests wait or while
  the client does not read what it is sent (:attr:`wants_read`);
- deadlines: the head of a request must arrive within ``header_timeout`` of
  its first byte; its body may pause no longer than ``body_timeout`` between
  two reads (the read that ended the head counts) and must be complete within
  ``body_deadline`` of its head (0: no limit), for Content-Length and chunked
  bodies alike (408 for each, answered in its turn like any refusal); an idle
  keep-alive connection is closed after ``keepalive_timeout``, a lingering
  close ends after ``LINGER_SECONDS``. A request's deadlines run while it is
  its turn: while an earlier request is being answered they wait, and they
  count again from that answer, as the header deadline always has;
- request limit (nginx's ``keepalive_requests``): the ``keepalive_requests``-th
  answer on a connection carries ``connection: close`` (0: no limit). Ending
  connections now and then is what spreads a keep-alive client's load again
  over the processes that share a listener, a new or restarted one included.

A connection that ends after an answer (a limit, ``connection: close``, a
drain) answers nothing that was pipelined behind it (RFC 9112 §9.6: the
client sends it again on a new connection). If such requests, or part of one,
were already received, or the client has pipelined before, more may be on
their way: closing at once would answer them with a reset that can destroy
the last answer before the client reads it, so the connection half-closes
and lingers as after a refusal (nginx's ``lingering_close on``).

Streamed bodies, both ways (``stream_over`` >= 0, see docs/streaming.md):

- a request whose body is chunked or longer than ``stream_over`` is handed
  out at its head; its body arrives on ``request.body_stream`` (a
  :class:`~.request.BodyStream`) and, while that request is the active one,
  on :attr:`ServerConnection.stream`. The caller takes the pieces as it can
  pass them on; while it cannot (:meth:`pause_body`), or while a streamed
  request waits behind another, reading stops. Its ``100 Continue`` goes out
  when the caller asks for the body (:meth:`want_body`), so a request
  answered without it never makes the client send it. A refusal inside the
  body (413 over ``max_body_size``, bad framing, 408) lands on the stream
  (``error``), for the caller to answer in its place; the deadlines do not
  run while the caller holds the body back. An answer made before the body
  ended closes the connection after it (RFC 9110 §10.1.1);
- an answer may be streamed: :meth:`respond_head`, :meth:`response_data` per
  piece, :meth:`response_end` (or :meth:`response_cut`). Content-Length when
  the size is known, else chunked on HTTP/1.1 and the connection's close on
  HTTP/1.0; a body that turns out longer or shorter than its length, or cut
  midway, is never made to look complete: no last chunk, the connection
  closes, and the piece that completes a length is held until the end is
  confirmed.

The caller acts on a few plain attributes after a call: bytes to write come
back from the method or wait in :attr:`outgoing`; :attr:`half_close` and
:attr:`must_close` say how the connection ends.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Final

from .parser import RequestParser
from .request import BodyStream, HttpError, HttpLimits, HttpRequest
from .response import date_line, error_body, status_line

__all__ = ["LINGER_BYTES", "LINGER_SECONDS", "STREAM_BUFFER_HIGH", "ServerConnection"]

CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
# Pipelined requests queued beyond this make the connection ask to stop
# reading until the queue drains: a client cannot make us buffer without bound.
PIPELINE_HIGH: Final = 32
PIPELINE_LOW: Final = 8
# After a refusal, what the client still sends is read and dropped for this
# long, and at most this many bytes of it.
LINGER_SECONDS: Final = 2.0
LINGER_BYTES: Final = 1 << 20
# Body bytes of a streamed request held (received, not taken by the caller)
# beyond which reading stops: the caller takes what each read brings at once
# while it can pass it on, so more than this means it cannot.
STREAM_BUFFER_HIGH: Final = 256 * 1024

# How a streamed answer's body is framed.
_NO_BODY: Final = 0  # HEAD, 204, 304: the head is the whole answer
_LENGTH: Final = 1  # content-length
_CHUNKED: Final = 2  # transfer-encoding: chunked (HTTP/1.1)
_UNTIL_CLOSE: Final = 3  # the end of the connection ends the body (HTTP/1.0)
_CHUNKED_HEAD: Final = b"transfer-encoding: chunked\r\n"
_LAST_CHUNK: Final = b"0\r\n\r\n"
_CRLF: Final = b"\r\n"

_CLOSE: Final = b"connection: close\r\n"
_KEEP_ALIVE_10: Final = b"connection: keep-alive\r\n"
# Statuses whose responses never carry content (RFC 9110 §6.4.1).
_NO_CONTENT: Final = frozenset((204, 304))
_ERROR_TYPE: Final = b"content-type: text/plain; charset=utf-8\r\n"


def _plain_error(status: int, message: str) -> tuple[bytes, bytes]:
    return _ERROR_TYPE, error_body(status, message)


# Queued after the last request when the client half-closed: answer what came
# before it, then close.
_CLIENT_DONE: Final = HttpError(0, "client closed its side")
# ``body_started`` while the request arriving has no complete head yet.
_NO_BODY_YET: Final = -1.0


def _chunk_size_line(size: int) -> bytes:
    return b"%x\r\n" % size


class ServerConnection:
    """The HTTP/1.1 state of one client connection; see the module docstring.

    ``active`` is the request being answered (None between requests).
    ``draining`` set by the caller makes the next answer end the connection.
    """

    __slots__ = (
        "_continue_sent",
        "_held",
        "_keep",
        "_linger_limit",
        "_lingered",
        "_pipelined",
        "_queue",
        "_refused",
        "_requests_left",
        "_response_left",
        "_response_mode",
        "_waiting_streams",
        "active",
        "body_deadline",
        "body_started",
        "body_timeout",
        "draining",
        "error_answer",
        "half_close",
        "header_timeout",
        "keepalive_timeout",
        "last_activity",
        "linger_until",
        "must_close",
        "outgoing",
        "parser",
        "request_started",
        "request_timeout",
        "response_sent",
        "stream",
        "write_blocked",
    )

    def __init__(
        self,
        limits: HttpLimits | None = None,
        watch: frozenset[bytes] = frozenset(),
        *,
        header_timeout: float = 10.0,
        keepalive_timeout: float = 60.0,
        request_timeout: float = 0.0,
        keepalive_requests: int = 0,
        error_answer: Callable[[int, str], tuple[bytes, bytes]] | None = None,
        now: float = 0.0,
        stream_over: int = -1,
    ) -> None:
        self.parser = parser = RequestParser(limits, watch, stream_over)
        # The head must arrive within header_timeout of the request's first
        # byte; with request_timeout (0: none) the whole request, body
        # included, must arrive within it.
        self.header_timeout = header_timeout
        self.request_timeout = request_timeout
        # The body's deadlines, from the limits; plain attributes, so that the
        # caller may change them on a connection already open.
        limits = parser.limits
        self.body_timeout = limits.body_timeout
        self.body_deadline = limits.body_deadline
        # When the head of the request arriving was complete (or its turn
        # came, see respond()); _NO_BODY_YET while it is not.
        self.body_started = _NO_BODY_YET
        # (header lines, body) of a refusal, by status and reason; plain text
        # unless the caller says otherwise.
        self.error_answer = error_answer or _plain_error
        # 0 turns keep-alive off: every answer closes the connection.
        self.keepalive_timeout = keepalive_timeout
        # Answers still allowed before one says ``connection: close``. Counted
        # down per answer; from 0 (no limit) it goes negative and never meets 0
        # again: one decrement and one compare per request, no other test.
        self._requests_left = keepalive_requests
        self.active: HttpRequest | None = None
        self._queue: deque[HttpRequest | HttpError] = deque()
        # Bytes the caller must write that no method returned (100 Continue,
        # a refusal); the caller takes them and clears the list.
        self.outgoing: list[bytes] = []
        # After writing outgoing: shut the write side down and linger (a refusal)...
        self.half_close = False
        # ...or close the connection.
        self.must_close = False
        self.draining = False
        self.last_activity = now
        self.request_started = now
        self.linger_until = 0.0
        self._lingered = 0
        # Bytes read and dropped while lingering before the connection closes.
        self._linger_limit = LINGER_BYTES
        self._refused = False
        # The client has sent a request before the previous one was answered:
        # it may be sending one now, so a close after an answer lingers.
        self._pipelined = False
        # The client does not read what it is sent (the caller's pause_writing).
        self.write_blocked = False
        self._continue_sent = False
        # The active request's streamed body, until it is answered.
        self.stream: BodyStream | None = None
        # Streamed requests queued behind the active one: reading waits for them.
        self._waiting_streams = 0
        # A streamed answer under way: its framing, the length it has left,
        # whether the connection stays open after it, and a piece held back
        # because it completes the length (sent once the end is confirmed).
        self._response_mode = _NO_BODY
        self._response_left = 0
        self._keep = False
        self._held: bytes | None = None
        # Bytes of the streamed answer after its head handed to the caller to
        # write (its body, and a chunked body's framing).
        self.response_sent = 0

    # bytes in -------------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> HttpRequest | None:
        """Take what the client sent; return the request to start now, if one can start."""
        if self.linger_until:
            self._lingered += len(data)
            if self._lingered > self._linger_limit:
                self.must_close = True
            return None
        self.last_activity = now
        parser = self.parser
        if not parser.in_request:
            self.request_started = now
            self.body_started = _NO_BODY_YET
        try:
            requests = parser.feed(data)
        except HttpError as error:
            self._refused = True
            stream = parser.stream
            if stream is None:
                self._enqueue(error.requests)
                self._queue.append(error)
            else:
                # Inside a streamed body: its request, handed out already (or
                # in error.requests), is answered with the error in its place
                # (unless its answer has gone out: then it is moot).
                if not stream.discarding:
                    stream.error = error
                self._enqueue(error.requests)
            return self.next_request() if self.active is None else None
        stream = self.stream
        if stream is not None and stream.discarding:
            stream.take()  # the answer has gone out: the rest of the body is dropped
        if requests:
            self._continue_sent = False
            if parser.in_request:
                # The bytes after the last complete request began the next one.
                self.request_started = now
                self.body_started = now if parser.headers_complete else _NO_BODY_YET
            if self.active is None and not self._queue and len(requests) == 1:
                # The common case, kept short: one request with nothing ahead of it.
                request = self.active = requests[0]
                if request.body_stream is not None:
                    self.stream = request.body_stream
                return request
            self._pipelined = True
            self._enqueue(requests)
            return self.next_request() if self.active is None else None
        if self.body_started == _NO_BODY_YET and parser.headers_complete:
            self.body_started = now  # the head is complete: the body's clock starts
        if self.active is None:
            self._idle()
        return None

    def receive_eof(self) -> bool:
        """The client shut its write side; False: close now, True: answer what is pending first.

        A client that half-closes after sending its requests still gets its
        answers (RFC 9112 §9.6); the connection closes once they are written.
        """
        if self.linger_until:
            return False  # the client has read our refusal and is done
        stream = self.parser.stream
        if stream is not None and not stream.discarding:
            # The body was cut short: never to be passed on as a whole one.
            stream.error = HttpError(400, "the client closed its side inside the body")
            self._refused = True
        if self.active is None and not self._queue:
            self.must_close = True
            return False
        self._queue.append(_CLIENT_DONE)
        return True

    def _enqueue(self, requests: list[HttpRequest]) -> None:
        queue = self._queue
        for request in requests:
            queue.append(request)
            if request.body_stream is not None:
                self._waiting_streams += 1

    def next_request(self) -> HttpRequest | None:
        """The next queued request, if nothing is being answered; refusals are answered here."""
        if self.active is not None or self.must_close or self.half_close:
            return None
        queue = self._queue
        if queue:
            item = queue.popleft()
            if type(item) is HttpError:
                self._refuse(item)
                return None
            request: HttpRequest = item  # type: ignore[assignment]
            self.active = request
            if request.body_stream is not None:
                self._waiting_streams -= 1
                self.stream = request.body_stream
            return request
        self._idle()
        return None

    def _idle(self) -> None:
        """Nothing is being answered or waiting: answer a pending 100-continue."""
        if not self._continue_sent and self.parser.pending_expect_continue:
            self._continue_sent = True
            self.outgoing.append(CONTINUE)

    # answers out ----------------------------------------------------------------------

    def _count_answer(self, request: HttpRequest) -> bool:
        """Count an answer against keepalive_requests; whether the connection may stay open."""
        self._requests_left -= 1
        return (
            request.keep_alive
            and self._requests_left != 0
            and not self.draining
            and self.keepalive_timeout > 0
        )

    def respond(
        self, status: int, fields: bytes, body: bytes | memoryview, now: float | None = None
    ) -> list[bytes]:
        """The bytes of the answer to the active request, which ends with it.

        ``fields`` are the response's header lines, each ending in CRLF,
        already validated and without the framing fields: this adds the
        status line, ``date``, ``content-length`` and ``connection`` as the
        request's version, method and keep-alive call for. The body is left
        out for HEAD and for statuses that carry none. Returns the chunks to
        write, in order (for ``writelines``: the body is not copied).
        With ``now``, the idle and header deadlines of what follows count from
        the answer, not from the last bytes received: a slow answer must not
        make the next request late, or the connection idle, at once.
        """
        request = self.active
        assert request is not None, "respond() without a request to answer"
        keep = self._count_answer(request)
        stream = request.body_stream
        if stream is not None:
            self.stream = None
            if not stream.ended:
                # Answered before its body ended: close after the answer and
                # drop the rest (RFC 9110 §10.1.1; no 100 went out, or the
                # client is told to stop).
                keep = False
                self._let_body_finish(stream)
        framing = b"" if status in _NO_CONTENT else b"content-length: %d\r\n" % len(body)
        if not keep:
            framing += _CLOSE
            self._end_after_answer()
        elif request.version == "1.0":
            framing += _KEEP_ALIVE_10
        head = status_line(status) + fields + date_line() + framing + b"\r\n"
        self.active = None
        if now is not None:
            self.last_activity = now
            if self.parser.in_request:
                self.request_started = now
                if self.body_started != _NO_BODY_YET:
                    self.body_started = now
        if not body or request.method == b"HEAD" or status in _NO_CONTENT:
            return [head]
        return [head, body]  # type: ignore[list-item]

    def _end_after_answer(self) -> None:
        """The answer being made is the last: close after it, lingering if more came behind it."""
        queue = self._queue
        if (queue or self.parser.in_request or self._pipelined) and _CLIENT_DONE not in queue:
            # Requests pipelined behind this one are never answered, and the
            # client may still be sending (nginx's heuristic: bytes behind the
            # request, or a client that pipelines): shut our side after the
            # answer and read what comes until the client closes, as after a
            # refusal, since bytes arriving after a close are answered with a
            # reset that drops what of the answer is still in flight.
            queue.clear()
            self.half_close = True
        else:
            # Nothing came after it (or the client has said it sends no
            # more): nothing unread can turn the close into a reset.
            queue.clear()
            self.must_close = True
        self._waiting_streams = 0

    def respond_error(
        self, status: int, message: str, fields: bytes = b"", now: float | None = None
    ) -> list[bytes]:
        """A short answer to the active request, as ``error_answer`` makes it."""
        error_fields, body = self.error_answer(status, message)
        return self.respond(status, error_fields + fields, body, now)

    def abandon(self) -> None:
        """The active request will not be answered (the client is gone)."""
        self.active = None
        self.stream = None
        self.must_close = True
        self._queue.clear()
        self._waiting_streams = 0
        self.parser.close()

    def _refuse(self, error: HttpError) -> None:
        if not error.status:
            self.must_close = True
            return
        fields, body = self.error_answer(error.status, error.reason)
        self.outgoing.append(
            status_line(error.status)
            + fields
            + date_line()
            + b"content-length: %d\r\n" % len(body)
            + _CLOSE
            + b"\r\n"
            + body
        )
        self._refused = True
        self._queue.clear()
        self._waiting_streams = 0
        self.half_close = True

    def lingering(self, now: float) -> None:
        """The caller has half-closed after a refusal: drop what comes until ``now`` + linger."""
        self.linger_until = now + LINGER_SECONDS

    # streamed answers -------------------------------------------------------------------

    def respond_head(
        self, status: int, fields: bytes, body_size: int | None, now: float | None = None
    ) -> bytes:
        """The head of a streamed answer to the active request; its body follows.

        ``body_size`` is the body's length when known. The body is framed by
        Content-Length when it is known, else chunked (HTTP/1.1) or by the
        connection's close (HTTP/1.0). Then :meth:`response_data` for each
        piece and :meth:`response_end` (or :meth:`response_cut`). When
        :attr:`response_open` is False after this call there is no body to
        send (HEAD, 204, 304): call :meth:`response_end` at once.
        """
        request = self.active
        assert request is not None, "respond_head() without a request to answer"
        keep = self._count_answer(request)
        stream = request.body_stream
        if stream is not None and not stream.ended:
            # Answering before the body ended: the rest is dropped as it comes
            # and the connection closes after the answer (RFC 9110 §10.1.1).
            keep = False
            stream.discarding = True
            stream.paused = False
            stream.take()
            self._let_body_finish(stream)
        if status in _NO_CONTENT:
            mode = _NO_BODY
            framing = b""
        elif body_size is not None:
            mode = _NO_BODY if request.method == b"HEAD" else _LENGTH
            framing = b"content-length: %d\r\n" % body_size
        elif request.method == b"HEAD":
            mode = _NO_BODY
            framing = b""
        elif request.version == "1.1":
            mode = _CHUNKED
            framing = _CHUNKED_HEAD
        else:
            mode = _UNTIL_CLOSE
            framing = b""
            keep = False
        if not keep:
            framing += _CLOSE
        elif request.version == "1.0":
            framing += _KEEP_ALIVE_10
        self._response_mode = mode
        self._response_left = body_size or 0
        self._keep = keep
        self._held = None
        self.response_sent = 0
        if now is not None:
            self.last_activity = now
        return status_line(status) + fields + date_line() + framing + b"\r\n"

    @property
    def response_open(self) -> bool:
        """A streamed answer's body is being sent."""
        return self._response_mode != _NO_BODY

    def response_data(self, data: bytes) -> list[bytes] | None:
        """The chunks to write for one piece of a streamed answer's body (for ``writelines``).

        None: the piece breaks the answer's framing (more than its
        Content-Length): the caller must :meth:`response_cut`. A piece that
        completes the length is held back (``[]``) until :meth:`response_end`
        confirms nothing follows.
        """
        mode = self._response_mode
        size = len(data)
        if not size:
            return []
        if mode == _CHUNKED:
            line = _chunk_size_line(size)
            self.response_sent += len(line) + size + 2
            return [line, data, _CRLF]
        if mode == _LENGTH:
            if self._held is not None or size > self._response_left:
                return None
            self._response_left -= size
            if not self._response_left:
                self._held = data
                return []
            self.response_sent += size
            return [data]
        if mode == _UNTIL_CLOSE:
            self.response_sent += size
            return [data]
        return []  # no body is sent (HEAD): the caller has stopped the stream

    def response_end(self, now: float | None = None) -> list[bytes] | None:
        """The streamed answer's body is complete: its last bytes, and the answer ends.

        None: it is shorter than its Content-Length; the caller must
        :meth:`response_cut`. Otherwise the connection goes on as after
        :meth:`respond` (the next request, or a close).
        """
        mode = self._response_mode
        tail: list[bytes] = []
        if mode == _LENGTH:
            if self._response_left:
                return None
            held = self._held
            if held is not None:
                self._held = None
                self.response_sent += len(held)
                tail.append(held)
        elif mode == _CHUNKED:
            tail.append(_LAST_CHUNK)
            self.response_sent += len(_LAST_CHUNK)
        self._response_mode = _NO_BODY
        self._end_response(now, mode == _UNTIL_CLOSE)
        return tail

    def _let_body_finish(self, stream: BodyStream) -> None:
        """An answer goes out before its request's body ended: the lingering close after it
        reads (and drops) what the body may still bring, so that a client sending it whole
        before it reads gets to the answer instead of a reset (nginx's lingering close)."""
        rest = self.parser.limits.max_body_size - stream.received
        if rest > self._linger_limit:
            self._linger_limit = rest

    def response_cut(self) -> None:
        """The streamed answer cannot be completed: close with what was sent (no end marker)."""
        self._response_mode = _NO_BODY
        self._held = None
        self.abandon()

    def _end_response(self, now: float | None, close: bool) -> None:
        request = self.active
        assert request is not None
        if close:
            self._queue.clear()
            self._waiting_streams = 0
            self.must_close = True
        elif not self._keep:
            self._end_after_answer()
        self.active = None
        self.stream = None
        if now is not None:
            self.last_activity = now
            if self.parser.in_request:
                self.request_started = now
                if self.body_started != _NO_BODY_YET:
                    self.body_started = now

    # streamed request bodies ------------------------------------------------------------

    def want_body(self) -> bytes:
        """The caller will pass the active request's streamed body on: ``100 Continue``
        to write first if the client waits for it, else ``b""``."""
        request = self.active
        stream = self.stream
        if (
            request is None
            or stream is None
            or not request.expect_continue
            or self._continue_sent
            or stream.received
            or stream.ended
        ):
            return b""
        self._continue_sent = True
        return CONTINUE

    def pause_body(self, now: float) -> None:
        """The caller cannot pass more of the streamed body on: stop reading.

        The body's deadlines stop counting until :meth:`resume_body`: the
        wait is not the client's doing.
        """
        stream = self.stream
        if stream is not None and not stream.paused:
            stream.paused = True
            stream.paused_at = now

    def resume_body(self, now: float) -> None:
        """The caller can take the streamed body again; reading may resume."""
        stream = self.stream
        if stream is not None and stream.paused:
            stream.paused = False
            if self.body_started != _NO_BODY_YET:
                self.body_started += now - stream.paused_at
            self.last_activity = now

    # flow control and deadlines -------------------------------------------------------

    @property
    def wants_read(self) -> bool:
        """Whether the caller should read from the client now.

        Not while the client does not read (``pause_writing``), not once the
        parser has refused the stream for good, not while more than
        PIPELINE_HIGH requests wait; again below PIPELINE_LOW. A lingering
        connection always reads (and drops).
        """
        if self.linger_until:
            return True
        if self.write_blocked or self._refused or self._waiting_streams:
            return False
        stream = self.stream
        if stream is not None and (stream.paused or stream.buffered >= STREAM_BUFFER_HIGH):
            return False
        return len(self._queue) < PIPELINE_HIGH

    def can_resume_read(self) -> bool:
        """Whether reading paused by the water marks may resume (hysteresis)."""
        if self.linger_until:
            return True
        if self.write_blocked or self._refused or self._waiting_streams:
            return False
        stream = self.stream
        if stream is not None and (stream.paused or stream.buffered >= STREAM_BUFFER_HIGH):
            return False
        return len(self._queue) < PIPELINE_LOW

    def pause_writing(self) -> None:
        self.write_blocked = True

    def resume_writing(self) -> None:
        self.write_blocked = False

    @property
    def waiting(self) -> int:
        """Complete requests received and not started yet."""
        return len(self._queue)

    @property
    def busy(self) -> bool:
        """A request is being answered, waiting, or arriving."""
        return self.active is not None or bool(self._queue) or self.parser.in_request

    def check_timeouts(self, now: float) -> None:
        """Apply the deadlines at ``now``: a 408 refusal in ``outgoing``, or ``must_close``."""
        if self.linger_until:
            if now > self.linger_until:
                self.must_close = True
            return
        if self.must_close or self.half_close:
            return
        stream = self.stream
        if stream is not None:
            self._check_stream(stream, now)
            return
        if self.active is not None or self._queue:
            return
        parser = self.parser
        if parser.in_request:
            late = now - self.request_started
            if self.request_timeout and late > self.request_timeout:
                self._refuse(HttpError(408, "request not received in time"))
            elif not parser.headers_complete:
                if late > self.header_timeout:
                    self._refuse(HttpError(408, "request head not received in time"))
            elif now - self.last_activity > self.body_timeout:
                self._refuse(HttpError(408, "request body paused too long"))
            elif self.body_deadline and now - self.body_started > self.body_deadline:
                self._refuse(HttpError(408, "request body not received in time"))
        elif now - self.last_activity > self.keepalive_timeout:
            self.must_close = True

    def _check_stream(self, stream: BodyStream, now: float) -> None:
        """The body deadlines of the active request's streamed body: an ``error`` on it.

        Only while the body is read: not once it ended or failed, not while
        the caller holds it back (paused, or pieces it has not taken).
        """
        if (
            stream.ended
            or stream.error is not None
            or stream.discarding
            or stream.paused
            or stream.buffered >= STREAM_BUFFER_HIGH
            or self._refused
        ):
            return
        if now - self.last_activity > self.body_timeout:
            stream.error = HttpError(408, "request body paused too long")
        elif self.body_deadline and now - self.body_started > self.body_deadline:
            stream.error = HttpError(408, "request body not received in time")
        else:
            return
        self._refused = True  # nothing more is read: the answer ends the connection

    def close_if_idle(self, now: float, quiet_for: float) -> bool:
        """While draining: True (and ``must_close``) if nothing has come for ``quiet_for``."""
        if not self.busy and now - self.last_activity >= quiet_for:
            self.must_close = True
            return True
        return False
