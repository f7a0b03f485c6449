"""A cluster's ``[clusters.NAME.discovery]`` table: nodes found in etcd or in DNS.

    [clusters.api.discovery]
    etcd = ["http://127.0.0.1:2379"]   # one etcd cluster's members
    prefix = "/pitcher/nodes/api/"     # the default: /pitcher/nodes/NAME/
    dns = "api.internal:7001"          # or "udp://api.internal:7001"; tcp by default
    interval = 5.0                     # seconds between two DNS resolutions
    weight = 1                         # of every node DNS gives

etcd needs the ``fleet`` extra (the HTTP client that speaks to its JSON
gateway); a file naming etcd where it is not installed is refused with the
command that installs it.
"""

from __future__ import annotations

import importlib.util
import urllib.parse
from collections.abc import Mapping
from typing import Any

from .checks import Checks
from .issues import show, type_message
from .lines import KeyPath
from .model import DiscoveryConfig

DISCOVERY_KEYS = ("etcd", "prefix", "dns", "interval", "weight")
# Transports whose node address is host:port, which a DNS name can stand for.
DNS_SCHEMES = ("tcp", "tls", "udp", "zmq+tcp")
FLEET_EXTRA = "pip install 'pitcher-rpc[fleet]'"


def default_prefix(cluster: str) -> str:
    return f"/pitcher/nodes/{cluster}/"


def fleet_installed() -> bool:
    """Whether the ``fleet`` extra's etcd client (aiohttp) can be imported."""
    try:
        return importlib.util.find_spec("aiohttp") is not None
    except (ImportError, ValueError):  # a None or broken entry in sys.modules
        return False


def parse_dns(value: str) -> tuple[str, str, int]:
    """``[scheme://]name:port`` -> (scheme, name, port); ValueError says what is wrong."""
    scheme, separator, rest = value.partition("://")
    if not separator:
        scheme, rest = "tcp", value
    if scheme not in DNS_SCHEMES:
        raise ValueError(f"the scheme must be one of {', '.join(DNS_SCHEMES)}, got {scheme!r}")
    name, colon, port_text = rest.rpartition(":")
    if not colon or not name or "/" in rest or "[" in name:
        raise ValueError("must be a name and a port, e.g. 'api.internal:7001'")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"the port must be 1..65535, got {port_text!r}")
    return scheme, name, int(port_text)


def discovery_section(
    checks: Checks, cluster: str, table: Mapping[str, Any], path: KeyPath
) -> DiscoveryConfig | None:
    """The cluster's discovery settings (None without the table); issues go to ``checks``."""
    checks._check_keys(table, path, DISCOVERY_KEYS)
    etcd = _endpoints(checks, table, (*path, "etcd"))
    prefix = checks._string(table, (*path, "prefix"))
    if prefix is None:
        prefix = default_prefix(cluster)
    elif not prefix.startswith("/") or not prefix.endswith("/") or len(prefix) < 2:
        # Without the closing slash "/nodes/api" would also take "/nodes/api2/...".
        checks.report((*path, "prefix"), f"must start and end with '/', got {show(prefix)}")
    dns: tuple[str, int] | None = None
    scheme = "tcp"
    text = checks._string(table, (*path, "dns"))
    if text is not None:
        try:
            scheme, name, port = parse_dns(text)
            dns = (name, port)
        except ValueError as exc:
            checks.report((*path, "dns"), f"{exc}, got {show(text)}")
    if not etcd and dns is None and "etcd" not in table and "dns" not in table:
        checks.report(path, 'names no source: set etcd = [...] or dns = "name:port"')
    if etcd and not fleet_installed():
        checks.report(
            (*path, "etcd"), f"etcd needs the fleet extra, which is not installed: {FLEET_EXTRA}"
        )
    return DiscoveryConfig(
        etcd=etcd,
        prefix=prefix,
        dns=dns,
        dns_scheme=scheme,
        dns_weight=checks._integer(table, (*path, "weight"), 1, 1, 1000),
        interval=checks._seconds(table, (*path, "interval"), 5.0),
    )


def _endpoints(checks: Checks, table: Mapping[str, Any], path: KeyPath) -> tuple[str, ...]:
    value = table.get(str(path[-1]))
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        checks.report(path, type_message('an array of URLs like ["http://127.0.0.1:2379"]', value))
        return ()
    endpoints: list[str] = []
    for index, item in enumerate(value):
        parsed = urllib.parse.urlsplit(item) if isinstance(item, str) else None
        if (
            parsed is None
            or parsed.scheme not in ("http", "https")
            or not parsed.hostname
            or parsed.path not in ("", "/")
        ):
            message = f"must be an http:// or https:// URL of an etcd member, got {item!r}"
            checks.report((*path, index), message)
            continue
        endpoints.append(item.rstrip("/"))
    return tuple(endpoints)
