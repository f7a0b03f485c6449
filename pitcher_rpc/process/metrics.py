"""The master's /metrics: every worker's numbers combined, in Prometheus text format.

Workers keep their counters in memory and report them over the control
plane; the master adds them up at scrape time. The exposition format is
written by prometheus_client, not by hand.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString

from transports.native import choose

from ..modules.metrics import MergedRoute, merge_refusals, merge_reports
from ..proxy.upstream import FAILURE_KINDS
from .gc_tuning import GcPauses
from .metrics_keeper import Keeper, Kept

__all__ = ["CONTENT_TYPE_LATEST", "Keeper", "render"]


def _worker_families(workers: Sequence[dict[str, Any]], master: bool = False) -> Iterable[Metric]:
    """Every family made of what the workers report (the master keeps these; see Keeper).

    ``master``: the master's own process_* samples join the workers' families.
    """
    requests = CounterMetricFamily(
        "pitcher_requests", "HTTP requests answered, per worker", labels=["worker"]
    )
    connections = GaugeMetricFamily(
        "pitcher_connections", "Open client connections, per worker", labels=["worker"]
    )
    for worker in workers:
        requests.add_metric([str(worker["index"])], worker.get("requests", 0))
        connections.add_metric([str(worker["index"])], worker.get("connections", 0))
    yield requests
    yield connections
    yield from _connection_cap(workers)
    yield from _tls(workers)
    snapshots = [w["gc"] for w in workers if isinstance(w.get("gc"), dict)]
    if snapshots:
        merged = GcPauses.merge(snapshots)
        pauses = HistogramMetricFamily(
            "pitcher_gc_pause_seconds",
            "Garbage collector pauses, all workers",
            labels=["generation"],
        )
        bounds = [*merged["bounds"], float("inf")]
        for generation, data in enumerate(merged["generations"]):
            buckets = [
                ("+Inf" if bound == float("inf") else repr(float(bound)), count)
                for bound, count in zip(bounds, data["buckets"], strict=True)
            ]
            pauses.add_metric([str(generation)], buckets, data["sum"])
        yield pauses
    reports = _module_reports(workers, "metrics")
    if reports:
        yield from _route_families(merge_reports(reports))
    throttles = _module_reports(workers, "throttle")
    if reports or throttles:
        refusals = CounterMetricFamily(
            "pitcher_http_refusals",
            "Requests the proxy refused itself, by status and reason, all workers: the"
            " parser's and deadlines' (no route), at accept, ip_filter's 403 before routing,"
            " the throttle's 429 and 503",
            labels=["status", "reason"],
        )
        counts = merge_refusals(reports)
        for throttle in throttles:
            for limit, count in (throttle.get("refused") or {}).items():
                key = THROTTLE_RATE if str(limit).endswith(":rate") else THROTTLE_CONCURRENCY
                counts[key] = counts.get(key, 0) + int(count)
        for (status, reason), count in sorted(counts.items()):
            refusals.add_metric([status, reason], count)
        yield refusals
    yield from _throttle(throttles, workers)
    yield from _overload(workers)
    yield from _node_families(reports)
    processes = [(str(w["index"]), w.get("pid")) for w in workers]
    yield from _processes([("master", os.getpid())] * master + processes)


def _module_reports(workers: Sequence[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [
        w["modules"][name]
        for w in workers
        if isinstance(w.get("modules"), dict) and isinstance(w["modules"].get(name), dict)
    ]


# How the throttle's refusals are counted in pitcher_http_refusals (status, reason).
THROTTLE_RATE = ("429", "throttle_rate")
THROTTLE_CONCURRENCY = ("503", "throttle_concurrency")


class _Master:
    """The families the master itself knows: workers, reloads, node health, discovery ..."""

    def __init__(
        self,
        workers: Sequence[dict[str, Any]],
        restarts: Sequence[int],
        reloads: int,
        draining: bool,
        health: Mapping[str, Any],
        scale_outs: int,
        discovery: Mapping[str, Sequence[Mapping[str, Any]]],
    ) -> None:
        self.workers = workers
        self.restarts = restarts
        self.reloads = reloads
        self.draining = draining
        self.health = health
        self.scale_outs = scale_outs
        self.discovery = discovery

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily("pitcher_workers", "Workers answering", value=len(self.workers))
        restarts = CounterMetricFamily(
            "pitcher_worker_restarts", "Workers replaced after dying", labels=["worker"]
        )
        for index, count in enumerate(self.restarts):
            restarts.add_metric([str(index)], count)
        yield restarts
        yield CounterMetricFamily(
            "pitcher_config_reloads", "Configuration reloads", value=self.reloads
        )
        yield GaugeMetricFamily(
            "pitcher_draining", "1 while the proxy drains", value=int(self.draining)
        )
        yield from _health(self.health, self.scale_outs, _module_reports(self.workers, "metrics"))
        yield from _discovery(self.discovery)
        yield _build_info()


def _tls(workers: Sequence[dict[str, Any]]) -> Iterable[Metric]:
    """A TLS listener's handshakes: under way, and failed by reason, all workers."""
    reports = [w["tls"] for w in workers if isinstance(w.get("tls"), dict) and w["tls"]["enabled"]]
    if not reports:
        return
    handshaking = GaugeMetricFamily(
        "pitcher_tls_handshakes_in_progress", "TLS handshakes under way, all workers"
    )
    handshaking.add_metric([], sum(int(r.get("handshaking", 0)) for r in reports))
    yield handshaking
    failures = CounterMetricFamily(
        "pitcher_tls_handshake_failures",
        "TLS handshakes that failed on the listener, by reason, all workers",
        labels=["reason"],
    )
    counts: dict[str, int] = {}
    for report in reports:
        for reason, count in (report.get("handshake_failures") or {}).items():
            counts[reason] = counts.get(reason, 0) + int(count)
    for reason, count in sorted(counts.items()):
        failures.add_metric([reason], count)
    yield failures


