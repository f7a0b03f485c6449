"""A configuration turned into the objects one request needs, swapped as one reference.

A request takes the current snapshot when it starts and keeps it until it
ends, so a reload never changes the routes or nodes under a request.
"""

from __future__ import annotations

from ..config import Config, RouteConfig
from ..http.headers import REQUEST_DROP
from ..http.parser import HttpLimits
from ..modules.chain import EMPTY as EMPTY_MODULES
from ..modules.chain import HookChains
from .routing import Router
from .upstream import Cluster, Upstreams


class Route:
    """A route as the hot path uses it: bytes where bytes are compared, cluster resolved."""

    __slots__ = (
        "business",
        "cluster",
        "host",
        "idempotent_methods",
        "name",
        "prefix",
        "prefix_bytes",
        "retries",
        "strip_prefix",
        "timeout",
    )

    def __init__(self, config: RouteConfig, cluster: Cluster) -> None:
        self.name = config.name
        self.host = config.host
        self.prefix = config.prefix
        self.prefix_bytes = config.prefix.encode()
        self.cluster = cluster
        self.timeout = config.timeout
        self.retries = config.retries
        self.idempotent_methods = frozenset(m.encode() for m in config.idempotent_methods)
        self.strip_prefix = config.strip_prefix
        self.business = config.business


class Snapshot:
    __slots__ = (
        "clusters",
        "config",
        "generation",
        "header_timeout",
        "keepalive_timeout",
        "limits",
        "modules",
        "router",
        "watch",
    )

    def __init__(
        self,
        config: Config,
        upstreams: Upstreams,
        generation: int,
        modules: HookChains = EMPTY_MODULES,
    ) -> None:
        self.config = config
        self.generation = generation
        self.modules = modules
        self.clusters = {name: upstreams.cluster(c) for name, c in config.clusters.items()}
        self.router: Router[Route] = Router(
            Route(route, self.clusters[route.cluster]) for route in config.routes
        )
        server = config.server
        self.limits = HttpLimits(
            max_request_line=server.max_request_line,
            max_header_size=server.max_header_size,
            max_headers=server.max_headers,
            max_body_size=server.max_body_size,
            body_timeout=server.body_timeout,
            body_deadline=server.body_deadline,
        )
        self.header_timeout = server.header_timeout
        self.keepalive_timeout = server.keepalive_timeout
        # Headers whose presence sends a request down the exchange's slow path:
        # the ones the proxy drops or rewrites, and the ones modules read.
        self.watch = REQUEST_DROP.union(*(module.watch for module in modules.modules.values()))

    def node_uris(self) -> set[str]:
        return {node.uri for cluster in self.clusters.values() for node in cluster.nodes}
