"""Nodes found and changed at run time, laid over the configuration file.

A cluster's nodes are built in this order, each step over the one before:

1. the file's ``nodes``;
2. the nodes its ``[clusters.NAME.discovery]`` sources (etcd, DNS) list
   now, added after them; a node the file lists already keeps the file's
   weight (the file is the operator's word);
3. the admin API's changes (``/admin/clusters/NAME/nodes``), in the order
   they were made: they have the last word, so an operator can drain or
   remove a node etcd lists, or give one another weight.

Health (ejection, probation, slow start) then applies to every node alike,
wherever it came from. The master computes this once and sends it to every
worker; a worker applies the same overlay to the file it loaded.

The rule across reloads: a change lasts until the next reload, unless it was
made with ``keep``: then it is applied again to every later file, until the
proxy stops (a graceful restart included: the new generation starts from the
file) or the change is undone through the API. The file is never written. A
kept change the new file makes moot is dropped and logged: its cluster is
gone, the file now lists the node it added, or no longer lists the node it
drained or removed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from transports.registry import AddressError, get_transport, parse_address

from .model import Config, NodeConfig

ACTIONS = ("add", "drain", "remove")
MAX_WEIGHT = 1000


class OverlayError(ValueError):
    """A change that cannot be made; the message says why."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class NodeChange:
    action: str  # "add", "drain" or "remove"
    cluster: str
    uri: str
    weight: int = 1
    keep: bool = False

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, item: Mapping[str, Any]) -> NodeChange:
        return cls(
            action=str(item["action"]),
            cluster=str(item["cluster"]),
            uri=str(item["uri"]),
            weight=int(item.get("weight", 1)),
            keep=bool(item.get("keep", False)),
        )


def check_uri(uri: str) -> None:
    """OverlayError unless ``uri`` is a node URI of a known transport."""
    try:
        get_transport(parse_address(uri).scheme)
    except AddressError as exc:
        raise OverlayError(str(exc)) from None
    except Exception as exc:  # a third-party transport that fails to import
        raise OverlayError(f"the transport of {uri!r} failed to load: {exc!r}") from None


