"""Node health as pure objects: batches of outcomes and ``now`` in, events and factors out."""

from __future__ import annotations

import random
import re
from collections import deque
from dataclasses import asdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pitcher_rpc.degrade.health import (
    ClusterEvent,
    ClusterHealth,
    Consecutive,
    CountWindow,
    HealthPolicy,
    NodeHealth,
    NodeState,
    TimeWindow,
)

DEFAULT = HealthPolicy()
COUNT_ONLY = HealthPolicy(window_seconds=0, consecutive_failures=0, failure_ratio=0.5)
TIME_ONLY = HealthPolicy(window_requests=0, consecutive_failures=0, failure_ratio=0.5)
CONSECUTIVE_ONLY = HealthPolicy(window_requests=0, window_seconds=0)


def fail(node: NodeHealth, now: float, count: int = 1) -> list[str | None]:
    return [node.record(now, 0, 1, 1) for _ in range(count)]


def succeed(node: NodeHealth, now: float, count: int = 1) -> list[str | None]:
    return [node.record(now, 1, 0, 0) for _ in range(count)]


def eject(node: NodeHealth, now: float) -> None:
    """Fail a node (in service or in probation) until it is ejected."""
    for _ in range(DEFAULT.consecutive_failures):
        if node.record(now, 0, 1, 1) in ("ejected", "re-ejected"):
            return
    raise AssertionError("not ejected")


def random_batch(rng: random.Random, size: int, failure_rate: float) -> tuple[int, int, int]:
    """(successes, failures, trailing failures) of ``size`` requests failing at random."""
    outcomes = [rng.random() < failure_rate for _ in range(size)]
    failures = sum(outcomes)
    trailing = 0
    for failed in reversed(outcomes):
        if not failed:
            break
        trailing += 1
    return size - failures, failures, trailing


# ------------------------------------------------------------------ policy


def test_defaults_are_the_documented_ones() -> None:
    assert asdict(DEFAULT) == {
        "window_requests": 100,
        "window_seconds": 10.0,
        "min_requests": 20,
        "min_failures": 5,
        "failure_ratio": 0.3,
        "consecutive_failures": 5,
        "ejection_time": 5.0,
        "max_ejection_time": 60.0,
        "probation_requests": 5,
        "slow_start": 10.0,
        "min_weight_percent": 10.0,
        "aggression": 1.0,
        "max_ejection_percent": 50.0,
        "detect_only": False,
    }


def test_from_settings_takes_known_keys_and_ints_for_floats() -> None:
    policy = HealthPolicy.from_settings({"ejection_time": 2, "detect_only": True})
    assert policy == HealthPolicy(ejection_time=2.0, detect_only=True)
    assert HealthPolicy.from_settings({}) == DEFAULT


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"window_request": 10}, "window_request: unknown key (did you mean window_requests?)"),
        ({"min_requests": True}, "min_requests: must be int, got True"),
        ({"min_requests": 2.0}, "min_requests: must be int, got 2.0"),
        ({"ejection_time": "5s"}, "ejection_time: must be float, got '5s'"),
        ({"ejection_time": float("inf")}, "ejection_time: must be float, got inf"),
        ({"detect_only": 1}, "detect_only: must be bool, got 1"),
        ({"failure_ratio": 0}, "failure_ratio: must be in (0, 1], got 0"),
        ({"failure_ratio": 1.5}, "failure_ratio: must be in (0, 1], got 1.5"),
        ({"min_failures": 0}, "min_failures: must be >= 1, got 0"),
        ({"window_seconds": -1}, "window_seconds: must be >= 0, got -1"),
        ({"min_weight_percent": 0}, "min_weight_percent: must be in (0, 100], got 0"),
        ({"max_ejection_percent": 101}, "max_ejection_percent: must be in [0, 100], got 101"),
        ({"aggression": 0}, "aggression: must be > 0, got 0"),
        ({"max_ejection_time": 1}, "max_ejection_time: must be >= ejection_time"),
        ({"window_requests": 10}, "min_requests: must be <= window_requests"),
    ],
)
def test_from_settings_names_the_bad_key(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        HealthPolicy.from_settings(settings)


def test_from_settings_reports_every_problem_at_once() -> None:
    with pytest.raises(ValueError) as info:
        HealthPolicy.from_settings({"bogus": 1, "min_requests": -1, "aggression": "x"})
    assert "bogus: unknown key" in str(info.value)
    assert "min_requests: must be >= 1" in str(info.value)
    assert "aggression: must be float" in str(info.value)


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ValueError, match="consecutive_failures"):
        HealthPolicy(consecutive_failures=-1)


