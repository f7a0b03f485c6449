"""A caller's streamed bodies: the request body it sends, the response body it receives.

:class:`OutgoingBody` is the rest of a request body after its REQUEST head
(sent with the MORE flag): ``write`` queues bytes, which leave as DATA frames
as the node's credit for the call allows; ``write`` answers False once the
credit is spent, and ``on_writable`` is called when the queue has drained,
so a caller pauses its source exactly as it would on a socket's
``pause_writing``. The body is bounded by the node's window, never by the
frame limit. Against a node that announced no window (``initial_window`` 0
or absent: it speaks whole frames only), the same object gathers the body
and sends one whole REQUEST at ``end()``; above the node's frame limit the
call fails with :class:`~transports.errors.RequestTooLarge`. While the body
is sent its caller decides what bounds the call (a REQUEST with MORE carries
``deadline_ms`` for the answer, counted from the body's end):
``move_deadline`` sets the receiver's deadline and wakes the call table's
timer for it, and ``on_credit`` tells of credit that moved part of the queue.

:class:`IncomingBody` is the rest of a response body after a RESPONSE head
with MORE. It stands in the connection's table of pending calls in the
caller's place until the body ends, so it counts against ``max_in_flight``,
a GOAWAY, a lost connection and the one deadline timer reach it as they
reach a call, and its ``deadline`` is the idle limit between two DATA frames
(running only while the node holds credit: a pause the consumer causes is not
the node's). ``consumed`` hands credit back; ``abort`` sends CANCEL.

Both talk to their carrier through :class:`BodyLink`; nothing here does I/O.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Protocol

from .calls import Receiver
from .errors import CallError, DeadlineExceeded, RequestTooLarge, TransportError
from .flow import ReceiveWindow, SendWindow, take_bytes_field, with_bytes_field

log = logging.getLogger("pitcher.transports")

DataCallback = Callable[[bytes], None]
EndCallback = Callable[[], None]
ErrorCallback = Callable[[TransportError], None]


class BodyLink(Protocol):
    """What a body asks of the connection (or socket) that carries its call."""

    def send_data(self, request_id: int, data: bytes, more: bool) -> None:
        """Write one DATA frame."""
        ...

    def send_credit(self, request_id: int, increment: int) -> None:
        """Write one WINDOW_UPDATE."""
        ...

    def drop_call(self, request_id: int) -> None:
        """Forget the call and tell the node (CANCEL); no callback follows."""
        ...

    def watch(self, when: float) -> None:
        """Run the call table's timer at ``when`` at the latest."""
        ...

    def time(self) -> float:
        """The event loop's clock."""
        ...


class WholeSender(Protocol):
    """The client, for the whole-frame fallback and for giving a call up."""

    def send_whole(self, payload: bytes, receiver: Receiver, flags: int) -> None: ...

    def give_up(self, receiver: Receiver) -> None: ...


# An OutgoingBody's states.
_UNBOUND = 0  # waiting for a connection: bytes are queued, write() answers False
_STREAM = 1  # DATA within the node's credit
_WHOLE = 2  # the node takes whole frames only: bytes are gathered until end()
_DONE = 3  # ended, answered early, aborted or failed: nothing more is sent


