"""Splitting a proxy-wide limit between worker processes by their demand.

Every tick (0.1 s) each worker reports, per limit, how many requests asked to
pass it since the last tick (for a concurrency gate: its peak in flight plus
the requests it refused). The master turns those into shares: a worker's share
is its demand over the total, smoothed across ticks so a single quiet tick
does not starve a worker, with a small floor so a worker that was idle can
take its first requests at once. Shares add up to 1.

Cost: one small message each way per worker per tick; nothing per request.
Accuracy: the proxy-wide limit holds for rates (shares never add up to more
than 1; a worker that misses ticks keeps its part for a second);
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
# Ticks a worker that stopped answering keeps its part of the split: it may
# still be admitting with its last share, so the others must not take it.
ABSENT_GRACE = 10


class ShareBook:
    """Smoothed demand per (limit key, worker) and the shares it gives."""

    def __init__(self) -> None:
        self._demand: dict[str, dict[int, float]] = {}
        self._absent: dict[int, int] = {}  # worker -> ticks without an answer

    def update(self, reports: Mapping[int, Mapping[str, float]]) -> dict[int, dict[str, float]]:
        """Fold in one tick's ``{worker: {key: demand}}``; the new ``{worker: {key: share}}``.

        Only the workers in ``reports`` get shares. A worker that did not
        answer keeps its part of the split, by its last demand, for
        ``ABSENT_GRACE`` ticks (it may still be admitting with its last
        share, and the shares must never add up to more than 1); then it
        drops out (dead, replaced).
        """
        known = {worker for smoothed in self._demand.values() for worker in smoothed}
        for worker in known - set(reports):
            self._absent[worker] = self._absent.get(worker, 0) + 1
        for worker in reports:
            self._absent.pop(worker, None)
        gone = {worker for worker, ticks in self._absent.items() if ticks > ABSENT_GRACE}
        for worker in gone:
            del self._absent[worker]
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
            for stale_worker in [w for w in smoothed if w not in reports and w not in self._absent]:
                del smoothed[stale_worker]
            # The split counts absent workers too; only the present get shares.
            mean = sum(smoothed.values()) / len(smoothed)
            floor = max(FLOOR * mean, 1e-9)
            weights = {worker: demand + floor for worker, demand in smoothed.items()}
            total = sum(weights.values())
            for worker in workers:
                shares[worker][key] = weights[worker] / total
        for stale in [key for key in self._demand if key not in keys]:
            del self._demand[stale]
        return shares
