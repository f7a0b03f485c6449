"""The status page's numbers: worker counters sampled into rates, and a ring of them.

Rates and latency percentiles are differences of the counters the workers
already report (``status``: requests, the metrics and throttle modules' numbers,
GC pauses, event-loop lag), so the page costs the request path nothing. Every
``SAMPLE_INTERVAL`` seconds the master records each worker's status here; the
book keeps the rates of each interval in a ring of ``HISTORY`` points (five
minutes), so a page opened late still draws the trend. The tables' numbers
are over about the last ``WINDOW`` seconds: a request's live counters against
the recorded sample nearest that age.

Counters are kept per worker process (by pid): a worker that is replaced, or
whose metrics module a reload rebuilt, starts from zero, and its difference
is taken from zero instead of going negative. Nothing here does I/O.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "HISTORY",
    "SAMPLE_INTERVAL",
    "WINDOW",
    "Delta",
    "StatusBook",
    "microseconds",
    "percentile",
    "table",
]

SAMPLE_INTERVAL = 2.0
HISTORY = 150  # samples: five minutes at SAMPLE_INTERVAL
WINDOW = 10.0  # seconds the tables' rates and percentiles cover
# Raw per-worker counters are kept only as far back as WINDOW needs.
_RAW_KEPT = int(WINDOW / SAMPLE_INTERVAL) + 2
# A rate over less than this much time is mostly noise: use an older base.
_SHORTEST = 0.5


def percentile(bounds: Sequence[float], counts: Sequence[int], quantile: float) -> float | None:
    """The quantile of a bucketed histogram (counts per bucket, +Inf last), interpolated
    linearly inside its bucket as Prometheus' histogram_quantile does; None when empty."""
    total = sum(counts)
    if total <= 0 or not bounds:
        return None
    rank = quantile * total
    seen = 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            if index >= len(bounds):  # the +Inf bucket: its lower bound is all we know
                return float(bounds[-1])
            lower = float(bounds[index - 1]) if index > 0 else 0.0
            upper = float(bounds[index])
            return lower + (upper - lower) * max(0.0, rank - seen) / count
        seen += count
    return float(bounds[-1])


