"""RateLimitedLog: one line per kind a second, the rest counted, on a fake clock and a real loop."""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import sys
import textwrap

import pytest

from pitcher_rpc.logs import RateLimitedLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def captured(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="test.ratelimit")
    return caplog


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "test.ratelimit"]


def counted(messages: list[str]) -> int:
    """How many events the lines stand for: each line is one, plus the ones it says it hides."""
    total = 0
    for message in messages:
        found = re.search(r"\(and (\d+) more like it in the last [\d.]+s\)$", message)
        total += 1 + (int(found[1]) if found else 0)
    return total


def test_first_line_at_once_the_rest_counted_on_the_next(
    captured: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    limited = RateLimitedLog(logging.getLogger("test.ratelimit"), clock=clock)
    for number in range(200):
        clock.now += 0.004  # 200 in 0.8s
        limited.warning(("tcp://a:1", "timeout"), "request %d failed", number)
    assert lines(captured) == ["request 0 failed"]
    assert limited.pending() == 199
    clock.now += 0.25  # the second is over: the next line tells of the held ones
    limited.warning(("tcp://a:1", "timeout"), "request %d failed", 200)
    assert lines(captured)[1] == "request 200 failed (and 199 more like it in the last 1.0s)"
    assert limited.pending() == 0
    assert counted(lines(captured)) == 201


def test_kinds_are_apart_and_a_steady_flood_is_one_line_a_second(
    captured: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    limited = RateLimitedLog(logging.getLogger("test.ratelimit"), every=1.0, clock=clock)
    sent = 0
    for _ in range(5000):  # 5 seconds at 1000 a second, two nodes, two kinds on one
        clock.now += 0.001
        limited.warning(("tcp://a:1", "timeout"), "a timeout")
        limited.warning(("tcp://a:1", "reset"), "a reset")
        limited.warning(("tcp://b:1", "timeout"), "b timeout")
        sent += 1
    messages = lines(captured)
    for stem in ("a timeout", "a reset", "b timeout"):
        mine = [message for message in messages if message.startswith(stem)]
        assert len(mine) == 5, mine
    limited.flush()
    messages = lines(captured)
    for stem in ("a timeout", "a reset", "b timeout"):
        assert counted([message for message in messages if message.startswith(stem)]) == sent


def test_memory_is_bounded_and_nothing_forgotten_goes_uncounted(
    captured: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    limited = RateLimitedLog(logging.getLogger("test.ratelimit"), max_kinds=8, clock=clock)
    for node in range(100):
        for _ in range(3):
            limited.warning(node, "node %d failed", node)
    assert len(limited._kinds) <= 8
    limited.flush()
    assert counted(lines(captured)) == 300
    messages = lines(captured)
    # The oldest kind is written out when a ninth comes.
    summary = messages.index("node 0 failed (and 1 more like it in the last 0.0s)")
    assert summary < messages.index("node 8 failed")


def test_nothing_is_done_when_the_level_is_off(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="test.ratelimit")
    limited = RateLimitedLog(logging.getLogger("test.ratelimit"))
    limited.warning("k", "hidden")
    assert limited.pending() == 0 and not limited._kinds


def test_the_held_lines_are_told_when_the_second_ends_with_nothing_after(
    captured: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        limited = RateLimitedLog(logging.getLogger("test.ratelimit"), every=0.1)
        for number in range(50):
            limited.warning("node", "failure %d", number)
        assert lines(captured) == ["failure 0"]
        await asyncio.sleep(0.2)  # the interval is over and nothing else came
        assert limited.pending() == 0

    asyncio.run(main())
    messages = lines(captured)
    assert len(messages) == 2, messages
    assert re.fullmatch(r"failure 49 \(and 48 more like it in the last 0\.1s\)", messages[1])
    assert counted(messages) == 50


def test_bad_settings() -> None:
    with pytest.raises(ValueError):
        RateLimitedLog(logging.getLogger("x"), every=0)
    with pytest.raises(ValueError):
        RateLimitedLog(logging.getLogger("x"), max_kinds=0)


def test_what_is_held_is_told_when_the_process_exits() -> None:
    script = textwrap.dedent(
        """
        import logging, sys
        from pitcher_rpc.logs import RateLimitedLog
        logging.basicConfig(stream=sys.stderr, format="%(message)s")
        limited = RateLimitedLog(logging.getLogger("t"), every=60, flush_at_exit=True)
        for number in range(10):
            limited.warning("k", "failure %d", number)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    assert done.stderr.splitlines() == [
        "failure 0",
        "failure 9 (and 8 more like it in the last 0.0s)",
    ]
