"""Running a server's handler without a task when it does not need one.

Most handlers answer without ever waiting (an echo, a lookup in memory). A
task per request costs several microseconds, so the server first runs the
handler's coroutine by hand up to its first suspension; only a handler that
really waits is handed to a task, which carries on from where it stopped.
This is what Python 3.12's eager task factory does, written for 3.11.
"""

from __future__ import annotations

import types
from collections.abc import Awaitable, Coroutine, Generator
from typing import Any


async def _as_coroutine(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def as_coroutine(awaitable: Awaitable[Any]) -> Coroutine[Any, Any, Any]:
    """The awaitable itself if it is a coroutine, else a coroutine awaiting it."""
    if isinstance(awaitable, types.CoroutineType):
        return awaitable
    return _as_coroutine(awaitable)


@types.coroutine
def resume(coroutine: Coroutine[Any, Any, Any], yielded: Any) -> Generator[Any, Any, Any]:
    """Carry on a coroutine that was stepped by hand and yielded ``yielded``.

    Awaited inside a task, this hands ``yielded`` (the future the coroutine
    waits for) to the task, then passes what the task sends or throws back
    into the coroutine, until it returns.
    """
    while True:
        try:
            sent = yield yielded
        except GeneratorExit:
            coroutine.close()
            raise
        except BaseException as exc:
            try:
                yielded = coroutine.throw(exc)
            except StopIteration as stop:
                return stop.value
            continue
        try:
            yielded = coroutine.send(sent)
        except StopIteration as stop:
            return stop.value
