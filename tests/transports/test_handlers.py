"""Running handlers eagerly: what a task would do, without a task when none is needed."""

from __future__ import annotations

import asyncio

import pytest

from transports.handlers import as_coroutine
from transports.stepping import resume


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


# ----------------------------------------------------------------------------- HandlerRunner

from collections.abc import Hashable  # noqa: E402
from typing import Any  # noqa: E402

from transports.base import WithDeadline  # noqa: E402
from transports.control import ErrorInfo  # noqa: E402
from transports.errors import ErrorCode  # noqa: E402
from transports.handlers import HandlerRunner  # noqa: E402
from transports.stream_io import BATCH_FRAMES, Batcher  # noqa: E402


class Answers:
    def __init__(self) -> None:
        self.got: list[tuple[Hashable, bytes | None, ErrorInfo | None]] = []
        self.settled = 0

    def __call__(self, key: Hashable, result: bytes | None, error: ErrorInfo | None) -> None:
        self.got.append((key, result, error))

    def on_settled(self) -> None:
        self.settled += 1


def runner_for(handler: Any, loop: asyncio.AbstractEventLoop) -> tuple[HandlerRunner, Answers]:
    answers = Answers()
    return HandlerRunner(handler, loop, answers, answers.on_settled), answers


def test_a_plain_function_answering_bytes_is_answered_inside_start() -> None:
    async def scenario() -> None:
        runner, answers = runner_for(lambda payload: payload.upper(), asyncio.get_running_loop())
        runner.start(1, b"abc", 100)
        assert answers.got == [(1, b"ABC", None)]
        assert not runner.tasks and not runner._timers

    asyncio.run(scenario())


def test_a_plain_function_may_answer_an_awaitable_when_it_must_wait() -> None:
    async def later(payload: bytes) -> bytes:
        await asyncio.sleep(0.01)
        return payload * 2

    async def scenario() -> None:
        runner, answers = runner_for(later, asyncio.get_running_loop())
        runner.start(1, b"ab", 5000)
        assert answers.got == [] and 1 in runner and len(runner) == 1
        assert 1 in runner._timers  # the deadline is armed while it waits
        await asyncio.sleep(0.05)
        assert answers.got == [(1, b"abab", None)]
        assert not runner.tasks and not runner._timers  # the timer went with the task
        assert answers.settled == 1

    asyncio.run(scenario())


def test_a_handler_marked_with_deadline_gets_the_frames_deadline_ms() -> None:
    seen: list[tuple[bytes, int]] = []

    def plain(payload: bytes, deadline_ms: int) -> bytes:
        seen.append((payload, deadline_ms))
        return payload

    async def waiting(payload: bytes, deadline_ms: int) -> bytes:
        await asyncio.sleep(0)
        seen.append((payload, deadline_ms))
        return payload

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        runner, answers = runner_for(WithDeadline(plain), loop)
        runner.start(1, b"a", 1500)
        runner.start(2, b"b", 0)
        assert answers.got == [(1, b"a", None), (2, b"b", None)]
        runner, answers = runner_for(WithDeadline(waiting), loop)
        runner.start(3, b"c", 250)
        assert 3 in runner._timers  # the deadline still stops the work
        await asyncio.sleep(0.01)
        assert answers.got == [(3, b"c", None)]

    asyncio.run(scenario())
    assert seen == [(b"a", 1500), (b"b", 0), (b"c", 250)]


def test_a_server_that_does_not_know_the_mark_may_call_it_without_a_deadline() -> None:
    marked = WithDeadline(lambda payload, deadline_ms: b"%s %d" % (payload, deadline_ms))
    assert marked(b"old") == b"old 0"