# ------------------------------------------------------------------ windows


def naive_count_window(size: int, batches: list[tuple[int, int]]) -> tuple[int, int]:
    """One entry per request; a batch's failures spread evenly, as CountWindow assumes."""
    window: deque[bool] = deque(maxlen=size)
    for successes, failures in batches:
        requests = successes + failures
        for index in range(requests):
            window.append((index + 1) * failures // requests > index * failures // requests)
    return len(window), sum(window)


@settings(max_examples=150, deadline=None)
@given(
    size=st.integers(1, 40),
    batches=st.lists(st.tuples(st.integers(0, 60), st.integers(0, 60)), max_size=30),
)
def test_count_window_equals_a_per_request_deque(size: int, batches: list[tuple[int, int]]) -> None:
    window = CountWindow(size)
    for successes, failures in batches:
        window.add(successes, failures)
    assert (window.requests, window.failures) == naive_count_window(size, batches)


def test_count_window_trims_the_oldest_batch_proportionally() -> None:
    window = CountWindow(10)
    window.add(0, 10)
    window.add(5, 0)
    assert (window.requests, window.failures) == (10, 5)
    window.add(4, 4)  # the rest of the first batch drops out, then 3 of the second
    assert (window.requests, window.failures) == (10, 4)
    window.add(0, 0)
    assert (window.requests, window.failures) == (10, 4)
    CountWindow(0).add(3, 3)


def test_time_window_rolls_and_forgets_what_is_older_than_the_window() -> None:
    window = TimeWindow(10.0)
    window.add(0.0, 0, 4)
    window.add(5.0, 2, 1)
    window.expire(9.99)
    assert (window.requests, window.failures) == (7, 5)
    window.expire(10.0)  # the t=0 bucket left; t=5 remains
    assert (window.requests, window.failures) == (3, 1)
    window.expire(15.0)
    assert (window.requests, window.failures) == (0, 0)


def test_time_window_keeps_only_the_last_seconds_of_steady_failures() -> None:
    # nginx's fail_timeout would count all 30 in a row; a rolling window holds the last ten.
    window = TimeWindow(10.0)
    for second in range(30):
        window.add(float(second), 0, 1)
    assert (window.requests, window.failures) == (10, 10)


def test_consecutive_counts_trailing_failures_and_resets_on_success() -> None:
    run = Consecutive()
    run.add(0, 3, 3)
    run.add(0, 1, 1)
    assert run.failures == 4
    run.add(1, 0, 0)
    assert run.failures == 0
    run.add(3, 6, 2)  # failures before the last success do not count
    assert run.failures == 2


# ------------------------------------------------------------------ detectors


def test_count_window_needs_min_requests() -> None:
    node = NodeHealth(COUNT_ONLY, 0.0)
    assert fail(node, 0.0, 19) == [None] * 19
    assert fail(node, 0.0) == ["ejected"]


def test_count_window_needs_min_failures() -> None:
    policy = HealthPolicy(
        min_requests=2, failure_ratio=0.1, window_seconds=0, consecutive_failures=0
    )
    node = NodeHealth(policy, 0.0)
    succeed(node, 0.0, 10)
    assert fail(node, 0.0, 4) == [None] * 4
    assert fail(node, 0.0) == ["ejected"]


def test_count_window_needs_the_ratio() -> None:
    node = NodeHealth(COUNT_ONLY, 0.0)
    succeed(node, 0.0, 20)
    assert fail(node, 0.0, 19) == [None] * 19  # 19 of 39
    assert fail(node, 0.0) == ["ejected"]  # 20 of 40


@settings(max_examples=100, deadline=None)
@given(st.lists(st.booleans(), max_size=300))
def test_count_window_fires_at_the_first_request_meeting_all_thresholds(
    outcomes: list[bool],
) -> None:
    policy = HealthPolicy(
        window_requests=30,
        min_requests=10,
        min_failures=4,
        failure_ratio=0.4,
        window_seconds=0,
        consecutive_failures=0,
    )
    node = NodeHealth(policy, 0.0)
    window: deque[bool] = deque(maxlen=30)
    for failed in outcomes:
        window.append(failed)
        expected = len(window) >= 10 and sum(window) >= 4 and sum(window) >= 0.4 * len(window)
        event = node.record(0.0, int(not failed), int(failed), int(failed))
        assert (event == "ejected") == expected
        if expected:
            break


def test_time_window_fires_on_recent_failures_only() -> None:
    old = NodeHealth(TIME_ONLY, 0.0)
    old.record(0.0, 0, 10, 10)
    assert old.record(10.0, 10, 9, 0) is None  # the ten at t=0 are forgotten
    recent = NodeHealth(TIME_ONLY, 0.0)
    recent.record(0.0, 0, 10, 10)
    assert recent.record(9.5, 9, 0, 0) is None  # 19 requests: too few
    assert recent.record(9.5, 1, 0, 0) == "ejected"  # 20 requests, 10 failures


def test_consecutive_fires_on_the_fifth_failure_in_a_row() -> None:
    node = NodeHealth(CONSECUTIVE_ONLY, 0.0)
    assert fail(node, 0.0, 4) + succeed(node, 0.0) + fail(node, 0.0, 4) == [None] * 9
    assert fail(node, 0.0) == ["ejected"]


def test_consecutive_runs_across_batches() -> None:
    node = NodeHealth(CONSECUTIVE_ONLY, 0.0)
    assert node.record(0.0, 3, 6, 2) is None
    assert node.record(0.1, 0, 2, 2) is None
    assert node.record(0.2, 0, 1, 1) == "ejected"
    assert NodeHealth(CONSECUTIVE_ONLY, 0.0).record(0.0, 0, 5) == "ejected"


def test_bad_batches_are_refused() -> None:
    node = NodeHealth(DEFAULT, 0.0)
    for batch in [(-1, 0, 0), (0, -1, 0), (1, 2, 3), (1, 2, -1)]:
        with pytest.raises(ValueError, match="bad batch"):
            node.record(0.0, *batch)


# ------------------------------------------------------------------ ejection, probation, slow start


def test_ejected_node_takes_nothing_then_a_trickle_in_probation() -> None:
    node = NodeHealth(DEFAULT, 0.0)
    eject(node, 0.0)
    assert node.state is NodeState.EJECTED
    assert not node.may_take(4.9)
    assert node.weight_factor(4.9) == 0.0
    assert node.record(4.9, 0, 50, 50) is None  # stragglers are not judged
    assert node.update(5.0) == "probation"
    assert node.update(5.0) is None
    assert node.may_take(5.0)
    assert node.weight_factor(5.0) == pytest.approx(0.1)


def test_probation_event_is_reported_by_record_when_no_update_came_first() -> None:
    node = NodeHealth(DEFAULT, 0.0)
    eject(node, 0.0)
    assert node.weight_factor(6.0) == pytest.approx(0.1)  # queries apply it, do not lose it
    assert node.record(6.0, 1, 0, 0) == "probation"


def test_ejection_time_doubles_on_each_re_ejection_and_caps() -> None:
    node = NodeHealth(DEFAULT, 0.0)
    now = 0.0
    durations = []
    for _ in range(6):
        eject(node, now)
        durations.append(node.ejected_until - now)
        now = node.ejected_until
        assert node.update(now) == "probation"
    assert durations == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]


