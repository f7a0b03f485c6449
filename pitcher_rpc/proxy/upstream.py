"""Clusters and nodes at run time, and the clients that reach them.

Clients (connection pools) are keyed by node URI in :class:`Upstreams`,
which outlives configuration snapshots: a reload that keeps a node keeps its
warm connections.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from transports.base import Client, ClientOptions
from transports.registry import transport_for

from ..config import ClusterConfig, ClusterTlsConfig, HealthConfig, UpstreamConfig
from .balance import BALANCERS, HealthWeighted, RoundRobin, SmoothWeighted

log = logging.getLogger("pitcher.upstream")


# What a node's failures are counted as in its numbers (``failures`` in
# :meth:`NodeStats.report`): the outcome kinds of :mod:`.exchange`, plus
# ``overloaded`` (the node refused a call at its in-flight limit). A fixed
# set, since each is a metrics label.
FAILURE_KINDS = ("connect", "timeout", "reset", "error", "5xx", "overloaded")


class NodeStats:
    """One node's numbers: outcomes since the last health tick, totals, and calls in flight.

    Kept per node URI, beside its client: it outlives configuration snapshots.
    Every node has one (health or not). ``successes``, ``failures`` and
    ``trailing`` are what the health book is given each tick (``take``);
    ``requests``, the failure counters and ``retries`` only ever grow, for
    /metrics. Plain integer fields: the exchange adds to them on every call.
    """

    __slots__ = (
        "alarm",
        "alarm_at",
        "connect",
        "error",
        "failures",
        "http_5xx",
        "in_flight",
        "overloaded",
        "requests",
        "reset",
        "retries",
        "successes",
        "timeout",
        "trailing",
    )

    def __init__(self) -> None:
        self.successes = 0
        self.failures = 0
        self.trailing = 0  # failures since the last success
        self.in_flight = 0
        # Calls that came to an outcome (an answer or a failure), and the
        # failures among them by kind; never reset.
        self.requests = 0
        self.connect = 0
        self.timeout = 0
        self.reset = 0
        self.error = 0
        self.http_5xx = 0
        self.overloaded = 0
        # Attempts sent to this node as a retry of a request another attempt failed.
        self.retries = 0
        # Called when ``alarm_at`` failures in a row are seen before the next
        # tick: the health book is asked to judge now rather than at the tick.
        self.alarm: Callable[[], None] | None = None
        self.alarm_at = 0

    def take(self) -> tuple[int, int, int] | None:
        """The outcomes since the last call (None if there were none), and start again."""
        if not (self.successes or self.failures):
            return None
        outcome = (self.successes, self.failures, self.trailing)
        self.successes = self.failures = self.trailing = 0
        return outcome

    def report(self) -> dict[str, Any]:
        """Totals for /metrics: ``requests``, ``failures`` by kind, ``retries``, ``in_flight``."""
        return {
            "requests": self.requests,
            "failures": {
                "connect": self.connect,
                "timeout": self.timeout,
                "reset": self.reset,
                "error": self.error,
                "5xx": self.http_5xx,
                "overloaded": self.overloaded,
            },
            "retries": self.retries,
            "in_flight": self.in_flight,
        }


class Node:
    __slots__ = ("cap", "client", "effective", "failure_kinds", "stats", "uri", "weight")

    def __init__(
        self,
        uri: str,
        weight: int,
        client: Client,
        stats: NodeStats | None = None,
        failure_kinds: frozenset[str] = frozenset(),
    ) -> None:
        self.uri = uri
        self.weight = weight
        self.client = client
        # Health (only for a cluster with a health table): outcomes are counted
        # in ``stats``; ``effective`` is the weight times the node's health
        # factor (0: takes nothing); ``cap`` the requests it may have in flight
        # while it ramps (0: no cap).
        self.stats = stats
        self.failure_kinds = failure_kinds
        self.effective = float(weight)
        self.cap = 0

    def record(self, kind: str | None) -> None:
        """One call's outcome: None for a success, else the kind of failure.

        Counted in the node's totals; for health, a kind the cluster's
        ``failures`` names is a failure, any other a success, except
        ``overloaded`` (busy, not broken: ejecting it would only load the
        others more), which health does not count at all.
        """
        stats = self.stats
        if stats is None:
            return
        stats.requests += 1
        if kind is not None:
            # Failures are rare: a chain of string tests costs nothing on the common path.
            if kind == "5xx":
                stats.http_5xx += 1
            elif kind == "timeout":
                stats.timeout += 1
            elif kind == "connect":
                stats.connect += 1
            elif kind == "reset":
                stats.reset += 1
            elif kind == "error":
                stats.error += 1
            elif kind == "overloaded":
                stats.overloaded += 1
                return
            if kind in self.failure_kinds:
                stats.failures += 1
                stats.trailing += 1
                if stats.trailing == stats.alarm_at and stats.alarm is not None:
                    stats.alarm()
                return
        stats.successes += 1
        stats.trailing = 0

    def __repr__(self) -> str:
        return f"Node({self.uri!r}, weight={self.weight})"


class Cluster:
    __slots__ = ("_balancer", "_retry_next", "health", "name", "nodes")

    def __init__(
        self,
        name: str,
        nodes: Iterable[Node],
        balance: str,
        health: HealthConfig | None = None,
    ) -> None:
        self.name = name
        self.nodes = tuple(nodes)
        self.health = health
        # The next pick is a retry's: the exchange's pick among the nodes not
        # tried yet found none, and it asks again for any node.
        self._retry_next = False
        self._balancer: RoundRobin[Node] | SmoothWeighted[Node] | HealthWeighted
        if health is not None:
            # Weights move with health: always balanced by effective weight.
            self._balancer = HealthWeighted(self.nodes)
        else:
            self._balancer = BALANCERS[balance](self.nodes)

    def pick(self, exclude: Collection[Node] = ()) -> Node | None:
        """A node for an attempt, avoiding ``exclude``; None if none can take it.

        The exchange excludes the nodes it has tried, so a pick that excludes
        is a retry's, and so is the pick for any node that follows one that
        found none (a lone node takes its own retry): the node picked counts
        a retry (``NodeStats.retries``).
        """
        node = self._balancer.pick(exclude)
        if exclude:
            if node is None:
                self._retry_next = True
            elif node.stats is not None:
                node.stats.retries += 1
        elif self._retry_next:
            self._retry_next = False
            if node is not None and node.stats is not None:
                node.stats.retries += 1
        return node

    def report(self) -> dict[str, dict[str, Any]]:
        """Each node's totals (:meth:`NodeStats.report`) and open connections, by URI."""
        nodes: dict[str, dict[str, Any]] = {}
        for node in self.nodes:
            numbers = (node.stats or NodeStats()).report()
            numbers["connections"] = int(getattr(node.client, "connection_count", 0))
            nodes[node.uri] = numbers
        return nodes

    def apply(self, factors: Mapping[str, float], share: float = 1.0) -> None:
        """Weight factors from the health book, by node URI.

        A node missing from the book's factors is new to it: beside nodes the
        book knows, it starts where slow start starts, not at full weight,
        until the next tick says more. When the book knows none of the
        cluster's nodes (a process just started, a cluster just added or all
        its nodes replaced: the book's next tick is at most 0.1 s away) every
        node takes its full weight, as the book will say (it ramps no cluster
        it has just met), so none refuses for lack of a verdict.
        ``share`` is this process's part of the proxy (1/N with N workers):
        the in-flight cap of a ramping node is split like the load.
        """
        health = self.health
        if health is None:
            return
        ramp = health.ramp_in_flight * share
        new = 1.0
        if not health.policy.detect_only:
            for node in self.nodes:
                if node.uri in factors:
                    new = health.policy.ramp(0.0)
                    break
        for node in self.nodes:
            factor = factors.get(node.uri, new)
            node.effective = node.weight * factor
            node.cap = 0 if factor >= 1.0 or factor <= 0.0 else max(1, math.ceil(factor * ramp))


