"""The metrics module's numbers on the master's /metrics, added up over real workers."""

from __future__ import annotations

import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from pitcher_rpc.modules.metrics import DEFAULT_BUCKETS, Histogram
from pitcher_rpc.process.metrics import render
from tests.process.test_master import admin, admin_port
from tests.proxy.conftest import Launcher, get, toml_config

HISTOGRAMS = (
    "pitcher_request_duration_seconds",
    "pitcher_backend_latency_seconds",
    "pitcher_residence_seconds",
)


def scrape(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_every_worker_s_requests_are_added_up_on_metrics(launcher: Launcher) -> None:
    echo = launcher.echo_backend("tcp")
    text = toml_config(
        [{"name": "echo", "prefix": "/", "cluster": "echo"}], {"echo": {"nodes": [echo.uri]}}
    )
    proxy = launcher.proxy(text + "\n[modules.metrics]\n", workers=2)
    port = admin_port(proxy)
    requests = 40
    for _ in range(requests):
        assert get(proxy, "/counted").status == 200

    families = scrape(port)
    counted = [
        sample
        for sample in families["pitcher_http_requests"].samples
        if sample.name == "pitcher_http_requests_total" and sample.labels["route"] == "echo"
    ]
    assert [(s.labels["status"], s.value) for s in counted] == [("200", requests)]
    for name in HISTOGRAMS:
        samples = families[name].samples
        [count] = [s.value for s in samples if s.name == f"{name}_count"]
        assert count == requests, name
        buckets = [s for s in samples if s.name == f"{name}_bucket"]
        assert [s.labels["le"] for s in buckets][-1] == "+Inf"
        assert len(buckets) == len(DEFAULT_BUCKETS) + 1
        assert buckets[-1].value == requests
        [total] = [s.value for s in samples if s.name == f"{name}_sum"]
        assert total > 0.0
    [sent] = [
        s.value
        for s in families["pitcher_response_bytes"].samples
        if s.name == "pitcher_response_bytes_total"
    ]
    assert sent > 0

    # The same numbers, worker by worker: what /metrics shows is their sum.
    status, body = admin(port, "/admin/workers")
    assert status == 200
    # A worker the kernel handed no connection has no line for the route yet.
    assert len(body["workers"]) == 2
    routes = [w["modules"]["metrics"]["routes"] for w in body["workers"]]
    workers = [r["echo"] for r in routes if "echo" in r]
    assert workers
    assert sum(sum(w["requests"].values()) for w in workers) == requests
    assert sum(w["response_bytes"] for w in workers) == sent


def worker(index: int, modules: dict[str, Any]) -> dict[str, Any]:
    return {"index": index, "requests": 0, "connections": 0, "modules": modules}


def numbers(bounds: tuple[float, ...], *values: float) -> dict[str, Any]:
    histogram = Histogram(bounds)
    for value in values:
        histogram.observe(value)
    snapshot = histogram.snapshot()
    return {
        "bounds": list(bounds),
        "routes": {
            "api": {
                "requests": {"200": len(values)},
                "response_bytes": 10 * len(values),
                "duration": snapshot,
                "backend_latency": snapshot,
                "residence": snapshot,
            }
        },
    }


def families_of(workers: list[dict[str, Any]]) -> dict[str, Any]:
    text = render(workers, [0] * len(workers), 0, False).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_the_families_appear_only_when_a_worker_reports_the_module() -> None:
    families = families_of([worker(0, {}), worker(1, {})])
    assert "pitcher_http_requests" not in families
    assert not set(HISTOGRAMS) & set(families)

    families = families_of(
        [worker(0, {"metrics": numbers((0.001, 1.0), 0.001, 0.5)}), worker(1, {})]
    )
    duration = {
        (s.name, s.labels.get("le")): s.value
        for s in families["pitcher_request_duration_seconds"].samples
    }
    # le is inclusive, the counts cumulative.
    assert duration == {
        ("pitcher_request_duration_seconds_bucket", "0.001"): 1,
        ("pitcher_request_duration_seconds_bucket", "1.0"): 2,
        ("pitcher_request_duration_seconds_bucket", "+Inf"): 2,
        ("pitcher_request_duration_seconds_count", None): 2,
        ("pitcher_request_duration_seconds_sum", None): 0.501,
    }


def test_a_worker_on_other_buckets_is_left_out_of_the_histograms_only() -> None:
    families = families_of(
        [
            worker(0, {"metrics": numbers((1.0,), 0.5, 0.5)}),
            worker(1, {"metrics": numbers((1.0,), 2.0)}),
            worker(2, {"metrics": numbers((9.0,), 0.5)}),
        ]
    )
    [requests] = [
        s.value
        for s in families["pitcher_http_requests"].samples
        if s.name == "pitcher_http_requests_total"
    ]
    assert requests == 4
    [count] = [
        s.value
        for s in families["pitcher_residence_seconds"].samples
        if s.name == "pitcher_residence_seconds_count"
    ]
    assert count == 3


def test_refusals_of_every_worker_are_added_up_by_status_and_reason() -> None:
    first = numbers((1.0,), 0.5)
    first["refusals"] = {"431": {"headers_too_large": 2}, "408": {"header_timeout": 1}}
    second = numbers((1.0,), 0.5)
    second["refusals"] = {"431": {"headers_too_large": 3, "too_many_headers": 1}}
    # A worker still on a build that reports no refusals adds nothing.
    families = families_of(
        [
            worker(0, {"metrics": first}),
            worker(1, {"metrics": second}),
            worker(2, {"metrics": numbers((1.0,), 0.5)}),
        ]
    )
    refusals = {
        (s.labels["status"], s.labels["reason"]): s.value
        for s in families["pitcher_http_refusals"].samples
        if s.name == "pitcher_http_refusals_total"
    }
    assert refusals == {
        ("431", "headers_too_large"): 5,
        ("431", "too_many_headers"): 1,
        ("408", "header_timeout"): 1,
    }


def test_each_worker_s_connection_cap_is_shown() -> None:
    workers = [worker(0, {}), worker(1, {})]
    workers[0]["connections"] = 3
    workers[0]["connection_cap"] = {
        "open": 3,
        "limit": 3,
        "share": 0.6,
        "paused": True,
        "pauses": 4,
        "paused_seconds": 1.5,
        "idle_closed": 2,
    }
    workers[1]["connection_cap"] = {
        "open": 1,
        "limit": 2,
        "share": 0.4,
        "paused": False,
        "pauses": 0,
        "paused_seconds": 0.0,
        "idle_closed": 0,
    }
    families = families_of(workers)

    def by_worker(family: str, sample: str | None = None) -> dict[str, float]:
        return {
            s.labels["worker"]: s.value
            for s in families[family].samples
            if s.name == (sample or family)
        }

    assert by_worker("pitcher_connections") == {"0": 3, "1": 0}
    assert by_worker("pitcher_connection_limit") == {"0": 3, "1": 2}
    assert by_worker("pitcher_accept_paused") == {"0": 1, "1": 0}
    assert by_worker("pitcher_accept_pauses", "pitcher_accept_pauses_total") == {"0": 4, "1": 0}
    assert by_worker("pitcher_accept_paused_seconds", "pitcher_accept_paused_seconds_total") == {
        "0": 1.5,
        "1": 0.0,
    }
    assert by_worker(
        "pitcher_idle_connections_closed", "pitcher_idle_connections_closed_total"
    ) == {"0": 2, "1": 0}
