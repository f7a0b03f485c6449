"""Clusters and nodes at run time, and the clients that reach them.

Clients (connection pools) are keyed by node URI in :class:`Upstreams`,
which outlives configuration snapshots: a reload that keeps a node keeps its
warm connections.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Iterable

from transports.base import Client, ClientOptions
from transports.registry import transport_for

from ..config import ClusterConfig, UpstreamConfig
from .balance import BALANCERS, RoundRobin, SmoothWeighted

log = logging.getLogger("pitcher.upstream")


class Node:
    __slots__ = ("client", "uri", "weight")

    def __init__(self, uri: str, weight: int, client: Client) -> None:
        self.uri = uri
        self.weight = weight
        self.client = client

    def __repr__(self) -> str:
        return f"Node({self.uri!r}, weight={self.weight})"


class Cluster:
    __slots__ = ("_balancer", "name", "nodes")

    def __init__(self, name: str, nodes: Iterable[Node], balance: str) -> None:
        self.name = name
        self.nodes = tuple(nodes)
        self._balancer: RoundRobin[Node] | SmoothWeighted[Node] = BALANCERS[balance](self.nodes)

    def pick(self, exclude: Collection[Node] = ()) -> Node | None:
        return self._balancer.pick(exclude)


class Upstreams:
    """Node URI -> client, shared by every snapshot of one proxy process."""

    def __init__(self, options: UpstreamConfig) -> None:
        self._clients: dict[str, Client] = {}
        self._options = self._client_options(options)
        self._closing: set[asyncio.Task[None]] = set()

    @staticmethod
    def _client_options(options: UpstreamConfig) -> ClientOptions:
        return ClientOptions(
            connect_timeout=options.connect_timeout,
            max_connections=options.max_connections,
            max_frame_size=options.max_frame_size,
        )

    def client(self, uri: str) -> Client:
        client = self._clients.get(uri)
        if client is None:
            client = transport_for(uri).client(uri, self._options)
            self._clients[uri] = client
        return client

    def cluster(self, config: ClusterConfig) -> Cluster:
        nodes = [Node(n.uri, n.weight, self.client(n.uri)) for n in config.nodes]
        return Cluster(config.name, nodes, config.balance)

    def retain_only(self, uris: Collection[str], drain_timeout: float = 30.0) -> None:
        """Drain and close clients of nodes no longer configured: in-flight calls finish."""
        for uri in [u for u in self._clients if u not in uris]:
            client = self._clients.pop(uri)
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
