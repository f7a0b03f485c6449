"""The status page's arithmetic: percentiles, differences across restarts, the sample ring."""

from __future__ import annotations

from typing import Any

import pytest

from pitcher_rpc.process.status_book import HISTORY, WINDOW, Delta, StatusBook, percentile

BOUNDS = [0.001, 0.01, 0.1]


def worker(
    pid: int,
    index: int = 0,
    requests: int = 0,
    routes: dict[str, tuple[dict[str, int], list[int]]] | None = None,
    bounds: list[float] = BOUNDS,
    refused: dict[str, int] | None = None,
    lag: float = 0.0,
) -> dict[str, Any]:
    """A worker's ``status`` answer, as the control plane gives it."""
    return {
        "index": index,
        "pid": pid,
        "requests": requests,
        "connections": 1,
        "overload": {"lag": lag, "shed": [], "overloaded": False},
        "gc": {"generations": [{"count": 2, "sum": 0.004, "max": 0.003}]},
        "modules": {
            "metrics": {
                "bounds": bounds,
                "routes": {
                    name: {"requests": statuses, "duration": {"counts": counts}}
                    for name, (statuses, counts) in (routes or {}).items()
                },
            },
            "throttle": {"admitted": requests, "refused": refused or {}},
        },
    }


def test_percentiles_interpolate_inside_their_bucket() -> None:
    # 10 observations: 5 up to 1 ms, 4 in (1, 10] ms, 1 in (10, 100] ms.
    counts = [5, 4, 1, 0]
    assert percentile(BOUNDS, counts, 0.5) == pytest.approx(0.001)
    # Rank 9 is the 4th of 4 in the second bucket: its upper bound.
    assert percentile(BOUNDS, counts, 0.9) == pytest.approx(0.01)
    # Rank 9.9 is 90% into the third bucket.
    assert percentile(BOUNDS, counts, 0.99) == pytest.approx(0.01 + 0.09 * 0.9)
    assert percentile(BOUNDS, [0, 0, 0, 0], 0.5) is None
    # Beyond the last bound all that is known is the last bound.
    assert percentile(BOUNDS, [0, 0, 0, 3], 0.99) == 0.1


def test_a_replaced_worker_counts_from_zero_and_a_lost_one_counts_nothing() -> None:
    old = {
        1: worker(1, requests=100, routes={"api": ({"200": 90, "503": 10}, [90, 10, 0, 0])}),
        2: worker(2, index=1, requests=50, routes={"api": ({"200": 50}, [50, 0, 0, 0])}),
    }
    new = {
        1: worker(1, requests=130, routes={"api": ({"200": 110, "503": 20}, [110, 20, 0, 0])}),
        # Worker 1's slot: pid 2 died, pid 3 replaced it and has served 7 since.
        3: worker(3, index=1, requests=7, routes={"api": ({"200": 6, "404": 1}, [7, 0, 0, 0])}),
    }
    book = StatusBook()
    book.record(list(old.values()), 0.0, 1000.0)
    book.record(list(new.values()), 2.0, 1002.0)
    point = book.points[-1]
    assert point.requests == pytest.approx((30 + 7) / 2)
    assert point.server_errors == pytest.approx(10 / 2)
    rate, errors, _ = point.routes["api"]
    assert rate == pytest.approx(37 / 2)
    assert errors == pytest.approx(10 / 37)


def test_counters_that_went_down_were_restarted() -> None:
    before = {7: worker(7, requests=500, routes={"api": ({"200": 500}, [500, 0, 0, 0])})}
    # The same process, its metrics module rebuilt by a reload (same buckets).
    after = {7: worker(7, requests=520, routes={"api": ({"200": 4}, [0, 4, 0, 0])})}
    book = StatusBook()
    book.record(list(before.values()), 0.0, 0.0)
    book.record(list(after.values()), 1.0, 1.0)
    _, delta = book.window(list(after.values()), 1.0)
    assert delta.requests == 20
    assert delta.routes["api"][0] == 4
    assert delta.routes["api"][3] == [0, 4, 0, 0]


def test_new_buckets_restart_the_histograms() -> None:
    before = [worker(7, routes={"api": ({"200": 10}, [10, 0, 0, 0])})]
    after = [worker(7, routes={"api": ({"200": 12}, [0, 0, 12])}, bounds=[0.005, 0.5])]
    book = StatusBook()
    book.record(before, 0.0, 0.0)
    _, delta = book.window(after, 1.0)
    assert delta.bounds == (0.005, 0.5)
    assert delta.routes["api"][0] == 12
    assert delta.routes["api"][3] == [0, 0, 12]


def test_the_window_reaches_back_about_window_seconds_and_the_ring_is_bounded() -> None:
    book = StatusBook(interval=1.0, history=5)
    for second in range(20):
        book.record([worker(1, requests=second * 10)], float(second), 1000.0 + second)
    assert len(book.points) == 5
    history = book.history()
    assert history["rps"] == [10.0] * 5
    assert history["time"] == [1015.0, 1016.0, 1017.0, 1018.0, 1019.0]
    seconds, delta = book.window([worker(1, requests=200)], 20.0)
    # The raw samples kept reach back WINDOW seconds at most.
    assert seconds <= WINDOW + 1
    assert delta.requests == pytest.approx(seconds * 10)
    assert HISTORY * 2.0 == 300.0  # five minutes at the default interval


def test_throttle_refusals_by_limit_and_worker_series_line_up() -> None:
    book = StatusBook()
    book.record([worker(1, lag=0.5, refused={"proxy:rate": 1})], 0.0, 0.0)
    book.record([worker(1, lag=0.01, refused={"proxy:rate": 5, "shop:rate": 2})], 2.0, 2.0)
    history = book.history()
    assert history["throttle_refused"] == [3.0]  # (4 + 2) / 2 s
    # One point per interval; the start-up sample before the first interval has none.
    assert history["workers"]["0"]["lag"] == [0.01]
    assert history["lag"] == [0.01]
    assert Delta().requests == 0


def test_node_calls_and_failures_are_counted_per_cluster_and_node() -> None:
    def with_nodes(pid: int, calls: int, failures: int) -> dict[str, Any]:
        status = worker(pid)
        status["modules"]["metrics"]["nodes"] = {
            "api": {
                "tcp://a": {"requests": calls, "failures": {"connect": failures, "5xx": 1}},
            }
        }
        return status

    book = StatusBook()
    book.record([with_nodes(1, 10, 2), with_nodes(2, 5, 0)], 0.0, 0.0)
    _, delta = book.window([with_nodes(1, 30, 6), with_nodes(3, 4, 1)], 2.0)
    # Worker 1: 20 calls, 4 failures more; worker 3 is new: all of its own.
    assert delta.nodes[("api", "tcp://a")] == [20 + 4, 4 + 2]