class Upstreams:
    """Node URI -> client, shared by every snapshot of one proxy process."""

    def __init__(self, options: UpstreamConfig) -> None:
        self._clients: dict[str, Client] = {}
        self._stats: dict[str, NodeStats] = {}
        # The last weight factors from the health book, by cluster and node URI:
        # a cluster built for a new snapshot starts from them.
        self.verdicts: dict[str, dict[str, float]] = {}
        # Told the URI of a node that failed several requests in a row.
        self.alarm: Callable[[str], None] | None = None
        # This process's part of the proxy's load (1/N with N workers).
        self.share = 1.0
        self._options = self._client_options(options)
        self._closing: set[asyncio.Task[None]] = set()

    @staticmethod
    def _client_options(options: UpstreamConfig) -> ClientOptions:
        return ClientOptions(
            connect_timeout=options.connect_timeout,
            max_connections=options.max_connections,
            max_frame_size=options.max_frame_size,
        )

    def client(self, uri: str, tls: ClusterTlsConfig | None = None) -> Client:
        """The client of a node, made on first use; a tls:// node's per cluster TLS settings.

        A tls:// node is keyed by its URI and its cluster's TLS digest: the
        same node in two clusters that trust different CAs gets two clients,
        and a reload that changes a CA or a certificate makes a new client
        (the old one drains) while one that changes nothing keeps the warm one.
        """
        key = uri
        if tls is not None and uri.startswith("tls://"):
            key = f"{uri} {tls.digest}"
        client = self._clients.get(key)
        if client is None:
            options = self._options
            if key != uri:
                assert tls is not None
                extra: dict[str, Any] = {"tls_context": tls.context}
                if tls.server_name:
                    extra["server_name"] = tls.server_name
                options = dataclasses.replace(options, extra=extra)
            client = transport_for(uri).client(uri, options)
            self._clients[key] = client
        return client

    def cluster(self, config: ClusterConfig) -> Cluster:
        health = config.health
        if health is None:
            # Outcomes are counted for /metrics; with no failure kinds, none is one for health.
            nodes = [
                Node(n.uri, n.weight, self.client(n.uri, config.tls), self._node_stats(n.uri))
                for n in config.nodes
            ]
            return Cluster(config.name, nodes, config.balance)
        policy = health.policy
        alarm_at = min(policy.consecutive_failures or policy.min_failures, policy.min_failures)
        nodes = [
            Node(
                n.uri,
                n.weight,
                self.client(n.uri, config.tls),
                self._node_stats(n.uri, alarm_at),
                health.failures,
            )
            for n in config.nodes
        ]
        cluster = Cluster(config.name, nodes, config.balance, health)
        cluster.apply(self.verdicts.get(config.name, {}), self.share)
        return cluster

    def _node_stats(self, uri: str, alarm_at: int = 0) -> NodeStats:
        stats = self._stats.get(uri)
        if stats is None:
            stats = self._stats[uri] = NodeStats()
            stats.alarm = lambda: self._alarm(uri)
        if alarm_at:
            stats.alarm_at = alarm_at
        return stats

    def _alarm(self, uri: str) -> None:
        if self.alarm is not None:
            self.alarm(uri)

    def take_outcomes(self) -> dict[str, tuple[int, int, int]]:
        """Outcomes per node URI since the last call, for the health book."""
        outcomes = {}
        for uri, stats in self._stats.items():
            outcome = stats.take()
            if outcome is not None:
                outcomes[uri] = outcome
        return outcomes

    def retain_only(
        self,
        uris: Collection[str],
        drain_timeout: float = 30.0,
        in_use: Collection[Client] | None = None,
    ) -> None:
        """Drain and close clients of nodes no longer configured: in-flight calls finish.

        ``in_use`` (the clients of the snapshot now current) also drains the
        clients of nodes still configured but reached another way now (their
        cluster's TLS settings changed).
        """
        for uri in [u for u in self._stats if u not in uris]:
            del self._stats[uri]
        used = None if in_use is None else {id(client) for client in in_use}
        for key, client in list(self._clients.items()):
            if key.partition(" ")[0] in uris and (used is None or id(client) in used):
                continue
            del self._clients[key]
            uri = key.partition(" ")[0]
            task = asyncio.get_running_loop().create_task(
                client.close(drain_timeout), name=f"pitcher-drain {uri}"
            )
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self, timeout: float = 5.0) -> None:
        clients, self._clients = list(self._clients.values()), {}
        await asyncio.gather(*(c.close(timeout) for c in clients), return_exceptions=True)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
