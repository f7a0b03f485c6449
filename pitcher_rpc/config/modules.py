"""What the configuration needs to know of modules, without importing them.

A ``[modules.NAME]`` table is checked by the module's own class (its settings,
its hooks and priority), yet config/ sits below modules/ and imports nothing
of it. So the validator asks a :class:`ModuleCatalog` for the class of each
name. The caller that builds a configuration may pass one (tests pass their
own); by default it is the catalog of :mod:`pitcher_rpc.modules.registry`
(built-in modules, registered ones and entry points), reached by name at run
time like any plug-in, never by an import statement.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from enum import Enum
from typing import Any, Protocol, cast

__all__ = ["DEFAULT_CATALOG", "ModuleCatalog", "ModuleSpec", "default_catalog"]

# Module and attribute of the catalog used when a caller passes none.
DEFAULT_CATALOG = "pitcher_rpc.modules.registry:CATALOG"


class ModuleSpec(Protocol):
    """What validation uses of a module class (pitcher_rpc.modules.base.Module is one)."""

    @property
    def priority(self) -> int: ...

    def validate(self, settings: Mapping[str, Any]) -> Mapping[str, Any]:
        """The checked settings; ValueError or TypeError whose text names the bad key."""
        ...

    def hooks(self) -> tuple[Enum, ...]: ...


class ModuleCatalog(Protocol):
    """Module names and their classes, as far as a configuration is concerned."""

    @property
    def defaults(self) -> tuple[str, ...]:
        """Modules loaded even when the configuration has no table for them."""
        ...

    def spec(self, name: str) -> ModuleSpec:
        """The class of module ``name``; LookupError with the text to report if none."""
        ...


def default_catalog() -> ModuleCatalog:
    module_name, _, attribute = DEFAULT_CATALOG.partition(":")
    return cast(ModuleCatalog, getattr(importlib.import_module(module_name), attribute))