def _connection_cap(workers: Sequence[dict[str, Any]]) -> Iterable[Metric]:
    """Each worker's part of server.max_connections and what reaching it did."""
    families = (
        (
            GaugeMetricFamily,
            "pitcher_connection_limit",
            "limit",
            "Connections this worker may hold",
        ),
        (
            GaugeMetricFamily,
            "pitcher_accept_paused",
            "paused",
            "1 while the worker, at its cap, does not accept",
        ),
        (
            CounterMetricFamily,
            "pitcher_accept_pauses",
            "pauses",
            "Times the worker reached its connection cap and stopped accepting",
        ),
        (
            CounterMetricFamily,
            "pitcher_accept_paused_seconds",
            "paused_seconds",
            "Time spent at the connection cap, not accepting",
        ),
        (
            CounterMetricFamily,
            "pitcher_idle_connections_closed",
            "idle_closed",
            "Idle keep-alive connections closed at the cap to make room for a waiting client",
        ),
    )
    reports = [
        (str(w["index"]), w["connection_cap"])
        for w in workers
        if isinstance(w.get("connection_cap"), dict)
    ]
    if not reports:
        return
    for kind, name, key, text in families:
        family = kind(name, f"{text}, per worker", labels=["worker"])
        for index, report in reports:
            family.add_metric([index], float(report.get(key, 0)))
        yield family


# Histogram families of the metrics module: (name, its key in a route's report, help).
_ROUTE_HISTOGRAMS = (
    (
        "pitcher_request_duration_seconds",
        "duration",
        "Time from a request read to its response written, all workers",
    ),
    (
        "pitcher_backend_latency_seconds",
        "backend_latency",
        "Time from the last backend attempt sent to its answer, all workers",
    ),
    (
        "pitcher_residence_seconds",
        "residence",
        "Time a request spent in the proxy itself (total minus backend), all workers",
    ),
    (
        "pitcher_request_body_size_bytes",
        "request_body_size",
        "Bytes of request bodies read (de-chunked), all workers",
    ),
    (
        "pitcher_response_size_bytes",
        "response_size",
        "Bytes of HTTP responses written, head included, all workers",
    ),
)


def _route_families(routes: dict[str, MergedRoute]) -> Iterable[Metric]:
    """The metrics module's numbers (see pitcher_rpc.modules.metrics); route "" is unrouted."""
    requests = CounterMetricFamily(
        "pitcher_http_requests",
        "HTTP responses written, by route and status, all workers",
        labels=["route", "status"],
    )
    sent = CounterMetricFamily(
        "pitcher_response_bytes",
        "Bytes of HTTP responses written, head included, all workers",
        labels=["route"],
    )
    for route, numbers in sorted(routes.items()):
        for status, count in sorted(numbers.requests.items()):
            requests.add_metric([route, status], count)
        sent.add_metric([route], numbers.response_bytes)
    yield requests
    yield sent
    for name, key, documentation in _ROUTE_HISTOGRAMS:
        family = HistogramMetricFamily(name, documentation, labels=["route"])
        for route, numbers in sorted(routes.items()):
            histogram = numbers.histograms.get(key)
            if histogram is None:
                continue
            bounds = [*map(floatToGoString, histogram.bounds), "+Inf"]
            family.add_metric(
                [route], list(zip(bounds, histogram.cumulative(), strict=True)), histogram.sum
            )
        yield family


