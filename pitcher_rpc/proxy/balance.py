"""Choosing a node within a cluster.

Round robin walks the nodes in order. Weighted uses nginx's smooth weighted
round robin: every pick adds each node's weight to its running score, takes
the highest, and subtracts the total from the winner, so a 5:1:1 cluster
sends a,a,b,a,c,a,a rather than five a's in a row.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, Generic, Protocol, TypeVar


class _Weighted(Protocol):
    @property
    def weight(self) -> int: ...


N = TypeVar("N", bound=_Weighted)


class RoundRobin(Generic[N]):
    __slots__ = ("_next", "nodes")

    def __init__(self, nodes: Sequence[N]) -> None:
        self.nodes = tuple(nodes)
        self._next = 0

    def pick(self, exclude: Collection[N] = ()) -> N | None:
        nodes = self.nodes
        count = len(nodes)
        for _ in range(count):
            node = nodes[self._next % count]
            self._next += 1
            if node not in exclude:
                return node
        return None


class SmoothWeighted(Generic[N]):
    __slots__ = ("_scores", "nodes")

    def __init__(self, nodes: Sequence[N]) -> None:
        self.nodes = tuple(nodes)
        self._scores = [0] * len(self.nodes)

    def pick(self, exclude: Collection[N] = ()) -> N | None:
        scores = self._scores
        best = -1
        total = 0
        for index, node in enumerate(self.nodes):
            if node in exclude:
                continue
            weight = node.weight
            scores[index] += weight
            total += weight
            if best < 0 or scores[index] > scores[best]:
                best = index
        if best < 0:
            return None
        scores[best] -= total
        return self.nodes[best]


class HealthWeighted:
    """Smooth weighted round robin on weights that move with health.

    A node's ``effective`` weight is its weight times its health factor; a
    node at 0 takes nothing, and a node with a ``cap`` (ramping) takes no
    more once that many of its requests are in flight.
    """

    __slots__ = ("_scores", "nodes")

    def __init__(self, nodes: Sequence[Any]) -> None:
        self.nodes = tuple(nodes)
        self._scores = [0.0] * len(self.nodes)

    def pick(self, exclude: Collection[Any] = ()) -> Any:
        scores = self._scores
        best = -1
        total = 0.0
        for index, node in enumerate(self.nodes):
            weight = node.effective
            if weight <= 0.0 or node in exclude:
                continue
            cap = node.cap
            if cap and node.stats.in_flight >= cap:
                continue
            scores[index] += weight
            total += weight
            if best < 0 or scores[index] > scores[best]:
                best = index
        if best < 0:
            return None
        scores[best] -= total
        return self.nodes[best]


BALANCERS: dict[str, type[RoundRobin[Any]] | type[SmoothWeighted[Any]]] = {
    "round_robin": RoundRobin,
    "weighted": SmoothWeighted,
}
