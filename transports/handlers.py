"""Running a server's handler without a task when it does not need one.

Most handlers answer without ever waiting (an echo, a lookup in memory). A
task per request costs several microseconds, so the server first runs the
handler's coroutine by hand up to its first suspension; only a handler that
really waits is handed to a task, which carries on from where it stopped.
This is what Python 3.12's eager task factory does, written for 3.11.

A handler may also be a plain function that returns the response bytes
when it has them at once, and an awaitable only when it must wait: then not
even a coroutine is made for the request (the SDK's services run this way,
stepping their own handlers' coroutines).

A handler served as :class:`~transports.base.WithDeadline` is called with
the REQUEST frame's ``deadline_ms`` after the payload. The mark is read once,
here, so that neither kind of handler pays a call per request for the other.
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Hashable
from typing import Any

from .base import (
    WHOLE_CALL,
    WHOLE_CALL_MAY_STREAM,
    ServerCall,
    StreamedAnswer,
    WithDeadline,
    WithStreams,
)
from .control import ErrorInfo
from .errors import ErrorCode
from .stepping import as_coroutine, resume

log = logging.getLogger("pitcher.transports")


_CoroutineType = types.CoroutineType


# A handler as the runner takes it: a transport Handler (request payload in,
# awaitable of the response payload out), or a function answering the bytes
# at once and an awaitable only when it has to wait; or either, taking the
# deadline too, marked by WithDeadline.
RunnerHandler = Callable[[bytes], "Awaitable[bytes] | bytes"] | WithDeadline | WithStreams

# What a server is told when one request is done: the key it started the
# request with, and either the response payload (bytes, or a StreamedAnswer
# from a WithStreams handler) or the error to send.
Answer = Callable[[Hashable, "bytes | StreamedAnswer | None", "ErrorInfo | None"], None]

# How the handler is called.
_PAYLOAD = 0  # handler(payload)
_DEADLINE = 1  # handler(payload, deadline_ms)
_STREAMS = 2  # handler(payload, deadline_ms, call)


class HandlerRunner:
    """Runs a server's handler once per request, for every carrier.

    ``start`` runs the handler at once; a handler that answers at once costs
    no task, no timer and no closure. One that has to wait goes on in a task,
    which a CANCEL (``cancel``) or the request's deadline cancels (for a
    streamed request body, counted from the body's last DATA: ``body_ended``). Every
    request ends in exactly one call of ``answer`` unless it was cancelled:
    with the response payload, or with an ErrorInfo (INTERNAL for a handler
    that raised or returned something other than bytes, DEADLINE_EXCEEDED
    for one stopped at its deadline).
    """

    __slots__ = (
        "_answer",
        "_handler",
        "_loop",
        "_mode",
        "_on_settled",
        "_timers",
        "_unstarted",
        "tasks",
    )

    def __init__(
        self,
        handler: RunnerHandler,
        loop: asyncio.AbstractEventLoop,
        answer: Answer,
        on_settled: Callable[[], None] = lambda: None,
    ) -> None:
        # Unwrapped once: per request a branch picks the call, and no wrapper
        # adds a Python call to any kind of handler.
        self._handler: Callable[..., Any]
        if isinstance(handler, WithStreams):
            self._mode = _STREAMS
            self._handler = handler.handler
        elif isinstance(handler, WithDeadline):
            self._mode = _DEADLINE
            self._handler = handler.handler
        else:
            self._mode = _PAYLOAD
            self._handler = handler
        self._loop = loop
        self._answer = answer
        # Called whenever a waiting request ends, answered or cancelled: the
        # server may have been waiting for its last one to close or drain.
        self._on_settled = on_settled
        self.tasks: dict[Hashable, asyncio.Task[None]] = {}
        # The deadline timers of the waiting requests that have one.
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}
        # Tasks not yet started, with the handler coroutine each will carry on.
        self._unstarted: dict[asyncio.Task[None], Coroutine[Any, Any, Any]] = {}

    def __len__(self) -> int:
        return len(self.tasks)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.tasks

    @property
    def takes_streams(self) -> bool:
        """The handler was served as WithStreams: it takes streamed bodies."""
        return self._mode == _STREAMS

    def start(
        self,
        key: Hashable,
        payload: bytes,
        deadline_ms: int,
        may_stream: int = 0,
        body: AsyncIterator[bytes] | None = None,
    ) -> None:
        """Run the handler for one request.

        ``may_stream`` (non-zero: the caller takes a streamed answer) and ``body``
        (the rest of a streamed request body) reach a WithStreams handler only.
        """
        coroutine: Coroutine[Any, Any, Any] | None = None
        try:
            handler = self._handler
            mode = self._mode
            # Literals, not the module's names: a global lookup per request saved.
            if mode == 0:  # _PAYLOAD
                result = handler(payload)
            elif mode == 1:  # _DEADLINE
                result = handler(payload, deadline_ms)
            else:
                if body is not None:
                    call = ServerCall(body, may_stream != 0)
                else:
                    call = WHOLE_CALL_MAY_STREAM if may_stream else WHOLE_CALL
                result = handler(payload, deadline_ms, call)
            if not isinstance(result, bytes) and not isinstance(result, StreamedAnswer):
                coroutine = result if isinstance(result, _CoroutineType) else as_coroutine(result)
                yielded = coroutine.send(None)
        except StopIteration as done:
            coroutine = None
            result = done.value
        except Exception as exc:
            self._finish(key, None, exc)
            return
        if coroutine is None:
            if isinstance(result, bytes):
                self._answer(key, result, None)
            else:
                self._finish(key, result, None)
            return
        task = self._loop.create_task(self._carry_on(key, coroutine, yielded))
        self.tasks[key] = task
        self._unstarted[task] = coroutine
        if deadline_ms and body is None:
            # Nobody waits for the answer after this: stop the work. A streamed
            # request's deadline counts from its body's end (body_ended).
            self._timers[key] = self._loop.call_later(deadline_ms / 1000, self._expire, key, task)

    def body_ended(self, key: Hashable, deadline_ms: int) -> None:
        """A streamed request's last DATA arrived: its deadline runs from now.

        Only for a handler still at work: one that answered (or was cancelled)
        before the body's end is no longer in ``tasks`` under a handler's task,
        since the server drops the body of an answered call first.
        """
        if not deadline_ms or key in self._timers:
            return
        task = self.tasks.get(key)
        if task is not None:
            self._timers[key] = self._loop.call_later(deadline_ms / 1000, self._expire, key, task)

    def cancel(self, key: Hashable) -> bool:
        """The caller gave up (CANCEL): stop the handler, send nothing."""
        task = self.tasks.pop(key, None)
        if task is None:
            return False
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        self._stop(task)
        return True

    def adopt(self, key: Hashable, task: asyncio.Task[None]) -> None:
        """Count a task that carries on a request after its handler answered (a streamed
        answer): it is in flight, and ``cancel`` (CANCEL) or ``cancel_all`` stops it."""
        self.tasks[key] = task

    def release(self, key: Hashable, task: asyncio.Task[None]) -> None:
        """An adopted task is done."""
        if self.tasks.get(key) is task:
            del self.tasks[key]
        self._on_settled()

    def cancel_all(self) -> None:
        tasks, self.tasks = self.tasks, {}
        for task in tasks.values():
            self._stop(task)
        timers, self._timers = self._timers, {}
        for timer in timers.values():
            timer.cancel()

    def _stop(self, task: asyncio.Task[None]) -> None:
        task.cancel()
        coroutine = self._unstarted.pop(task, None)
        if coroutine is None:
            return
        # Cancelled before its first step, the task will run no line of
        # _carry_on: the handler gets its CancelledError here, where it waits,
        # as it would have in the task.
        try:
            coroutine.throw(asyncio.CancelledError())
        except (asyncio.CancelledError, StopIteration):
            pass
        except Exception:
            log.exception("handler failed while cancelled")
        else:
            coroutine.close()  # it waits again, and nothing will carry it on
        self._on_settled()

    async def _carry_on(self, key: Hashable, coroutine: Any, yielded: Any) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._unstarted.pop(task, None)
        error: Exception | None = None
        try:
            result = await resume(coroutine, yielded)
        except asyncio.CancelledError:
            # Our own deadline (_expire) if the request is still ours; a CANCEL
            # or cancel_all forgets it first, and then nothing is sent.
            if self._settle(key):
                self._answer(key, None, ErrorInfo(ErrorCode.DEADLINE_EXCEEDED, "deadline passed"))
            self._on_settled()
            raise
        except Exception as exc:
            result = None
            error = exc
        if self._settle(key):
            self._finish(key, result, error)
        self._on_settled()

    def _settle(self, key: Hashable) -> bool:
        """Forget the running task's request; False if it was forgotten already.

        Compared by identity: a datagram peer may reuse a cancelled request's key.
        """
        if self.tasks.get(key) is not asyncio.current_task():
            return False
        del self.tasks[key]
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        return True

    def _expire(self, key: Hashable, task: asyncio.Task[None]) -> None:
        if self.tasks.get(key) is task:
            task.cancel()

    def _finish(self, key: Hashable, result: Any, error: BaseException | None) -> None:
        if error is None:
            if isinstance(result, bytes) or (
                self._mode == _STREAMS and isinstance(result, StreamedAnswer)
            ):
                self._answer(key, result, None)
                return
            error = TypeError(f"handler returned {type(result).__name__}, not bytes")
        log.error("handler failed on request %r", key, exc_info=error)
        self._answer(key, None, ErrorInfo(ErrorCode.INTERNAL, f"{type(error).__name__}: {error}"))
