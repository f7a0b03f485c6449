"""Counters that never go backwards when a worker is replaced: the master's keeper.

See :class:`Keeper`; :mod:`pitcher_rpc.process.metrics` renders /metrics with one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from prometheus_client.core import Metric

__all__ = ["Keeper", "Kept"]

# Makes the families of the workers whose status answers it is given.
Families = Callable[[Sequence[dict[str, Any]]], Iterable[Metric]]
# A sample of a counter family: (family, sample name, labels sorted).
SampleKey = tuple[str, str, tuple[tuple[str, str], ...]]
# What a family is, for one rebuilt from kept samples alone: (type, help).
_Kind = tuple[str, str]


def _counter_samples(families: Iterable[Metric]) -> dict[SampleKey, float]:
    """The samples of counters and histograms (what only grows), by key."""
    samples: dict[SampleKey, float] = {}
    for family in families:
        if family.type not in ("counter", "histogram"):
            continue
        for sample in family.samples:
            key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
            samples[key] = sample.value
    return samples


class Keeper:
    """The master's memory of each worker's counters, so that no sum ever goes backwards.

    Prometheus reads a counter that drops as a reset. A worker's numbers live
    in its memory: when it dies (or its metrics module is rebuilt) they would
    vanish from the sum. At each scrape the keeper remembers each worker
    slot's counter samples with the worker's pid; when the pid in a slot
    changes, the last samples it saw of the old worker are retired: added to
    every later scrape, in the worker's slot for families with a worker label
    (``pitcher_requests{worker="1"}`` goes on from where it was), in the sum
    for the others. A sample that drops while the pid stays (a metrics
    module rebuilt by a reload) retires its last value alike; one no longer
    reported (a node or route a reload removed) is let go, as one process
    would let it go, so removed nodes do not stay on every scrape. A worker
    that does not answer a scrape is stood in for by its last samples. What
    is retired is kept for the master's life. Counts made between a worker's
    last scrape and its death are lost: they were never seen.
    """

    def __init__(self) -> None:
        self._last: dict[int, tuple[int, dict[SampleKey, float]]] = {}
        self._retired: dict[SampleKey, float] = {}
        self._kinds: dict[str, _Kind] = {}

    def extras(
        self, workers: Sequence[dict[str, Any]], families: Families
    ) -> dict[SampleKey, float]:
        """What to add to this scrape's families: retired samples and stand-ins.

        ``workers`` are the status answers of every slot (``{"index", "error"}``
        for one that did not answer); ``families`` makes the families of some workers.
        """
        extras = dict(self._retired)
        for worker in workers:
            index = worker.get("index")
            if not isinstance(index, int):
                continue
            last = self._last.get(index)
            if "error" in worker:
                if last is not None:
                    _add(extras, last[1])
                continue
            made = list(families([worker]))
            for family in made:
                if family.type in ("counter", "histogram"):
                    self._kinds[family.name] = (family.type, family.documentation)
            samples = _counter_samples(made)
            pid = int(worker.get("pid") or 0)
            if last is not None:
                if last[0] != pid:
                    gone = last[1]
                else:
                    # Only a sample still there and lower: one no longer reported went
                    # with its node or route (a reload), as it would in one process.
                    gone = {k: v for k, v in last[1].items() if k in samples and samples[k] < v}
                _add(self._retired, gone)
                _add(extras, gone)
            self._last[index] = (pid, samples)
        return extras

    def kind(self, name: str) -> _Kind | None:
        return self._kinds.get(name)


def _add(into: dict[SampleKey, float], samples: Mapping[SampleKey, float]) -> None:
    for key, value in samples.items():
        into[key] = into.get(key, 0.0) + value


class Kept:
    """The workers' families, with the keeper's retired samples added to their counters."""

    def __init__(
        self,
        families: Families,
        workers: Sequence[dict[str, Any]],
        extras: Mapping[SampleKey, float],
        keeper: Keeper,
    ) -> None:
        self.families = families
        self.workers = workers
        self.extras = extras
        self.keeper = keeper

    def collect(self) -> Iterable[Metric]:
        extras: dict[str, dict[SampleKey, float]] = {}
        for key, value in self.extras.items():
            extras.setdefault(key[0], {})[key] = value
        for family in self.families(self.workers):
            kept = extras.pop(family.name, None)
            if kept and family.type in ("counter", "histogram"):
                _fold(family, kept)
            yield family
        for name, kept in sorted(extras.items()):
            kind = self.keeper.kind(name)
            if kind is None:
                continue
            family = Metric(name, kind[1], kind[0])
            _fold(family, kept)
            yield family


def _series(labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in labels.items() if k != "le"))


def _in_order(item: tuple[SampleKey, float]) -> tuple[Any, ...]:
    """A series' samples together, its buckets by increasing ``le`` (as the format wants)."""
    _, name, labels = item[0]
    found = dict(labels)
    le = found.get("le")
    bound = float("inf") if le == "+Inf" else float(le) if le is not None else 0.0
    return (_series(found), not name.endswith("_bucket"), name, bound)


def _fold(family: Metric, kept: Mapping[SampleKey, float]) -> None:
    """Add kept samples to a family's: to the same sample, or as new ones.

    A histogram series is taken whole or not at all: one whose live buckets
    differ from the kept ones (a reload changed them) keeps only its live part.
    """
    live: dict[tuple[str, tuple[tuple[str, str], ...]], int] = {}
    layouts: dict[tuple[tuple[str, str], ...], set[str]] = {}
    for position, sample in enumerate(family.samples):
        live[(sample.name, tuple(sorted(sample.labels.items())))] = position
        if sample.name.endswith("_bucket"):
            layouts.setdefault(_series(sample.labels), set()).add(sample.labels.get("le", ""))
    kept_layouts: dict[tuple[tuple[str, str], ...], set[str]] = {}
    for _, name, labels in kept:
        if name.endswith("_bucket"):
            kept_layouts.setdefault(_series(dict(labels)), set()).add(dict(labels).get("le", ""))
    for (_, name, labels), value in sorted(kept.items(), key=_in_order):
        series = _series(dict(labels))
        if series in layouts and kept_layouts.get(series, layouts[series]) != layouts[series]:
            continue
        found = live.get((name, labels))
        if found is None:
            family.add_sample(name, dict(labels), value)
        else:
            sample = family.samples[found]
            family.samples[found] = sample._replace(value=sample.value + value)