@pytest.mark.parametrize(
    ("handler", "message"),
    [
        (lambda payload: "text", "TypeError: object str can't be used in 'await' expression"),
        (lambda payload: 1 / 0, "ZeroDivisionError: division by zero"),
    ],
)
def test_a_plain_function_that_fails_or_answers_no_bytes_is_an_internal_error(
    handler: Any, message: str
) -> None:
    async def scenario() -> None:
        runner, answers = runner_for(handler, asyncio.get_running_loop())
        runner.start(7, b"", 0)
        [(key, result, error)] = answers.got
        assert (key, result) == (7, None)
        assert error is not None and error.code == ErrorCode.INTERNAL
        assert error.message == message

    asyncio.run(scenario())


def test_a_coroutine_answering_no_bytes_is_an_internal_error() -> None:
    async def handler(payload: bytes) -> Any:
        return "text"

    async def scenario() -> None:
        runner, answers = runner_for(handler, asyncio.get_running_loop())
        runner.start(3, b"", 0)
        [(_, result, error)] = answers.got
        assert result is None and error is not None
        assert error.message == "TypeError: handler returned str, not bytes"

    asyncio.run(scenario())


def test_the_deadline_stops_a_waiting_handler_and_answers_deadline_exceeded() -> None:
    async def forever(payload: bytes) -> bytes:
        await asyncio.sleep(10)
        return b"never"

    async def scenario() -> None:
        runner, answers = runner_for(forever, asyncio.get_running_loop())
        runner.start(1, b"", 20)
        await asyncio.sleep(0.1)
        [(key, result, error)] = answers.got
        assert (key, result) == (1, None)
        assert error is not None and error.code == ErrorCode.DEADLINE_EXCEEDED
        assert not runner.tasks and not runner._timers

    asyncio.run(scenario())


def test_a_cancelled_request_sends_nothing_and_disarms_its_deadline() -> None:
    async def forever(payload: bytes) -> bytes:
        await asyncio.sleep(10)
        return b"never"

    async def scenario() -> None:
        runner, answers = runner_for(forever, asyncio.get_running_loop())
        runner.start(1, b"", 5000)
        [task] = runner.tasks.values()
        assert runner.cancel(1) and not runner.cancel(1)
        assert not runner.tasks and not runner._timers
        await asyncio.sleep(0.01)
        assert task.cancelled() and answers.got == []

    asyncio.run(scenario())


def test_a_key_reused_after_a_cancel_belongs_to_the_new_request() -> None:
    # A datagram peer may send a new request under a cancelled one's key. The old
    # handler catches its cancellation and answers; that must not end the new one.
    async def stubborn(payload: bytes) -> bytes:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return b"old"
        return b"never"

    async def scenario() -> None:
        runner, answers = runner_for(stubborn, asyncio.get_running_loop())
        runner.start("k", b"", 5000)
        runner.cancel("k")
        runner.start("k", b"", 5000)
        await asyncio.sleep(0.01)
        assert answers.got == []  # the old one's answer is not sent
        assert "k" in runner and "k" in runner._timers  # the new one still runs, with its deadline
        runner.cancel_all()
        assert not runner.tasks and not runner._timers
        await asyncio.sleep(0)

    asyncio.run(scenario())


# ----------------------------------------------------------------------------- Batcher


class WriteLog:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closing


def batcher_on(loop: asyncio.AbstractEventLoop) -> tuple[Batcher, WriteLog]:
    batcher = Batcher(loop)
    log = WriteLog()
    batcher.transport = log  # type: ignore[assignment]
    return batcher, log


def test_the_first_frame_of_a_turn_leaves_at_once_and_the_rest_at_its_end() -> None:
    async def scenario() -> None:
        batcher, log = batcher_on(asyncio.get_running_loop())
        for frame in (b"1", b"2", b"3"):
            batcher.write(frame)
        assert log.writes == [b"1"]
        await asyncio.sleep(0)
        assert log.writes == [b"1", b"23"]
        batcher.write(b"4")  # a new turn: at once again
        assert log.writes == [b"1", b"23", b"4"]
        await asyncio.sleep(0)

    asyncio.run(scenario())