class OutgoingBody:
    """The rest of a request body, after a REQUEST head with the MORE flag."""

    __slots__ = (
        "_client",
        "_flags",
        "_head",
        "_limit",
        "_link",
        "_paused",
        "_queue",
        "_queued",
        "_receiver",
        "_state",
        "_window",
        "ended",
        "max_data",
        "on_credit",
        "on_writable",
        "request_id",
        "started",
    )

    def __init__(self, client: WholeSender, receiver: Receiver, head: bytes, flags: int) -> None:
        self._client = client
        self._receiver = receiver
        self._head = head
        # REQUEST flags for the whole-frame fallback (STREAM_OK, not MORE).
        self._flags = flags
        self._state = _UNBOUND
        self._link: BodyLink | None = None
        self._window = SendWindow(0)
        self._queue: list[bytes] = []
        self._queued = 0
        self._paused = False
        # The whole REQUEST's largest payload, in the fallback.
        self._limit = 0
        self.request_id = 0
        # Largest DATA payload: the node's frame limit.
        self.max_data = 0
        self.ended = False
        # Body bytes were handed over: the caller cannot send this call again.
        self.started = False
        self.on_writable: Callable[[], None] | None = None
        # Called when the node's credit lets queued bytes leave but some still
        # wait: the node made progress though the queue has not drained.
        self.on_credit: Callable[[], None] | None = None

    # the caller's side ----------------------------------------------------------------

    @property
    def done(self) -> bool:
        """Nothing more will be sent: ended and flushed, answered early, aborted or failed."""
        return self._state == _DONE

    @property
    def queued(self) -> int:
        """Bytes written and not yet on the wire (waiting for credit or a connection)."""
        return self._queued

    def write(self, data: bytes) -> bool:
        """Queue ``data``; False: credit is spent, wait for ``on_writable`` before more."""
        state = self._state
        if state == _DONE or self.ended:
            return True  # answered or failed: the caller learns it from its receiver
        if not data:
            return not self._paused
        self.started = True
        self._queue.append(data)
        self._queued += len(data)
        if state == _STREAM:
            self._pump()
            if self._queued:
                self._paused = True
                return False
            return True
        if state == _WHOLE:
            self._check_whole_size()
            return True
        self._paused = True
        return False

    def end(self) -> None:
        """The body is complete: the last DATA (without MORE) follows what is queued."""
        if self.ended or self._state == _DONE:
            return
        self.ended = True
        if self._state == _STREAM:
            self._pump()
        elif self._state == _WHOLE:
            self._send_whole()

    def abort(self) -> None:
        """Give the call up: CANCEL if the node has it; no callback follows.

        After the response head the call is its IncomingBody's to abort.
        """
        self._finish()
        self._client.give_up(self._receiver)

    def move_deadline(self, when: float) -> None:
        """Set the call's deadline (its receiver's) to ``when``, earlier or later.

        While a streamed body is sent, the caller decides what limits the
        call (docs/wire.md: the REQUEST's deadline_ms counts from the body's
        end): the call table re-reads ``receiver.deadline`` when its timer
        fires, and is asked here to fire by ``when``. No deadline (``math.inf``)
        is ignored until the head left: the deadline bounds finding a connection.
        """
        if when == math.inf and self._state == _UNBOUND:
            return  # still finding a connection: its deadline bounds that wait
        self._receiver.deadline = when
        link = self._link
        if link is not None and when != math.inf:
            link.watch(when)

    # the carrier's side ---------------------------------------------------------------

    def bind_stream(self, link: BodyLink, request_id: int, credit: int, max_data: int) -> None:
        """The head left with MORE: send DATA within ``credit``."""
        if self._state != _UNBOUND:
            return
        self._state = _STREAM
        self._link = link
        self.request_id = request_id
        self._window = SendWindow(credit)
        self.max_data = max_data
        self._pump()
        self._wake()

    def bind_whole(self, limit: int) -> None:
        """The node takes whole frames only: gather the body, one REQUEST at end()."""
        if self._state != _UNBOUND:
            return
        self._state = _WHOLE
        self._limit = limit
        if not self._check_whole_size():
            return
        if self.ended:
            self._send_whole()
        else:
            self._wake()

    def credit(self, increment: int) -> None:
        """A WINDOW_UPDATE for this call (FlowControlError past the largest window)."""
        self._window.grant(increment)
        if self._state == _STREAM:
            queued = self._queued
            self._pump()
            if self._queued and self._queued < queued:
                callback = self.on_credit
                if callback is not None:
                    try:
                        callback()
                    except Exception:
                        log.exception("on_credit failed")
            self._wake()

    def stop(self) -> None:
        """The call is over before its body (an early answer, an error, a lost connection)."""
        if self._state != _DONE:
            self._finish()
            self._wake()

    # internals ------------------------------------------------------------------------

    def _pump(self) -> None:
        link = self._link
        if link is None:
            return
        queue = self._queue
        window = self._window
        request_id = self.request_id
        max_data = self.max_data
        while queue:
            chunk = queue[0]
            size = len(chunk)
            granted = window.take(size if size < max_data else max_data)
            if not granted:
                return
            if granted == size:
                queue.pop(0)
                piece = chunk
            else:
                piece = chunk[:granted]
                queue[0] = chunk[granted:]
            self._queued -= granted
            # The last bytes of an ended body carry the end themselves.
            last = self.ended and not queue
            link.send_data(request_id, piece, not last)
            if last:
                self._finish()
                return
        if self.ended:
            link.send_data(request_id, b"", False)
            self._finish()

    def _wake(self) -> None:
        # Gathered bytes (the fallback) are taken; in a stream they must have left.
        if self._paused and (self._state != _STREAM or not self._queued):
            self._paused = False
            callback = self.on_writable
            if callback is not None:
                try:
                    callback()
                except Exception:
                    log.exception("on_writable failed")

    def _check_whole_size(self) -> bool:
        size = len(self._head) + self._queued
        if size <= self._limit:
            return True
        self._finish()
        try:
            self._receiver.on_error(
                RequestTooLarge(
                    f"request of at least {size} bytes exceeds the node's frame limit of"
                    f" {self._limit} bytes (the node takes no streamed body)"
                )
            )
        except Exception:
            log.exception("a receiver failed on an error")
        self._wake()
        return False

    def _send_whole(self) -> None:
        head, first = take_bytes_field(self._head, 6)  # pitcher.v1.Request.body
        body = first + b"".join(self._queue)
        self._finish()
        payload = with_bytes_field(head, 6, body) if body else head
        self._client.send_whole(payload, self._receiver, self._flags)

    def _finish(self) -> None:
        self._state = _DONE
        self._queue = []
        self._queued = 0


