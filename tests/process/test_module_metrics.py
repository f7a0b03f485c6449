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
    workers = [w["modules"]["metrics"]["routes"]["echo"] for w in body["workers"]]
    assert len(workers) == 2
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
