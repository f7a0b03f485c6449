"""TOML text -> :class:`Config`, or one :class:`ConfigError` listing every problem.

Validation never stops at the first problem: each check records an issue and
carries on with the default value, so a user fixing a file sees all of its
mistakes at once, each as ``SOURCE:LINE: KEY: MESSAGE``. Only if no issue was
recorded is the snapshot returned; a half-valid config is never handed out.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from typing import Any

from transports.registry import AddressError, get_transport, parse_address

from .discovery import discovery_section
from .issues import (
    ConfigError,
    ConfigIssue,
    one_of_message,
    show,
    type_message,
)
from .lines import KeyPath
from .model import (
    BALANCE_POLICIES,
    DEFAULT_IDEMPOTENT_METHODS,
    AdminConfig,
    ClusterConfig,
    Config,
    NodeConfig,
    RouteConfig,
    ServerConfig,
    UpstreamConfig,
    parse_listen,
)
from .modules import ModuleCatalog, default_catalog
from .schema import (
    ADMIN_KEYS,
    CLUSTER_KEYS,
    CLUSTER_NAME,
    NODE_KEYS,
    ROUTE_KEYS,
    SERVER_KEYS,
    TOKEN,
    TOML_POSITION,
    TOP_LEVEL_KEYS,
    UPSTREAM_KEYS,
    host_problem,
)
from .sections import PolicySections
from .tls import cluster_tls_section, named_for_discovery, server_tls_section

__all__ = [
    "ConfigError",
    "ConfigIssue",
    "load_config",
    "parse_config",
    "validate_config",
]

_SERVER_DEFAULTS = ServerConfig()
_UPSTREAM_DEFAULTS = UpstreamConfig()
# An admin token: long enough not to be guessed, short enough to be a header.
_TOKEN_MIN_LENGTH = 16
_TOKEN_FILE_LIMIT = 4096


def read_token(token_file: str) -> str:
    """The bearer token ``token_file`` holds, white space around it stripped.

    ValueError says why there is none: unreadable, too long, not ASCII,
    empty, or not one word of visible characters.
    """
    try:
        with open(token_file, "rb") as file:
            # Bounded: a token is a line, and a path to /dev/zero must not hang the load.
            data = file.read(_TOKEN_FILE_LIMIT + 1)
    except OSError as exc:
        raise ValueError(f"cannot read {show(token_file)}: {exc.strerror or exc}") from None
    if len(data) > _TOKEN_FILE_LIMIT:
        raise ValueError(f"{show(token_file)} holds more than {_TOKEN_FILE_LIMIT} bytes")
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ValueError(f"the token in {show(token_file)} must be ASCII") from None
    if not token:
        raise ValueError(f"{show(token_file)} is empty: it must hold the token")
    # What goes after "Bearer " in a header: visible characters, no space inside.
    if not all("!" <= char <= "~" for char in token):
        raise ValueError(
            f"the token in {show(token_file)} must be one word of visible characters"
            " (spaces and control characters cannot be sent in a header)"
        )
    return token


def load_config(path: str | os.PathLike[str], *, modules: ModuleCatalog | None = None) -> Config:
    """Read and validate a UTF-8 TOML file; ConfigError for any problem, reading included."""
    source = os.fspath(path)
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError([ConfigIssue(source, None, "", f"cannot read: {reason}")]) from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        message = f"not valid UTF-8 ({exc.reason} at byte {exc.start})"
        raise ConfigError([ConfigIssue(source, line, "", message)]) from exc
    return parse_config(text, source, modules=modules)


def parse_config(
    text: str, source: str = "<config>", *, modules: ModuleCatalog | None = None
) -> Config:
    """Parse and validate TOML text into a snapshot; ConfigError lists every issue."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_syntax_issue(exc, text, source)]) from exc
    return validate_config(document, text=text, source=source, modules=modules)


