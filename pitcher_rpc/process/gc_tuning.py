"""Garbage-collector tuning for a worker, and a measure of what the collector costs.

The hot path makes no reference cycles, so reference counting frees nearly
everything and the cyclic collector mostly walks long-lived objects (modules,
config, pools) for nothing. :func:`apply` moves those out of its way once a
worker has started; :class:`GcPauses` times every collection so the effect is
measured, not assumed, and exported as a Prometheus-style histogram.
"""

from __future__ import annotations

import gc
import time
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass
from time import perf_counter
from typing import TypedDict

__all__ = [
    "GENERATIONS",
    "PAUSE_BUCKETS",
    "GcPauses",
    "GcSettings",
    "GenerationPauses",
    "PauseSnapshot",
    "apply",
]

GENERATIONS = 3
# Upper bounds (seconds, inclusive as Prometheus' ``le``) of the finite buckets;
# one more bucket, +Inf, follows. A young collection takes tens of
# microseconds, a full one over a large heap tens of milliseconds.
PAUSE_BUCKETS: tuple[float, ...] = (
    50e-6,
    100e-6,
    250e-6,
    500e-6,
    1e-3,
    2.5e-3,
    5e-3,
    10e-3,
    25e-3,
    50e-3,
    100e-3,
)


@dataclass(frozen=True, slots=True)
class GcSettings:
    """How a worker tunes the collector once it has started.

    ``thresholds`` are those of :func:`gc.set_threshold`; None keeps CPython's.
    The first must be at least 1: 0 would silently turn automatic collection
    off, which is :func:`gc.disable`'s job, not a tuning.
    """

    freeze: bool = True
    thresholds: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.freeze, bool):
            raise TypeError(f"freeze must be a bool, not {type(self.freeze).__name__}")
        if self.thresholds is None:
            return
        values = self.thresholds
        # A TOML array arrives as a list; accept it and keep the frozen form a tuple.
        if not isinstance(values, tuple | list) or len(values) != 3:
            raise ValueError(f"thresholds must be three integers, not {values!r}")
        if not all(isinstance(value, int) and not isinstance(value, bool) for value in values):
            raise TypeError(f"thresholds must be three integers, not {values!r}")
        if values[0] < 1 or values[1] < 0 or values[2] < 0:
            raise ValueError(
                f"thresholds {tuple(values)!r}: the first must be >= 1, the others >= 0"
            )
        object.__setattr__(self, "thresholds", tuple(values))


def apply(settings: GcSettings) -> None:
    """Tune the collector for a worker that has finished start-up.

    Call it once config is loaded, sockets are open and modules are imported:
    what exists then lives as long as the process. :func:`gc.freeze` moves every
    object the collector tracks into a permanent generation it never examines,
    so full collections stop walking them and, in a forked worker, stop writing
    to their pages (copy-on-write stays shared).

    :func:`gc.collect` runs first because freeze moves *everything* tracked,
    garbage included: an unreachable cycle left over from start-up would be
    frozen with the rest and never freed.
    """
    if settings.thresholds is not None:
        gc.set_threshold(*settings.thresholds)
    if settings.freeze:
        gc.collect()
        gc.freeze()


class GenerationPauses(TypedDict):
    """One generation's collections: cumulative ``buckets`` match ``bounds`` plus +Inf."""

    buckets: list[int]
    count: int
    sum: float
    max: float
    collected: int
    uncollectable: int


class PauseSnapshot(TypedDict):
    """What :meth:`GcPauses.snapshot` returns; plain JSON types only."""

    bounds: list[float]
    generations: list[GenerationPauses]
    collected: int
    uncollectable: int
    callback_errors: int


# All counters live in one flat list so that one slice copies them at once
# (see GcPauses.snapshot). Slot 0 is a write marker, odd while the callback
# updates; slot 1 counts callback failures; then one block per generation.
_MARKER = 0
_ERRORS = 1
_SLOTS = len(PAUSE_BUCKETS) + 1
_SUM = _SLOTS
_MAX = _SLOTS + 1
_COLLECTED = _SLOTS + 2
_UNCOLLECTABLE = _SLOTS + 3
_BLOCK = _SLOTS + 4
_FIRST_BLOCK = 2
# A dict, not a tuple: a negative or unknown generation must fail, not wrap around.
_BLOCK_OF = {generation: _FIRST_BLOCK + generation * _BLOCK for generation in range(GENERATIONS)}


