"""``ip_filter``: allow and deny clients by address (CIDR), at ACCEPT.

    [modules.ip_filter]
    allow = ["10.0.0.0/8", "127.0.0.1"]   # if given, only these may connect
    deny = ["10.1.2.0/24"]                 # checked first: deny wins

A refused connection is answered 403 and closed before any request is read.
Clients on a Unix socket have no address and are let through.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

from .base import Answer, Module

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
    # First at ACCEPT: nothing else should spend work on a refused client.
    priority = 1000
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
        self.allow: Sequence[Network] = values["allow"]
        self.deny: Sequence[Network] = values["deny"]
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
        try:
            address = ipaddress.ip_address(client_ip.decode("ascii"))
        except ValueError:
            return True  # a Unix-socket client: no address to judge
        if any(address in network for network in self.deny):
            return False
        return not self.allow or any(address in network for network in self.allow)

    def on_accept(self, connection: Any) -> Answer | None:
        return None if self.allowed(connection.client_ip) else _FORBIDDEN
