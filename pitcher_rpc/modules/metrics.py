"""``metrics``: requests, latencies and response bytes per route, for the master's /metrics.

    [modules.metrics]
    buckets = [0.001, 0.01, 0.1, 1, 10]   # histogram upper bounds, seconds (optional)

Once a response has been written (REQUEST_FINISH) each worker counts, per
route name (``""`` for a request no route took, such as a 404: a route's
name is never empty):

- the requests, by response status;
- the total time: from the request read to its response written;
- the backend latency: from the last attempt sent to its answer (or error),
  only for requests that reached for a backend;
- the residence time: total time minus backend latency, the proxy's own share
  (parsing, modules, encoding, earlier failed attempts, writing);
- the bytes of the responses written, head included, in total and as a
  histogram of response sizes;
- a histogram of request body sizes (de-chunked; 0 for none).

Buckets are inclusive upper bounds, as Prometheus' ``le``; a +Inf bucket
follows them. The default suits a proxy measured in microseconds: 10 µs to
10 s. Size buckets are fixed (``SIZE_BUCKETS``: 0, then 64 bytes to 16 MiB by
powers of 4).

Each worker keeps its numbers in memory and reports them through ``stats()``;
the master adds them up at scrape time (``pitcher_http_requests_total``,
``pitcher_request_duration_seconds`` ... see :mod:`pitcher_rpc.process.metrics`).
The numbers belong to the module instance: a reload that keeps
``[modules.metrics]`` as it was keeps them, one that changes it starts from
zero. A request whose client left before the answer is counted with status
499 (as nginx). Requests of a route whose own ``modules`` list leaves
``metrics`` out are not counted.

Requests refused before they make an exchange (the HTTP parser's 400, 408,
413, 414, 431, 505, and connections refused at ACCEPT) are counted apart,
by status and reason (``header_timeout``, ``body_too_large`` ... see
:class:`pitcher_rpc.proxy.glue.Refusal`): they have no route and no times
(``pitcher_http_refusals_total``). So is a 403 before routing (reason
``forbidden``): ip_filter judging the client a trusted proxy names (the
proxy itself answers 404 there, never 403); that request is also counted
with route ``""``.

The module also reports every node of the proxy's clusters (calls, failures
by kind, retries, calls in flight, open connections: see
:class:`pitcher_rpc.proxy.upstream.NodeStats`). Those numbers are kept by the
proxy beside each node's client, not by the module; the module finds its
proxy through the connection of the first request it counts.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, TypedDict

from .base import AnyRecord, Module

__all__ = [
    "DEFAULT_BUCKETS",
    "SIZE_BUCKETS",
    "UNROUTED",
    "Histogram",
    "HistogramSnapshot",
    "MergedRoute",
    "Metrics",
    "merge_refusals",
    "merge_reports",
]

# Seconds. A request through the proxy on one host takes tens of microseconds
# of the proxy's own time (the residence histogram must tell 10 µs from 50);
# a slow backend, seconds.
DEFAULT_BUCKETS: Final[tuple[float, ...]] = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# Bytes: bodies and responses, from none (a GET) to the 16 MiB a frame may carry
# at most by default, by powers of 4. Fixed, so every worker's can be added up.
SIZE_BUCKETS: Final[tuple[float, ...]] = (
    0.0,
    64.0,
    256.0,
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262144.0,
    1048576.0,
    4194304.0,
    16777216.0,
)
# Every bound is one more series per route and histogram at the master.
MAX_BUCKETS: Final = 64
# The route label of requests no route took; no route can be named so.
UNROUTED: Final = ""
HISTOGRAMS = ("duration", "backend_latency", "residence")
SIZE_HISTOGRAMS = ("request_body_size", "response_size")
# A 403 before routing comes from a module at BEFORE_CLUSTER (the proxy itself
# answers 404 there): ip_filter judging the client a trusted proxy names.
FORBIDDEN: Final = (403, "forbidden")


def _bucket(bounds: tuple[float, ...], value: float) -> int:
    """bisect_left(bounds, value), scanning up from the lowest bound.

    Most values fall in the first few buckets (a request's time in the proxy,
    a small body). Compiled, a scan of those is a few native compares: ~290
    instructions a call against ~950 for bisect_left called from compiled
    code. Pure Python pays for it (timeit, bisect against scan: 114/162 ns at
    30 µs, 191/333 ns at 300 bytes, 128/597 ns at 2 s; 171/141 ns at 0
    bytes): some 0.4 µs a request with metrics on, in the fallback build.
    """
    index = 0
    for bound in bounds:
        if value <= bound:
            return index
        index += 1
    return index


class HistogramSnapshot(TypedDict):
    """A histogram in plain JSON types: ``counts`` per bucket (not cumulative), +Inf last."""

    bounds: list[float]
    counts: list[int]
    sum: float
    count: int


class Histogram:
    """Observations counted by bucket; a value equal to a bound goes in that bound's bucket."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = DEFAULT_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        # One slot per bound, then +Inf; _bucket(bounds, v) is the first bound >= v.
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[_bucket(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[int]:
        """Observations at or below each bound, then the total (+Inf), as Prometheus counts."""
        running = 0
        totals = []
        for count in self.counts:
            running += count
            totals.append(running)
        return totals

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(
            bounds=list(self.bounds), counts=list(self.counts), sum=self.sum, count=self.count
        )

    @classmethod
    def merge(cls, snapshots: Iterable[HistogramSnapshot]) -> Histogram:
        """Add several workers' snapshots; ValueError if none is given or their bounds differ."""
        merged: Histogram | None = None
        for snapshot in snapshots:
            if merged is None:
                merged = cls(snapshot["bounds"])
            elif list(snapshot["bounds"]) != list(merged.bounds):
                raise ValueError(
                    f"cannot merge a histogram bucketed by {snapshot['bounds']!r}"
                    f" into one bucketed by {list(merged.bounds)!r}"
                )
            if len(snapshot["counts"]) != len(merged.counts):
                raise ValueError(
                    f"{len(snapshot['counts'])} counts for {len(merged.bounds)} bounds"
                )
            merged.counts = [a + b for a, b in zip(merged.counts, snapshot["counts"], strict=True)]
            merged.sum += snapshot["sum"]
        if merged is None:
            raise ValueError("no histogram to merge")
        return merged


class _RouteNumbers:
    """One route's numbers in one worker."""

    __slots__ = (
        "backend_latency",
        "duration",
        "request_body_size",
        "residence",
        "response_bytes",
        "response_size",
        "statuses",
    )

    def __init__(self, bounds: Sequence[float]) -> None:
        self.statuses: dict[int, int] = {}
        self.duration = Histogram(bounds)
        self.backend_latency = Histogram(bounds)
        self.residence = Histogram(bounds)
        self.response_bytes = 0
        self.request_body_size = Histogram(SIZE_BUCKETS)
        self.response_size = Histogram(SIZE_BUCKETS)

    def report(self) -> dict[str, Any]:
        return {
            # JSON object keys are strings.
            "requests": {str(status): count for status, count in self.statuses.items()},
            "response_bytes": self.response_bytes,
            "duration": self.duration.snapshot(),
            "backend_latency": self.backend_latency.snapshot(),
            "residence": self.residence.snapshot(),
            "request_body_size": self.request_body_size.snapshot(),
            "response_size": self.response_size.snapshot(),
        }


def _buckets(value: Any) -> tuple[float, ...]:
    if not isinstance(value, list | tuple) or not value:
        raise ValueError("buckets must be a non-empty array of seconds")
    if len(value) > MAX_BUCKETS:
        raise ValueError(f"buckets: {len(value)} bounds, at most {MAX_BUCKETS}")
    bounds: list[float] = []
    for bound in value:
        if isinstance(bound, bool) or not isinstance(bound, int | float):
            raise ValueError(f"buckets: {bound!r} is not a number of seconds")
        if not (math.isfinite(bound) and bound > 0):
            raise ValueError(f"buckets: {bound!r} is not a positive, finite number of seconds")
        if bounds and bound <= bounds[-1]:
            raise ValueError(f"buckets must be strictly increasing: {bound!r} after {bounds[-1]!r}")
        bounds.append(float(bound))
    return tuple(bounds)


class Metrics(Module):
    name = "metrics"
    # Late at REQUEST_FINISH: it only reads what the request came to.
    priority = 20
    # Under overload is when these numbers are most needed.
    essential = True

    @classmethod
    def validate(cls, settings: Mapping[str, Any]) -> Mapping[str, Any]:
        unknown = set(settings) - {"buckets"}
        if unknown:
            raise ValueError(f"unknown key {sorted(unknown)[0]!r} (expected buckets)")
        return {"buckets": _buckets(settings.get("buckets", DEFAULT_BUCKETS))}

    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__(settings)
        self.bounds: tuple[float, ...] = self.validate(settings)["buckets"]
        self._routes: dict[str, _RouteNumbers] = {}
        # Refusals by (status, reason): a few fixed reasons, so a few keys.
        self._refusals: dict[tuple[int, str], int] = {}
        # The proxy server, found through the first request's connection: its
        # clusters' nodes are reported with these numbers.
        self._server: Any = None

    def request_finish(self, exchange: AnyRecord) -> None:
        # Every request runs this: a few dict operations and bisects, the
        # histograms updated inline (three observe() calls made it ~15% slower,
        # 0.47 against 0.40 µs).
        route = exchange.route
        status = exchange.status
        if route is None:
            name = UNROUTED
            if status == 403:
                self._refusals[FORBIDDEN] = self._refusals.get(FORBIDDEN, 0) + 1
        else:
            name = route.name
        numbers = self._routes.get(name)
        if numbers is None:
            numbers = self._routes[name] = _RouteNumbers(self.bounds)
            if self._server is None:
                self._server = getattr(exchange.connection, "server", None)
        statuses = numbers.statuses
        statuses[status] = statuses.get(status, 0) + 1
        size = exchange.response_bytes
        numbers.response_bytes += size
        histogram = numbers.response_size
        histogram.counts[_bucket(SIZE_BUCKETS, size)] += 1
        histogram.sum += size
        request = exchange.request
        stream = request.body_stream
        size = len(request.body) if stream is None else stream.received
        histogram = numbers.request_body_size
        histogram.counts[_bucket(SIZE_BUCKETS, size)] += 1
        histogram.sum += size
        bounds = self.bounds
        total = exchange.finished - exchange.started
        histogram = numbers.duration
        histogram.counts[_bucket(bounds, total)] += 1
        histogram.sum += total
        sent = exchange.backend_started
        if sent and exchange.backend_ended >= sent:
            backend = exchange.backend_ended - sent
            histogram = numbers.backend_latency
            histogram.counts[_bucket(bounds, backend)] += 1
            histogram.sum += backend
            total -= backend
        histogram = numbers.residence
        histogram.counts[_bucket(bounds, total)] += 1
        histogram.sum += total

    def request_refused(self, refusal: Any) -> None:
        """A request refused without an exchange (see :class:`~pitcher_rpc.proxy.glue.Refusal`)."""
        key = (refusal.status, refusal.reason)
        self._refusals[key] = self._refusals.get(key, 0) + 1

    def stats(self) -> dict[str, Any]:
        """``{"bounds": [...], "routes": {route: {...}}, "refusals": {status: {reason: n}},
        "nodes": {cluster: {uri: {...}}}}``.

        A route's numbers are its ``requests`` by status, ``response_bytes``
        and histograms; a node's are its calls, failures by kind, retries,
        calls in flight and open connections (``Cluster.report`` in
        :mod:`pitcher_rpc.proxy.upstream`), for every cluster of the proxy's
        current snapshot once a request has shown the module its proxy.
        """
        refusals: dict[str, dict[str, int]] = {}
        for (status, reason), count in self._refusals.items():
            refusals.setdefault(str(status), {})[reason] = count
        report: dict[str, Any] = {
            "bounds": list(self.bounds),
            "routes": {name: numbers.report() for name, numbers in self._routes.items()},
            "refusals": refusals,
        }
        clusters = getattr(getattr(self._server, "snapshot", None), "clusters", None)
        if isinstance(clusters, Mapping):
            report["nodes"] = {name: cluster.report() for name, cluster in clusters.items()}
        return report


def merge_refusals(reports: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], int]:
    """Several workers' refusal counts added up, by (status, reason)."""
    merged: dict[tuple[str, str], int] = {}
    for report in reports:
        refusals = report.get("refusals")
        if not isinstance(refusals, Mapping):
            continue
        for status, reasons in refusals.items():
            for reason, count in reasons.items():
                key = (str(status), str(reason))
                merged[key] = merged.get(key, 0) + int(count)
    return merged


class MergedRoute:
    """One route's numbers added up over several workers' ``stats()``."""

    __slots__ = ("histograms", "requests", "response_bytes")

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.response_bytes = 0
        self.histograms: dict[str, Histogram] = {}


def merge_reports(reports: Iterable[Mapping[str, Any]]) -> dict[str, MergedRoute]:
    """Several workers' ``stats()`` added up, by route.

    Histograms are merged only over reports whose bounds are those most
    workers use: right after a reload that changed ``buckets`` a worker still on
    the old ones is left out of the histograms (not the counters) until it
    has reloaded too.
    """
    reports = [report for report in reports if isinstance(report.get("routes"), Mapping)]
    layouts = Counter(tuple(report.get("bounds", ())) for report in reports)
    bounds = list(layouts.most_common(1)[0][0]) if layouts else []
    merged: dict[str, MergedRoute] = {}
    snapshots: dict[tuple[str, str], list[HistogramSnapshot]] = {}
    for report in reports:
        same_bounds = list(report.get("bounds", ())) == bounds
        for name, numbers in report["routes"].items():
            route = merged.get(name)
            if route is None:
                route = merged[name] = MergedRoute()
            route.requests.update(numbers["requests"])
            route.response_bytes += numbers["response_bytes"]
            if same_bounds:
                for key in HISTOGRAMS:
                    snapshots.setdefault((name, key), []).append(numbers[key])
            for key in SIZE_HISTOGRAMS:
                if key in numbers:
                    snapshots.setdefault((name, key), []).append(numbers[key])
    for (name, key), parts in snapshots.items():
        merged[name].histograms[key] = Histogram.merge(parts)
    return merged
