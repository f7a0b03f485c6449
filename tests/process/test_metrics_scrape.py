"""A real master's whole /metrics under traffic: every family parses, the new ones move,
the Grafana dashboard names only metrics a scrape has, and no counter goes backwards
when a worker is killed and replaced."""

from __future__ import annotations

import json
import os
import re
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.process.test_master import admin, admin_port
from tests.proxy.conftest import Launcher, Proxy, RawClient, free_port, get, wait_until

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "conf" / "grafana" / "pitcher.json"


def scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def scrape(port: int) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(scrape_text(port))}


def value(families: dict[str, Any], sample: str, **labels: str) -> float:
    """The sum of ``sample``'s values whose labels include ``labels``."""
    family = families[re.sub(r"_(total|bucket|count|sum)$", "", sample)]
    return sum(
        s.value
        for s in family.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Launcher, Proxy, int, str, str]]:
    launcher = Launcher()
    try:
        echo = launcher.echo_backend("tcp")
        dead = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
        text = f"""
[server]
listen = "127.0.0.1:0"
max_header_size = 4096
trusted_proxies = ["127.0.0.1"]
drain_timeout = 2.0

[admin]
listen = "127.0.0.1:0"

[modules.metrics]
[modules.ip_filter]
deny = ["192.0.2.0/24"]
[modules.throttle.business.tiny]
rate = 1
burst = 1

[[routes]]
name = "limited"
prefix = "/limited/"
cluster = "echo"
business = "tiny"

[[routes]]
name = "slow"
prefix = "/slow/"
cluster = "echo"
timeout = 0.3

[[routes]]
name = "mixed"
prefix = "/mixed/"
cluster = "mixed"

[[routes]]
name = "echo"
prefix = "/"
cluster = "echo"

[clusters.echo]
nodes = ["{echo.uri}"]

[clusters.mixed]
balance = "round_robin"
nodes = ["{echo.uri}", "{dead}"]

[clusters.mixed.health]
min_requests = 2
min_failures = 2
consecutive_failures = 2
ejection_time = 30.0
"""
        proxy = launcher.proxy(text, workers=2)
        port = admin_port(proxy)
        yield launcher, proxy, port, echo.uri, dead
    finally:
        launcher.close()


@pytest.fixture(scope="module")
def loaded(served: tuple[Launcher, Proxy, int, str, str]) -> dict[str, Any]:
    """The traffic every check below reads, sent once."""
    proxy = served[1]
    for _ in range(20):
        assert get(proxy, "/hello").status == 200
    for _ in range(12):
        # Half go first to the dead node: refused connects, retried on the live one.
        assert get(proxy, "/mixed/x").status == 200
    assert get(proxy, "/slow/x?sleep=1").status == 504
    limited = [get(proxy, "/limited/x").status for _ in range(10)]
    assert limited.count(429) >= 6, limited
    forbidden = get(proxy, "/hello", headers=[("x-forwarded-for", "192.0.2.7")])
    assert forbidden.status == 403
    with RawClient.connect(proxy.host, proxy.port) as client:
        big = client.request("GET", "/hello", headers=[("x-big", "a" * 5000)])
    assert big.status == 431
    with RawClient.connect(proxy.host, proxy.port) as client:
        posted = client.request("POST", "/hello", body=b"b" * 5000)
    assert posted.status == 200
    return {"limited": limited.count(429)}


