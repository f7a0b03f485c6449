"""Splitting a proxy-wide limit between worker processes by their demand.

Every tick (0.1 s) each worker reports, per limit, how many requests asked to
pass it since the last tick (for a concurrency gate: its peak in flight plus
the requests it refused). The master turns those into shares: a worker's share
is its demand over the total, smoothed across ticks so a single quiet tick
does not starve a worker, with a small floor so a worker that was idle can
take its first requests at once. Shares add up to 1.

Cost: one small message each way per worker per tick; nothing per request.
Accuracy: the proxy-wide limit holds exactly for rates (shares sum to 1);
when load moves from one worker to another it takes a tick or two for the
shares to follow, and in that time the busy worker may refuse early (never
admit too much).
"""

from __future__ import annotations

from collections.abc import Mapping

# Weight of the newest tick in the smoothed demand.
SMOOTHING = 0.5
# Each worker's demand is counted as at least this share of the mean demand.
FLOOR = 0.05


class ShareBook:
    """Smoothed demand per (limit key, worker) and the shares it gives."""

    def __init__(self) -> None:
        self._demand: dict[str, dict[int, float]] = {}

    def update(self, reports: Mapping[int, Mapping[str, float]]) -> dict[int, dict[str, float]]:
        """Fold in one tick's ``{worker: {key: demand}}``; the new ``{worker: {key: share}}``.

        Only the workers in ``reports`` get shares: a worker that did not
        answer this tick (dead, replaced) drops out of the split.
        """
        workers = list(reports)
        keys = {key for report in reports.values() for key in report}
        shares: dict[int, dict[str, float]] = {worker: {} for worker in workers}
        if not workers:
            return shares
        for key in keys:
            smoothed = self._demand.setdefault(key, {})
            for worker in workers:
                fresh = float(reports[worker].get(key, 0.0))
                old = smoothed.get(worker, fresh)
                smoothed[worker] = old + SMOOTHING * (fresh - old)
            for gone in [w for w in smoothed if w not in reports]:
                del smoothed[gone]
            mean = sum(smoothed.values()) / len(workers)
            floor = max(FLOOR * mean, 1e-9)
            weights = {worker: smoothed[worker] + floor for worker in workers}
            total = sum(weights.values())
            for worker in workers:
                shares[worker][key] = weights[worker] / total
        for stale in [key for key in self._demand if key not in keys]:
            del self._demand[stale]
        return shares
