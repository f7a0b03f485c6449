"""The configuration snapshot: frozen values, built whole by the validator.

A reload builds a new :class:`Config` beside the old one and swaps a single
reference, so nothing here may be mutated after construction: records are
frozen dataclasses, sequences are tuples and mappings are read-only proxies.
The constructors do not validate; :func:`pitcher_rpc.config.parse_config`
does, and reports every problem with its key and line.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .health import HealthPolicy
from .issues import ConfigIssue

__all__ = [
    "BALANCE_POLICIES",
    "DEFAULT_IDEMPOTENT_METHODS",
    "AdminConfig",
    "ClusterConfig",
    "ClusterTlsConfig",
    "Config",
    "DiscoveryConfig",
    "ListenAddress",
    "NodeConfig",
    "RouteConfig",
    "ServerConfig",
    "ServerTlsConfig",
    "SniCertificate",
    "UpstreamConfig",
    "parse_listen",
]

BALANCE_POLICIES = ("round_robin", "weighted")
DEFAULT_IDEMPOTENT_METHODS: frozenset[str] = frozenset({"GET", "HEAD"})
_UNIX_PREFIX = "unix://"


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """Where the HTTP frontend listens: a TCP host and port, or a Unix socket path."""

    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def is_unix(self) -> bool:
        return bool(self.path)


def parse_listen(text: str) -> ListenAddress:
    """Split ``host:port``, ``[v6]:port`` or ``unix:///path``.

    The ValueError raised for a bad address says what is wrong but does not
    repeat the address, so that the caller can decide how to show it.

    Port 0 is accepted and means "any free port", which tests and the demo use.
    """
    if text.startswith(_UNIX_PREFIX):
        path = text[len(_UNIX_PREFIX) :]
        if not path:
            raise ValueError("a unix:// address needs a socket path")
        return ListenAddress(path=path)
    if text.startswith("["):
        closing = text.find("]")
        if closing < 0 or not text.startswith(":", closing + 1):
            raise ValueError("expected '[v6-address]:port'")
        host, port_text = text[1:closing], text[closing + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("the host in brackets is not an IPv6 address") from None
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise ValueError("expected 'host:port', '[v6-address]:port' or 'unix:///path'")
        if ":" in host:
            raise ValueError("an IPv6 address must be in brackets: '[v6-address]:port'")
        if not host:
            raise ValueError("the host is empty")
        if any(char.isspace() for char in host):
            raise ValueError("the host contains whitespace")
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError("the port must be a number")
    port = int(port_text)
    if port > 65535:
        raise ValueError("the port must be between 0 and 65535")
    return ListenAddress(host=host, port=port)


@dataclass(frozen=True, slots=True)
class SniCertificate:
    """One of ``[[server.tls.certificates]]``: served to clients asking for one of ``names``."""

    names: tuple[str, ...]  # lower-case host names, or "*.example.com" (one label)
    certificate: str
    key: str


@dataclass(frozen=True, slots=True)
class ServerTlsConfig:
    """``[server.tls]``: the listener speaks TLS (HTTP/1.1 inside, ALPN "http/1.1").

    ``context`` is the SSLContext the validator built from the files (so a
    file that loads at ``pitcher check`` is the one served, and one that does
    not is refused with its key and line); every reload builds a new one,
    which new handshakes use while open connections keep theirs.
    ``digest`` hashes the settings and the files' bytes: two snapshots with
    the same digest serve the same certificates.
    """

    certificate: str
    key: str
    min_version: str = "1.2"
    # The CA whose certificates clients must present ("required") or may ("optional").
    client_ca: str | None = None
    client_certificate: str = "required"
    certificates: tuple[SniCertificate, ...] = ()
    digest: str = ""
    context: ssl.SSLContext | None = field(default=None, compare=False, repr=False, hash=False)


@dataclass(frozen=True, slots=True)
class ClusterTlsConfig:
    """``[clusters.NAME.tls]``: how the proxy speaks TLS to the cluster's ``tls://`` nodes.

    ``ca`` None trusts the system's store; ``certificate`` and ``key`` are
    the proxy's own (for services that ask for a client certificate);
    ``server_name`` is what the node's certificate must name (and the SNI
    sent), default each node's host. ``context`` and ``digest`` as
    :class:`ServerTlsConfig`'s.
    """

    ca: str | None = None
    certificate: str | None = None
    key: str | None = None
    server_name: str | None = None
    min_version: str = "1.2"
    digest: str = ""
    context: ssl.SSLContext | None = field(default=None, compare=False, repr=False, hash=False)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The HTTP frontend: listener and request-head limits."""

    listen: str = "127.0.0.1:8080"
    backlog: int = 511
    header_timeout: float = 10.0
    keepalive_timeout: float = 60.0
    # Requests one client connection may carry before the proxy closes it
    # (0: no limit): reconnecting clients spread over the workers again.
    keepalive_requests: int = 1000
    # The longest wait between two reads of a request body, and the most time
    # a whole body may take after its head (0: no limit); past either, 408.
    body_timeout: float = 30.0
    body_deadline: float = 300.0
    # Client connections the whole proxy holds at once (split between workers).
    max_connections: int = 10000
    # Peers (CIDRs, normalised; "unix" for a Unix-socket listener's peers)
    # whose X-Forwarded-For is believed.
    trusted_proxies: tuple[str, ...] = ()
    max_request_line: int = 8192
    max_header_size: int = 32768
    max_headers: int = 100
    max_body_size: int = 1048576
    # Worker processes; None means one per CPU, 0 runs the proxy in a single process.
    workers: int | None = None
    # How long a draining process lets in-flight requests finish before it exits.
    drain_timeout: float = 30.0
    # After start-up each process moves its long-lived objects out of the
    # collector's way (gc.freeze); thresholds as gc.set_threshold, None = CPython's.
    gc_freeze: bool = True
    gc_thresholds: tuple[int, int, int] | None = None
    # None: plain HTTP.
    tls: ServerTlsConfig | None = None

    @property
    def scheme(self) -> str:
        """What clients use: "https" on a TLS listener, else "http"."""
        return "http" if self.tls is None else "https"

    @property
    def listen_address(self) -> ListenAddress:
        return parse_listen(self.listen)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The master's admin HTTP listener; loopback by default, never the proxy's port."""

    listen: str = "127.0.0.1:9180"
    # A file holding the bearer token every admin call but the health check, the
    # metrics and the status page's shell must carry; None: no token asked (allowed
    # on a loopback listener only). Relative to the configuration file's directory.
    token_file: str | None = None
    # The token as read from token_file when the snapshot was validated (a reload
    # reads it again); kept out of repr so that no log line ever shows it.
    token: str | None = field(default=None, repr=False)

    @property
    def listen_address(self) -> ListenAddress:
        return parse_listen(self.listen)

    @staticmethod
    def is_loopback_host(host: str) -> bool:
        """Whether only this machine can reach ``host``: 127.0.0.0/8, ::1 or localhost.

        Any other name counts as reachable from elsewhere: what it resolves to
        may change, and 0.0.0.0 or :: listen on every interface.
        """
        if host.lower().rstrip(".") == "localhost":
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            return address.ipv4_mapped.is_loopback
        return address.is_loopback


@dataclass(frozen=True, slots=True)
class OverloadConfig:
    """When a worker sheds its non-essential modules, and when it takes them back.

    Overloaded: event-loop lag above ``lag_high`` seconds, or more than
    ``in_flight_high`` requests in flight (0: not used). Calm again: lag below
    ``lag_low`` and in flight at most ``in_flight_low`` (default: half of
    ``in_flight_high``) for ``recover_after`` s.
    """

    mode: str = "enforce"  # "detect": log what would be shed, shed nothing; "off"
    lag_high: float = 0.1
    lag_low: float = 0.02
    in_flight_high: int = 0
    in_flight_low: int = 0
    recover_after: float = 10.0
    # How long a shedding step waits to see its effect before the next one.
    step: float = 1.0


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """Defaults for every cluster's backend connections."""

    connect_timeout: float = 1.0
    max_connections: int = 4
    max_frame_size: int = 4194304