def test_a_long_turn_writes_every_batch_frames_without_waiting_for_its_end() -> None:
    async def scenario() -> None:
        batcher, log = batcher_on(asyncio.get_running_loop())
        frames = [bytes([n]) for n in range(1 + 2 * BATCH_FRAMES + 3)]
        for frame in frames:
            batcher.write(frame)
        assert log.writes == [
            frames[0],
            b"".join(frames[1 : 1 + BATCH_FRAMES]),
            b"".join(frames[1 + BATCH_FRAMES : 1 + 2 * BATCH_FRAMES]),
        ]
        await asyncio.sleep(0)
        assert log.writes[-1] == b"".join(frames[1 + 2 * BATCH_FRAMES :])
        assert b"".join(log.writes) == b"".join(frames)

    asyncio.run(scenario())


def test_held_writes_leave_at_release_without_a_callback() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        batcher, log = batcher_on(loop)
        batcher.hold()
        for frame in (b"a", b"b", b"c"):
            batcher.write(frame)
        assert log.writes == [b"a"]
        assert not batcher._end_scheduled
        batcher.release()
        assert log.writes == [b"a", b"bc"]
        batcher.write(b"d")  # after release: a first frame again
        assert log.writes == [b"a", b"bc", b"d"]
        await asyncio.sleep(0)

    asyncio.run(scenario())


def test_a_release_inside_a_turn_already_open_leaves_the_rest_to_the_turns_end() -> None:
    async def scenario() -> None:
        batcher, log = batcher_on(asyncio.get_running_loop())
        batcher.write(b"x")  # e.g. a waiting handler's answer, earlier in this turn
        batcher.hold()
        batcher.write(b"y")
        batcher.release()
        assert log.writes == [b"x"]
        await asyncio.sleep(0)
        assert log.writes == [b"x", b"y"]

    asyncio.run(scenario())


def test_nothing_is_written_to_a_closing_transport() -> None:
    async def scenario() -> None:
        batcher, log = batcher_on(asyncio.get_running_loop())
        batcher.write(b"1")
        batcher.write(b"2")
        log.closing = True
        await asyncio.sleep(0)
        batcher.write(b"3")
        assert log.writes == [b"1"]

    asyncio.run(scenario())


@pytest.mark.parametrize("how", ["cancel", "cancel_all"])
def test_a_handler_cancelled_before_its_task_first_runs_still_gets_the_cancellation(
    how: str,
) -> None:
    # A server aborting (or a CANCEL arriving) in the same loop turn as the
    # request: the task has not taken a step, and a task cancelled then never
    # runs its coroutine, so the handler must be told by the runner itself.
    seen: list[str] = []

    async def handler(payload: bytes) -> bytes:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen.append("cancelled inside")
            raise
        finally:
            seen.append("finally")
        return payload

    async def scenario() -> None:
        runner, answers = runner_for(handler, asyncio.get_running_loop())
        runner.start(3, b"x", 5000)
        assert 3 in runner
        if how == "cancel":
            assert runner.cancel(3)
        else:
            runner.cancel_all()
        assert seen == ["cancelled inside", "finally"]
        assert answers.settled == 1
        await asyncio.sleep(0.01)  # the cancelled task ends without running a line
        assert answers.got == [] and not runner.tasks and not runner._unstarted
        assert answers.settled == 1

    asyncio.run(scenario())


def test_a_handler_that_ignores_a_cancellation_before_its_first_step_is_closed() -> None:
    seen: list[str] = []

    async def stubborn(payload: bytes) -> bytes:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen.append("ignored")
        try:
            await asyncio.sleep(10)
        finally:
            seen.append("closed")
        return payload

    async def scenario() -> None:
        runner, answers = runner_for(stubborn, asyncio.get_running_loop())
        runner.start(4, b"x", 0)
        runner.cancel_all()
        assert seen == ["ignored", "closed"]
        await asyncio.sleep(0.01)
        assert answers.got == []

    asyncio.run(scenario())