class IncomingBody:
    """The rest of a response body, after a RESPONSE head with the MORE flag."""

    __slots__ = (
        "_chunks",
        "_ended",
        "_error",
        "_idle",
        "_link",
        "_on_data",
        "_on_end",
        "_on_error",
        "_started",
        "deadline",
        "finished",
        "idempotent",
        "request_id",
        "size",
        "window",
    )

    def __init__(self, link: BodyLink, request_id: int, window: int, idle_timeout: float) -> None:
        self._link = link
        self.request_id = request_id
        self.window = ReceiveWindow(window)
        self._idle = idle_timeout
        # The idle limit as a call deadline: the call table's timer enforces it.
        self.deadline = link.time() + idle_timeout
        self.idempotent = False
        self._chunks: list[bytes] = []
        self._ended = False
        self._error: TransportError | None = None
        self._started = False
        self._on_data: DataCallback | None = None
        self._on_end: EndCallback | None = None
        self._on_error: ErrorCallback | None = None
        # The body's outcome is known (ended, failed or aborted).
        self.finished = False
        # Not known to the transport: the caller reads body_size from the head's payload.
        self.size: int | None = None

    # the caller's side ----------------------------------------------------------------

    def start(self, on_data: DataCallback, on_end: EndCallback, on_error: ErrorCallback) -> None:
        """Deliver the body from now on (what came before is delivered at once)."""
        if self._started:
            raise RuntimeError("IncomingBody.start() called twice")
        self._started = True
        self._on_data = on_data
        self._on_end = on_end
        self._on_error = on_error
        chunks, self._chunks = self._chunks, []
        for chunk in chunks:
            if self._on_data is None:
                return  # aborted from inside on_data
            on_data(chunk)
        if self._ended:
            self._deliver_end()
        elif self._error is not None:
            self._deliver_error(self._error)

    def consumed(self, size: int) -> None:
        """``size`` bytes were passed on downstream: credit back to the node."""
        window = self.window
        was_blocked = window.peer_blocked
        increment = window.consumed(size)
        if increment and not self.finished:
            link = self._link
            link.send_credit(self.request_id, increment)
            if was_blocked:
                # The node may send again: from now on a silence is its own.
                self.deadline = link.time() + self._idle
                link.watch(self.deadline)

    def abort(self) -> None:
        """The caller gives up: CANCEL, and nothing more is delivered."""
        self._on_data = self._on_end = self._on_error = None
        self._chunks = []
        if not self.finished:
            self.finished = True
            self._link.drop_call(self.request_id)

    # the carrier's side ---------------------------------------------------------------

    def receive(self, data: bytes, more: bool) -> bool:
        """A DATA frame for this call; True when it ended the body.

        FlowControlError (from the window) if the node sent beyond its credit.
        """
        window = self.window
        window.received(len(data))
        if self.finished:
            return not more
        if not more:
            self.finished = True
        else:
            self.deadline = math.inf if window.peer_blocked else self._link.time() + self._idle
        if data:
            if self._started:
                on_data = self._on_data
                if on_data is not None:
                    try:
                        on_data(data)
                    except Exception:
                        log.exception("a consumer failed on response body data")
            else:
                self._chunks.append(data)
        if not more:
            self._ended = True
            if self._started:
                self._deliver_end()
        return not more

    # As a pending call: what the call table and the carrier deliver.

    def on_response(self, payload: bytes) -> None:
        self.on_error(CallError("the node sent a second RESPONSE for a streamed call"))

    def on_error(self, error: TransportError) -> None:
        if isinstance(error, DeadlineExceeded):
            error = DeadlineExceeded(f"no response body data from the node for {self._idle:g}s")
        self.finished = True
        if self._started:
            self._deliver_error(error)
        elif self._error is None and not self._ended:
            self._error = error

    def _deliver_end(self) -> None:
        callback = self._on_end
        self._on_data = self._on_end = self._on_error = None
        if callback is not None:
            try:
                callback()
            except Exception:
                log.exception("a consumer failed at the end of a response body")

    def _deliver_error(self, error: TransportError) -> None:
        callback = self._on_error
        self._on_data = self._on_end = self._on_error = None
        if callback is not None:
            try:
                callback(error)
            except Exception:
                log.exception("a consumer failed on a response body error")
