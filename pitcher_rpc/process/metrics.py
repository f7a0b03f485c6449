"""The master's /metrics: every worker's numbers combined, in Prometheus text format.

Workers keep their counters in memory and report them over the control
plane; the master adds them up at scrape time. The exposition format is
written by prometheus_client, not by hand.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

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


def render(
    workers: Sequence[dict[str, Any]], restarts: Sequence[int], reloads: int, draining: bool
) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(workers, restarts, reloads, draining))
    return generate_latest(registry)