def test_doubling_is_forgotten_after_max_ejection_time_in_service() -> None:
    def ejection_after(seconds_in_service: float) -> float:
        node = NodeHealth(DEFAULT, 0.0)
        eject(node, 0.0)
        assert succeed(node, 5.0, 5)[-1] == "restored"
        eject(node, 5.0 + seconds_in_service)
        return node.ejected_until - (5.0 + seconds_in_service)

    assert ejection_after(30.0) == 10.0
    assert ejection_after(60.0) == 5.0


def test_probation_success_then_slow_start_ramp_then_healthy() -> None:
    node = NodeHealth(DEFAULT, 0.0)
    eject(node, 0.0)
    assert succeed(node, 5.0, 4) == ["probation", None, None, None]
    assert succeed(node, 6.0) == ["restored"]
    assert node.state is NodeState.SLOW_START
    for elapsed, factor in [(0.0, 0.1), (0.5, 0.1), (2.0, 0.2), (5.0, 0.5), (9.0, 0.9)]:
        assert node.weight_factor(6.0 + elapsed) == pytest.approx(factor)
    assert node.weight_factor(16.0) == 1.0
    assert node.state is NodeState.HEALTHY


def test_probation_counts_successes_across_batches() -> None:
    node = NodeHealth(DEFAULT, 0.0)
    eject(node, 0.0)
    assert node.record(5.0, 3, 0, 0) == "probation"
    assert node.record(5.1, 2, 0, 0) == "restored"


def test_probation_failure_ejects_again_for_longer() -> None:
    node = NodeHealth(DEFAULT, 0.0)
    eject(node, 0.0)
    succeed(node, 5.0, 4)
    assert node.record(5.5, 3, 1, 0) == "re-ejected"
    assert node.ejected_until == 15.5
    assert not node.may_take(15.0)


