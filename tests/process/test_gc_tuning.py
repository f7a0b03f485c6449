"""GC tuning and pause measurement, against the real collector."""

from __future__ import annotations

import gc
import json
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from pitcher_rpc.process import gc_tuning
from pitcher_rpc.process.gc_tuning import (
    GENERATIONS,
    PAUSE_BUCKETS,
    GcPauses,
    GcSettings,
    PauseSnapshot,
    apply,
)


class _Node:
    """A container that can take part in a reference cycle."""

    def __init__(self) -> None:
        self.other: Any = None


def make_cycles(count: int = 100) -> weakref.ref[_Node]:
    """Unreachable cycles for the collector to find; a weak reference to one of them."""
    first = _Node()
    for _ in range(count):
        a, b = _Node(), _Node()
        a.other, b.other = b, a
    first.other = first
    return weakref.ref(first)


def assert_consistent(snapshot: PauseSnapshot) -> None:
    assert snapshot["bounds"] == list(PAUSE_BUCKETS)
    assert len(snapshot["generations"]) == GENERATIONS
    for entry in snapshot["generations"]:
        buckets = entry["buckets"]
        assert len(buckets) == len(PAUSE_BUCKETS) + 1
        assert buckets == sorted(buckets), "cumulative buckets never decrease"
        assert buckets[-1] == entry["count"], "+Inf holds every collection"
        assert entry["sum"] >= 0.0
        assert entry["max"] <= entry["sum"] + 1e-12
        if entry["count"]:
            assert entry["max"] > 0.0
        else:
            assert entry["sum"] == entry["max"] == 0.0


@pytest.fixture
def pauses() -> Iterator[GcPauses]:
    recorder = GcPauses()
    recorder.install()
    try:
        yield recorder
    finally:
        recorder.uninstall()


@pytest.fixture
def restore_gc() -> Iterator[None]:
    """Leave the collector as found: thresholds, nothing frozen, enabled."""
    thresholds = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        gc.enable()


# --------------------------------------------------------------------------- settings


def test_settings_default_freezes_and_keeps_thresholds() -> None:
    settings = GcSettings()
    assert settings.freeze is True
    assert settings.thresholds is None


def test_settings_accepts_a_list_and_keeps_a_tuple() -> None:
    settings = GcSettings(thresholds=[50_000, 50, 100])  # type: ignore[arg-type]
    assert settings.thresholds == (50_000, 50, 100)
    assert hash(settings) == hash(GcSettings(thresholds=(50_000, 50, 100)))


@pytest.mark.parametrize(
    ("thresholds", "error"),
    [
        ((0, 10, 10), ValueError),
        ((700, -1, 10), ValueError),
        ((700, 10, -1), ValueError),
        ((700, 10), ValueError),
        ((700, 10, 10, 10), ValueError),
        ("700", ValueError),
        ((700.0, 10, 10), TypeError),
        ((True, 10, 10), TypeError),
        ((700, "10", 10), TypeError),
    ],
)
def test_settings_refuse_bad_thresholds(thresholds: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="thresholds"):
        GcSettings(thresholds=thresholds)


def test_settings_refuse_a_non_bool_freeze() -> None:
    with pytest.raises(TypeError, match="freeze"):
        GcSettings(freeze=1)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ apply


@pytest.mark.usefixtures("restore_gc")
def test_apply_sets_thresholds_and_freezes() -> None:
    assert gc.get_freeze_count() == 0
    apply(GcSettings(freeze=True, thresholds=(50_000, 50, 100)))
    assert gc.get_threshold() == (50_000, 50, 100)
    assert gc.get_freeze_count() > 0


@pytest.mark.usefixtures("restore_gc")
def test_apply_collects_before_freezing() -> None:
    """Garbage present at start-up is freed, not frozen for the life of the process."""
    garbage = make_cycles(10)
    assert garbage() is not None, "still waiting for the collector"
    apply(GcSettings(freeze=True))
    assert garbage() is None


@pytest.mark.usefixtures("restore_gc")
def test_apply_without_freeze_only_sets_thresholds() -> None:
    apply(GcSettings(freeze=False, thresholds=(1_000, 20, 30)))
    assert gc.get_threshold() == (1_000, 20, 30)
    assert gc.get_freeze_count() == 0


@pytest.mark.usefixtures("restore_gc")
def test_apply_keeps_thresholds_when_none() -> None:
    before = gc.get_threshold()
    apply(GcSettings(freeze=False))
    assert gc.get_threshold() == before


# ----------------------------------------------------------------------------- pauses


