"""Stepping handlers' coroutines by hand, and carrying them on inside a task.

Kept apart from the handler runner (transports/handlers.py) so that these
always run as Python, whatever the build: a generator-based coroutine
(``types.coroutine``) must be a real generator, and awaiting something that
is not awaitable must raise TypeError, where compiled code would iterate it.
"""

from __future__ import annotations

import types
from collections.abc import Awaitable, Coroutine, Generator
from typing import Any

_CoroutineType = types.CoroutineType


async def _as_coroutine(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def as_coroutine(awaitable: Awaitable[Any]) -> Coroutine[Any, Any, Any]:
    """The awaitable itself if it is a coroutine, else a coroutine awaiting it."""
    if isinstance(awaitable, _CoroutineType):
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
