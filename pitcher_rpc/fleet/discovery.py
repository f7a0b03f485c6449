"""Nodes found in etcd or DNS: one source per cluster and provider, run by one process.

The master of a proxy (or the proxy itself with ``workers = 0``) runs a
:class:`Discovery`; workers never talk to etcd or DNS. Each source keeps the
nodes it last knew and calls back when they change; the caller lays them
over the file (pitcher_rpc.config.overlay) and sends the result to every
worker, as it does for the admin API's changes.

The rule when a provider fails: the cluster keeps the nodes last known, and
the failure is logged (once per outage, and again when it ends), counted and
shown by :meth:`Discovery.describe` (``/admin/clusters``, ``/metrics``). A
registry that is gone never empties a cluster; only a registry that answers
with no node does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from ..config.model import ClusterConfig, Config, DiscoveryConfig, NodeConfig
from .nodes import NodeEntries

log = logging.getLogger("pitcher.discovery")

# Retry delays after a failure: doubled each time, from the first to the last.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0
# How often a watched etcd is asked something, to notice one that went silent.
PROBE_INTERVAL = 5.0


class Source:
    """One provider of one cluster's nodes; ``nodes`` is None until it first answers."""

    kind = ""

    def __init__(self, cluster: str, changed: Callable[[str], None]) -> None:
        self.cluster = cluster
        self._changed = changed
        self.nodes: tuple[NodeConfig, ...] | None = None
        self.metadata: dict[str, Any] = {}
        self.state = "starting"  # "ok" or "unreachable" once it has tried
        self.since = time.time()
        self.error = ""
        self.failures = 0  # failed attempts since the source started
        self.updates = 0  # node sets taken
        self.skipped: dict[str, str] = {}  # what was skipped -> why
        self._task: asyncio.Task[None] | None = None

    @property
    def target(self) -> str:
        raise NotImplementedError

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"pitcher-discovery-{self.kind}-{self.cluster}"
        )

    async def stop(self) -> None:
        """Stop asking the provider; what it knew stays (start() goes on from there)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def close(self) -> None:
        await self.stop()

    async def _run(self) -> None:
        raise NotImplementedError

    def _take(self, entries: NodeEntries) -> None:
        """A node set read from the provider: kept, and the caller told if it changed."""
        nodes = entries.nodes()
        newly_skipped = {k: v for k, v in entries.skipped.items() if self.skipped.get(k) != v}
        for what, why in newly_skipped.items():
            log.warning("%s of cluster %s: skipped %s: %s", self.kind, self.cluster, what, why)
        self.skipped = dict(entries.skipped)
        self.metadata = entries.metadata()
        if nodes != self.nodes:
            self.nodes = nodes
            self.updates += 1
            self._changed(self.cluster)

    def _ok(self, detail: str = "") -> None:
        if self.state != "ok":
            if self.state == "unreachable":
                log.warning(
                    "%s of cluster %s is back after %.1fs%s",
                    self.kind,
                    self.cluster,
                    time.time() - self.since,
                    f" ({detail})" if detail else "",
                )
            self.state, self.since, self.error = "ok", time.time(), ""

    def _failed(self, error: str, retry: float) -> None:
        self.failures += 1
        self.error = error
        if self.state != "unreachable":
            kept = "no node known yet" if self.nodes is None else f"{len(self.nodes)} nodes"
            log.error(
                "%s of cluster %s unreachable (%s): keeping the last known (%s); retrying",
                self.kind,
                self.cluster,
                error,
                kept,
            )
            self.state, self.since = "unreachable", time.time()
        else:
            log.debug("%s of cluster %s still unreachable: %s", self.kind, self.cluster, error)

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.kind,
            "target": self.target,
            "state": self.state,
            "since": round(self.since, 3),
            "error": self.error,
            "failures": self.failures,
            "updates": self.updates,
            "nodes": None if self.nodes is None else len(self.nodes),
            "metadata": self.metadata,
            "skipped": self.skipped,
        }


class EtcdSource(Source):
    """Every key under a prefix is a node: read it all, then watch from that revision."""

    kind = "etcd"

    def __init__(
        self, cluster: str, settings: DiscoveryConfig, changed: Callable[[str], None]
    ) -> None:
        super().__init__(cluster, changed)
        from .etcd import EtcdClient

        self.prefix = settings.prefix
        self.client = EtcdClient(settings.etcd)
        self.revision = 0  # the last revision seen: a watch resumes after it
        self.reads = 0  # whole reads of the prefix (the first, then after compactions)
        self._entries = NodeEntries()
        self._must_read = True
        self.probe_interval = PROBE_INTERVAL
        self._backoff = BACKOFF_FIRST

    @property
    def target(self) -> str:
        return f"{','.join(self.client.endpoints)}{self.prefix}"

    async def close(self) -> None:
        await super().close()
        await self.client.close()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "revision": self.revision, "reads": self.reads}

    async def _run(self) -> None:
        from .etcd import EtcdCompacted, EtcdError

        loop = asyncio.get_running_loop()
        while True:
            try:
                if self._must_read:
                    kvs, revision = await self.client.range_prefix(self.prefix)
                    self.reads += 1
                    self._entries = NodeEntries()
                    for kv in kvs:
                        self._entries.put(self._name(kv.key), kv.value)
                    self.revision = revision
                    self._must_read = False
                    self._ok(f"read at revision {revision}")
                    self._take(self._entries)
                # Whichever ends first (both end only by raising) ends the other.
                name = f"pitcher-discovery-etcd-{self.cluster}"
                watch = loop.create_task(self._watch(), name=f"{name}-watch")
                probe = loop.create_task(self._probe(), name=f"{name}-probe")
                try:
                    done, _ = await asyncio.wait({watch, probe}, return_when="FIRST_COMPLETED")
                finally:
                    for task in (watch, probe):
                        task.cancel()
                    await asyncio.gather(watch, probe, return_exceptions=True)
                for task in done:
                    task.result()
            except EtcdCompacted as exc:
                log.warning(
                    "etcd of cluster %s: %s; reading %s again", self.cluster, exc, self.prefix
                )
                self._must_read = True
                continue
            except EtcdError as exc:
                self._failed(str(exc), self._backoff)
            except Exception as exc:  # a bug must not end discovery for good
                log.exception("etcd of cluster %s: unexpected failure", self.cluster)
                self._failed(repr(exc), self._backoff)
            await asyncio.sleep(self._backoff)
            self._backoff = min(BACKOFF_MAX, self._backoff * 2)

    async def _watch(self) -> None:
        async for event in self.client.watch_prefix(self.prefix, self.revision + 1):
            if event.kind == "created":
                self._ok(f"watching from revision {self.revision + 1}")
                self._backoff = BACKOFF_FIRST
                continue
            if event.kind == "put":
                self._entries.put(self._name(event.key), event.value)
            else:
                self._entries.delete(self._name(event.key))
            self.revision = max(self.revision, event.revision)
            self._take(self._entries)

    async def _probe(self) -> None:
        """A small read now and then: an etcd that stopped answering on an open watch
        (a partition without a reset, a stopped process) is noticed within about
        ``probe_interval`` plus the client's timeout."""
        while True:
            await asyncio.sleep(self.probe_interval)
            await self.client.count_prefix(self.prefix)

    def _name(self, key: str) -> str:
        return key[len(self.prefix) :] if key.startswith(self.prefix) else key