def validate_config(
    document: Mapping[str, Any],
    *,
    text: str = "",
    source: str = "<config>",
    modules: ModuleCatalog | None = None,
) -> Config:
    """Validate an already-parsed document; ``text`` (its source) is used for line numbers.

    ``modules`` resolves the ``[modules.NAME]`` tables (default: the built-in
    catalog, see :mod:`pitcher_rpc.config.modules`).
    """
    validator = _Validator(text, source, default_catalog() if modules is None else modules)
    config = validator.config(document)
    if validator.issues:
        raise ConfigError(validator.issues)
    return config


def _syntax_issue(exc: tomllib.TOMLDecodeError, text: str, source: str) -> ConfigIssue:
    message = str(exc)
    line: int | None = getattr(exc, "lineno", None)
    match = TOML_POSITION.search(message)
    if match is not None:
        message = message[: match.start()]
        if line is None:
            line = int(match.group(1)) if match.group(1) else max(1, len(text.splitlines()))
    return ConfigIssue(source, line, "", f"invalid TOML: {message}")


# -- the validator -----------------------------------------------------------


class _Validator(PolicySections):
    """Walks a parsed document once, recording issues and building the model."""

    __slots__ = ()

    # -- document ------------------------------------------------------------

    def config(self, document: Mapping[str, Any]) -> Config:
        self._check_keys(document, (), TOP_LEVEL_KEYS)
        server = self._server(document)
        upstream = self._upstream(document)
        admin = self._admin(document)
        overload = self._overload(document)
        modules = self._modules(document)
        self._module_names = {module.name for module in modules}
        # Businesses the throttle module has quotas for: a route naming another
        # is most likely a typo that would leave it without its quota.
        for module in modules:
            if module.name == "throttle" and module.settings.get("business"):
                self._businesses = set(module.settings["business"])
        clusters, cluster_names = self._clusters(document)
        routes = self._routes(document, cluster_names)
        checksum = hashlib.sha256(self._text.encode("utf-8", "surrogatepass")).hexdigest()
        return Config(
            server=server,
            upstream=upstream,
            routes=routes,
            clusters=clusters,
            source=self._source,
            checksum=checksum,
            admin=admin,
            modules=modules,
            overload=overload,
            warnings=tuple(self.warnings),
        )

    # -- [server] and [upstream] ---------------------------------------------

    def _server(self, document: Mapping[str, Any]) -> ServerConfig:
        path: KeyPath = ("server",)
        table = self._table(document, path)
        if table is None:
            return _SERVER_DEFAULTS
        self._check_keys(table, path, SERVER_KEYS)
        defaults = _SERVER_DEFAULTS
        listen = self._string(table, (*path, "listen"))
        if listen is None:
            listen = defaults.listen
        else:
            try:
                parse_listen(listen)
            except ValueError as exc:
                self.report((*path, "listen"), f"{exc}, got {show(listen)}")
        tls = None
        tls_table = self._table(table, (*path, "tls"))
        if tls_table is not None:
            tls = server_tls_section(self, tls_table, (*path, "tls"))
        if "request_id_header" in table:
            self.report(
                (*path, "request_id_header"),
                "moved: request ids are the request_id module's, set [modules.request_id] header",
            )
        return ServerConfig(
            listen=listen,
            backlog=self._integer(table, (*path, "backlog"), defaults.backlog, 1, 65535),
            header_timeout=self._seconds(table, (*path, "header_timeout"), defaults.header_timeout),
            keepalive_timeout=self._seconds(
                table, (*path, "keepalive_timeout"), defaults.keepalive_timeout, allow_zero=True
            ),
            keepalive_requests=self._integer(
                table, (*path, "keepalive_requests"), defaults.keepalive_requests, 0
            ),
            body_timeout=self._seconds(table, (*path, "body_timeout"), defaults.body_timeout),
            body_deadline=self._seconds(
                table, (*path, "body_deadline"), defaults.body_deadline, allow_zero=True
            ),
            max_connections=self._integer(
                table, (*path, "max_connections"), defaults.max_connections, 1, 1_000_000
            ),
            trusted_proxies=self._networks(table, (*path, "trusted_proxies")),
            max_request_line=self._integer(
                table, (*path, "max_request_line"), defaults.max_request_line, 1
            ),
            max_header_size=self._integer(
                table, (*path, "max_header_size"), defaults.max_header_size, 1
            ),
            max_headers=self._integer(table, (*path, "max_headers"), defaults.max_headers, 1),
            max_body_size=self._integer(table, (*path, "max_body_size"), defaults.max_body_size, 1),
            workers=self._integer(table, (*path, "workers"), 0, 0, 256)
            if "workers" in table
            else None,
            drain_timeout=self._seconds(table, (*path, "drain_timeout"), defaults.drain_timeout),
            gc_freeze=self._gc_freeze(table, (*path, "gc_freeze")),
            gc_thresholds=self._gc_thresholds(table, (*path, "gc_thresholds")),
            tls=tls,
        )

    def _networks(self, table: Mapping[str, Any], path: KeyPath) -> tuple[str, ...]:
        """CIDRs (``10.0.0.0/8``, ``::1``), normalised; host bits set are masked, as nginx.

        ``unix`` stands for every peer of a Unix-socket listener (nginx's ``unix:``).
        """
        value = table.get(str(path[-1]))
        if value is None:
            return ()
        if not isinstance(value, list):
            self.report(path, type_message("an array of addresses or CIDRs", value))
            return ()
        networks: list[str] = []
        for index, item in enumerate(value):
            if not isinstance(item, str):
                self.report((*path, index), type_message("an address or a CIDR", item))
                continue
            if item == "unix":
                networks.append(item)
                continue
            try:
                network = ipaddress.ip_network(item, strict=False)
            except ValueError:
                self.report(
                    (*path, index), f'must be an address, a CIDR or "unix", got {show(item)}'
                )
                continue
            networks.append(str(network))
        return tuple(dict.fromkeys(networks))

    def _gc_freeze(self, table: Mapping[str, Any], path: KeyPath) -> bool:
        value = table.get("gc_freeze", True)
        if not isinstance(value, bool):
            self.report(path, type_message("a boolean", value))
            return True
        return value

    def _gc_thresholds(
        self, table: Mapping[str, Any], path: KeyPath
    ) -> tuple[int, int, int] | None:
        value = table.get("gc_thresholds")
        if value is None:
            return None
        if (
            not isinstance(value, list)
            or len(value) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            self.report(path, type_message("an array of three integers", value))
            return None
        if value[0] < 1 or value[1] < 0 or value[2] < 0:
            self.report(path, f"the first must be >= 1 and the others >= 0, got {value}")
            return None
        return (value[0], value[1], value[2])

    def _admin(self, document: Mapping[str, Any]) -> AdminConfig:
        path: KeyPath = ("admin",)
        table = self._table(document, path)
        if table is None:
            return AdminConfig()
        self._check_keys(table, path, ADMIN_KEYS)
        defaults = AdminConfig()
        listen = self._string(table, (*path, "listen"))
        host = defaults.listen_address.host
        if listen is None:
            listen = defaults.listen
        else:
            try:
                address = parse_listen(listen)
            except ValueError as exc:
                self.report((*path, "listen"), f"{exc}, got {show(listen)}")
                listen = defaults.listen
            else:
                if address.is_unix:
                    self.report((*path, "listen"), f"must be host:port, got {show(listen)}")
                    listen = defaults.listen
                else:
                    host = address.host
        token_file = self._string(table, (*path, "token_file"))
        token = None
        if token_file is not None:
            token_file, token = self._admin_token((*path, "token_file"), token_file)
        elif "token_file" not in table and not AdminConfig.is_loopback_host(host):
            # Anyone who reaches the listener could reload, restart or drain the proxy.
            self.report(
                (*path, "listen"),
                f"{show(listen)} is reachable from other machines: set [admin] token_file"
                " (a file holding the bearer token every admin call must carry),"
                ' or listen on loopback ("127.0.0.1:9180", "[::1]:9180")',
            )
        return AdminConfig(listen=listen, token_file=token_file, token=token)

    def _admin_token(self, path: KeyPath, token_file: str) -> tuple[str, str | None]:
        """The token file's path (relative to the configuration's directory) and its token."""
        if not token_file.strip():
            self.report(path, "must be the path of a file holding the token, got an empty string")
            return token_file, None
        if not os.path.isabs(token_file) and os.path.isfile(self._source):
            # Relative to the file that names it, as a service manager runs from "/".
            token_file = os.path.join(os.path.dirname(os.path.abspath(self._source)), token_file)
        try:
            token = read_token(token_file)
        except ValueError as exc:
            self.report(path, str(exc))
            return token_file, None
        if len(token) < _TOKEN_MIN_LENGTH:
            self.report(
                path,
                f"the token in {show(token_file)} has {len(token)} characters, fewer than"
                f" {_TOKEN_MIN_LENGTH}: too easy to guess (try: openssl rand -hex 32)",
            )
            return token_file, None
        return token_file, token

    def _upstream(self, document: Mapping[str, Any]) -> UpstreamConfig:
        path: KeyPath = ("upstream",)
        table = self._table(document, path)
        if table is None:
            return _UPSTREAM_DEFAULTS
        self._check_keys(table, path, UPSTREAM_KEYS)
        defaults = _UPSTREAM_DEFAULTS
        return UpstreamConfig(
            connect_timeout=self._seconds(
                table, (*path, "connect_timeout"), defaults.connect_timeout
            ),
            max_connections=self._integer(
                table, (*path, "max_connections"), defaults.max_connections, 1, 64
            ),
            max_frame_size=self._integer(
                table, (*path, "max_frame_size"), defaults.max_frame_size, 1024, 268435456
            ),
        )

    # -- [clusters.NAME] -----------------------------------------------------

    def _clusters(self, document: Mapping[str, Any]) -> tuple[dict[str, ClusterConfig], set[str]]:
        """The valid clusters, and the names of all clusters written, valid or not.

        Routes are checked against every written name so that a broken cluster
        is reported once, at the cluster, and not again at each route using it.
        """
        path: KeyPath = ("clusters",)
        table = self._table(document, path)
        if table is None:
            return {}, set()
        clusters: dict[str, ClusterConfig] = {}
        for name, value in table.items():
            cluster = self._cluster(name, value, (*path, name))
            if cluster is not None:
                clusters[name] = cluster
        return clusters, set(table)

    def _cluster(self, name: str, value: Any, path: KeyPath) -> ClusterConfig | None:
        if CLUSTER_NAME.fullmatch(name) is None:
            message = "a cluster name is letters, digits, '_', '-' and '.', not starting with '-'"
            self.report(path, f"{message}; got {show(name)}")
        if not isinstance(value, dict):
            self.report(path, type_message("a table", value))
            return None
        self._check_keys(value, path, CLUSTER_KEYS)
        balance = self._string(value, (*path, "balance"))
        if balance is None:
            balance = "round_robin"
        elif balance not in BALANCE_POLICIES:
            self.report((*path, "balance"), one_of_message(balance, BALANCE_POLICIES))
        discovery = None
        discovery_table = self._table(value, (*path, "discovery"))
        if discovery_table is not None:
            discovery = discovery_section(self, name, discovery_table, (*path, "discovery"))
        # Nodes found in etcd or DNS may be all a cluster has.
        nodes = self._nodes(value, (*path, "nodes"), required=discovery_table is None)
        health = self._health(value, (*path, "health"))
        scale_out = self._scale_out(value, (*path, "scale_out"))
        if scale_out is not None and health is None and "health" not in value:
            self.report(
                (*path, "scale_out"),
                "needs a [clusters.NAME.health] table: capacity is judged by node health",
            )
        tls = None
        tls_table = self._table(value, (*path, "tls"))
        if tls_table is not None:
            tls = cluster_tls_section(self, tls_table, (*path, "tls"))
            if discovery is None and nodes and not any(n.uri.startswith("tls://") for n in nodes):
                self.warn(
                    (*path, "tls"),
                    "applies to tls:// nodes, and this cluster has none (a node added at run"
                    " time as tls://host:port will use it)",
                )
        dns = discovery.dns if discovery is not None and discovery.dns_scheme == "tls" else None
        if dns is not None and (tls_table is None or (tls is not None and not tls.server_name)):
            # Nodes found in DNS are addresses: their certificates name the DNS name.
            tls = named_for_discovery(tls, dns[0])
        return ClusterConfig(
            name=name,
            balance=balance,
            nodes=nodes,
            health=health,
            scale_out=scale_out,
            discovery=discovery,
            tls=tls,
        )

    def _nodes(
        self, cluster: Mapping[str, Any], path: KeyPath, required: bool = True
    ) -> tuple[NodeConfig, ...]:
        value = cluster.get("nodes")
        if value is None:
            if required:
                self.report(
                    path,
                    "missing required key (a cluster needs at least one node,"
                    " or a [clusters.NAME.discovery] table)",
                )
            return ()
        if not isinstance(value, list):
            self.report(path, type_message("an array of node URIs", value))
            return ()
        if not value:
            if required:
                self.report(path, "a cluster needs at least one node")
            return ()
        nodes: list[NodeConfig] = []
        seen: set[str] = set()
        for index, item in enumerate(value):
            node = self._node(item, (*path, index))
            if node is None:
                continue
            if node.uri in seen:
                message = f"duplicate node {show(node.uri)}; give one node a higher weight instead"
                self.report((*path, index), message)
            seen.add(node.uri)
            nodes.append(node)
        return tuple(nodes)

    def _node(self, item: Any, path: KeyPath) -> NodeConfig | None:
        if isinstance(item, str):
            return NodeConfig(uri=item) if self._node_uri(item, path) else None
        if not isinstance(item, dict):
            self.report(path, type_message("a node URI or a table {uri = ..., weight = ...}", item))
            return None
        self._check_keys(item, path, NODE_KEYS)
        uri_path = (*path, "uri")
        uri = self._string(item, uri_path)
        if uri is None:
            if "uri" not in item:
                self.report(uri_path, "missing required key")
            return None
        weight = self._integer(item, (*path, "weight"), 1, 1, 1000)
        return NodeConfig(uri=uri, weight=weight) if self._node_uri(uri, uri_path) else None

    def _node_uri(self, uri: str, path: KeyPath) -> bool:
        try:
            address = parse_address(uri)
        except AddressError as exc:
            self.report(path, str(exc))
            return False
        try:
            get_transport(address.scheme)
        except AddressError as exc:
            self.report(path, str(exc))
            return False
        except Exception as exc:
            # A registered third-party transport whose module fails to import:
            # better refused here, with the reason, than at the first request.
            message = f"the transport for {address.scheme!r} failed to load: {exc!r}"
            self.report(path, message)
            return False
        return True

    # -- [[routes]] ----------------------------------------------------------

    def _routes(
        self, document: Mapping[str, Any], cluster_names: set[str]
    ) -> tuple[RouteConfig, ...]:
        path: KeyPath = ("routes",)
        value = document.get("routes")
        if value is None:
            self.report(path, "missing required key (at least one [[routes]] table)")
            return ()
        if not isinstance(value, list):
            self.report(path, type_message("an array of tables ([[routes]])", value))
            return ()
        if not value:
            self.report(path, "at least one route is required")
            return ()
        routes: list[RouteConfig] = []
        written: list[tuple[int, Mapping[str, Any], RouteConfig]] = []
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                self.report((*path, index), type_message("a table", item))
                continue
            route = self._route(item, (*path, index), cluster_names)
            routes.append(route)
            written.append((index, item, route))
        self._check_duplicates(written)
        return tuple(routes)

    def _check_duplicates(self, written: list[tuple[int, Mapping[str, Any], RouteConfig]]) -> None:
        first_by_match: dict[tuple[str, str], int] = {}
        first_by_name: dict[str, int] = {}
        for index, item, route in written:
            # A value of the wrong type was replaced by its default, and a
            # duplicate made of defaults would be a second, misleading report.
            if not all(isinstance(item.get(key, ""), str) for key in ("name", "host", "prefix")):
                continue
            path: KeyPath = ("routes", index)
            match = (route.host, route.prefix)
            duplicate_match = match in first_by_match
            if duplicate_match:
                where = "prefix" if "prefix" in item else "host" if "host" in item else None
                message = (
                    f"host {show(route.host)} with prefix {show(route.prefix)} "
                    f"is already routed by routes[{first_by_match[match]}]"
                )
                self.report(path if where is None else (*path, where), message)
            else:
                first_by_match[match] = index
            if route.name not in first_by_name:
                first_by_name[route.name] = index
            # A defaulted name repeats exactly when host and prefix do, which was
            # just reported; saying it twice would only add noise.
            elif "name" in item or not duplicate_match:
                message = (
                    f"route name {show(route.name)} is already used by "
                    f"routes[{first_by_name[route.name]}]"
                )
                self.report((*path, "name") if "name" in item else path, message)

    def _route(
        self, item: Mapping[str, Any], path: KeyPath, cluster_names: set[str]
    ) -> RouteConfig:
        self._check_keys(item, path, ROUTE_KEYS)

        host = self._string(item, (*path, "host"))
        if host is None:
            host = "*"
        else:
            host = host.lower()
            problem = host_problem(host)
            if problem is not None:
                self.report((*path, "host"), problem)

        prefix = self._string(item, (*path, "prefix"))
        if prefix is None:
            prefix = "/"
        elif not prefix.startswith("/"):
            self.report((*path, "prefix"), f'must start with "/", got {show(prefix)}')
        elif any(char.isspace() or not char.isprintable() for char in prefix):
            message = f"must not contain whitespace or control characters, got {show(prefix)}"
            self.report((*path, "prefix"), message)

        name = self._string(item, (*path, "name"))
        if name is not None and not name.strip():
            self.report((*path, "name"), "must not be empty")

        cluster_path = (*path, "cluster")
        cluster = self._string(item, cluster_path)
        if cluster is None:
            if "cluster" not in item:
                self.report(cluster_path, "missing required key (the cluster to forward to)")
            cluster = ""
        elif cluster not in cluster_names:
            self.report(cluster_path, self._no_cluster_message(cluster, cluster_names))

        strip_prefix = self._boolean(item, (*path, "strip_prefix"))
        return RouteConfig(
            name=name or "",
            host=host,
            prefix=prefix,
            cluster=cluster,
            timeout=self._seconds(item, (*path, "timeout"), 30.0),
            retries=self._integer(item, (*path, "retries"), 1, 0, 5),
            idempotent_methods=self._methods(item, (*path, "idempotent_methods")),
            strip_prefix=bool(strip_prefix),
            modules=self._route_modules(item, (*path, "modules")),
            business=self._business(item, (*path, "business")),
        )

    @staticmethod
    def _no_cluster_message(cluster: str, cluster_names: set[str]) -> str:
        if not cluster_names:
            return f"no cluster named {show(cluster)}; no clusters are defined"
        close = difflib.get_close_matches(cluster, sorted(cluster_names), n=1)
        if close:
            return f"no cluster named {show(cluster)}; did you mean {show(close[0])}?"
        defined = ", ".join(sorted(cluster_names))
        return f"no cluster named {show(cluster)} (defined: {defined})"

    def _methods(self, item: Mapping[str, Any], path: KeyPath) -> frozenset[str]:
        value = item.get(str(path[-1]))
        if value is None:
            return DEFAULT_IDEMPOTENT_METHODS
        if not isinstance(value, list):
            self.report(path, type_message("an array of HTTP method names", value))
            return DEFAULT_IDEMPOTENT_METHODS
        methods: set[str] = set()
        for index, method in enumerate(value):
            if not isinstance(method, str):
                self.report((*path, index), type_message("an HTTP method name", method))
            elif TOKEN.fullmatch(method) is None:
                self.report((*path, index), f"must be an HTTP method name, got {show(method)}")
            else:
                methods.add(method.upper())
        return frozenset(methods)
