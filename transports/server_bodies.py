"""A server's streamed bodies: the request body a handler reads, the answer it streams.

:class:`RequestBody` is ``ServerCall.body``: an async iterator over the DATA
frames of one call. Credit goes back to the caller as the handler takes
chunks (in half-window batches), so a handler that reads slowly holds the
caller back and the server never keeps more than the window of one call.
The REQUEST's ``deadline_ms`` counts from the body's last DATA: its
``deadline`` is set then (the server arms the handler's deadline timer at
the same moment), so a long upload that keeps moving never expires.

:func:`send_streamed_answer` runs a :class:`~transports.base.StreamedAnswer`
in a task of its own (counted in flight by the handler runner, so a CANCEL,
GOAWAY or close reaches it): the RESPONSE head with MORE, then DATA as the
caller's credit (:class:`AnswerCredit`) allows, waiting for WINDOW_UPDATE,
then the last DATA; an exception in the chunks sends a per-request ERROR
(INTERNAL), which the caller reads as a cut body.

Carrier-neutral: both talk to their connection through :class:`ServerLink`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Protocol

from .base import StreamedAnswer
from .control import ErrorInfo
from .errors import DeadlineExceeded, ErrorCode, TransportError
from .flow import ReceiveWindow, SendWindow, take_bytes_field, with_bytes_field

log = logging.getLogger("pitcher.transports")

# A streamed answer lets other work run at least this often (bytes sent).
YIELD_EVERY = 1024 * 1024


class ServerLink(Protocol):
    """What a server-side body asks of the connection that carries its call."""

    def send_data(self, request_id: int, data: bytes, more: bool) -> None: ...

    def send_credit(self, request_id: int, increment: int) -> None: ...

    def send_head(self, request_id: int, payload: bytes, more: bool) -> None:
        """Write a RESPONSE (with MORE when its body follows in DATA)."""
        ...

    def send_error(self, request_id: int, info: ErrorInfo) -> None: ...


class RequestBody:
    """The rest of a request body (``ServerCall.body``), chunk by chunk."""

    __slots__ = (
        "_chunks",
        "_ended",
        "_error",
        "_idle",
        "_link",
        "_loop",
        "_waiter",
        "deadline",
        "deadline_ms",
        "request_id",
        "window",
    )

    def __init__(
        self,
        link: ServerLink,
        loop: asyncio.AbstractEventLoop,
        request_id: int,
        window: int,
        idle_timeout: float,
        deadline_ms: int = 0,
    ) -> None:
        self._link = link
        self._loop = loop
        self.request_id = request_id
        self.window = ReceiveWindow(window)
        self._idle = idle_timeout
        self._chunks: deque[bytes] = deque()
        self._ended = False
        self._error: TransportError | None = None
        self._waiter: asyncio.Future[None] | None = None
        # The REQUEST's deadline_ms counts from the body's last DATA (docs/wire.md):
        # ``deadline`` (time.monotonic()) is None until then, or without a deadline.
        self.deadline_ms = deadline_ms
        self.deadline: float | None = None

    def __aiter__(self) -> RequestBody:
        return self

    async def __anext__(self) -> bytes:
        chunks = self._chunks
        while not chunks:
            if self._error is not None:
                raise self._error
            if self._ended:
                raise StopAsyncIteration
            waiter = self._loop.create_future()
            self._waiter = waiter
            # The caller holds credit whenever the handler waits here (nothing is
            # held back): a silence this long is the caller's. A timer, not
            # asyncio.timeout: the handler's first step may run outside a task.
            timer = self._loop.call_later(self._idle, _expire, waiter, self._idle)
            try:
                await waiter
            finally:
                self._waiter = None
                timer.cancel()
        chunk = chunks.popleft()
        increment = self.window.consumed(len(chunk))
        if increment and not self._ended and self._error is None:
            self._link.send_credit(self.request_id, increment)
        return chunk

    # the connection's side ------------------------------------------------------------

    def receive(self, data: bytes, more: bool) -> bool:
        """A DATA frame for this call (FlowControlError beyond the window); True at its end."""
        self.window.received(len(data))
        if data:
            self._chunks.append(data)
        if not more:
            self._ended = True
            if self.deadline_ms:
                self.deadline = time.monotonic() + self.deadline_ms / 1000
        self._wake()
        return not more

    def fail(self, error: TransportError) -> None:
        """The body will not be complete (the call was cancelled, the connection lost)."""
        if not self._ended and self._error is None:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _expire(waiter: asyncio.Future[None], idle: float) -> None:
    if not waiter.done():
        waiter.set_exception(
            DeadlineExceeded(f"no request body data from the caller for {idle:g}s")
        )


class AnswerCredit:
    """The caller's credit for one streamed answer, and a way to wait for more."""

    __slots__ = ("_loop", "_waiter", "window")

    def __init__(self, loop: asyncio.AbstractEventLoop, initial: int) -> None:
        self._loop = loop
        self.window = SendWindow(initial)
        self._waiter: asyncio.Future[None] | None = None

    def grant(self, increment: int) -> None:
        """A WINDOW_UPDATE (FlowControlError past the largest window)."""
        self.window.grant(increment)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self, wanted: int) -> int:
        """Up to ``wanted`` bytes of credit, waiting while there is none."""
        window = self.window
        granted = window.take(wanted)
        while not granted:
            waiter = self._loop.create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                self._waiter = None
            granted = window.take(wanted)
        return granted


