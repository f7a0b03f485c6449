"""Running handlers eagerly: what a task would do, without a task when none is needed."""

from __future__ import annotations

import asyncio

import pytest

from transports.handlers import as_coroutine, resume


def test_a_handler_that_never_waits_finishes_on_its_first_step() -> None:
    async def handler() -> bytes:
        return b"done"

    coroutine = as_coroutine(handler())
    with pytest.raises(StopIteration) as stop:
        coroutine.send(None)
    assert stop.value.value == b"done"


def test_a_non_coroutine_awaitable_is_wrapped() -> None:
    async def scenario() -> bytes:
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        future.set_result(b"ready")
        return await as_coroutine(future)

    assert asyncio.run(scenario()) == b"ready"


def _step(coroutine: object) -> object:
    return coroutine.send(None)  # type: ignore[attr-defined]


def test_a_suspended_handler_resumes_in_a_task_with_every_await_after() -> None:
    events: list[str] = []

    async def handler() -> bytes:
        events.append("start")
        await asyncio.sleep(0.01)
        events.append("middle")
        await asyncio.sleep(0)
        events.append("end")
        return b"late"

    async def scenario() -> bytes:
        coroutine = handler()
        yielded = _step(coroutine)
        assert events == ["start"]
        return await asyncio.get_running_loop().create_task(resume(coroutine, yielded))

    assert asyncio.run(scenario()) == b"late"
    assert events == ["start", "middle", "end"]


def test_an_error_after_suspension_reaches_the_task() -> None:
    async def handler() -> bytes:
        await asyncio.sleep(0)
        raise KeyError("missing")

    async def scenario() -> None:
        coroutine = handler()
        yielded = _step(coroutine)
        with pytest.raises(KeyError):
            await asyncio.get_running_loop().create_task(resume(coroutine, yielded))

    asyncio.run(scenario())


def test_cancelling_the_task_cancels_the_handler_where_it_waits() -> None:
    seen: list[str] = []

    async def handler() -> bytes:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen.append("cancelled inside")
            raise
        return b"never"

    async def scenario() -> None:
        coroutine = handler()
        yielded = _step(coroutine)
        task = asyncio.get_running_loop().create_task(resume(coroutine, yielded))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert seen == ["cancelled inside"]


def test_a_handler_may_catch_the_cancellation_and_answer() -> None:
    async def handler() -> bytes:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return b"partial"
        return b"never"

    async def scenario() -> bytes:
        coroutine = handler()
        yielded = _step(coroutine)
        task = asyncio.get_running_loop().create_task(resume(coroutine, yielded))
        await asyncio.sleep(0.01)
        task.cancel()
        return await task

    assert asyncio.run(scenario()) == b"partial"


def test_deadline_ms_fits_the_header_field() -> None:
    from transports.calls import MAX_DEADLINE_MS, deadline_ms

    assert deadline_ms(0.0001) == 1  # never 0, which means "none"
    assert deadline_ms(1.5) == 1500
    assert deadline_ms(MAX_DEADLINE_MS / 1000) == 0
    assert deadline_ms(float("inf")) == 0
