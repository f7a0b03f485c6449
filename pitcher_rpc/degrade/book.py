"""The health of every cluster that has a ``[clusters.NAME.health]`` table, in one place.

The proxy keeps one book: the master with several workers, the proxy
process itself with none. Every tick it is given the request outcomes seen
since the last tick, per node URI (from every worker: a verdict holds for the
whole proxy, and a node is judged on all its traffic), and answers with a
weight factor per node of each cluster, which the workers balance by. Events
(ejected, probation, restored, panic ...) are logged and counted here.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import Config, HealthConfig
from ..config.model import ScaleOutConfig
from .health import ClusterHealth, NodeState

log = logging.getLogger("pitcher.health")

# An outcome report: successes, failures, failures after the last success.
Outcome = Sequence[int]
# cluster name -> node URI -> weight factor (0.0: takes nothing)
Verdicts = dict[str, dict[str, float]]


@dataclass(frozen=True, slots=True)
class ScaleOut:
    """A scale-out command to run now for a cluster, with the numbers for its environment."""

    cluster: str
    config: ScaleOutConfig
    environment: dict[str, str]


class HealthBook:
    def __init__(self) -> None:
        self.clusters: dict[str, ClusterHealth] = {}
        self._configs: dict[str, HealthConfig] = {}
        self._scale: dict[str, ScaleOutConfig] = {}
        self._weights: dict[str, dict[str, int]] = {}
        self._scaled_at: dict[str, float] = {}
        self.events: Counter[tuple[str, str]] = Counter()  # (cluster, event) -> count
        self._last: Verdicts = {}

    def configure(self, config: Config, now: float) -> None:
        """Follow a configuration.

        Slow start is for nodes that come back from a failure, and for nodes
        joining a cluster that is serving: a node takes its full weight at
        once when it has never failed and no node of its cluster could take
        the load while it ramped. So a cluster new to the book (a proxy
        starting cold, a graceful restart's new generation, a cluster added by
        a reload) starts with every node in service, as HAProxy's
        ``slowstart`` "never applies when haproxy starts". Ramping there would
        only refuse: every node would sit at its in-flight cap (measured:
        about 22,000 fast 503s in the first 1.5 s of a loaded cold start).
        A cluster whose health settings are unchanged keeps its nodes' state;
        a node new to it ramps beside the nodes it keeps (see
        :meth:`ClusterHealth.sync`). A cluster whose health settings changed
        starts afresh with its nodes in service: new thresholds are no reason
        to ramp nodes that were serving.
        """
        clusters: dict[str, ClusterHealth] = {}
        configs: dict[str, HealthConfig] = {}
        self._scale = {}
        self._weights = {}
        for name, cluster in config.clusters.items():
            health = cluster.health
            if health is None:
                continue
            if cluster.scale_out is not None:
                self._scale[name] = cluster.scale_out
            self._weights[name] = {node.uri: node.weight for node in cluster.nodes}
            uris = [node.uri for node in cluster.nodes]
            known = self.clusters.get(name)
            if known is not None and self._configs[name].policy == health.policy:
                known.sync(uris, now)
                clusters[name] = known
            elif known is None:
                clusters[name] = ClusterHealth(health.policy, uris, now, new=False)
            else:
                serving = [uri for uri in uris if uri in known.nodes]
                fresh = ClusterHealth(health.policy, serving, now, new=False)
                fresh.sync(uris, now)  # nodes new to the cluster ramp all the same
                clusters[name] = fresh
            configs[name] = health
        self.clusters = clusters
        self._configs = configs

    def tick(self, outcomes: Mapping[str, Outcome], now: float) -> Verdicts:
        """Judge the outcomes since the last tick; the weight factors from now on."""
        for name, cluster in self.clusters.items():
            for uri, outcome in outcomes.items():
                if uri in cluster.nodes:
                    successes, failures, trailing = (int(n) for n in outcome)
                    self._note(name, cluster.record(uri, now, successes, failures, trailing), now)
            self._note(name, cluster.update(now), now)
        verdicts = {name: cluster.factors(now) for name, cluster in self.clusters.items()}
        self._last = verdicts
        return verdicts

    def capacity(self, name: str) -> tuple[float, list[str]]:
        """The share of a cluster's weight on nodes in service, and the nodes out of it.

        Out of service: ejected, in probation, or bad and kept in only by the
        ejection cap.
        """
        cluster = self.clusters[name]
        weights = self._weights.get(name, {})
        total = sum(weights.get(uri, 1) for uri in cluster.nodes) or 1
        out = [
            uri
            for uri, node in cluster.nodes.items()
            if node.refused or node.state in (NodeState.EJECTED, NodeState.PROBATION)
        ]
        serving = total - sum(weights.get(uri, 1) for uri in out)
        return serving / total, out

    def scale_outs(self, now: float) -> list[ScaleOut]:
        """Scale-out commands due now: capacity below the mark, cool-down over."""
        due = []
        for name, config in self._scale.items():
            if name not in self.clusters:
                continue
            share, out = self.capacity(name)
            if share >= config.below:
                continue
            last = self._scaled_at.get(name)
            if last is not None and now - last < config.cooldown:
                continue
            self._scaled_at[name] = now
            nodes = self.clusters[name].nodes
            due.append(
                ScaleOut(
                    name,
                    config,
                    {
                        "PITCHER_CLUSTER": name,
                        "PITCHER_NODES": str(len(nodes)),
                        "PITCHER_NODES_IN_SERVICE": str(len(nodes) - len(out)),
                        "PITCHER_HEALTHY_SHARE": f"{share:.3f}",
                        "PITCHER_THRESHOLD": f"{config.below:g}",
                        "PITCHER_NODES_OUT": " ".join(out),
                    },
                )
            )
        return due

    def _note(self, cluster: str, events: Sequence[Any], now: float) -> None:
        for node, event in events:
            self.events[(cluster, event)] += 1
            if node is None:
                if event == "panic":
                    log.warning(
                        "cluster %s: panic: too many nodes look bad; sending to every node",
                        cluster,
                    )
                else:
                    log.warning("cluster %s: panic over", cluster)
                continue
            health = self.clusters[cluster].nodes[node]
            if event in ("ejected", "re-ejected"):
                log.warning(
                    "cluster %s: node %s %s for %.1fs",
                    cluster,
                    node,
                    event,
                    health.ejected_until - now,
                )
            elif event == "ejection_refused":
                log.warning(
                    "cluster %s: node %s looks bad, but the ejection cap keeps it in service",
                    cluster,
                    node,
                )
            elif event == "would_eject":
                log.warning("cluster %s: node %s would be ejected (detect only)", cluster, node)
            else:
                log.info("cluster %s: node %s: %s", cluster, node, event)

    def describe(self, now: float) -> dict[str, Any]:
        """Each cluster's nodes as the admin API shows them."""
        described: dict[str, Any] = {}
        for name, cluster in self.clusters.items():
            factors = cluster.factors(now)
            share, _ = self.capacity(name)
            described[name] = {
                "panic": cluster.panic,
                "in_service_share": round(share, 3),
                "admitted_share": round(cluster.admit_factor(now), 3),
                "detect_only": cluster.policy.detect_only,
                "nodes": {
                    uri: {
                        "state": str(node.state),
                        "factor": round(factors.get(uri, 1.0), 3),
                        "ejected_for": round(max(0.0, node.ejected_until - now), 3)
                        if str(node.state) == "ejected"
                        else 0.0,
                    }
                    for uri, node in cluster.nodes.items()
                },
                "events": {
                    event: count
                    for (cluster_name, event), count in self.events.items()
                    if cluster_name == name
                },
            }
        return described