@dataclass(frozen=True, slots=True)
class NodeConfig:
    uri: str
    weight: int = 1


# What may count as a failed request for a node's health.
FAILURE_KINDS = ("connect", "timeout", "reset", "error", "5xx", "4xx")
DEFAULT_FAILURES = frozenset({"connect", "timeout", "reset", "error", "5xx"})


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """A cluster's ``[clusters.NAME.health]``: failure detection, ejection, slow start.

    ``policy`` holds the thresholds and timings (applied by pitcher_rpc.degrade.health);
    ``failures`` what counts as a failed request; ``ramp_in_flight`` caps a
    node while it ramps (slow start, probation): at factor f it takes at most
    ``f * ramp_in_flight`` requests at once from the whole proxy (each of N
    workers allows its 1/N of that, at least one).
    """

    policy: HealthPolicy = field(default_factory=HealthPolicy)
    failures: frozenset[str] = DEFAULT_FAILURES
    ramp_in_flight: int = 100


@dataclass(frozen=True, slots=True)
class ScaleOutConfig:
    """A cluster's ``[clusters.NAME.scale_out]``: a command run when healthy capacity is low.

    When the share of the cluster's weight on nodes in service (not ejected,
    not in probation, not kept in service by the ejection cap while bad) falls
    below ``below``, ``command`` (an argv, no shell) is run with the numbers in
    its environment, at most once per ``cooldown`` seconds, and killed after
    ``timeout``. ``detect_only`` logs what would run and runs nothing.
    """

    command: tuple[str, ...]
    below: float = 0.5
    cooldown: float = 300.0
    timeout: float = 60.0
    detect_only: bool = False


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """A cluster's ``[clusters.NAME.discovery]``: nodes found in etcd or DNS.

    ``etcd``: the endpoints of one etcd cluster (empty: none); every key
    under ``prefix`` is one node as JSON. ``dns``: a name and port whose
    addresses are nodes of scheme ``dns_scheme``, resolved every ``interval``
    seconds with weight ``dns_weight``. How they combine with the file's
    nodes and the admin API's changes: pitcher_rpc.config.overlay.
    """

    etcd: tuple[str, ...] = ()
    prefix: str = ""
    dns: tuple[str, int] | None = None  # (name, port)
    dns_scheme: str = "tcp"
    dns_weight: int = 1
    interval: float = 5.0


