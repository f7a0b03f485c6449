"""The module instances of one proxy process, across configuration snapshots.

A reload that keeps a module's settings keeps its instance (and its
counters, buckets, open files); one that changes them makes a new instance
and closes the old one once the requests of the old snapshot can no longer
use it. Runtime switches (admin API) and this process's shares of the
proxy-wide limits outlive reloads too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from ..config import Config, RouteConfig
from ..degrade.overload import Shedder
from ..modules.base import Module
from ..modules.chain import EMPTY as EMPTY_MODULES
from ..modules.chain import HookChains
from ..modules.registry import module_class

log = logging.getLogger("pitcher.proxy")


class ModuleHost:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        shedder: Shedder,
        default_share: float = 1.0,
        fixed: HookChains | None = None,
    ) -> None:
        self.loop = loop
        self.shedder = shedder
        # This process's part of each proxy-wide limit until the master says
        # more, and the last shares it sent, by module.
        self.default_share = default_share
        self._shares: dict[str, dict[str, float]] = {}
        # Chains given by the caller (tests, benchmarks) instead of a configuration's.
        self._fixed = fixed
        # Module instances by name with the settings they were made with.
        self._instances: dict[str, tuple[dict[str, Any], Module]] = {}
        # Runtime switches (admin API); they outlive reloads.
        self.switches: dict[str, bool] = {}
        # Instances a reload dropped, closed once requests that may use them are
        # done (or when the proxy stops): module -> its close timer.
        self._retired: dict[Module, asyncio.TimerHandle] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def chains_for(self, config: Config, old_routes: Sequence[RouteConfig] = ()) -> HookChains:
        """The module chains of a configuration; ModuleFailure if they cannot be ordered.

        ``old_routes``: the routes of the snapshot being replaced, whose
        requests may still use a dropped instance for their timeout.
        """
        if self._fixed is not None:
            return self._fixed
        if not config.modules:
            return EMPTY_MODULES
        instances: dict[str, tuple[dict[str, Any], Module]] = {}
        for module_config in config.modules:
            settings = dict(module_config.settings)
            previous = self._instances.get(module_config.name)
            if previous is not None and previous[0] == settings:
                instance = previous[1]
            else:
                instance = module_class(module_config.name)(module_config.settings)
                if self.default_share != 1.0 or module_config.name in self._shares:
                    instance.set_shares(
                        {"*": self.default_share, **self._shares.get(module_config.name, {})}
                    )
            instances[module_config.name] = (settings, instance)
        kept = {id(instance) for _, instance in instances.values()}
        dropped = [m for _, m in self._instances.values() if id(m) not in kept]
        chains = HookChains(
            [instance for _, instance in instances.values()],
            shed=self.shedder.shed if self.shedder.config.mode == "enforce" else (),
            disabled=[m.name for m in config.modules if not self.switches.get(m.name, m.enabled)],
            route_orders={r.name: r.modules for r in config.routes if r.modules is not None},
            essential={m.name: m.essential for m in config.modules if m.essential is not None},
        )
        self._instances = instances
        if dropped:
            grace = min(60.0, max((route.timeout for route in old_routes), default=0.0) + 1.0)
            for module in dropped:
                self._close_later(module, grace)
        return chains

    def _close_later(self, module: Module, delay: float) -> None:
        def close() -> None:
            self._retired.pop(module, None)
            task = self.loop.create_task(_close(module))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

        self._retired[module] = self.loop.call_later(delay, close)

    def reopen(self, chains: HookChains) -> None:
        """SIGUSR1: every loaded module reopens its files (after a log rotation)."""
        for module in chains.modules.values():
            try:
                module.reopen()
            except Exception:
                log.exception("module %s failed to reopen its files", module.name)

    def stats(self, chains: HookChains) -> dict[str, dict[str, Any]]:
        """The numbers each loaded module reports, by module name."""
        stats = {}
        for name, module in chains.modules.items():
            try:
                numbers = module.stats()
            except Exception:
                log.exception("module %s failed to report", name)
                continue
            if numbers:
                stats[name] = numbers
        return stats

    def demand(self, chains: HookChains) -> dict[str, dict[str, tuple[float, float]]]:
        """Each module's demand on its proxy-wide limits since the last call."""
        demand = {}
        for name, module in chains.modules.items():
            numbers = module.demand()
            if numbers:
                demand[name] = numbers
        return demand

    def apply_shares(self, shares: dict[str, dict[str, float]], chains: HookChains) -> None:
        """Take this process's shares of the proxy-wide limits, by module and limit."""
        self._shares = shares
        for name, module_shares in shares.items():
            module = chains.modules.get(name)
            if module is not None:
                module.set_shares(module_shares)

    def switch(self, chains: HookChains, name: str, enabled: bool) -> None:
        """Switch a module on or off now and for every later snapshot; KeyError if unknown."""
        chains.set_enabled(name, enabled)
        self.switches[name] = enabled
        self.shedder.forget(name)

    async def close(self, chains: HookChains) -> None:
        """The proxy stops: close the current instances and those waiting to be."""
        retired = list(self._retired)
        for handle in self._retired.values():
            handle.cancel()
        self._retired.clear()
        for module in [*retired, *chains.modules.values()]:
            await _close(module)
        if self._closing:
            await asyncio.wait(list(self._closing), timeout=1.0)


async def _close(module: Module) -> None:
    try:
        await module.aclose()
    except Exception:
        log.exception("module %s failed to close", module.name)
