"""Splitting a proxy-wide limit between worker processes by their demand.

Every tick (0.1 s) each worker reports, per limit, its demand and the limit's
capacity, in the same unit: for a rate, the requests per second that asked
for a token since the last tick, and the proxy-wide rate; for a concurrency
gate, its peak in flight plus the requests it refused, and the proxy-wide
limit; for the connection cap, its peak of open connections plus the times
it stopped accepting at its cap, and ``server.max_connections`` (a worker
turns a share into a local limit of at least 1). The master smooths each
worker's demand over ticks and splits the capacity:

* while the demand of all workers together is below the capacity, each
  worker gets its own demand plus an equal part of what is left over, so no
  worker refuses a request the proxy as a whole has room for, whichever
  worker the kernel hands the connection to;
* once the demand reaches the capacity, each gets a part in proportion to
  its demand (with a floor of 5% of the mean, so a worker that was idle can
  take its first requests at once).

Shares never add up to more than 1.

Cost: one small message each way per worker per tick; nothing per request.
Accuracy: the proxy-wide limit holds for rates; a worker that misses ticks
keeps its part for a second (it may still be admitting with it). When load
moves from one worker to another it takes a tick or two for the shares to
follow; in that time the busy worker may refuse early, never admit too much.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# Weight of the newest tick in the smoothed demand.
SMOOTHING = 0.5
# Once saturated, each worker's demand counts as at least this share of the mean.
FLOOR = 0.05
# Ticks a worker that stopped answering keeps its part of the split: it may
# still be admitting with its last share, so the others must not take it.
ABSENT_GRACE = 10

# A report: limit key -> (demand, capacity), both in the limit's unit.
Report = Mapping[str, Sequence[float]]


class ShareBook:
    """Smoothed demand per (limit key, worker) and the shares it gives."""

    def __init__(self) -> None:
        self._demand: dict[str, dict[int, float]] = {}
        self._capacity: dict[str, float] = {}
        self._absent: dict[int, int] = {}  # worker -> ticks without an answer

    def update(self, reports: Mapping[int, Report]) -> dict[int, dict[str, float]]:
        """Fold in one tick's ``{worker: {key: (demand, capacity)}}``; ``{worker: {key: share}}``.

        Only the workers in ``reports`` get shares. A worker that did not
        answer keeps its part of the split, by its last demand, for
        ``ABSENT_GRACE`` ticks; then it drops out (dead, replaced).
        """
        known = {worker for smoothed in self._demand.values() for worker in smoothed}
        for worker in known - set(reports):
            self._absent[worker] = self._absent.get(worker, 0) + 1
        for worker in reports:
            self._absent.pop(worker, None)
        for worker in [w for w, ticks in self._absent.items() if ticks > ABSENT_GRACE]:
            del self._absent[worker]
        workers = list(reports)
        keys = {key for report in reports.values() for key in report}
        shares: dict[int, dict[str, float]] = {worker: {} for worker in workers}
        if not workers:
            return shares
        for key in keys:
            smoothed = self._demand.setdefault(key, {})
            for worker in workers:
                demand, capacity = reports[worker].get(key, (0.0, 0.0))
                if capacity > 0:
                    self._capacity[key] = float(capacity)
                fresh = float(demand)
                old = smoothed.get(worker, fresh)
                smoothed[worker] = old + SMOOTHING * (fresh - old)
            for stale in [w for w in smoothed if w not in reports and w not in self._absent]:
                del smoothed[stale]
            split = _split(smoothed, self._capacity.get(key, 0.0))
            for worker in workers:
                shares[worker][key] = split[worker]
        for stale_key in [key for key in self._demand if key not in keys]:
            del self._demand[stale_key]
            self._capacity.pop(stale_key, None)
        return shares


def _split(demand: Mapping[int, float], capacity: float) -> dict[int, float]:
    """Shares of ``capacity`` for workers with these (smoothed) demands."""
    count = len(demand)
    total = sum(demand.values())
    if capacity > 0 and total < capacity:
        spare = (capacity - total) / count
        return {worker: (wanted + spare) / capacity for worker, wanted in demand.items()}
    floor = max(FLOOR * total / count, 1e-9)
    weights = {worker: wanted + floor for worker, wanted in demand.items()}
    whole = sum(weights.values())
    return {worker: weight / whole for worker, weight in weights.items()}
