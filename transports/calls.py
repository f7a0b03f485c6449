"""How a caller receives the outcome of one call, for every transport.

The hot path hands a client a *receiver*: an object with a ``deadline`` (in
event-loop time) and two methods, one of which the client calls exactly once,
directly from the code that read the answer. No future and no timer is made
per call: a future plus its callback costs about 3 µs and a timer about 2 µs
(uvloop, measured), a large share of the time a request spends in the proxy.
Deadlines are checked by one timer per connection, armed for the earliest.

:class:`CallTable` is the bookkeeping every client shares: the calls pending
by request id, that one deadline timer, the header of a request (and so the
encoding of its deadline), cancel and fail-all. A carrier keeps only its I/O
and tells the table, through :class:`CallCarrier`, what expiring a call costs
on its wire. :class:`FutureReceiver` adapts all this to ``await client.call(...)``.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import TYPE_CHECKING, Final, Protocol

from .control import ErrorInfo
from .errors import (
    CallError,
    DeadlineExceeded,
    ErrorCode,
    Overloaded,
    Rejected,
    RemoteError,
    TransportError,
)
from .frame import HEADER, VERSION

if TYPE_CHECKING:
    from .bodies import IncomingBody

log = logging.getLogger("pitcher.transports")


class Receiver(Protocol):
    """Gets the outcome of one call: exactly one of the two methods, once."""

    # Event-loop time after which the caller stops waiting.
    deadline: float
    # Whether sending the request twice does no harm: a lossy carrier (UDP)
    # re-sends only these, with the same request id.
    idempotent: bool

    def on_response(self, payload: bytes) -> None: ...

    def on_error(self, error: TransportError) -> None: ...


class StreamReceiver(Receiver, Protocol):
    """A receiver that takes a streamed response (``send(..., stream_response=True)``).

    Gets exactly one of ``on_response`` (a whole answer), ``on_error`` (before
    any head) or ``on_response_head`` (a head whose body follows through
    ``body``: see :class:`transports.bodies.IncomingBody`). ``timeout``, the
    call's own timeout in seconds, is the idle limit between two DATA frames
    of its body (the carrier's ``stream_idle_timeout`` if it has none).
    """

    def on_response_head(self, payload: bytes, body: IncomingBody) -> None: ...


class FutureReceiver:
    """A receiver that completes an asyncio future."""

    __slots__ = ("deadline", "future", "idempotent")

    def __init__(
        self, future: asyncio.Future[bytes], deadline: float, idempotent: bool = False
    ) -> None:
        self.future = future
        self.deadline = deadline
        self.idempotent = idempotent

    def on_response(self, payload: bytes) -> None:
        if not self.future.done():
            self.future.set_result(payload)

    def on_error(self, error: TransportError) -> None:
        if not self.future.done():
            self.future.set_exception(error)


# The header's deadline_ms is a uint32; a budget beyond it (or none) is sent as 0,
# "no deadline" (docs/wire.md, 6.1), on every carrier.
MAX_DEADLINE_MS: Final = 0xFFFFFFFF
# uvloop's timers have millisecond resolution and may fire a little early.
TIMER_SLACK: Final = 0.001
_pack_header: Final = HEADER.pack


def deadline_ms(remaining: float) -> int:
    """The header value for ``remaining`` seconds: at least 1, 0 when it does not fit."""
    milliseconds = remaining * 1000
    if milliseconds >= MAX_DEADLINE_MS:
        return 0
    return max(1, int(milliseconds))


def error_for(info: ErrorInfo) -> CallError:
    """The CallError a caller gets for a per-request ERROR frame, on every carrier."""
    code = info.code
    if code == ErrorCode.UNAVAILABLE:
        return Rejected(f"node refused: {info.describe()}")
    if code == ErrorCode.DEADLINE_EXCEEDED:
        # The node's clock ran out a hair before ours: the same outcome.
        return DeadlineExceeded(f"the node gave up: {info.message}")
    if code == ErrorCode.TOO_MANY_IN_FLIGHT:
        return Overloaded(info.message)  # refused without being started
    return RemoteError(code, info.message)


def deliver_response(receiver: Receiver, payload: bytes) -> None:
    """Hand over an answer; a receiver's own failure is logged, not raised into the carrier."""
    try:
        receiver.on_response(payload)
    except Exception:
        log.exception("a receiver failed on a response")


def deliver_error(receiver: Receiver, error: TransportError) -> None:
    try:
        receiver.on_error(error)
    except Exception:
        log.exception("a receiver failed on an error")


class AwaitableCalls:
    """``start()`` and ``await call()`` for a client that implements send() and cancel()."""

    __slots__ = ()

    def send(self, payload: bytes, receiver: Receiver) -> None:
        raise NotImplementedError

    def cancel(self, receiver: Receiver) -> None:
        raise NotImplementedError

    def start(
        self, payload: bytes, timeout: float, idempotent: bool = False
    ) -> asyncio.Future[bytes]:
        """Send one request; the future gets the response payload or a CallError.

        Cancelling the future gives the call up and tells the node (CANCEL).
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        receiver = FutureReceiver(future, loop.time() + timeout, idempotent)
        self.send(payload, receiver)
        if not future.done():
            future.add_done_callback(
                lambda done: self.cancel(receiver) if done.cancelled() else None
            )
        return future

    async def call(self, payload: bytes, timeout: float, idempotent: bool = False) -> bytes:
        return await self.start(payload, timeout, idempotent)


class CallCarrier(Protocol):
    """What a :class:`CallTable` asks of the carrier that owns it."""

    def call_expired(self, request_id: int) -> bool:
        """The table dropped this call at its deadline: tell the node (CANCEL) if it may
        have it. True if it may, False if the request never left."""
        ...

    def timer_due(self, now: float) -> float:
        """The carrier's own timed work (re-sends, queued sends), run on the table's
        timer; the next time it needs the timer, or ``math.inf``."""
        ...


class CallTable:
    """The calls one client (or one connection) has pending, by request id.

    ``pending`` is one dict for the table's life (fail_all empties it in
    place), so a carrier's read path may hold it and pop answers straight
    from it. One timer, armed for the earliest deadline (or for the carrier's
    own next event, see :meth:`wake_at`), expires calls; nothing is made per
    call but the header.
    """

    __slots__ = ("_carrier", "_loop", "_timer", "next_id", "pending", "timer_at")

    def __init__(
        self,
        carrier: CallCarrier,
        loop: asyncio.AbstractEventLoop | None = None,
        first_id: int = 1,
    ) -> None:
        self._carrier = carrier
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = None
        # When the timer fires (inf: not armed); a call due earlier re-arms it.
        self.timer_at = math.inf
        self.next_id = first_id
        self.pending: dict[int, Receiver] = {}

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop the timer runs on, for a carrier that learns it late."""
        self._loop = loop

    def __len__(self) -> int:
        return len(self.pending)

    def request_header(
        self, receiver: Receiver, size: int, remaining: float, flags: int = 0
    ) -> bytes:
        """Register a call and return its REQUEST header (``size`` payload bytes).

        ``remaining``: seconds left until ``receiver.deadline``, > 0 (a carrier
        refuses a call already late in its own words). The header's
        deadline_ms is :func:`deadline_ms`, inline: the one encoding of every
        carrier.
        """
        request_id = self.next_id
        self.next_id = request_id + 1
        self.pending[request_id] = receiver
        deadline = receiver.deadline
        if deadline < self.timer_at:
            self._arm(deadline)
        milliseconds = remaining * 1000.0
        return _pack_header(
            VERSION,
            1,  # FrameType.REQUEST
            flags,
            size,
            request_id,
            (int(milliseconds) or 1) if milliseconds < MAX_DEADLINE_MS else 0,
        )

    def last_id(self) -> int:
        """The id :meth:`request_header` gave last."""
        return self.next_id - 1

    def cancel(self, receiver: Receiver) -> int:
        """Forget the call of ``receiver``: its request id, or 0 if it was not pending.

        No callback follows; telling the node (CANCEL) is the carrier's part.
        """
        for request_id, pending in self.pending.items():
            if pending is receiver:
                del self.pending[request_id]
                return request_id
        return 0

    def fail_all(self, error: TransportError) -> None:
        """Every pending call fails with ``error``; the table is empty after."""
        pending = self.pending
        if not pending:
            return
        receivers = list(pending.values())
        pending.clear()
        for receiver in receivers:
            deliver_error(receiver, error)

    def wake_at(self, when: float) -> None:
        """Run the timer at ``when`` at the latest, for the carrier's own timed work."""
        if when < self.timer_at:
            self._arm(when)

    def close(self) -> None:
        """Stop the timer (the pending calls stay: fail them first if they must be told)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.timer_at = math.inf

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = self._loop
        assert loop is not None, "CallTable.bind() was not called"
        self.timer_at = when
        self._timer = loop.call_at(when, self._expire_due)

    def _expire_due(self) -> None:
        self._timer = None
        self.timer_at = math.inf
        loop = self._loop
        assert loop is not None
        now = loop.time() + TIMER_SLACK
        earliest = math.inf
        pending = self.pending
        expired: list[tuple[int, Receiver]] = []
        for request_id, receiver in pending.items():
            deadline = receiver.deadline
            if deadline <= now:
                expired.append((request_id, receiver))
            elif deadline < earliest:
                earliest = deadline
        carrier = self._carrier
        failed: list[tuple[Receiver, bool]] = []
        for request_id, receiver in expired:
            # The carrier's I/O for one call may end others (a connection that
            # closes once drained): each is dropped once, by whoever comes first.
            if pending.pop(request_id, None) is receiver:
                failed.append((receiver, carrier.call_expired(request_id)))
        later = carrier.timer_due(now)
        if later < earliest:
            earliest = later
        for receiver, sent in failed:
            message = "no answer before the deadline" if sent else "deadline passed unsent"
            deliver_error(receiver, DeadlineExceeded(message, sent=sent))
        # A receiver told above may have made a call and armed the timer already.
        if earliest < self.timer_at:
            self._arm(earliest)
