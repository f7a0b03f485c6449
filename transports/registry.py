"""URI scheme -> transport class.

Built-in carriers are known by name; others come from the entry-point group
``pitcher_rpc.transports`` (name = scheme, value = ``module:Class``) and are
resolved once, the first time a scheme is asked for.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any
from urllib.parse import unquote, urlsplit

ENTRY_POINT_GROUP = "pitcher_rpc.transports"

_BUILTIN = {
    "tcp": "transports.stream:TcpTransport",
    "unix": "transports.stream:UnixTransport",
    "tls": "transports.tls:TlsTransport",
    "udp": "transports.udp:UdpTransport",
    "zmq+tcp": "transports.zeromq:ZmqTransport",
    "zmq+ipc": "transports.zeromq:ZmqTransport",
}

_resolved: dict[str, Any] = {}
# Schemes whose address is a filesystem path rather than host:port.
_PATH_SCHEMES = frozenset(("unix",))


class AddressError(ValueError):
    """A node address that is not a URI we can use."""


@dataclass(frozen=True, slots=True)
class Address:
    uri: str
    scheme: str
    host: str = ""
    port: int = 0
    path: str = ""


def parse_address(uri: str) -> Address:
    """Split a node URI (``tcp://host:port``, ``unix:///path``) into its parts."""
    if "://" not in uri:
        raise AddressError(f"{uri!r} is not a URI (expected scheme://...)")
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme in _PATH_SCHEMES or scheme.endswith("+ipc"):
        path = unquote(parts.netloc + parts.path)
        if not path:
            raise AddressError(f"{uri!r} has no socket path")
        return Address(uri, scheme, path=path)
    try:
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise AddressError(f"{uri!r}: {exc}") from None
    if not host or port is None:
        raise AddressError(f"{uri!r} needs a host and a port")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise AddressError(f"{uri!r} has a path or query; a {scheme} address is host:port")
    return Address(uri, scheme, host=host, port=port)


def known_schemes() -> list[str]:
    names = set(_BUILTIN)
    names.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def _load(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def get_transport(scheme: str) -> Any:
    """The transport class for a scheme; AddressError if none is registered."""
    scheme = scheme.lower()
    transport = _resolved.get(scheme)
    if transport is not None:
        return transport
    if scheme in _BUILTIN:
        transport = _load(_BUILTIN[scheme])
    else:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name == scheme:
                transport = ep.load()
                break
        else:
            raise AddressError(
                f"no transport for scheme {scheme!r} (known: {', '.join(known_schemes())})"
            )
    _resolved[scheme] = transport
    return transport


def transport_for(uri: str) -> Any:
    return get_transport(parse_address(uri).scheme)