def test_every_generation_is_timed(pauses: GcPauses) -> None:
    for generation in range(GENERATIONS):
        make_cycles()
        gc.collect(generation)
    snapshot = pauses.snapshot()
    assert_consistent(snapshot)
    for entry in snapshot["generations"]:
        assert entry["count"] >= 1
        # Plausible: more than nothing, far less than a second on a test heap.
        assert 0.0 < entry["max"] < 1.0
        assert 0.0 < entry["sum"] < entry["count"] * 1.0
    # Each cycle above is two _Node objects and their __dict__s.
    assert snapshot["collected"] >= 200
    assert snapshot["collected"] == sum(e["collected"] for e in snapshot["generations"])
    assert snapshot["uncollectable"] == 0
    assert snapshot["callback_errors"] == 0


def test_collections_land_in_their_own_generation(pauses: GcPauses) -> None:
    before = pauses.snapshot()
    for _ in range(5):
        gc.collect(2)
    after = pauses.snapshot()
    full = after["generations"][2]["count"] - before["generations"][2]["count"]
    # Automatic young collections may add to 0 and 1 meanwhile, never to 2.
    assert full == 5


def test_buckets_are_cumulative_with_inclusive_bounds(
    pauses: GcPauses, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pause exactly on a bound counts in that bound's bucket, as Prometheus' ``le``."""
    pauses.uninstall()  # the real collector must not interleave with the fake clock
    clock = iter([10.0, 10.0 + 0.001, 20.0, 20.0 + 0.5, 30.0, 30.0 + 20e-6])
    monkeypatch.setattr(gc_tuning, "perf_counter", lambda: next(clock))
    info = {"generation": 1, "collected": 3, "uncollectable": 1}
    for _ in range(3):
        pauses._on_collection("start", info)
        pauses._on_collection("stop", info)
    entry = pauses.snapshot()["generations"][1]
    one_ms = PAUSE_BUCKETS.index(0.001)
    assert entry["buckets"][0] == 1  # 20 µs <= 50 µs
    assert entry["buckets"][one_ms - 1] == 1  # 1 ms is not <= 500 µs
    assert entry["buckets"][one_ms] == 2  # 1 ms <= 1 ms
    assert entry["buckets"][-2] == 2  # 0.5 s is beyond 100 ms ...
    assert entry["buckets"][-1] == 3  # ... and only in +Inf
    assert entry["count"] == 3
    assert entry["max"] == pytest.approx(0.5)
    assert entry["sum"] == pytest.approx(0.501 + 20e-6)
    assert (entry["collected"], entry["uncollectable"]) == (9, 3)


def test_uninstall_stops_recording_and_is_idempotent(pauses: GcPauses) -> None:
    gc.collect(0)
    assert pauses.installed
    pauses.uninstall()
    pauses.uninstall()
    assert not pauses.installed
    frozen = pauses.snapshot()
    make_cycles()
    gc.collect()
    assert pauses.snapshot() == frozen


def test_install_twice_records_each_collection_once(pauses: GcPauses) -> None:
    pauses.install()
    assert sum(callback == pauses._on_collection for callback in gc.callbacks) == 1
    before = pauses.snapshot()["generations"][2]["count"]
    gc.collect(2)
    assert pauses.snapshot()["generations"][2]["count"] == before + 1


def test_snapshot_is_json(pauses: GcPauses) -> None:
    make_cycles()
    gc.collect()
    snapshot = pauses.snapshot()
    assert json.loads(json.dumps(snapshot, allow_nan=False)) == snapshot


# -------------------------------------------------------------------------- collecting


def test_snapshot_during_a_collection_is_consistent(pauses: GcPauses) -> None:
    """From a finalizer and from a later callback, both inside the collector."""
    seen: list[tuple[str, PauseSnapshot]] = []

    class Finalized(_Node):
        def __del__(self) -> None:
            seen.append(("finalizer", pauses.snapshot()))

    def later_callback(phase: str, info: dict[str, int]) -> None:
        seen.append((phase, pauses.snapshot()))

    gc.callbacks.append(later_callback)
    try:
        before = pauses.snapshot()["generations"][2]["count"]
        node = Finalized()
        node.other = node
        del node
        gc.collect(2)
    finally:
        gc.callbacks.remove(later_callback)
    phases = [phase for phase, _ in seen]
    assert "finalizer" in phases
    for _, snapshot in seen:
        assert_consistent(snapshot)
    counts = {phase: snapshot["generations"][2]["count"] for phase, snapshot in seen}
    # The collection in progress shows up only once it has ended.
    assert counts["finalizer"] == before
    assert counts["stop"] == before + 1


@pytest.mark.usefixtures("restore_gc")
def test_snapshot_stays_consistent_when_it_triggers_collections(pauses: GcPauses) -> None:
    """With a tiny threshold the snapshot's own allocations start collections."""
    before = sum(entry["count"] for entry in pauses.snapshot()["generations"])
    thresholds = gc.get_threshold()
    gc.set_threshold(1, 1_000_000, 1_000_000)
    try:
        snapshots = [pauses.snapshot() for _ in range(200)]
    finally:
        gc.set_threshold(*thresholds)
    for snapshot in snapshots:
        assert_consistent(snapshot)
    after = sum(entry["count"] for entry in snapshots[-1]["generations"])
    assert after > before + 100


def test_snapshots_from_another_thread_are_consistent(pauses: GcPauses) -> None:
    stop = time.perf_counter() + 0.3
    taken: list[PauseSnapshot] = []

    def reader() -> None:
        while time.perf_counter() < stop:
            taken.append(pauses.snapshot())

    thread = threading.Thread(target=reader, name="snapshot reader")
    # Switch threads as often as CPython allows so the reader lands mid-callback.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        thread.start()
        while time.perf_counter() < stop:
            make_cycles(5)
            gc.collect(0)
        thread.join(5)
    finally:
        sys.setswitchinterval(interval)
    assert not thread.is_alive()
    assert taken
    for snapshot in taken:
        assert_consistent(snapshot)


def test_snapshot_waits_out_a_half_written_update() -> None:
    """An odd marker (an update in progress elsewhere) makes the snapshot copy again."""
    recorder = GcPauses()  # not installed: only this test writes to it
    state = recorder._state
    block = gc_tuning._BLOCK_OF[0]
    state[gc_tuning._MARKER] += 1
    state[block] = 1  # a bucket is written, its sum and max not yet

    def finish() -> None:
        state[block + gc_tuning._SUM] = 1e-5
        state[block + gc_tuning._MAX] = 1e-5
        state[gc_tuning._MARKER] += 1

    timer = threading.Timer(0.05, finish)
    timer.start()
    began = time.perf_counter()
    snapshot = recorder.snapshot()
    timer.join()
    assert time.perf_counter() - began >= 0.04
    assert_consistent(snapshot)
    assert snapshot["generations"][0]["sum"] == 1e-5


def test_a_failing_callback_never_raises(pauses: GcPauses) -> None:
    unraisable: list[Any] = []
    hook = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        before = pauses.snapshot()
        for bad in (
            {"generation": 7, "collected": 0, "uncollectable": 0},
            {"generation": -1, "collected": 0, "uncollectable": 0},
            {"collected": 0, "uncollectable": 0},
            {"generation": 0, "collected": "many", "uncollectable": 0},
            None,
        ):
            pauses._on_collection("start", {})
            pauses._on_collection("stop", bad)  # type: ignore[arg-type]
        after = pauses.snapshot()
        # The real collector goes on being measured after the failures.
        gc.collect(2)
        final = pauses.snapshot()
    finally:
        sys.unraisablehook = hook
    assert unraisable == []
    assert after["callback_errors"] == before["callback_errors"] + 5
    assert after["generations"] == before["generations"], "no half-written counters"
    assert final["generations"][2]["count"] == before["generations"][2]["count"] + 1
    assert_consistent(final)


def test_a_stop_without_a_start_is_ignored() -> None:
    recorder = GcPauses()
    recorder._on_collection("stop", {"generation": 0, "collected": 1, "uncollectable": 0})
    assert recorder.snapshot()["generations"][0]["count"] == 0
    assert recorder.snapshot()["callback_errors"] == 0


# ------------------------------------------------------------------------------- merge


def test_merge_adds_counts_and_keeps_the_longest_pause(pauses: GcPauses) -> None:
    other = GcPauses()
    other.install()
    try:
        make_cycles()
        gc.collect(2)
    finally:
        other.uninstall()
    make_cycles()
    gc.collect(1)
    first, second = pauses.snapshot(), other.snapshot()
    # Through JSON, as the workers would send them to the master.
    merged = GcPauses.merge(json.loads(json.dumps(s)) for s in (first, second))
    assert_consistent(merged)
    for generation in range(GENERATIONS):
        a, b, total = (s["generations"][generation] for s in (first, second, merged))
        assert total["count"] == a["count"] + b["count"]
        assert total["buckets"] == [x + y for x, y in zip(a["buckets"], b["buckets"], strict=True)]
        assert total["sum"] == pytest.approx(a["sum"] + b["sum"])
        assert total["max"] == max(a["max"], b["max"])
    assert merged["collected"] == first["collected"] + second["collected"]
    assert merged["uncollectable"] == first["uncollectable"] + second["uncollectable"]


def test_merge_of_nothing_is_zero() -> None:
    merged = GcPauses.merge([])
    assert_consistent(merged)
    assert merged == GcPauses().snapshot()


def test_merge_refuses_other_buckets() -> None:
    snapshot = GcPauses().snapshot()
    snapshot["bounds"] = [0.001, 0.01]
    with pytest.raises(ValueError, match="bucketed"):
        GcPauses.merge([GcPauses().snapshot(), snapshot])