# Keyword-only because the spec order puts a required field after defaulted
# ones; positional construction of these wide records would be error-prone anyway.
@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterConfig:
    name: str
    balance: str = "round_robin"
    nodes: tuple[NodeConfig, ...]
    # None: no failure detection, every node always takes its share.
    health: HealthConfig | None = None
    scale_out: ScaleOutConfig | None = None
    # None: the file's nodes (and the admin API's changes) are all there is.
    discovery: DiscoveryConfig | None = None
    # How its tls:// nodes are reached; None: the system's trust store, each node's host.
    tls: ClusterTlsConfig | None = None

    def __post_init__(self) -> None:
        # A list passed by a caller would stay mutable behind the frozen record.
        if not isinstance(self.nodes, tuple):
            object.__setattr__(self, "nodes", tuple(self.nodes))


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteConfig:
    """One routing rule: requests for ``host`` under ``prefix`` go to ``cluster``.

    ``host`` is ``"*"``, an exact lower-case host, or ``"*.example.com"``.
    An empty ``name`` becomes ``f"{host}{prefix}"``.
    """

    name: str = ""
    host: str = "*"
    prefix: str = "/"
    cluster: str
    timeout: float = 30.0
    retries: int = 1
    idempotent_methods: frozenset[str] = DEFAULT_IDEMPOTENT_METHODS
    strip_prefix: bool = False
    # This route's own module list, in the order given; None runs every module
    # that is on, by priority.
    modules: tuple[str, ...] | None = None
    # The business (tenant) the route's traffic is counted to, for quotas.
    business: str = "default"

    def __post_init__(self) -> None:
        # Frozen: the generated __setattr__ refuses, the slot itself does not.
        if not self.name:
            object.__setattr__(self, "name", f"{self.host}{self.prefix}")
        if not isinstance(self.idempotent_methods, frozenset):
            object.__setattr__(self, "idempotent_methods", frozenset(self.idempotent_methods))


@dataclass(frozen=True, slots=True)
class ModuleConfig:
    """One ``[modules.NAME]`` table: whether the module is on, and its own settings."""

    name: str
    enabled: bool = True
    # Overrides the module's own "essential" (shed under overload or not); None keeps it.
    essential: bool | None = None
    # Read-only: what the module's own validate() returned (compared, not hashed).
    settings: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), hash=False)


@dataclass(frozen=True, slots=True)
class Config:
    """One validated, immutable configuration snapshot."""

    server: ServerConfig
    upstream: UpstreamConfig
    routes: tuple[RouteConfig, ...]
    # A read-only view (MappingProxyType); left out of the hash because a
    # mapping proxy is unhashable, while equality still compares it.
    clusters: Mapping[str, ClusterConfig] = field(hash=False)
    source: str
    checksum: str
    admin: AdminConfig = AdminConfig()
    modules: tuple[ModuleConfig, ...] = ()
    overload: OverloadConfig = OverloadConfig()
    # What is worth saying but not refusing (an expired certificate: nginx serves it too).
    warnings: tuple[ConfigIssue, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.routes, tuple):
            object.__setattr__(self, "routes", tuple(self.routes))
        if not isinstance(self.clusters, MappingProxyType):
            object.__setattr__(self, "clusters", MappingProxyType(dict(self.clusters)))