def test_no_probation_restores_when_the_ejection_ends() -> None:
    node = NodeHealth(HealthPolicy(probation_requests=0), 0.0)
    eject(node, 0.0)
    assert node.update(7.0) == "restored"
    assert node.weight_factor(7.0) == pytest.approx(0.2)  # ramping since t=5


@pytest.mark.parametrize(
    ("aggression", "points"),
    [
        (1.0, [(0.0, 0.1), (1.0, 0.1), (3.0, 0.3), (7.5, 0.75)]),
        (2.0, [(0.04, 0.1), (2.5, 0.5), (6.4, 0.8)]),  # sqrt(f): faster early
        (0.5, [(2.5, 0.1), (5.0, 0.25), (9.0, 0.81)]),  # f squared: slower early
    ],
)
def test_new_node_ramps_by_envoys_formula(
    aggression: float, points: list[tuple[float, float]]
) -> None:
    node = NodeHealth(HealthPolicy(aggression=aggression), 100.0, new=True)
    assert node.state is NodeState.SLOW_START
    for elapsed, factor in points:
        assert node.weight_factor(100.0 + elapsed) == pytest.approx(factor)
    assert node.weight_factor(110.0) == 1.0


def test_a_ramping_node_can_be_ejected() -> None:
    node = NodeHealth(DEFAULT, 0.0, new=True)
    eject(node, 1.0)
    assert node.state is NodeState.EJECTED


def test_detect_only_reports_would_eject_once_per_streak_and_changes_nothing() -> None:
    node = NodeHealth(HealthPolicy(detect_only=True), 0.0, new=True)
    assert node.weight_factor(0.0) == 1.0  # no slow start either
    events = fail(node, 0.0, 10)
    assert events == [None] * 4 + ["would_eject"] + [None] * 5
    assert node.state is NodeState.HEALTHY
    assert node.may_take(0.0) and node.weight_factor(0.0) == 1.0
    succeed(node, 0.0, 100)  # streak over: the windows are good again
    assert fail(node, 0.0, 5)[-1] == "would_eject"


# ------------------------------------------------------------------ cluster


@pytest.mark.parametrize(
    ("nodes", "percent", "allowed"),
    [(1, 50, 0), (1, 100, 1), (2, 50, 1), (3, 50, 1), (4, 50, 2), (5, 10, 1), (5, 0, 0)],
)
def test_ejection_cap(nodes: int, percent: float, allowed: int) -> None:
    policy = HealthPolicy(max_ejection_percent=percent)
    assert ClusterHealth(policy, map(str, range(nodes)), 0.0).max_out() == allowed


def bad_cluster(names: str, policy: HealthPolicy = DEFAULT) -> ClusterHealth:
    return ClusterHealth(policy, list(names), 0.0, new=False)


def test_cap_refuses_the_extra_ejection_and_the_cluster_panics() -> None:
    cluster = bad_cluster("abcd")
    assert cluster.record("a", 1.0, 0, 5, 5) == [ClusterEvent("a", "ejected")]
    assert cluster.record("b", 1.0, 0, 5, 5) == [ClusterEvent("b", "ejected")]
    assert cluster.factors(1.0) == {"a": 0.0, "b": 0.0, "c": 1.0, "d": 1.0}
    assert cluster.record("c", 1.0, 0, 5, 5) == [
        ClusterEvent("c", "ejection_refused"),
        ClusterEvent(None, "panic"),
    ]
    assert cluster.record("c", 1.1, 0, 5, 5) == []  # reported once per streak
    assert cluster.nodes["c"].state is NodeState.HEALTHY
    assert cluster.panic
    assert cluster.factors(1.1) == {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}
    assert cluster.record("c", 1.2, 100, 0, 0) == [ClusterEvent(None, "panic_over")]
    assert cluster.factors(1.2) == {"a": 0.0, "b": 0.0, "c": 1.0, "d": 1.0}


def test_probation_counts_against_the_cap_and_a_freed_slot_is_used() -> None:
    cluster = bad_cluster("ab")
    cluster.record("a", 0.0, 0, 5, 5)
    assert cluster.update(5.0) == [ClusterEvent("a", "probation")]
    assert cluster.record("b", 5.0, 0, 5, 5)[0] == ClusterEvent("b", "ejection_refused")
    assert cluster.record("a", 5.1, 5, 0, 0) == [ClusterEvent("a", "restored")]
    assert cluster.record("b", 5.2, 0, 1, 1) == [
        ClusterEvent("b", "ejected"),
        ClusterEvent(None, "panic_over"),
    ]


