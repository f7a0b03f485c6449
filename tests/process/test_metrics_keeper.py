"""The master's keeper: what a replaced, silent or reset worker counted stays in every sum."""

from __future__ import annotations

import os
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from pitcher_rpc.modules.metrics import Histogram
from pitcher_rpc.process.metrics import Keeper, render


def worker(index: int, pid: int, requests: int, *durations: float, bounds=(0.1, 1.0)) -> Any:
    histogram = Histogram(bounds)
    for duration in durations:
        histogram.observe(duration)
    snapshot = histogram.snapshot()
    return {
        "index": index,
        "pid": pid,
        "requests": requests,
        "connections": 3,
        "modules": {
            "metrics": {
                "bounds": list(bounds),
                "routes": {
                    "api": {
                        "requests": {"200": len(durations)},
                        "response_bytes": 10 * len(durations),
                        "duration": snapshot,
                        "backend_latency": snapshot,
                        "residence": snapshot,
                    }
                },
                "refusals": {"408": {"header_timeout": requests}},
            }
        },
    }


def scrape(keeper: Keeper, *workers: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = render(list(workers), [0] * len(workers), 0, False, keeper=keeper).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.name.startswith("process_")
    }


# Pids no process has: no process_* samples to read for them.
DEAD, NEW, OTHER = 2**22 + 11, 2**22 + 12, 2**22 + 13


def test_a_replaced_worker_s_counts_stay_in_its_slot_and_in_the_sums() -> None:
    keeper = Keeper()
    first = scrape(keeper, worker(0, DEAD, 5, 0.05, 0.5), worker(1, OTHER, 1, 0.05))
    assert first[("pitcher_requests_total", (("worker", "0"),))] == 5
    # Worker 0 died and was replaced: the new one has counted 2 requests so far.
    second = scrape(keeper, worker(0, NEW, 2, 0.05), worker(1, OTHER, 1, 0.05))
    assert second[("pitcher_requests_total", (("worker", "0"),))] == 7
    assert second[("pitcher_http_requests_total", (("route", "api"), ("status", "200")))] == 4
    bucket = ("pitcher_request_duration_seconds_bucket", (("le", "0.1"), ("route", "api")))
    assert (first[bucket], second[bucket]) == (2, 3)
    assert (
        second[("pitcher_http_refusals_total", (("reason", "header_timeout"), ("status", "408")))]
        == 8
    )
    # A gauge is the live worker's alone.
    assert second[("pitcher_connections", (("worker", "0"),))] == 3
    # Later scrapes keep what was retired.
    third = scrape(keeper, worker(0, NEW, 3, 0.05, 0.05), worker(1, OTHER, 1, 0.05))
    assert third[("pitcher_requests_total", (("worker", "0"),))] == 8


def test_a_worker_that_does_not_answer_is_stood_in_for_by_its_last_counts() -> None:
    keeper = Keeper()
    scrape(keeper, worker(0, DEAD, 5, 0.05), worker(1, OTHER, 4, 0.05))
    silent = scrape(keeper, {"index": 0, "error": "not running"}, worker(1, OTHER, 4, 0.05))
    assert silent[("pitcher_requests_total", (("worker", "0"),))] == 5
    assert silent[("pitcher_http_requests_total", (("route", "api"), ("status", "200")))] == 2
    assert ("pitcher_connections", (("worker", "0"),)) not in silent
    # Then its replacement: its last counts are retired once, not twice.
    back = scrape(keeper, worker(0, NEW, 1, 0.05), worker(1, OTHER, 4, 0.05))
    assert back[("pitcher_requests_total", (("worker", "0"),))] == 6


def test_counts_that_drop_in_a_living_worker_are_kept() -> None:
    keeper = Keeper()
    scrape(keeper, worker(0, OTHER, 9, 0.05, 0.05, 0.05))
    # A reload rebuilt its metrics module (other buckets): its route numbers start again.
    after = scrape(keeper, worker(0, OTHER, 10, 0.05, bounds=(0.2, 2.0)))
    assert after[("pitcher_http_requests_total", (("route", "api"), ("status", "200")))] == 4
    assert after[("pitcher_requests_total", (("worker", "0"),))] == 10
    # A histogram whose buckets changed keeps only its live part: never a mix of layouts.
    les = {dict(labels).get("le") for name, labels in after if name.endswith("_bucket")}
    assert les == {"0.2", "2.0", "+Inf"}


def test_without_a_keeper_a_replaced_worker_s_counts_are_lost() -> None:
    # What the keeper is for (and what the master's scrape did without one).
    first = scrape(Keeper(), worker(0, DEAD, 5, 0.05))
    second = scrape(Keeper(), worker(0, NEW, 2, 0.05))
    key = ("pitcher_requests_total", (("worker", "0"),))
    assert second[key] < first[key]


def test_process_families_cover_each_worker_and_the_master() -> None:
    text = render([worker(0, os.getpid(), 1, 0.05)], [0], 0, False).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "process_cpu_seconds",
        "process_resident_memory_bytes",
        "process_start_time_seconds",
    ):
        assert {s.labels["worker"] for s in families[name].samples} == {"0", "master"}
    [info] = families["pitcher_build_info"].samples
    assert set(info.labels) == {"version", "python", "build"}


def test_a_series_only_a_dead_worker_had_comes_back_whole_and_in_order() -> None:
    keeper = Keeper()
    scrape(keeper, worker(0, DEAD, 1, 0.05, 0.5, 5.0))
    text = render([{"index": 0, "error": "not running"}], [0], 0, False, keeper=keeper).decode()
    [family] = [
        f
        for f in text_string_to_metric_families(text)
        if f.name == "pitcher_request_duration_seconds"
    ]
    les = [s.labels["le"] for s in family.samples if s.name.endswith("_bucket")]
    assert les == ["0.1", "1.0", "+Inf"]
    values = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert values[("pitcher_request_duration_seconds_bucket", "1.0")] == 2
    assert values[("pitcher_request_duration_seconds_count", None)] == 3


def test_a_series_a_living_worker_stops_reporting_is_let_go() -> None:
    keeper = Keeper()
    scrape(keeper, worker(0, OTHER, 3, 0.05))
    # A reload removed the route: the worker reports no numbers for it any more.
    gone = worker(0, OTHER, 4)
    gone["modules"]["metrics"]["routes"] = {}
    after = scrape(keeper, gone)
    assert not [key for key in after if dict(key[1]).get("route") == "api"]
    assert after[("pitcher_requests_total", (("worker", "0"),))] == 4