def _throttle(
    reports: Sequence[dict[str, Any]], workers: Sequence[dict[str, Any]]
) -> Iterable[Metric]:
    if not reports:
        return
    yield CounterMetricFamily(
        "pitcher_throttle_admitted",
        "Requests the throttle module let through, all workers",
        value=sum(r.get("admitted", 0) for r in reports),
    )
    for name, key, text in (
        ("pitcher_throttle_refused", "refused", "Requests refused, by limit"),
        ("pitcher_throttle_would_refuse", "would_refuse", "Detect mode: would be refused"),
    ):
        family = CounterMetricFamily(name, f"{text}, all workers", labels=["limit"])
        totals: dict[str, int] = {}
        for report in reports:
            for limit, count in (report.get(key) or {}).items():
                totals[limit] = totals.get(limit, 0) + count
        for limit, count in sorted(totals.items()):
            family.add_metric([limit], count)
        yield family
    yield from _fleet_limits(workers)


def _fleet_limits(workers: Sequence[dict[str, Any]]) -> Iterable[Metric]:
    """Rates shared through Redis (throttle scope = "fleet"): what each worker holds, and
    whether Redis answers it or the limit runs in its fail mode."""
    fleets = [
        (str(w["index"]), w["modules"]["throttle"]["fleet"])
        for w in workers
        if isinstance(w.get("modules"), dict)
        and isinstance(w["modules"].get("throttle"), dict)
        and isinstance(w["modules"]["throttle"].get("fleet"), dict)
    ]
    if not fleets:
        return
    connected = GaugeMetricFamily(
        "pitcher_throttle_fleet_connected",
        "1 while Redis answers the worker's refills; 0: its fleet limits are in fail mode",
        labels=["worker"],
    )
    failing = GaugeMetricFamily(
        "pitcher_throttle_fleet_fail_mode",
        "1 while a fleet limit runs in its fail mode (open: admits; closed: a local share)",
        labels=["limit", "worker"],
    )
    held = GaugeMetricFamily(
        "pitcher_throttle_fleet_held_tokens",
        "Tokens a worker holds from the fleet's bucket, spent without asking Redis",
        labels=["limit", "worker"],
    )
    proxies = GaugeMetricFamily(
        "pitcher_throttle_fleet_proxies", "Proxies sharing the fleet's limits, as Redis counts"
    )
    counters = {
        key: CounterMetricFamily(name, text, labels=["limit"])
        for key, name, text in (
            ("refills", "pitcher_throttle_fleet_refills", "Batches of tokens taken from Redis"),
            (
                "unchecked",
                "pitcher_throttle_fleet_unchecked",
                "Requests admitted unchecked while Redis was away (fail = open)",
            ),
        )
    }
    errors = CounterMetricFamily(
        "pitcher_throttle_fleet_redis_errors", "Refills Redis failed or did not answer in time"
    )
    outages = CounterMetricFamily(
        "pitcher_throttle_fleet_outages", "Times Redis went away, counted per worker, summed"
    )
    totals: dict[str, dict[str, float]] = {key: {} for key in counters}
    error_count = outage_count = 0
    most_proxies = 0.0
    for worker, fleet in fleets:
        connected.add_metric([worker], 1.0 if fleet.get("connected") else 0.0)
        error_count += int(fleet.get("errors", 0))
        outage_count += int(fleet.get("outages", 0))
        most_proxies = max(most_proxies, float(fleet.get("proxies") or 0))
        for limit, state in sorted((fleet.get("limits") or {}).items()):
            failing.add_metric([limit, worker], 0.0 if state.get("mode") == "fleet" else 1.0)
            held.add_metric([limit, worker], float(state.get("held", 0)))
            for key, total in totals.items():
                total[limit] = total.get(limit, 0) + float(state.get(key, 0))
    for key, family in counters.items():
        for limit, value in sorted(totals[key].items()):
            family.add_metric([limit], value)
    errors.add_metric([], error_count)
    outages.add_metric([], outage_count)
    proxies.add_metric([], most_proxies)
    yield from (connected, failing, held, proxies, *counters.values(), errors, outages)


