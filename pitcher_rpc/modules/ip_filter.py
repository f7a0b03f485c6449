"""``ip_filter``: allow and deny clients by address (CIDR).

    [modules.ip_filter]
    allow = ["10.0.0.0/8", "127.0.0.1"]   # if given, only these may connect
    deny = ["10.1.2.0/24"]                 # checked first: deny wins

A client is judged at ACCEPT: a refused connection is answered 403 and
closed before any request is read. Behind a proxy listed in ``[server]
trusted_proxies`` the client is the one that proxy forwards for (see
:attr:`~.base.Record.client_ip`), known only per request: a trusted proxy's
connection is let in whatever its own address, and each of its requests is
judged by its client before routing (403). A request from a trusted proxy
that names no client is judged by the proxy's own address, as nginx's
``allow``/``deny`` after ``real_ip`` do. Every request is judged again
before routing, so a reload's new rules reach keep-alive connections too
(a cached verdict: a dictionary look-up).

Clients on a Unix socket have no address and are let through. An IPv4 client
of a dual-stack listener (``::ffff:192.0.2.1``) is judged as its IPv4 address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from .base import AddressSet, Answer, AnyRecord, Module, address_key, trusted_proxies

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_FORBIDDEN = Answer(403, "your address may not use this proxy")
# Verdicts by client address; bounded so that a scan of many addresses cannot grow it.
_CACHE_SIZE = 4096


def _networks(value: Any, key: str) -> tuple[Network, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{key} must be an array of addresses or CIDR networks")
    networks = []
    for item in value:
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{key}: {item!r} is not an address or a CIDR network") from None
    return tuple(networks)


class IpFilter(Module):
    name = "ip_filter"
    # First of all, at ACCEPT and before routing: nothing else should spend
    # work on a refused client (request_id, 1000, comes after it).
    priority = 1010
    essential = True  # a security rule is never shed under load

    @classmethod
    def validate(cls, settings: Mapping[str, Any]) -> Mapping[str, Any]:
        unknown = set(settings) - {"allow", "deny"}
        if unknown:
            raise ValueError(f"unknown key {sorted(unknown)[0]!r} (expected allow, deny)")
        return {
            "allow": _networks(settings.get("allow", []), "allow"),
            "deny": _networks(settings.get("deny", []), "deny"),
        }

    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__(settings)
        checked = settings if isinstance(settings.get("allow", ()), tuple) else None
        values = checked or self.validate(settings)
        self.allow = AddressSet(str(network) for network in values["allow"])
        self.deny = AddressSet(str(network) for network in values["deny"])
        self._verdicts: dict[bytes, bool] = {}

    def allowed(self, client_ip: bytes) -> bool:
        verdict = self._verdicts.get(client_ip)
        if verdict is None:
            verdict = self._decide(client_ip)
            if len(self._verdicts) >= _CACHE_SIZE:
                self._verdicts.clear()
            self._verdicts[client_ip] = verdict
        return verdict

    def _decide(self, client_ip: bytes) -> bool:
        key = address_key(client_ip.decode("latin-1"))
        if key < 0:
            return True  # a Unix-socket client: no address to judge
        if self.deny.holds_key(key):
            return False
        return self.allow.empty or self.allow.holds_key(key)

    def on_accept(self, connection: Any) -> Answer | None:
        client_ip = connection.client_ip
        if self.allowed(client_ip):
            return None
        # A trusted proxy is let in: its requests are judged by their clients.
        trusted = trusted_proxies(connection.server.snapshot.config.server.trusted_proxies)
        return None if trusted is not None and trusted.holds(client_ip) else _FORBIDDEN

    def before_cluster(self, exchange: AnyRecord) -> Answer | None:
        return None if self.allowed(exchange.client_ip) else _FORBIDDEN
