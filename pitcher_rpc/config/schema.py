"""What a configuration file may contain: the keys of each table and the shape of names."""

from __future__ import annotations

import ipaddress
import re

from .issues import show

TOP_LEVEL_KEYS = ("server", "upstream", "admin", "overload", "modules", "routes", "clusters")
OVERLOAD_KEYS = (
    "mode",
    "lag_high",
    "lag_low",
    "in_flight_high",
    "in_flight_low",
    "recover_after",
    "step",
)
ADMIN_KEYS = ("listen", "token_file")
SERVER_KEYS = (
    "listen",
    "workers",
    "drain_timeout",
    "gc_freeze",
    "gc_thresholds",
    "backlog",
    "header_timeout",
    "keepalive_timeout",
    "keepalive_requests",
    "body_timeout",
    "body_deadline",
    "max_connections",
    "trusted_proxies",
    "max_request_line",
    "max_header_size",
    "max_headers",
    "max_body_size",
    "request_id_header",  # refused with a pointer to [modules.request_id]
    "tls",
)
SERVER_TLS_KEYS = (
    "certificate",
    "key",
    "min_version",
    "client_ca",
    "client_certificate",
    "certificates",
)
SNI_CERTIFICATE_KEYS = ("names", "certificate", "key")
CLUSTER_TLS_KEYS = ("ca", "certificate", "key", "server_name", "min_version")
UPSTREAM_KEYS = ("connect_timeout", "max_connections", "max_frame_size")
ROUTE_KEYS = (
    "name",
    "host",
    "prefix",
    "cluster",
    "timeout",
    "retries",
    "idempotent_methods",
    "strip_prefix",
    "modules",
    "business",
)
CLUSTER_KEYS = ("balance", "nodes", "health", "scale_out", "discovery", "tls")
SCALE_OUT_KEYS = ("command", "below", "cooldown", "timeout", "detect_only")
NODE_KEYS = ("uri", "weight")

# RFC 9110 token: header field names and methods.
TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
HOST_LABEL = r"(?!-)[a-z0-9_-]{1,63}(?<!-)"
HOST_NAME = re.compile(rf"{HOST_LABEL}(?:\.{HOST_LABEL})*")
# Cluster names appear in metrics labels, admin URLs and CLI arguments.
CLUSTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
TOML_POSITION = re.compile(r"\s*\(at line (\d+), column \d+\)$|\s*\(at end of document\)$")


def host_problem(host: str) -> str | None:
    """Why a route host pattern is unusable, or None if it is fine (already lower-cased)."""
    if host == "*":
        return None
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return f"the part in brackets is not an IPv6 address, got {show(host)}"
        return None
    name = host[2:] if host.startswith("*.") else host
    if ":" in name:
        return f"must not include a port (ports are ignored when matching), got {show(host)}"
    if HOST_NAME.fullmatch(name) is None:
        return (
            'must be "*", a host name such as "api.example.com", '
            f'or a wildcard such as "*.example.com", got {show(host)}'
        )
    return None