async def send_streamed_answer(
    link: ServerLink,
    request_id: int,
    answer: StreamedAnswer,
    credit: AnswerCredit,
    max_data: int,
) -> None:
    """Head, DATA within the caller's credit, last DATA; ERROR (INTERNAL) if chunks fail.

    Cancelled (CANCEL, close), it sends nothing more and closes the chunks.
    """
    link.send_head(request_id, answer.head, True)
    chunks = answer.chunks
    # Bytes sent since this task last let the loop run: chunks that never wait,
    # under a large window, would otherwise hold the event loop for as long.
    unyielded = 0
    try:
        async for chunk in chunks:
            if not isinstance(chunk, bytes | bytearray | memoryview):
                raise TypeError(f"a streamed answer yielded {type(chunk).__name__}, not bytes")
            view = bytes(chunk)
            size = len(view)
            offset = 0
            while offset < size:
                wanted = size - offset
                granted = await credit.take(wanted if wanted < max_data else max_data)
                link.send_data(request_id, view[offset : offset + granted], True)
                offset += granted
                unyielded += granted
                if unyielded >= YIELD_EVERY:
                    unyielded = 0
                    await asyncio.sleep(0)
        link.send_data(request_id, b"", False)
    except asyncio.CancelledError:
        await _close_chunks(chunks)
        raise
    except Exception as exc:
        log.error("streamed answer to request %d failed", request_id, exc_info=exc)
        link.send_error(request_id, ErrorInfo(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"))
        await _close_chunks(chunks)


async def gather_answer(answer: StreamedAnswer, limit: int) -> bytes:
    """A StreamedAnswer as one whole response payload, for a caller with no window.

    The chunks go into the head's body field (``pitcher.v1.Response.body``, 4)
    after the head's own first bytes. ValueError over ``limit`` bytes.
    """
    parts: list[bytes] = []
    size = len(answer.head)
    chunks = answer.chunks
    try:
        async for chunk in chunks:
            parts.append(bytes(chunk))
            size += len(chunk)
            if size > limit:
                raise ValueError(
                    f"response of over {size} bytes exceeds the frame limit of {limit}"
                    " (the caller takes no streamed answer)"
                )
    except BaseException:
        await _close_chunks(chunks)
        raise
    head, first = take_bytes_field(answer.head, 4)
    body = first + b"".join(parts)
    return with_bytes_field(head, 4, body) if body else head


async def _close_chunks(chunks: object) -> None:
    close = getattr(chunks, "aclose", None)
    if close is None:
        return
    try:
        await close()
    except Exception:
        log.exception("closing a streamed answer's chunks failed")
