"""``headers``: add, set and remove request and response headers, for all routes or per route.

    [modules.headers]
    request_set = { "x-env" = "prod" }        # replaces any the client sent
    response_remove = ["server"]

    [modules.headers.route.api]               # only for the route named "api"
    response_add = { "cache-control" = "no-store" }
    request_remove = ["x-debug"]

For each direction the order is: remove, then set (which removes the name
first), then add. A route's rules are added to the global ones. The rules are
built once per configuration; a request only picks the ones of its route.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..http.headers import HOP_BY_HOP, HeaderChanges, HeaderEdits, is_valid_name, is_valid_value
from .base import AnyRecord, Module

_RULES = (
    "request_add",
    "request_set",
    "request_remove",
    "response_add",
    "response_set",
    "response_remove",
)
# The proxy frames messages itself; a module may not forge the framing.
_FORBIDDEN = HOP_BY_HOP | {b"content-length", b"host"}


def _pairs(value: Any, key: str) -> tuple[tuple[bytes, bytes], ...]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{key} must be a table of header = value")
    pairs = []
    for name, text in value.items():
        encoded = _name(name, key)
        if not isinstance(text, str) or not is_valid_value(text.encode("latin-1", "replace")):
            raise ValueError(f"{key}.{name}: not a valid header value")
        pairs.append((encoded, text.encode("latin-1")))
    return tuple(pairs)


def _name(name: Any, key: str) -> bytes:
    if not isinstance(name, str) or not is_valid_name(name.encode("latin-1", "replace")):
        raise ValueError(f"{key}: {name!r} is not a header name")
    encoded = name.lower().encode("latin-1")
    if encoded in _FORBIDDEN:
        raise ValueError(f"{key}: {name!r} is managed by the proxy itself")
    return encoded


def _rules(section: Mapping[str, Any], where: str) -> dict[str, Any]:
    unknown = set(section) - set(_RULES)
    if unknown:
        raise ValueError(f"{where}unknown key {sorted(unknown)[0]!r}")
    rules: dict[str, Any] = {}
    for key in _RULES:
        if key not in section:
            continue
        if key.endswith("_remove"):
            names = section[key]
            if not isinstance(names, list):
                raise ValueError(f"{where}{key} must be an array of header names")
            rules[key] = frozenset(_name(name, f"{where}{key}") for name in names)
        else:
            rules[key] = _pairs(section[key], f"{where}{key}")
    return rules


def _merge(*rule_sets: Mapping[str, Any]) -> HeaderEdits:
    def changes(direction: str) -> HeaderChanges:
        add: tuple[tuple[bytes, bytes], ...] = ()
        replace: tuple[tuple[bytes, bytes], ...] = ()
        remove: frozenset[bytes] = frozenset()
        for rules in rule_sets:
            add += rules.get(f"{direction}_add", ())
            replace += rules.get(f"{direction}_set", ())
            remove |= rules.get(f"{direction}_remove", frozenset())
        return HeaderChanges(add, replace, remove)

    return HeaderEdits(changes("request"), changes("response"))


class Headers(Module):
    name = "headers"
    priority = 100
    # A rule may hide an internal header or set one a backend relies on:
    # never dropped silently under load.
    essential = True

    @classmethod
    def validate(cls, settings: Mapping[str, Any]) -> Mapping[str, Any]:
        routes = settings.get("route", {})
        if not isinstance(routes, Mapping):
            raise ValueError("route must be a table of route names")
        base = _rules({k: v for k, v in settings.items() if k != "route"}, "")
        per_route = {}
        for route, section in routes.items():
            if not isinstance(section, Mapping):
                raise ValueError(f"route.{route} must be a table")
            per_route[route] = _rules(section, f"route.{route}.")
        return {"base": base, "routes": per_route}

    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__(settings)
        checked = settings if "base" in settings else self.validate(settings)
        self._default = _merge(checked["base"])
        self._by_route = {
            route: _merge(checked["base"], rules) for route, rules in checked["routes"].items()
        }

    def after_cluster(self, exchange: AnyRecord) -> None:
        # AFTER_CLUSTER runs once a route has taken the request.
        route = exchange.route
        edits = self._by_route.get(route.name, self._default) if route else self._default
        if edits.request or edits.response:
            exchange.edits = edits
