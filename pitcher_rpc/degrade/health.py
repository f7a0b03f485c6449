"""Node health without I/O: request outcomes in, verdicts, events and weight factors out.

Nothing here reads a clock or touches a socket. Every call takes ``now`` in
seconds (from ``time.monotonic()``; it must not go backwards), and outcomes
arrive in batches, typically one per node per 0.1 s tick, possibly merged from
several worker processes: ``successes``, ``failures`` and ``trailing_failures``
(the failures after the batch's last success). One request is a batch of one.

Detection. A node in service is judged bad when any enabled detector says so:

* count window: the last ``window_requests`` requests (100) hold at least
  ``min_requests`` (20) requests, at least ``min_failures`` (5) failures, and
  failures make at least ``failure_ratio`` (0.3) of them. Quick when traffic
  is high.
* time window: the same three thresholds over the requests of the last
  ``window_seconds`` (10 s). The window rolls: a failure counts for at least
  0.9 and at most 1.0 times the window after it happened (the window moves
  in tenths), so old successes cannot shield a node that went bad when
  traffic is slow. This is not nginx's ``fail_timeout``, which is also a quiet
  period after the failures.
* consecutive: ``consecutive_failures`` (5) failures in a row, across batches.
  Batches carry no order, so a run is seen only as it stands at a batch's
  end (the trailing failures); a run wholly inside a batch is left to the
  windows.

The two windows share their thresholds on purpose: one definition of "bad
enough", applied to two memories (the last N requests, the last T seconds).
Zero disables a window or the consecutive detector. The defaults are
set so that a wrong ejection, which costs capacity, does not happen to a
node with a healthy error rate: a node failing 1% of its requests at random is
never ejected (tested over 200,000 requests; in simulation neither is one
failing 5% or 10%), while a node failing 50% is ejected within one window of
100 requests (in simulation, 300 runs each with batches of 1, 10 and 20
requests: all within 100). The ratio is 0.3 rather than 0.5 for that: a
node failing exactly 50% would sit on a 0.5 threshold and be caught within
one window only about half the time.

Ejection. A bad node is ejected for ``ejection_time`` (5 s), doubled on each
further ejection up to ``max_ejection_time`` (60 s). The doubling is forgotten
once the node has been back in service for ``max_ejection_time``: a node that
stayed good longer than the longest ejection has earned a fresh start. Windows
are cleared on ejection; outcomes recorded while ejected (requests sent
before it, or during a panic) are not judged.

Probation. When the ejection ends the node takes a trickle of real requests:
its weight factor is ``min_weight_percent`` (10%). A trickle by weight, not
"one request in flight", because outcomes from several worker processes only
meet here in batches. After ``probation_requests`` (5) successes the node is
restored; any failure first ejects it again, for the doubled time. Zero
probation requests restores the node as soon as its ejection ends.

Slow start. A restored node, and a node joining a cluster that is serving
(not one of a cluster just created: see pitcher_rpc.degrade.book), ramps up over ``slow_start``
(10 s) with Envoy's factor ``max(min_weight_percent / 100, f ** (1 / aggression))``,
where ``f`` is the elapsed share of the window; aggression 1 is linear, more
than 1 ramps faster early. Zero disables the ramp.

Cluster. At most ``max_ejection_percent`` (50%) of a cluster's nodes are out
(ejected or in probation), rounded down, but a cluster of two or more nodes
may always eject one (as Envoy and gRPC allow); a single node is ejected
only at 100%. An ejection over the cap is refused: the node stays in service and the
cluster panics, as it also does when no node may take requests. Many nodes
going bad at once more likely share a cause (a dependency, an overload) than
a fault, and ejecting would pile the load on the survivors; so, as Envoy
does, a panicking cluster sends to every node, ejected ones included, with
only slow start applied. When every node is ramping (nodes back from
ejection), the admitted load ramps, not only the relative weights: the proxy
caps each ramping node's requests in flight at its factor
(pitcher_rpc.proxy.upstream), so the cluster takes
:meth:`ClusterHealth.admit_factor` of its full load. A proxy that just
started ramps nothing: its nodes have never failed.

Detect-only. Verdicts and events are computed ("would_eject" once per bad
streak) but nothing changes traffic: no ejection, no slow start, factors 1.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from enum import StrEnum
from typing import Literal, NamedTuple

# The thresholds are configuration (built below this package); the rules are here.
from ..config.health import HealthPolicy

__all__ = [
    "ClusterEvent",
    "ClusterHealth",
    "Consecutive",
    "CountWindow",
    "Event",
    "HealthPolicy",
    "NodeHealth",
    "NodeState",
    "TimeWindow",
]

Event = Literal[
    "ejected",  # taken out of service by a detector
    "re-ejected",  # failed during probation
    "ejection_refused",  # bad, but the cluster cap keeps it in service (once per bad streak)
    "would_eject",  # detect-only: would have been ejected (once per bad streak)
    "probation",  # ejection over, a trickle of requests decides
    "restored",  # probation passed, slow start begins
    "panic",  # cluster: sending to every node
    "panic_over",
]


class CountWindow:
    """The last ``size`` requests, fed in batches; zero size keeps nothing.

    Batches are kept whole as (requests, failures) chunks; when over size, the
    oldest chunk is trimmed proportionally. A batch has no order, so its
    failures are taken as spread evenly through it: the first k of n requests
    of a batch with f failures hold ``k * f // n`` of them. The counts equal
    a per-request deque fed in that order, at a cost per batch, not per request.
    """

    __slots__ = ("_chunks", "_head_trimmed", "failures", "requests", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.requests = 0
        self.failures = 0
        self._chunks: deque[tuple[int, int]] = deque()
        self._head_trimmed = 0  # requests already dropped from the oldest chunk

    def add(self, successes: int, failures: int) -> None:
        batch = successes + failures
        if batch == 0 or self.size == 0:
            return
        self._chunks.append((batch, failures))
        self.requests += batch
        self.failures += failures
        excess = self.requests - self.size
        while excess > 0:
            chunk, chunk_failures = self._chunks[0]
            before = self._head_trimmed
            after = min(chunk, before + excess)
            self.failures -= after * chunk_failures // chunk - before * chunk_failures // chunk
            self.requests -= after - before
            excess -= after - before
            if after == chunk:
                self._chunks.popleft()
                self._head_trimmed = 0
            else:
                self._head_trimmed = after

    def clear(self) -> None:
        self._chunks.clear()
        self.requests = self.failures = self._head_trimmed = 0


class TimeWindow:
    """Requests of the last ``seconds``, in ``buckets`` buckets: a rolling window.

    A request counts while its bucket is among the newest ``buckets``, so for
    at least ``seconds * (1 - 1/buckets)`` and never longer than ``seconds``.
    Zero seconds keeps nothing.
    """

    __slots__ = ("_buckets", "_count", "_width", "failures", "requests", "seconds")

    def __init__(self, seconds: float, buckets: int = 10) -> None:
        self.seconds = seconds
        self._count = buckets
        self._width = seconds / buckets
        self._buckets: deque[list[int]] = deque()  # [index, requests, failures], oldest first
        self.requests = 0
        self.failures = 0

    def add(self, now: float, successes: int, failures: int) -> None:
        if self.seconds <= 0 or successes + failures == 0:
            return
        self.expire(now)
        index = math.floor(now / self._width)
        if self._buckets and self._buckets[-1][0] >= index:
            self._buckets[-1][1] += successes + failures
            self._buckets[-1][2] += failures
        else:
            self._buckets.append([index, successes + failures, failures])
        self.requests += successes + failures
        self.failures += failures

    def expire(self, now: float) -> None:
        """Forget the buckets that left the window by ``now``."""
        if self.seconds <= 0:
            return
        oldest = math.floor(now / self._width) - self._count
        while self._buckets and self._buckets[0][0] <= oldest:
            _, requests, failures = self._buckets.popleft()
            self.requests -= requests
            self.failures -= failures

    def clear(self) -> None:
        self._buckets.clear()
        self.requests = self.failures = 0


class Consecutive:
    """Failures in a row as they stand after the latest batch."""

    __slots__ = ("failures",)

    def __init__(self) -> None:
        self.failures = 0

    def add(self, successes: int, failures: int, trailing_failures: int) -> None:
        self.failures = trailing_failures if successes else self.failures + failures


class NodeState(StrEnum):
    HEALTHY = "healthy"
    EJECTED = "ejected"  # takes nothing until ``ejected_until``
    PROBATION = "probation"  # a trickle of real requests decides
    SLOW_START = "slow_start"  # in service, weight ramping up


class NodeHealth:
    """The health state machine of one node.

    ``eject_allowed`` is asked before a node in service is ejected (a node
    in probation is already out and is re-ejected without asking); a refusal
    keeps the node in service, flagged :attr:`refused`. Methods taking ``now``
    first apply the transitions due by then (ejection over, ramp over);
    :meth:`update` and :meth:`record` report them.
    """

    __slots__ = (
        "_consecutive",
        "_count_window",
        "_flagged",
        "_in_service_since",
        "_next_ejection_time",
        "_pending",
        "_probation_successes",
        "_ramp_start",
        "_state",
        "_time_window",
        "eject_allowed",
        "ejected_until",
        "policy",
        "refused",
    )

    def __init__(
        self,
        policy: HealthPolicy,
        now: float,
        new: bool = False,
        eject_allowed: Callable[[NodeHealth], bool] | None = None,
    ) -> None:
        self.policy = policy
        self.eject_allowed = eject_allowed
        self.ejected_until = 0.0  # meaningful while EJECTED
        self.refused = False  # bad, but kept in service by the cap
        self._flagged = False  # inside a bad streak already reported
        self._count_window = CountWindow(policy.window_requests)
        self._time_window = TimeWindow(policy.window_seconds)
        self._consecutive = Consecutive()
        self._next_ejection_time = policy.ejection_time
        self._in_service_since = now
        self._probation_successes = 0
        self._pending: Event | None = None
        self._ramp_start = now
        ramping = new and policy.slow_start > 0 and not policy.detect_only
        self._state = NodeState.SLOW_START if ramping else NodeState.HEALTHY

    @property
    def state(self) -> NodeState:
        """The state as of the latest call that took ``now``."""
        return self._state

    def update(self, now: float) -> Event | None:
        """Apply the transitions due by ``now``; return "probation" or "restored" if one did."""
        self._advance(now)
        event, self._pending = self._pending, None
        return event

    def record(
        self, now: float, successes: int, failures: int, trailing_failures: int | None = None
    ) -> Event | None:
        """Judge one batch of outcomes; return the event it caused, if any.

        ``trailing_failures`` is taken as ``failures`` when there is no success,
        and as 0 (the cautious guess) when left out. When a transition due by
        ``now`` and one caused by the batch coincide, the latter is returned
        ("re-ejected" and "restored" imply the "probation" before them).
        """
        if trailing_failures is None:
            trailing_failures = 0 if successes else failures
        if successes < 0 or failures < 0 or not 0 <= trailing_failures <= failures:
            raise ValueError(f"bad batch: {successes=} {failures=} {trailing_failures=}")
        self._advance(now)
        pending, self._pending = self._pending, None
        state = self._state
        if state is NodeState.EJECTED:
            return pending
        if state is NodeState.PROBATION:
            if failures:
                return self._eject(now, "re-ejected")
            self._probation_successes += successes
            if self._probation_successes >= self.policy.probation_requests:
                self._restore(now)
                return "restored"
            return pending
        self._count_window.add(successes, failures)
        self._time_window.add(now, successes, failures)
        self._consecutive.add(successes, failures, trailing_failures)
        if not self._bad():
            self._flagged = self.refused = False
            return pending
        if self.policy.detect_only or (self.eject_allowed and not self.eject_allowed(self)):
            self.refused = not self.policy.detect_only
            if self._flagged:
                return pending
            self._flagged = True
            return "would_eject" if self.policy.detect_only else "ejection_refused"
        if now - self._in_service_since >= self.policy.max_ejection_time:
            self._next_ejection_time = self.policy.ejection_time
        return self._eject(now, "ejected")

    def may_take(self, now: float) -> bool:
        """Whether requests may be sent: not while ejected (probation takes a trickle)."""
        self._advance(now)
        return self._state is not NodeState.EJECTED

    def weight_factor(self, now: float) -> float:
        """Multiplier of the node's configured weight: 0 while ejected, else in [min, 1].

        1.0 when healthy; ``min_weight_percent / 100`` in probation; the ramp in slow start.
        """
        self._advance(now)
        if self._state is NodeState.EJECTED:
            return 0.0
        if self._state is NodeState.PROBATION:
            return self.policy.min_weight_percent / 100
        return self.ramp_factor(now)

    def ramp_factor(self, now: float) -> float:
        """The slow-start factor alone (1.0 unless ramping): what a panicking cluster applies."""
        if self._state is not NodeState.SLOW_START:
            return 1.0
        return self.policy.ramp(now - self._ramp_start)

    def _bad(self) -> bool:
        policy = self.policy
        count, timed = self._count_window, self._time_window
        return (
            policy.window_bad(count.requests, count.failures)
            or policy.window_bad(timed.requests, timed.failures)
            or 0 < policy.consecutive_failures <= self._consecutive.failures
        )

    def _advance(self, now: float) -> None:
        self._time_window.expire(now)
        if self._state is NodeState.EJECTED and now >= self.ejected_until:
            if self.policy.probation_requests > 0:
                self._state = NodeState.PROBATION
                self._probation_successes = 0
                self._pending = "probation"
            else:
                # Ramp from when the ejection ended, however late this call comes.
                self._restore(self.ejected_until)
                self._pending = "restored"
        if self._state is NodeState.SLOW_START and now - self._ramp_start >= self.policy.slow_start:
            self._state = NodeState.HEALTHY

    def _eject(self, now: float, event: Event) -> Event:
        self._state = NodeState.EJECTED
        self.ejected_until = now + self._next_ejection_time
        self._next_ejection_time = min(2 * self._next_ejection_time, self.policy.max_ejection_time)
        self._flagged = self.refused = False
        self._count_window.clear()
        self._time_window.clear()
        self._consecutive.failures = 0
        return event

    def _restore(self, now: float) -> None:
        self._in_service_since = self._ramp_start = now
        self._state = NodeState.SLOW_START if self.policy.slow_start > 0 else NodeState.HEALTHY


class ClusterEvent(NamedTuple):
    node: str | None  # None for the cluster's own events ("panic", "panic_over")
    event: Event


class ClusterHealth:
    """Node health for one cluster: the ejection cap, panic, and the factors to balance by.

    Nodes are named by strings (e.g. their URIs). Nodes given at construction
    start in slow start when ``new``; :meth:`sync` adds later ones (in slow
    start beside nodes in service) and drops removed ones. Route by
    :meth:`factors`: a node's own ``may_take`` knows nothing of a panic.
    Each tick: :meth:`record` every node's batch, then :meth:`update`, then
    read :meth:`factors` and :meth:`admit_factor`; log and count the events.
    """

    __slots__ = ("_panic", "nodes", "policy")

    def __init__(
        self, policy: HealthPolicy, node_ids: Iterable[str], now: float, new: bool = True
    ) -> None:
        self.policy = policy
        self.nodes: dict[str, NodeHealth] = {}
        self._panic = False  # as last reported
        for node_id in node_ids:
            self.nodes[node_id] = NodeHealth(policy, now, new, self._eject_allowed)

    def sync(self, node_ids: Iterable[str], now: float) -> None:
        """Keep the listed nodes' state, add new ones, forget the rest.

        New nodes ramp (slow start) when the cluster keeps a node in service
        to take the load meanwhile; when it keeps none (every node replaced),
        ramping would only refuse requests, so they start at full weight.
        """
        old, self.nodes = self.nodes, {}
        node_ids = list(node_ids)
        serving = (NodeState.HEALTHY, NodeState.SLOW_START)
        ramp = any(node_id in old and old[node_id].state in serving for node_id in node_ids)
        for node_id in node_ids:
            node = old.get(node_id) or NodeHealth(self.policy, now, ramp, self._eject_allowed)
            self.nodes[node_id] = node

    def max_out(self) -> int:
        """How many nodes may be out (ejected or in probation) at once."""
        count = len(self.nodes)
        allowed = math.floor(count * self.policy.max_ejection_percent / 100 + 1e-9)
        if count >= 2 and self.policy.max_ejection_percent > 0:
            allowed = max(allowed, 1)
        return allowed

    @property
    def panic(self) -> bool:
        """Whether the cluster sends to every node: an ejection was refused or none may take."""
        nodes = self.nodes.values()
        return any(node.refused for node in nodes) or (
            bool(self.nodes) and all(node.state is NodeState.EJECTED for node in nodes)
        )

    def record(
        self,
        node_id: str,
        now: float,
        successes: int,
        failures: int,
        trailing_failures: int | None = None,
    ) -> list[ClusterEvent]:
        """Judge a batch for one node (see :meth:`NodeHealth.record`); KeyError if unknown."""
        event = self.nodes[node_id].record(now, successes, failures, trailing_failures)
        events = [ClusterEvent(node_id, event)] if event else []
        return self._panic_events(events)

    def update(self, now: float) -> list[ClusterEvent]:
        """Apply the transitions due by ``now``; call it every tick to see them reported."""
        events = []
        for node_id, node in self.nodes.items():
            event = node.update(now)
            if event:
                events.append(ClusterEvent(node_id, event))
        return self._panic_events(events)

    def factors(self, now: float) -> dict[str, float]:
        """Weight factor per node, 0.0 for nodes that may not take requests.

        Multiply each node's configured weight by it. In a panic every node
        gets its slow-start factor alone, ejected ones included.
        """
        factors = {node_id: node.weight_factor(now) for node_id, node in self.nodes.items()}
        if self.panic:  # judged after weight_factor() applied the transitions due by now
            return {node_id: node.ramp_factor(now) for node_id, node in self.nodes.items()}
        return factors

    def admit_factor(self, now: float) -> float:
        """Share of the cluster's full load it admits now, in [min, 1]: the largest node factor.

        Below 1 only when no node takes full weight (all ramping or in
        probation, e.g. just after start). The largest, not the mean: a
        healthy node that served everything before keeps doing so. Reported
        by the admin API; the proxy enforces it through each ramping node's
        in-flight cap.
        """
        return max(self.factors(now).values(), default=1.0)

    def _eject_allowed(self, node: NodeHealth) -> bool:
        out = sum(n.state in (NodeState.EJECTED, NodeState.PROBATION) for n in self.nodes.values())
        return out < self.max_out()

    def _panic_events(self, events: list[ClusterEvent]) -> list[ClusterEvent]:
        panic = self.panic
        if panic != self._panic:
            self._panic = panic
            events.append(ClusterEvent(None, "panic" if panic else "panic_over"))
        return events