def _overload(workers: Sequence[dict[str, Any]]) -> Iterable[Metric]:
    lag = GaugeMetricFamily(
        "pitcher_event_loop_lag_seconds", "Event-loop lag, per worker", labels=["worker"]
    )
    shed = GaugeMetricFamily(
        "pitcher_modules_shed",
        "Modules switched off by overload, per worker",
        labels=["worker"],
    )
    for worker in workers:
        overload = worker.get("overload")
        if isinstance(overload, dict):
            lag.add_metric([str(worker["index"])], overload.get("lag", 0.0))
            shed.add_metric([str(worker["index"])], len(overload.get("shed", ())))
    yield lag
    yield shed


def _health(
    health: Mapping[str, Any], scale_outs: int, reports: Sequence[dict[str, Any]]
) -> Iterable[Metric]:
    yield from _node_states(health, reports)
    if not health:
        return
    panic = GaugeMetricFamily(
        "pitcher_cluster_panic", "1 while a cluster sends to every node", labels=["cluster"]
    )
    factor = GaugeMetricFamily(
        "pitcher_node_weight_factor",
        "A node's health factor: 0 ejected, below 1 ramping or in probation",
        labels=["cluster", "node", "state"],
    )
    events = CounterMetricFamily(
        "pitcher_health_events",
        "Node health events (ejected, probation, restored, panic ...)",
        labels=["cluster", "event"],
    )
    for cluster, state in sorted(health.items()):
        panic.add_metric([cluster], int(state["panic"]))
        for node, info in sorted(state["nodes"].items()):
            factor.add_metric([cluster, node, info["state"]], info["factor"])
        for event, count in sorted(state["events"].items()):
            events.add_metric([cluster, event], count)
    yield panic
    yield factor
    yield events
    yield CounterMetricFamily(
        "pitcher_scale_out_runs", "Scale-out commands started", value=scale_outs
    )


def _discovery(sources: Mapping[str, Sequence[Mapping[str, Any]]]) -> Iterable[Metric]:
    """Each discovery source (etcd, DNS) of each cluster: up or not, nodes, skipped entries."""
    labels = ["cluster", "source"]
    up = GaugeMetricFamily(
        "pitcher_discovery_up",
        "1 while a discovery source answers; 0: its last known nodes are kept",
        labels=labels,
    )
    nodes = GaugeMetricFamily(
        "pitcher_discovery_nodes", "Nodes a discovery source lists now", labels=labels
    )
    skipped = GaugeMetricFamily(
        "pitcher_discovery_skipped",
        "Entries a discovery source holds that are not a valid node (skipped)",
        labels=labels,
    )
    failures = CounterMetricFamily(
        "pitcher_discovery_failures",
        "Failed attempts to read, watch or resolve a discovery source",
        labels=labels,
    )
    updates = CounterMetricFamily(
        "pitcher_discovery_updates", "Node sets taken from a discovery source", labels=labels
    )
    for cluster, group in sources.items():
        for source in group:
            key = [cluster, str(source.get("source", ""))]
            up.add_metric(key, 1.0 if source.get("state") == "ok" else 0.0)
            nodes.add_metric(key, float(source.get("nodes") or 0))
            skipped.add_metric(key, float(len(source.get("skipped") or ())))
            failures.add_metric(key, float(source.get("failures", 0)))
            updates.add_metric(key, float(source.get("updates", 0)))
    if sources:
        yield from (up, nodes, skipped, failures, updates)


# A node's health as one enum-style gauge: 1 for the state it is in, 0 for the
# others (the health book's names; a node of a cluster without a health table
# is always "healthy").
NODE_STATES = ("healthy", "slow_start", "probation", "ejected")