def table(report: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """``report[key]`` where it is a table, else an empty one (a worker may not report it)."""
    value = report.get(key)
    return value if isinstance(value, Mapping) else {}


class _Counters:
    """One worker's cumulative counters at one moment, in plain types."""

    __slots__ = (
        "admitted",
        "bounds",
        "gc_count",
        "gc_sum",
        "nodes",
        "refused",
        "requests",
        "routes",
    )

    def __init__(self, status: Mapping[str, Any]) -> None:
        self.requests = int(status.get("requests", 0))
        modules = table(status, "modules")
        metrics = table(modules, "metrics")
        self.bounds: tuple[float, ...] = tuple(metrics.get("bounds", ()))
        # route -> (requests, 4xx, 5xx, duration counts per bucket)
        self.routes: dict[str, tuple[int, int, int, list[int]]] = {}
        for name, numbers in (metrics.get("routes") or {}).items():
            by_status = numbers.get("requests") or {}
            client = sum(int(n) for s, n in by_status.items() if str(s).startswith("4"))
            server = sum(int(n) for s, n in by_status.items() if str(s).startswith("5"))
            duration = numbers.get("duration") or {}
            self.routes[str(name)] = (
                sum(int(n) for n in by_status.values()),
                client,
                server,
                [int(n) for n in duration.get("counts", ())],
            )
        # (cluster, node URI) -> (calls that came to an outcome, failures of any kind)
        self.nodes: dict[tuple[str, str], tuple[int, int]] = {}
        for cluster, nodes in table(metrics, "nodes").items():
            for uri, numbers in nodes.items():
                failures = numbers.get("failures") or {}
                self.nodes[(str(cluster), str(uri))] = (
                    int(numbers.get("requests", 0)),
                    sum(int(n) for n in failures.values()),
                )
        throttle = table(modules, "throttle")
        self.admitted = int(throttle.get("admitted", 0))
        self.refused: dict[str, int] = {
            str(k): int(v) for k, v in (throttle.get("refused") or {}).items()
        }
        gc = table(status, "gc")
        generations = gc.get("generations") or ()
        self.gc_count = sum(int(g.get("count", 0)) for g in generations)
        self.gc_sum = sum(float(g.get("sum", 0.0)) for g in generations)


def _counters(statuses: Iterable[Mapping[str, Any]]) -> dict[int, _Counters]:
    return {int(s["pid"]): _Counters(s) for s in statuses if "error" not in s and "pid" in s}


class Delta:
    """What changed between two moments, all workers added up."""

    __slots__ = (
        "admitted",
        "bounds",
        "gc_count",
        "gc_sum",
        "nodes",
        "refused",
        "requests",
        "routes",
        "workers",
    )

    def __init__(self) -> None:
        self.requests = 0
        # (cluster, node URI) -> [calls, failures]
        self.nodes: dict[tuple[str, str], list[int]] = {}
        # pid -> (requests, GC pauses, seconds paused) of that worker alone
        self.workers: dict[int, tuple[int, int, float]] = {}
        self.bounds: tuple[float, ...] = ()
        self.routes: dict[str, list[Any]] = {}  # route -> [requests, 4xx, 5xx, counts]
        self.admitted = 0
        self.refused: dict[str, int] = {}
        self.gc_count = 0
        self.gc_sum = 0.0

    @classmethod
    def between(cls, old: Mapping[int, _Counters], new: Mapping[int, _Counters]) -> Delta:
        delta = cls()
        for pid, now in new.items():
            before = old.get(pid)
            requests = _grown(before.requests if before else 0, now.requests)
            gc_count = _grown(before.gc_count if before else 0, now.gc_count)
            gc_sum = now.gc_sum - before.gc_sum if before else now.gc_sum
            gc_sum = gc_sum if gc_sum >= 0 else now.gc_sum
            delta.workers[pid] = (requests, gc_count, gc_sum)
            delta.requests += requests
            delta.gc_count += gc_count
            delta.gc_sum += gc_sum
            delta.admitted += _grown(before.admitted if before else 0, now.admitted)
            for key, (calls, failures) in now.nodes.items():
                was_node = before.nodes.get(key) if before is not None else None
                if was_node is None or was_node[0] > calls:
                    was_node = (0, 0)
                into_node = delta.nodes.setdefault(key, [0, 0])
                into_node[0] += calls - was_node[0]
                into_node[1] += max(0, failures - was_node[1])
            for reason, count in now.refused.items():
                grown = _grown(before.refused.get(reason, 0) if before else 0, count)
                delta.refused[reason] = delta.refused.get(reason, 0) + grown
            if now.routes and not delta.bounds:
                delta.bounds = now.bounds
            if now.bounds != delta.bounds:
                continue  # mid-reload, another bucket layout: left out, as /metrics does
            # A reload that changed the buckets rebuilt the module: its counters restarted.
            base = before.routes if before is not None and before.bounds == now.bounds else {}
            for name, (total, client, server, counts) in now.routes.items():
                was = base.get(name)
                if was is None or was[0] > total or len(was[3]) != len(counts):
                    was = (0, 0, 0, [0] * len(counts))
                into = delta.routes.setdefault(name, [0, 0, 0, [0] * len(counts)])
                into[0] += total - was[0]
                into[1] += max(0, client - was[1])
                into[2] += max(0, server - was[2])
                into[3] = [
                    a + max(0, b - c) for a, b, c in zip(into[3], counts, was[3], strict=True)
                ]
        return delta


def _grown(before: int, now: int) -> int:
    # A counter that went down was restarted: all it holds is new.
    return now - before if now >= before else now


class _Point:
    """One entry of the history ring: the rates of one sample interval."""

    __slots__ = (
        "admitted",
        "at",
        "lag",
        "p99",
        "refused",
        "requests",
        "routes",
        "server_errors",
        "workers",
    )

    def __init__(
        self, at: float, seconds: float, delta: Delta, workers: dict[int, tuple[float, int]]
    ) -> None:
        per = 1.0 / seconds if seconds > 0 else 0.0
        self.at = at
        self.requests = delta.requests * per
        self.server_errors = sum(numbers[2] for numbers in delta.routes.values()) * per
        self.admitted = delta.admitted * per
        self.refused = sum(delta.refused.values()) * per
        # Worker index -> (event-loop lag, connections) at the sample; the worst lag of all.
        self.workers = workers
        self.lag = max((lag for lag, _ in workers.values()), default=0.0)
        merged = _merged_counts(delta)
        self.p99 = percentile(delta.bounds, merged, 0.99) if merged else None
        # route -> (req/s, 5xx share, p99)
        self.routes: dict[str, tuple[float, float, float | None]] = {
            name: (
                numbers[0] * per,
                numbers[2] / numbers[0] if numbers[0] else 0.0,
                percentile(delta.bounds, numbers[3], 0.99),
            )
            for name, numbers in delta.routes.items()
        }


def _merged_counts(delta: Delta) -> list[int]:
    merged: list[int] = []
    for numbers in delta.routes.values():
        counts = numbers[3]
        merged = counts[:] if not merged else [a + b for a, b in zip(merged, counts, strict=True)]
    return merged


class StatusBook:
    """The sampled history, and the report the page polls."""

    def __init__(self, interval: float = SAMPLE_INTERVAL, history: int = HISTORY) -> None:
        self.interval = interval
        self.points: deque[_Point] = deque(maxlen=history)
        # (monotonic time, per-worker counters) of the last few samples.
        self.raw: deque[tuple[float, dict[int, _Counters]]] = deque(maxlen=_RAW_KEPT)

    def record(self, statuses: Sequence[Mapping[str, Any]], now: float, wall: float) -> None:
        counters = _counters(statuses)
        if self.raw:
            then, before = self.raw[-1]
            workers = {
                int(s["index"]): (_lag(s), int(s.get("connections", 0)))
                for s in statuses
                if "error" not in s and "index" in s
            }
            delta = Delta.between(before, counters)
            self.points.append(_Point(wall, now - then, delta, workers))
        self.raw.append((now, counters))

    def window(self, statuses: Sequence[Mapping[str, Any]], now: float) -> tuple[float, Delta]:
        """Seconds covered and what changed, from the sample nearest WINDOW ago to ``statuses``."""
        counters = _counters(statuses)
        base: tuple[float, dict[int, _Counters]] | None = None
        for then, before in self.raw:
            if now - then < _SHORTEST:
                break
            base = (then, before)
            if now - then <= WINDOW:
                break
        if base is None:
            if not self.raw:
                return 0.0, Delta()
            base = self.raw[0]
        return max(0.0, now - base[0]), Delta.between(base[1], counters)

    def history(self) -> dict[str, Any]:
        points = list(self.points)
        routes: dict[str, dict[str, list[float | None]]] = {}
        for position, point in enumerate(points):
            for name, (rate, errors, p99) in point.routes.items():
                series = routes.setdefault(
                    name,
                    {
                        "rps": [0.0] * len(points),
                        "error_rate": [0.0] * len(points),
                        "p99": [None] * len(points),
                    },
                )
                series["rps"][position] = round(rate, 3)
                series["error_rate"][position] = round(errors, 4)
                series["p99"][position] = microseconds(p99)
        return {
            "interval": self.interval,
            "time": [round(p.at, 3) for p in points],
            "rps": [round(p.requests, 3) for p in points],
            "server_errors": [round(p.server_errors, 3) for p in points],
            "p99": [microseconds(p.p99) for p in points],
            "lag": [p.lag for p in points],
            "throttle_admitted": [round(p.admitted, 3) for p in points],
            "throttle_refused": [round(p.refused, 3) for p in points],
            "routes": {name: routes[name] for name in sorted(routes)},
            "workers": {
                str(index): {
                    "lag": [_at(p.workers.get(index), 0) for p in points],
                    "connections": [_at(p.workers.get(index), 1) for p in points],
                }
                for index in sorted({index for p in points for index in p.workers})
            },
        }


def microseconds(seconds: float | None) -> float | None:
    """Seconds to the microsecond: finer than any bucket, and no 17-digit noise in the JSON."""
    return None if seconds is None else round(seconds, 6)


def _at(pair: tuple[float, int] | None, index: int) -> float | None:
    return None if pair is None else pair[index]


def _lag(status: Mapping[str, Any]) -> float:
    overload = status.get("overload")
    return float(overload.get("lag", 0.0)) if isinstance(overload, Mapping) else 0.0