class DnsSource(Source):
    """A name's A and AAAA records, resolved every ``interval`` seconds by the loop's resolver."""

    kind = "dns"

    def __init__(
        self, cluster: str, settings: DiscoveryConfig, changed: Callable[[str], None]
    ) -> None:
        super().__init__(cluster, changed)
        assert settings.dns is not None
        self.name, self.port = settings.dns
        self.scheme = settings.dns_scheme
        self.weight = settings.dns_weight
        self.interval = settings.interval
        self.resolutions = 0

    @property
    def target(self) -> str:
        return f"{self.scheme}://{self.name}:{self.port}"

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "resolutions": self.resolutions}

    async def resolve(self) -> list[str]:
        """The node URIs the name gives now, in a stable order; OSError if it gives none."""
        kind = socket.SOCK_DGRAM if self.scheme == "udp" else socket.SOCK_STREAM
        loop = asyncio.get_running_loop()
        answers = await asyncio.wait_for(
            loop.getaddrinfo(self.name, self.port, type=kind), timeout=max(1.0, self.interval)
        )
        uris: set[str] = set()
        for family, _, _, _, address in answers:
            host = str(address[0])
            if family == socket.AF_INET6:
                host = f"[{host}]"
            elif family != socket.AF_INET:
                continue
            uris.add(f"{self.scheme}://{host}:{self.port}")
        if not uris:
            raise OSError(f"{self.name} has no A or AAAA record")
        return sorted(uris)

    async def _run(self) -> None:
        backoff = BACKOFF_FIRST
        while True:
            wait = self.interval
            try:
                uris = await self.resolve()
            except (OSError, TimeoutError) as exc:
                self._failed(f"cannot resolve {self.name}: {exc or 'timed out'}", backoff)
                # Retry sooner than the interval while it fails, never later.
                wait = min(self.interval, backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)
            else:
                self.resolutions += 1
                backoff = BACKOFF_FIRST
                self._ok()
                entries = NodeEntries()
                for uri in uris:
                    entries.put(uri, None, NodeConfig(uri, self.weight))
                self._take(entries)
            await asyncio.sleep(wait)


