"""The master's /metrics: every worker's numbers combined, in Prometheus text format.

Workers keep their counters in memory and report them over the control
plane; the master adds them up at scrape time. The exposition format is
written by prometheus_client, not by hand.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

from ..modules.metrics import MergedRoute, merge_refusals, merge_reports
from .gc_tuning import GcPauses

__all__ = ["CONTENT_TYPE_LATEST", "render"]


class _Snapshot:
    """A collector over numbers gathered once per scrape."""

    def __init__(
        self,
        workers: Sequence[dict[str, Any]],
        restarts: Sequence[int],
        reloads: int,
        draining: bool,
    ) -> None:
        self.workers = workers
        self.restarts = restarts
        self.reloads = reloads
        self.draining = draining

    def collect(self) -> Iterable[Metric]:
        alive = [w for w in self.workers if "error" not in w]
        requests = CounterMetricFamily(
            "pitcher_requests", "HTTP requests answered, per worker", labels=["worker"]
        )
        connections = GaugeMetricFamily(
            "pitcher_connections", "Open client connections, per worker", labels=["worker"]
        )
        for worker in alive:
            requests.add_metric([str(worker["index"])], worker.get("requests", 0))
            connections.add_metric([str(worker["index"])], worker.get("connections", 0))
        yield requests
        yield connections
        yield from _connection_cap(alive)
        yield GaugeMetricFamily("pitcher_workers", "Workers answering", value=len(alive))
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
        snapshots = [w["gc"] for w in alive if isinstance(w.get("gc"), dict)]
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
        reports = [
            w["modules"]["metrics"]
            for w in alive
            if isinstance(w.get("modules"), dict) and isinstance(w["modules"].get("metrics"), dict)
        ]
        if reports:
            yield from _route_families(merge_reports(reports))
            refusals = CounterMetricFamily(
                "pitcher_http_refusals",
                "Requests refused before reaching a route (the parser's 400, 408, 413, 414,"
                " 431, 505; refusals at accept), by status and reason, all workers",
                labels=["status", "reason"],
            )
            for (status, reason), count in sorted(merge_refusals(reports).items()):
                refusals.add_metric([status, reason], count)
            yield refusals


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


class _Degradation:
    """Throttling and overload from the workers' reports; node health from the master's book."""

    def __init__(
        self, workers: Sequence[dict[str, Any]], health: Mapping[str, Any], scale_outs: int
    ) -> None:
        self.workers = [w for w in workers if "error" not in w]
        self.health = health
        self.scale_outs = scale_outs

    def collect(self) -> Iterable[Metric]:
        yield from self._throttle()
        yield from self._overload()
        yield from self._health()

    def _throttle(self) -> Iterable[Metric]:
        reports = [
            w["modules"]["throttle"]
            for w in self.workers
            if isinstance(w.get("modules"), dict) and isinstance(w["modules"].get("throttle"), dict)
        ]
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
        yield from self._fleet_limits()

    def _fleet_limits(self) -> Iterable[Metric]:
        """Rates shared through Redis (throttle scope = "fleet"): what each worker holds, and
        whether Redis answers it or the limit runs in its fail mode."""
        fleets = [
            (str(w["index"]), w["modules"]["throttle"]["fleet"])
            for w in self.workers
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

    def _overload(self) -> Iterable[Metric]:
        lag = GaugeMetricFamily(
            "pitcher_event_loop_lag_seconds", "Event-loop lag, per worker", labels=["worker"]
        )
        shed = GaugeMetricFamily(
            "pitcher_modules_shed",
            "Modules switched off by overload, per worker",
            labels=["worker"],
        )
        for worker in self.workers:
            overload = worker.get("overload")
            if isinstance(overload, dict):
                lag.add_metric([str(worker["index"])], overload.get("lag", 0.0))
                shed.add_metric([str(worker["index"])], len(overload.get("shed", ())))
        yield lag
        yield shed

    def _health(self) -> Iterable[Metric]:
        if not self.health:
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
        for cluster, state in sorted(self.health.items()):
            panic.add_metric([cluster], int(state["panic"]))
            for node, info in sorted(state["nodes"].items()):
                factor.add_metric([cluster, node, info["state"]], info["factor"])
            for event, count in sorted(state["events"].items()):
                events.add_metric([cluster, event], count)
        yield panic
        yield factor
        yield events
        yield CounterMetricFamily(
            "pitcher_scale_out_runs", "Scale-out commands started", value=self.scale_outs
        )


class _Discovery:
    """Each discovery source (etcd, DNS) of each cluster: up or not, nodes, skipped entries."""

    def __init__(self, sources: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
        self.sources = sources

    def collect(self) -> Iterable[Metric]:
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
        for cluster, group in self.sources.items():
            for source in group:
                key = [cluster, str(source.get("source", ""))]
                up.add_metric(key, 1.0 if source.get("state") == "ok" else 0.0)
                nodes.add_metric(key, float(source.get("nodes") or 0))
                skipped.add_metric(key, float(len(source.get("skipped") or ())))
                failures.add_metric(key, float(source.get("failures", 0)))
                updates.add_metric(key, float(source.get("updates", 0)))
        if self.sources:
            yield from (up, nodes, skipped, failures, updates)


def render(
    workers: Sequence[dict[str, Any]],
    restarts: Sequence[int],
    reloads: int,
    draining: bool,
    health: Mapping[str, Any] | None = None,
    scale_outs: int = 0,
    discovery: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(workers, restarts, reloads, draining))
    registry.register(_Degradation(workers, health or {}, scale_outs))
    registry.register(_Discovery(discovery or {}))
    return generate_latest(registry)