def test_a_node_in_probation_is_re_ejected_whatever_the_cap() -> None:
    cluster = bad_cluster("ab")
    cluster.record("a", 0.0, 0, 5, 5)
    cluster.update(5.0)
    assert cluster.record("a", 5.1, 0, 1, 1) == [ClusterEvent("a", "re-ejected")]


def test_single_node_is_never_left_without_traffic() -> None:
    kept = bad_cluster("a")
    assert kept.record("a", 0.0, 0, 5, 5) == [
        ClusterEvent("a", "ejection_refused"),
        ClusterEvent(None, "panic"),
    ]
    assert kept.factors(0.0) == {"a": 1.0}
    ejected = bad_cluster("a", HealthPolicy(max_ejection_percent=100))
    assert ejected.record("a", 0.0, 0, 5, 5) == [
        ClusterEvent("a", "ejected"),
        ClusterEvent(None, "panic"),
    ]
    assert ejected.factors(0.0) == {"a": 1.0}
    assert ejected.update(5.0) == [ClusterEvent("a", "probation"), ClusterEvent(None, "panic_over")]


def test_all_new_cluster_ramps_its_admitted_load() -> None:
    cluster = ClusterHealth(DEFAULT, ["a", "b", "c"], 0.0)
    ramp = [cluster.admit_factor(now) for now in (0.0, 2.0, 5.0)]
    assert ramp == pytest.approx([0.1, 0.2, 0.5])
    assert cluster.factors(5.0) == pytest.approx({"a": 0.5, "b": 0.5, "c": 0.5})
    ramp = [cluster.admit_factor(now) for now in (8.0, 10.0, 11.0)]
    assert ramp == pytest.approx([0.8, 1.0, 1.0])


def test_a_new_node_in_a_running_cluster_ramps_only_its_weight() -> None:
    cluster = ClusterHealth(DEFAULT, ["a"], 0.0, new=False)
    cluster.nodes["a"].record(0.0, 10, 0, 0)
    cluster.sync(["a", "b"], 20.0)
    assert cluster.admit_factor(22.0) == 1.0
    assert cluster.factors(22.0) == pytest.approx({"a": 1.0, "b": 0.2})
    cluster.sync(["b"], 23.0)
    assert list(cluster.nodes) == ["b"]


def test_detect_only_cluster_changes_no_weights_but_reports() -> None:
    cluster = ClusterHealth(HealthPolicy(detect_only=True), ["a", "b"], 0.0)
    assert cluster.admit_factor(0.0) == 1.0
    assert cluster.record("a", 0.0, 0, 5, 5) == [ClusterEvent("a", "would_eject")]
    assert cluster.record("b", 0.0, 0, 5, 5) == [ClusterEvent("b", "would_eject")]
    assert not cluster.panic
    assert cluster.factors(0.0) == {"a": 1.0, "b": 1.0}


# ------------------------------------------------------------------ false positives, statistically


def test_healthy_node_failing_one_percent_is_never_ejected() -> None:
    rng = random.Random(1234)
    cluster = ClusterHealth(DEFAULT, ["a"], 0.0, new=False)
    node = NodeHealth(DEFAULT, 0.0)  # alone: no cap to hide an ejection
    now, sent = 0.0, 0
    while sent < 200_000:
        size = rng.choice((1, 2, 5, 10, 20, 50, 100))
        batch = random_batch(rng, size, 0.01)
        assert node.record(now, *batch) is None
        assert cluster.record("a", now, *batch) == []
        sent += size
        now += 0.1
    assert node.state is NodeState.HEALTHY


def requests_until_ejected(seed: int, failure_rate: float, batch_size: int = 10) -> int:
    """Requests a node needs, after 1000 healthy ones, to be ejected once it starts failing."""
    rng = random.Random(seed)
    node = NodeHealth(DEFAULT, 0.0)
    now = 0.0
    for _ in range(1000 // batch_size):
        assert node.record(now, *random_batch(rng, batch_size, 0.01)) is None
        now += 0.1
    sent = 0
    while node.record(now, *random_batch(rng, batch_size, failure_rate)) != "ejected":
        sent += batch_size
        now += 0.1
    return sent + batch_size


@pytest.mark.parametrize("batch_size", [1, 10, 20])
@pytest.mark.parametrize("failure_rate", [0.5, 0.65, 1.0])
def test_failing_node_is_ejected_within_one_window(failure_rate: float, batch_size: int) -> None:
    for seed in range(20):
        assert requests_until_ejected(seed, failure_rate, batch_size) <= DEFAULT.window_requests