class Discovery:
    """Every discovery source of a configuration; ``changed`` is called when a node set moves."""

    def __init__(self, changed: Callable[[], None]) -> None:
        self._changed = changed
        # (cluster, settings) -> its sources, so a reload keeps unchanged ones running.
        self._sources: dict[str, tuple[DiscoveryConfig, list[Source]]] = {}
        # Nodes of sources a reload replaced, kept until the new ones answer.
        self._previous: dict[str, tuple[NodeConfig, ...]] = {}

    @staticmethod
    def wanted(config: Config) -> bool:
        return any(cluster.discovery is not None for cluster in config.clusters.values())

    def configure(self, config: Config) -> list[Source]:
        """Start the sources ``config`` names, stop those it no longer does; the closed ones.

        The caller awaits :meth:`close_sources` on what is returned.
        """
        closed: list[Source] = []
        for name in list(self._sources):
            settings, sources = self._sources[name]
            cluster = config.clusters.get(name)
            if cluster is None or cluster.discovery != settings:
                self._previous[name] = self.nodes(name)
                del self._sources[name]
                closed.extend(sources)
        for name, cluster in config.clusters.items():
            if cluster.discovery is not None and name not in self._sources:
                self._sources[name] = (cluster.discovery, self._start(cluster))
        for name in list(self._previous):
            if name not in self._sources:
                del self._previous[name]
        return closed

    def _start(self, cluster: ClusterConfig) -> list[Source]:
        settings = cluster.discovery
        assert settings is not None
        sources: list[Source] = []
        if settings.etcd:
            sources.append(EtcdSource(cluster.name, settings, self._source_changed))
        if settings.dns is not None:
            sources.append(DnsSource(cluster.name, settings, self._source_changed))
        for source in sources:
            source.start()
        return sources

    def _source_changed(self, cluster: str) -> None:
        sources = self._sources.get(cluster, (None, []))[1]
        if all(source.nodes is not None for source in sources):
            self._previous.pop(cluster, None)
        self._changed()

    def nodes(self, cluster: str) -> tuple[NodeConfig, ...]:
        """The cluster's discovered nodes: each source's last known, etcd's first, by URI."""
        entry = self._sources.get(cluster)
        if entry is None:
            return ()
        sources = entry[1]
        if cluster in self._previous and any(source.nodes is None for source in sources):
            return self._previous[cluster]
        seen: set[str] = set()
        nodes: list[NodeConfig] = []
        for source in sources:
            for node in source.nodes or ():
                if node.uri not in seen:
                    seen.add(node.uri)
                    nodes.append(node)
        return tuple(nodes)

    async def settle(self, timeout: float) -> bool:
        """Wait until every source has answered or failed once (at most ``timeout`` s).

        At start-up, so that workers start with the registry's nodes rather
        than take them a moment later; False if some source had not answered.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        sources = [source for _, group in self._sources.values() for source in group]
        while any(source.state == "starting" for source in sources):
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def all_nodes(self) -> dict[str, tuple[NodeConfig, ...]]:
        return {name: self.nodes(name) for name in self._sources}

    def describe(self) -> dict[str, list[dict[str, Any]]]:
        return {
            name: [source.describe() for source in sources]
            for name, (_, sources) in self._sources.items()
        }

    @staticmethod
    async def close_sources(sources: list[Source]) -> None:
        await asyncio.gather(*(source.close() for source in sources))

    async def close(self) -> None:
        sources = [source for _, group in self._sources.values() for source in group]
        self._sources.clear()
        await self.close_sources(sources)