def test_every_family_parses_and_the_new_ones_move(
    served: tuple[Launcher, Proxy, int, str, str], loaded: dict[str, Any]
) -> None:
    _, _, port, echo, dead = served

    def settled() -> bool:
        families = scrape(port)
        states = families.get("pitcher_node_health_state")
        return states is not None and (
            value(families, "pitcher_node_health_state", node=dead, state="ejected") == 1
        )

    wait_until(settled, 5.0, "the dead node ejected")
    families = scrape(port)  # parsing it whole is the first check
    for family in families.values():
        assert family.samples or family.type in ("gauge", "counter"), family.name

    # A node's calls and failures by kind, a pool, health as a state gauge.
    assert value(families, "pitcher_node_requests_total", cluster="echo", node=echo) >= 22
    assert value(families, "pitcher_node_failures_total", node=dead, kind="connect") >= 2
    # A node in two clusters is one node: its numbers show under each.
    assert (
        value(families, "pitcher_node_failures_total", cluster="echo", node=echo, kind="timeout")
        == 1
    )
    assert (
        value(families, "pitcher_node_failures_total", cluster="echo", node=echo, kind="connect")
        == 0
    )
    assert value(families, "pitcher_node_connections", cluster="echo", node=echo) >= 1
    assert value(families, "pitcher_node_in_flight", cluster="echo", node=echo) == 0
    # The dead node's refused connects were retried on the live one.
    assert value(families, "pitcher_node_retries_total", cluster="mixed", node=echo) >= 2
    assert value(families, "pitcher_node_retries_total", cluster="mixed", node=dead) == 0
    kinds = {s.labels["kind"] for s in families["pitcher_node_failures"].samples}
    assert kinds == {"connect", "timeout", "reset", "error", "5xx", "overloaded"}
    states = {
        s.labels["state"]: s.value
        for s in families["pitcher_node_health_state"].samples
        if s.labels["node"] == dead
    }
    assert states == {"healthy": 0, "slow_start": 0, "probation": 0, "ejected": 1}
    # A node of a cluster with no health table is in service.
    assert value(families, "pitcher_node_health_state", cluster="echo", state="healthy") == 1

    # Refusals by status and reason: the parser's, ip_filter's, the throttle's.
    refusals = "pitcher_http_refusals_total"
    assert value(families, refusals, status="431", reason="headers_too_large") == 1
    assert value(families, refusals, status="403", reason="forbidden") == 1
    assert value(families, refusals, status="429", reason="throttle_rate") == loaded["limited"]

    # Sizes: the 5000-byte body lies between 4 KiB and 16 KiB.
    body = "pitcher_request_body_size_bytes_bucket"
    assert value(families, body, route="echo", le="4096.0") == 20
    assert value(families, body, route="echo", le="16384.0") == 21
    assert value(families, "pitcher_request_body_size_bytes_sum", route="echo") == 5000
    assert value(families, "pitcher_response_size_bytes_bucket", route="echo", le="4096.0") == 20

    # process_* for every worker and the master; the build.
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"):
        workers = {s.labels["worker"] for s in families[name.removesuffix("_total")].samples}
        assert workers == {"0", "1", "master"}, name
    [info] = families["pitcher_build_info"].samples
    assert info.value == 1 and info.labels["build"] in ("compiled", "pure")


def _expressions(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, item in node.items():
            if key == "expr" and isinstance(item, str):
                yield item
            else:
                yield from _expressions(item)
    elif isinstance(node, list):
        for item in node:
            yield from _expressions(item)


def test_the_dashboard_names_only_metrics_a_scrape_has(
    served: tuple[Launcher, Proxy, int, str, str], loaded: dict[str, Any]
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = list(_expressions(dashboard))
    assert len(expressions) >= 10
    names = {
        sample.name
        for family in text_string_to_metric_families(scrape_text(served[2]))
        for sample in family.samples
    }
    for expression in expressions:
        used = set(re.findall(r"\b(?:pitcher|process)_[a-z0-9_]+", expression))
        assert used, expression
        assert used <= names, (expression, sorted(used - names))


def _counter_sums(families: dict[str, Any]) -> dict[str, float]:
    sums: dict[str, float] = {}
    for family in families.values():
        if family.type not in ("counter", "histogram"):
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    return sums


def test_no_counter_goes_backwards_when_a_worker_is_killed(
    served: tuple[Launcher, Proxy, int, str, str], loaded: dict[str, Any]
) -> None:
    _, proxy, port, _, _ = served
    _, body = admin(port, "/admin/workers")
    pids = {w["index"]: w["pid"] for w in body["workers"]}
    before = scrape(port)
    os.kill(pids[0], signal.SIGKILL)

    def replaced() -> bool:
        _, answer = admin(port, "/admin/workers")
        return any(
            w["index"] == 0 and w.get("pid") not in (None, pids[0]) for w in answer["workers"]
        )

    wait_until(replaced, 10.0, "worker 0 replaced")
    after = scrape(port)
    sums_before, sums_after = _counter_sums(before), _counter_sums(after)
    dropped = {
        name: (total, sums_after.get(name, 0.0))
        for name, total in sums_before.items()
        if sums_after.get(name, 0.0) < total
    }
    assert not dropped
    # Worker 0's slot goes on from its last count, and takes new requests on top.
    requests = value(before, "pitcher_requests_total", worker="0")
    assert requests > 0
    assert value(after, "pitcher_requests_total", worker="0") >= requests
    for _ in range(10):
        assert get(proxy, "/hello").status == 200
    later = scrape(port)
    assert value(later, "pitcher_http_requests_total", route="echo") >= (
        value(before, "pitcher_http_requests_total", route="echo") + 10
    )
