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

The caller acts on a few plain attributes after a call: bytes to write come
back from the method or wait in :attr:`outgoing`; :attr:`half_close` and
:attr:`must_close` say how the connection ends.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Final

from .parser import RequestParser
from .request import HttpError, HttpLimits, HttpRequest
from .response import date_line, error_body, status_line

__all__ = ["LINGER_BYTES", "LINGER_SECONDS", "ServerConnection"]

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Pipelined requests queued beyond this make the connection ask to stop
# reading until the queue drains: a client cannot make us buffer without bound.
PIPELINE_HIGH = 32
PIPELINE_LOW = 8
# After a refusal, what the client still sends is read and dropped for this
# long, and at most this many bytes of it.
LINGER_SECONDS = 2.0
LINGER_BYTES = 1 << 20

_CLOSE = b"connection: close\r\n"
_KEEP_ALIVE_10 = b"connection: keep-alive\r\n"
# Statuses whose responses never carry content (RFC 9110 §6.4.1).
_NO_CONTENT = frozenset((204, 304))
_ERROR_TYPE = b"content-type: text/plain; charset=utf-8\r\n"


def _plain_error(status: int, message: str) -> tuple[bytes, bytes]:
    return _ERROR_TYPE, error_body(status, message)


# Queued after the last request when the client half-closed: answer what came
# before it, then close.
_CLIENT_DONE = HttpError(0, "client closed its side")
# ``body_started`` while the request arriving has no complete head yet.
_NO_BODY_YET: Final = -1.0


class ServerConnection:
    """The HTTP/1.1 state of one client connection; see the module docstring.

    ``active`` is the request being answered (None between requests).
    ``draining`` set by the caller makes the next answer end the connection.
    """

    __slots__ = (
        "_continue_sent",
        "_lingered",
        "_pipelined",
        "_queue",
        "_refused",
        "_requests_left",
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
    ) -> None:
        self.parser = parser = RequestParser(limits, watch)
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
        self._refused = False
        # The client has sent a request before the previous one was answered:
        # it may be sending one now, so a close after an answer lingers.
        self._pipelined = False
        # The client does not read what it is sent (the caller's pause_writing).
        self.write_blocked = False
        self._continue_sent = False

    # bytes in -------------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> HttpRequest | None:
        """Take what the client sent; return the request to start now, if one can start."""
        if self.linger_until:
            self._lingered += len(data)
            if self._lingered > LINGER_BYTES:
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
            self._queue.extend(error.requests)
            self._queue.append(error)
            return self.next_request() if self.active is None else None
        if requests:
            self._continue_sent = False
            if parser.in_request:
                # The bytes after the last complete request began the next one.
                self.request_started = now
                self.body_started = now if parser.headers_complete else _NO_BODY_YET
            if self.active is None and not self._queue and len(requests) == 1:
                # The common case, kept short: one request with nothing ahead of it.
                request = self.active = requests[0]
                return request
            self._pipelined = True
            self._queue.extend(requests)
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
        if self.active is None and not self._queue:
            self.must_close = True
            return False
        self._queue.append(_CLIENT_DONE)
        return True

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
            self.active = item  # type: ignore[assignment]
            return item  # type: ignore[return-value]
        self._idle()
        return None

    def _idle(self) -> None:
        """Nothing is being answered or waiting: answer a pending 100-continue."""
        if not self._continue_sent and self.parser.pending_expect_continue:
            self._continue_sent = True
            self.outgoing.append(CONTINUE)

    # answers out ----------------------------------------------------------------------

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
        self._requests_left -= 1
        keep = (
            request.keep_alive
            and self._requests_left != 0
            and not self.draining
            and self.keepalive_timeout > 0
        )
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

    def respond_error(
        self, status: int, message: str, fields: bytes = b"", now: float | None = None
    ) -> list[bytes]:
        """A short answer to the active request, as ``error_answer`` makes it."""
        error_fields, body = self.error_answer(status, message)
        return self.respond(status, error_fields + fields, body, now)

    def abandon(self) -> None:
        """The active request will not be answered (the client is gone)."""
        self.active = None
        self.must_close = True
        self._queue.clear()
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
        self.half_close = True

    def lingering(self, now: float) -> None:
        """The caller has half-closed after a refusal: drop what comes until ``now`` + linger."""
        self.linger_until = now + LINGER_SECONDS

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
        if self.write_blocked or self._refused:
            return False
        return len(self._queue) < PIPELINE_HIGH

    def can_resume_read(self) -> bool:
        """Whether reading paused by the water marks may resume (hysteresis)."""
        if self.linger_until:
            return True
        return not self.write_blocked and not self._refused and len(self._queue) < PIPELINE_LOW

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
        if self.must_close or self.half_close or self.active is not None or self._queue:
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

    def close_if_idle(self, now: float, quiet_for: float) -> bool:
        """While draining: True (and ``must_close``) if nothing has come for ``quiet_for``."""
        if not self.busy and now - self.last_activity >= quiet_for:
            self.must_close = True
            return True
        return False
