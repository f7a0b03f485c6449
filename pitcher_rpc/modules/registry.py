"""Module name -> module class.

Built-in modules are known by name; others come from the entry-point group
``pitcher_rpc.modules`` (name = module name, value = ``package.module:Class``),
resolved when a configuration names them. :data:`CATALOG` is how the
configuration, which sits below this package and never imports it, finds them
(see pitcher_rpc.config.modules).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from ..config.modules import ModuleCatalog
from .base import Module

ENTRY_POINT_GROUP = "pitcher_rpc.modules"

# Built-in modules, by the name a configuration uses; filled as they are written.
_BUILTIN: dict[str, str] = {
    "access_log": "pitcher_rpc.modules.access_log:AccessLog",
    "headers": "pitcher_rpc.modules.headers:Headers",
    "ip_filter": "pitcher_rpc.modules.ip_filter:IpFilter",
    "metrics": "pitcher_rpc.modules.metrics:Metrics",
    "request_id": "pitcher_rpc.modules.request_id:RequestId",
    "throttle": "pitcher_rpc.modules.throttle:Throttle",
    "tracing": "pitcher_rpc.modules.tracing:Tracing",
}
# Loaded even when the configuration has no table for them.
DEFAULT_MODULES = ("request_id",)
_registered: dict[str, type[Module]] = {}


def register(cls: type[Module]) -> type[Module]:
    """Make a module class known by its ``name`` (also usable as a class decorator)."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    _registered[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    _registered.pop(name, None)


def module_class(name: str) -> type[Module]:
    """The class of module ``name``; LookupError naming the known ones if there is none."""
    cls = _registered.get(name)
    if cls is not None:
        return cls
    target = _BUILTIN.get(name)
    if target is None:
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            if entry.name == name:
                target = entry.value
                break
    if target is None:
        raise LookupError(f"no module named {name!r} (known: {', '.join(known()) or 'none'})")
    module_name, _, attribute = target.partition(":")
    cls = getattr(importlib.import_module(module_name), attribute)
    if not (isinstance(cls, type) and issubclass(cls, Module)):
        raise LookupError(f"{target} is not a pitcher_rpc Module")
    _registered[name] = cls
    return cls


def known() -> list[str]:
    names = set(_BUILTIN) | set(_registered)
    names.update(entry.name for entry in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


class _Catalog:
    """This registry as a pitcher_rpc.config.modules.ModuleCatalog."""

    __slots__ = ()

    @property
    def defaults(self) -> tuple[str, ...]:
        return DEFAULT_MODULES

    def spec(self, name: str) -> type[Module]:
        return module_class(name)


CATALOG: ModuleCatalog = _Catalog()