@dataclass(frozen=True, slots=True)
class Overlay:
    changes: tuple[NodeChange, ...] = ()
    # Per cluster, the nodes its discovery sources list now (etcd, DNS).
    discovered: tuple[tuple[str, tuple[NodeConfig, ...]], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.changes or self.discovered)

    def with_discovered(self, discovered: Mapping[str, Iterable[NodeConfig]]) -> Overlay:
        """This overlay with the discovered nodes replaced by ``discovered`` (by cluster)."""
        return Overlay(
            self.changes,
            tuple((name, tuple(nodes)) for name, nodes in sorted(discovered.items())),
        )

    def found(self, config: Config) -> Config:
        """``config`` with the discovered nodes added after the file's (steps 1 and 2)."""
        if not self.discovered:
            return config
        clusters = dict(config.clusters)
        for name, found in self.discovered:
            cluster = clusters.get(name)
            if cluster is None or cluster.discovery is None:
                continue
            listed = {node.uri for node in cluster.nodes}
            extra = tuple(node for node in found if node.uri not in listed)
            if extra:
                clusters[name] = dataclasses.replace(cluster, nodes=cluster.nodes + extra)
        return dataclasses.replace(config, clusters=clusters)

    def apply(self, config: Config) -> Config:
        """``config`` with the discovered nodes, then every change in order (those that no
        longer fit skipped)."""
        config = self.found(config)
        if not self.changes:
            return config
        clusters = dict(config.clusters)
        for change in self.changes:
            cluster = clusters.get(change.cluster)
            if cluster is None:
                continue
            nodes = [node for node in cluster.nodes if node.uri != change.uri]
            if change.action == "add":
                nodes.append(NodeConfig(change.uri, change.weight))
            clusters[change.cluster] = dataclasses.replace(cluster, nodes=tuple(nodes))
        return dataclasses.replace(config, clusters=clusters)

    def draining(self, config: Config) -> dict[str, list[str]]:
        """Per cluster, the nodes drained (and not added back or removed since)."""
        state: dict[tuple[str, str], str] = {}
        for change in self.changes:
            state[(change.cluster, change.uri)] = change.action
        drained: dict[str, list[str]] = {}
        for (cluster, uri), action in state.items():
            if action == "drain" and cluster in config.clusters:
                drained.setdefault(cluster, []).append(uri)
        return drained

    def change(self, config: Config, change: NodeChange) -> Overlay:
        """This overlay with ``change`` made on top of ``config`` (the file's, overlaid by self).

        OverlayError (404 for an unknown cluster or node, 409 for a node
        already there) when it cannot be made.
        """
        if change.action not in ACTIONS:
            raise OverlayError(f"unknown action {change.action!r}")
        current = self.apply(config)
        cluster = current.clusters.get(change.cluster)
        if cluster is None:
            raise OverlayError(f"no cluster named {change.cluster!r}", 404)
        listed = {node.uri for node in cluster.nodes}
        drained = self.draining(config).get(change.cluster, [])
        if change.action == "add":
            check_uri(change.uri)
            if not 1 <= change.weight <= MAX_WEIGHT:
                raise OverlayError(f"weight must be between 1 and {MAX_WEIGHT}")
            if change.uri in listed:
                raise OverlayError(f"{change.uri} is already a node of {change.cluster}", 409)
        elif change.uri not in listed and not (change.action == "remove" and change.uri in drained):
            raise OverlayError(f"{change.uri} is not a node of {change.cluster}", 404)
        elif change.uri in listed and len(listed) == 1:
            # Draining or removing it would leave the cluster answering 503 to all.
            raise OverlayError(
                f"{change.uri} is the last node of {change.cluster}: add another first", 409
            )
        # Earlier changes to the same node are folded into this one.
        kept = tuple(c for c in self.changes if (c.cluster, c.uri) != (change.cluster, change.uri))
        if change.action == "remove" and not self._in_file(self.found(config), change):
            # Removing a node that only the API added: nothing is left to record.
            return Overlay(kept, self.discovered)
        return Overlay((*kept, change), self.discovered)

    @staticmethod
    def _in_file(config: Config, change: NodeChange) -> bool:
        cluster = config.clusters.get(change.cluster)
        return cluster is not None and any(node.uri == change.uri for node in cluster.nodes)

    def for_reload(self, config: Config) -> tuple[Overlay, list[NodeChange]]:
        """What survives a reload to ``config`` (the new file), and what is dropped.

        Discovered nodes stay while their cluster still has a discovery table
        (its sources may change with the file: they then replace them).
        """
        discovered = tuple(
            (name, nodes)
            for name, nodes in self.discovered
            if name in config.clusters and config.clusters[name].discovery is not None
        )
        config = Overlay((), discovered).found(config)
        kept: list[NodeChange] = []
        dropped: list[NodeChange] = []
        for change in self.changes:
            if not change.keep:
                continue
            cluster = config.clusters.get(change.cluster)
            in_file = cluster is not None and any(n.uri == change.uri for n in cluster.nodes)
            # Moot: the cluster is gone, the file now lists the added node, or
            # no longer lists the drained or removed one.
            if cluster is None or in_file == (change.action == "add"):
                dropped.append(change)
            else:
                kept.append(change)
        return Overlay(tuple(kept), discovered), dropped

    def changes_json(self) -> list[dict[str, Any]]:
        return [change.to_json() for change in self.changes]

    def to_json(self) -> dict[str, Any]:
        return {
            "changes": self.changes_json(),
            "discovered": {
                name: [{"uri": node.uri, "weight": node.weight} for node in nodes]
                for name, nodes in self.discovered
            },
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> Overlay:
        """From :meth:`to_json`, or a bare list of changes (the form before discovery)."""
        if isinstance(value, Mapping):
            found = value.get("discovered") or {}
            return cls(
                tuple(NodeChange.from_json(item) for item in value.get("changes") or ()),
                tuple(
                    (str(name), tuple(NodeConfig(str(n["uri"]), int(n["weight"])) for n in nodes))
                    for name, nodes in sorted(found.items())
                ),
            )
        return cls(tuple(NodeChange.from_json(item) for item in value))
