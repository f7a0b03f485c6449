"""Log lines that repeat per request, kept to a few a second.

A slow or dead node fails every request sent to it, and a warning per
request would bury every other line (and cost a write each) just when
someone reads the log. :class:`RateLimitedLog` writes the first line of a
kind at once, then holds the others back for ``every`` seconds and writes
one line for them all, the last of them with how many more there were::

    request 5f1c-9 (route api) to tcp://10.0.1.5:7000 failed: no answer before the deadline
    request 5f1c-a7 (route api) to tcp://10.0.1.5:7000 failed: no answer before the deadline
        (and 153 more like it in the last 1.0s)                  [one line, folded here]

A kind is a key the caller chooses (the proxy's is the node's URI and the
failure), so one node's failures never hide another's. The summary line is
written when the second is over even if nothing more comes (a timer on the
running event loop; without a loop it waits for the next line of its kind).
What each request did is in the access log, which has every one.

One instance per process (a worker's lines are counted by that worker),
which with ``flush_at_exit`` writes out what it holds when the process
exits. It
keeps at most ``max_kinds`` kinds: past that, the oldest is written out and
forgotten, so a flood of distinct keys cannot grow it. Pure Python on
purpose: it runs only when a request fails, never on the request path.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import time
from collections.abc import Callable, Hashable

__all__ = ["RateLimitedLog"]


class _Kind:
    """One kind of line: when it may next be written, and what is held back meanwhile."""

    __slots__ = ("args", "held", "message", "next_at", "since", "timer")

    def __init__(self, now: float, every: float) -> None:
        self.next_at = now + every
        self.since = now  # when the line before the held ones was written
        self.held = 0
        self.message = ""
        self.args: tuple[object, ...] = ()
        self.timer: asyncio.TimerHandle | None = None


class RateLimitedLog:
    """At most one line per kind every ``every`` seconds; the next counts the ones held back."""

    __slots__ = ("_clock", "_kinds", "every", "level", "logger", "max_kinds")

    def __init__(
        self,
        logger: logging.Logger,
        every: float = 1.0,
        level: int = logging.WARNING,
        max_kinds: int = 1024,
        clock: Callable[[], float] = time.monotonic,
        flush_at_exit: bool = False,
    ) -> None:
        if every <= 0 or max_kinds < 1:
            raise ValueError("every must be > 0 and max_kinds >= 1")
        self.logger = logger
        self.every = every
        self.level = level
        self.max_kinds = max_kinds
        self._clock = clock
        self._kinds: dict[Hashable, _Kind] = {}
        if flush_at_exit:
            # A process that stops within the second still tells of what it held
            # (before logging's own exit handler, registered earlier, runs).
            atexit.register(self._flush_at_exit)

    def warning(self, kind: Hashable, message: str, *args: object) -> None:
        """Log ``message % args`` now, or hold it back if a line of ``kind`` went out lately."""
        if not self.logger.isEnabledFor(self.level):
            return
        now = self._clock()
        state = self._kinds.get(kind)
        if state is None:
            if len(self._kinds) >= self.max_kinds:
                self._forget_oldest()
            self._kinds[kind] = _Kind(now, self.every)
            self.logger.log(self.level, message, *args)
            return
        if now >= state.next_at:
            # Held lines whose timer has not run yet (or with no loop to run one)
            # are told of with this one, so none goes uncounted.
            held = state.held
            self._cancel(state)
            self._write(message, args, held, now - state.since)
            state.next_at = now + self.every
            state.since = now
            return
        state.held += 1
        state.message = message
        state.args = args
        if state.timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            state.timer = loop.call_later(state.next_at - now, self._flush, kind)

    def pending(self) -> int:
        """Lines held back and not yet told of, over every kind."""
        return sum(state.held for state in self._kinds.values())

    def flush(self) -> None:
        """Write out what is held back now (at a stop), and forget every kind."""
        kinds, self._kinds = self._kinds, {}
        now = self._clock()
        for state in kinds.values():
            self._write_held(state, now)

    # ---------------------------------------------------------------------------------

    def _flush_at_exit(self) -> None:
        # Only where logging was set up (a proxy's processes): a process that
        # configured none (a test run) would print on logging's last-resort stderr.
        if self.logger.hasHandlers():
            self.flush()

    def _flush(self, kind: Hashable) -> None:
        state = self._kinds.get(kind)
        if state is None:
            return
        state.timer = None
        if not state.held:
            return
        now = self._clock()
        self._write_held(state, now)
        # The summary is a line of its kind: the next one waits a whole interval.
        state.next_at = now + self.every
        state.since = now

    def _write_held(self, state: _Kind, now: float) -> None:
        held = state.held
        self._cancel(state)
        if held:
            # The last line held back stands for all of them.
            self._write(state.message, state.args, held - 1, now - state.since)
        state.message = ""
        state.args = ()

    def _write(self, message: str, args: tuple[object, ...], more: int, seconds: float) -> None:
        if more:
            message = message + " (and %d more like it in the last %.1fs)"
            args = (*args, more, seconds)
        self.logger.log(self.level, message, *args)

    def _cancel(self, state: _Kind) -> None:
        state.held = 0
        if state.timer is not None:
            state.timer.cancel()
            state.timer = None

    def _forget_oldest(self) -> None:
        kind = next(iter(self._kinds))
        state = self._kinds.pop(kind)
        self._write_held(state, self._clock())