def _node_families(reports: Sequence[dict[str, Any]]) -> Iterable[Metric]:
    """Every node's calls, failures by kind, retries, calls in flight and pool, all workers."""
    totals: dict[tuple[str, str], dict[str, Any]] = {}
    for report in reports:
        for cluster, nodes in (report.get("nodes") or {}).items():
            for uri, numbers in nodes.items():
                total = totals.setdefault((cluster, uri), {"failures": {}})
                for key in ("requests", "retries", "in_flight", "connections"):
                    total[key] = total.get(key, 0) + int(numbers.get(key, 0))
                for kind, count in (numbers.get("failures") or {}).items():
                    total["failures"][kind] = total["failures"].get(kind, 0) + int(count)
    if not totals:
        return
    labels = ["cluster", "node"]
    requests = CounterMetricFamily(
        "pitcher_node_requests",
        "Calls to a node that came to an outcome (an answer or a failure), all workers",
        labels=labels,
    )
    failures = CounterMetricFamily(
        "pitcher_node_failures",
        "Failed calls to a node by kind: connect, timeout, reset, error (a backend error"
        " or an undecodable answer), 5xx, overloaded (refused at its in-flight limit)",
        labels=[*labels, "kind"],
    )
    retries = CounterMetricFamily(
        "pitcher_node_retries", "Attempts sent to a node as a retry, all workers", labels=labels
    )
    in_flight = GaugeMetricFamily(
        "pitcher_node_in_flight", "Calls to a node in flight now, all workers", labels=labels
    )
    pool = GaugeMetricFamily(
        "pitcher_node_connections",
        "Open connections to a node (its pools in every worker)",
        labels=labels,
    )
    for (cluster, uri), total in sorted(totals.items()):
        node = [cluster, uri]
        requests.add_metric(node, total["requests"])
        for kind in FAILURE_KINDS:
            failures.add_metric([*node, kind], total["failures"].get(kind, 0))
        retries.add_metric(node, total["retries"])
        in_flight.add_metric(node, total["in_flight"])
        pool.add_metric(node, total["connections"])
    yield from (requests, failures, retries, in_flight, pool)


def _node_states(health: Mapping[str, Any], reports: Sequence[dict[str, Any]]) -> Iterable[Metric]:
    """``pitcher_node_health_state``: the book's state of each node, "healthy" where none."""
    states: dict[tuple[str, str], str] = {}
    for report in reports:
        for cluster, nodes in (report.get("nodes") or {}).items():
            for uri in nodes:
                states[(cluster, uri)] = "healthy"
    for cluster, state in health.items():
        for uri, info in (state.get("nodes") or {}).items():
            states[(cluster, uri)] = str(info.get("state", "healthy"))
    if not states:
        return
    family = GaugeMetricFamily(
        "pitcher_node_health_state",
        "1 for the health state a node is in (healthy, slow_start, probation, ejected), 0 for"
        " the others",
        labels=["cluster", "node", "state"],
    )
    for (cluster, uri), current in sorted(states.items()):
        for state in NODE_STATES:
            family.add_metric([cluster, uri, state], 1.0 if state == current else 0.0)
    yield family


def _processes(processes: Sequence[tuple[str, Any]]) -> Iterable[Metric]:
    """prometheus_client's process_* families for each process by pid, with a worker label."""
    families: dict[str, Metric] = {}
    for label, pid in processes:
        if not isinstance(pid, int) or pid <= 0:
            continue
        collector = ProcessCollector(pid=_constant(pid), registry=None)
        for found in collector.collect():
            family = families.get(found.name)
            if family is None:
                family = families[found.name] = Metric(
                    found.name,
                    found.documentation + " By process: a worker's slot, or the master",
                    found.type,
                )
            for sample in found.samples:
                family.add_sample(sample.name, {**sample.labels, "worker": label}, sample.value)
    yield from families.values()


def _constant(pid: int) -> Callable[[], int]:
    return lambda: pid


def _build_info() -> Metric:
    build = choose()
    try:
        version = importlib.metadata.version("pitcher-rpc")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    info = GaugeMetricFamily(
        "pitcher_build_info",
        "Always 1: the version, the Python and the build (compiled or pure) the master runs",
        labels=["version", "python", "build"],
    )
    info.add_metric(
        [version, platform.python_version(), "compiled" if build.compiled else "pure"], 1
    )
    return info


def _with_master(workers: Sequence[dict[str, Any]]) -> Iterable[Metric]:
    return _worker_families(workers, master=True)


def render(
    workers: Sequence[dict[str, Any]],
    restarts: Sequence[int],
    reloads: int,
    draining: bool,
    health: Mapping[str, Any] | None = None,
    scale_outs: int = 0,
    discovery: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    keeper: Keeper | None = None,
) -> bytes:
    """/metrics of the whole proxy from the workers' ``status`` answers (one per slot).

    With a ``keeper`` (the master keeps one for its life) counters never go
    backwards when a worker is replaced; see :class:`Keeper`.
    """
    alive = [w for w in workers if "error" not in w]
    keeper = keeper or Keeper()
    registry = CollectorRegistry(auto_describe=False)
    extras = keeper.extras(workers, _worker_families)
    registry.register(Kept(_with_master, alive, extras, keeper))
    registry.register(
        _Master(alive, restarts, reloads, draining, health or {}, scale_outs, discovery or {})
    )
    return generate_latest(registry)