class GcPauses:
    """Times every collection through :data:`gc.callbacks`, per generation.

    The callback runs inside the collector, so it does a few list updates and
    nothing that can fail after the first write; a failure is counted in
    ``callback_errors``, never raised. While installed, ``gc.callbacks`` holds a
    reference to this object.
    """

    __slots__ = ("_callback", "_started", "_state")

    def __init__(self) -> None:
        self._state: list[float] = [0] * (_FIRST_BLOCK + GENERATIONS * _BLOCK)
        self._started = 0.0
        # One bound method, so install and uninstall find the very object listed.
        self._callback = self._on_collection

    @property
    def installed(self) -> bool:
        return any(callback is self._callback for callback in gc.callbacks)

    def install(self) -> None:
        """Start timing collections; installing twice is the same as once."""
        if not self.installed:
            # A "stop" without our "start" (installed mid-collection) is ignored.
            self._started = 0.0
            gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        """Stop timing collections; safe to call when not installed."""
        callbacks = gc.callbacks
        for index, callback in enumerate(callbacks):
            if callback is self._callback:
                del callbacks[index]
                break
        self._started = 0.0

    def _on_collection(self, phase: str, info: dict[str, int]) -> None:
        # An exception here would be printed as "unraisable" on every collection;
        # try costs nothing in 3.11+ when nothing is raised.
        try:
            if phase == "start":
                self._started = perf_counter()
                return
            started = self._started
            if not started:
                return
            pause = perf_counter() - started
            self._started = 0.0
            state = self._state
            # Everything that can fail is computed before the first write, so a
            # bad ``info`` leaves the counters untouched and the marker even.
            base = _BLOCK_OF[info["generation"]]
            bucket = base + bisect_left(PAUSE_BUCKETS, pause)
            count = state[bucket] + 1
            total = state[base + _SUM] + pause
            longest = max(state[base + _MAX], pause)
            collected = state[base + _COLLECTED] + info["collected"]
            uncollectable = state[base + _UNCOLLECTABLE] + info["uncollectable"]
            # No call or loop below lets another thread in today, but that is an
            # interpreter detail; should a reader ever copy in between, the odd
            # marker makes it copy again.
            state[_MARKER] += 1
            try:
                state[bucket] = count
                state[base + _SUM] = total
                state[base + _MAX] = longest
                state[base + _COLLECTED] = collected
                state[base + _UNCOLLECTABLE] = uncollectable
            finally:
                # Even after a KeyboardInterrupt: an odd marker left behind would
                # make every later snapshot wait forever.
                state[_MARKER] += 1
        except Exception:
            self._state[_ERRORS] += 1

    def _copy(self) -> list[float]:
        while True:
            # One slice is one bytecode: neither a thread switch nor a collection
            # (3.12+ runs them between bytecodes; 3.11 inside the allocation of the
            # new list, before anything is copied) can split it.
            state = self._state[:]
            if not int(state[_MARKER]) & 1:
                return state
            time.sleep(0)  # a callback on another thread is mid-update: let it finish

    def snapshot(self) -> PauseSnapshot:
        """A consistent copy of every counter, even when taken during a collection."""
        state = self._copy()
        generations: list[GenerationPauses] = []
        for generation in range(GENERATIONS):
            base = _BLOCK_OF[generation]
            buckets: list[int] = []
            running = 0
            for slot in range(base, base + _SLOTS):
                running += int(state[slot])
                buckets.append(running)
            generations.append(
                GenerationPauses(
                    buckets=buckets,
                    count=running,
                    sum=float(state[base + _SUM]),
                    max=float(state[base + _MAX]),
                    collected=int(state[base + _COLLECTED]),
                    uncollectable=int(state[base + _UNCOLLECTABLE]),
                )
            )
        return PauseSnapshot(
            bounds=list(PAUSE_BUCKETS),
            generations=generations,
            collected=sum(entry["collected"] for entry in generations),
            uncollectable=sum(entry["uncollectable"] for entry in generations),
            callback_errors=int(state[_ERRORS]),
        )

    @staticmethod
    def merge(snapshots: Iterable[PauseSnapshot]) -> PauseSnapshot:
        """Add several workers' snapshots (maxima: the largest); none gives zeros.

        ValueError if one was taken with other buckets or generations.
        """
        generations = [
            GenerationPauses(
                buckets=[0] * _SLOTS, count=0, sum=0.0, max=0.0, collected=0, uncollectable=0
            )
            for _ in range(GENERATIONS)
        ]
        merged = PauseSnapshot(
            bounds=list(PAUSE_BUCKETS),
            generations=generations,
            collected=0,
            uncollectable=0,
            callback_errors=0,
        )
        for snapshot in snapshots:
            if list(snapshot["bounds"]) != merged["bounds"]:
                raise ValueError(f"cannot merge pauses bucketed by {snapshot['bounds']!r}")
            if len(snapshot["generations"]) != GENERATIONS:
                raise ValueError(
                    f"cannot merge {len(snapshot['generations'])} generations into {GENERATIONS}"
                )
            for total, part in zip(generations, snapshot["generations"], strict=True):
                total["buckets"] = [
                    a + b for a, b in zip(total["buckets"], part["buckets"], strict=True)
                ]
                total["count"] += part["count"]
                total["sum"] += part["sum"]
                total["max"] = max(total["max"], part["max"])
                total["collected"] += part["collected"]
                total["uncollectable"] += part["uncollectable"]
            merged["collected"] += snapshot["collected"]
            merged["uncollectable"] += snapshot["uncollectable"]
            merged["callback_errors"] += snapshot["callback_errors"]
        return merged
