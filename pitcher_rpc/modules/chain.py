"""Ordered handler chains per hook, per route; isolation of failures; runtime on/off.

Chains are tuples built once (at load, and again when a module is switched
on or off), so a request pays one tuple iteration per hook and nothing for a
module that is off: an empty chain is an empty tuple.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .base import Answer, Hook, Module

log = logging.getLogger("pitcher.modules")

Handler = tuple[Module, Callable[..., Any]]


class Chains:
    """One tuple of handlers per hook, as attributes: the hot path reads one of them.

    (An Enum-keyed dict would hash the member in Python on every lookup.)
    """

    __slots__ = (
        "after_cluster",
        "backend_response",
        "before_cluster",
        "on_accept",
        "on_finish",
        "request_finish",
    )
    on_accept: tuple[Handler, ...]
    before_cluster: tuple[Handler, ...]
    after_cluster: tuple[Handler, ...]
    backend_response: tuple[Handler, ...]
    request_finish: tuple[Handler, ...]
    on_finish: tuple[Handler, ...]

    def __init__(self, handlers: Mapping[Hook, tuple[Handler, ...]]) -> None:
        for hook in Hook:
            setattr(self, hook.method, handlers.get(hook, ()))

    def of(self, hook: Hook) -> tuple[Handler, ...]:
        return getattr(self, hook.method)


_MODULE_FAILED = 500


class ModuleFailure(Exception):
    """A module set that cannot be loaded (a priority tie, an unknown name)."""


class HookChains:
    """The modules of one snapshot: the default chains and each route's own."""

    def __init__(
        self,
        modules: Iterable[Module],
        disabled: Iterable[str] = (),
        route_orders: Mapping[str, Sequence[str]] | None = None,
        shed: Iterable[str] = (),
        essential: Mapping[str, bool] | None = None,
    ) -> None:
        self.modules: dict[str, Module] = {}
        for module in modules:
            if module.name in self.modules:
                raise ModuleFailure(f"module {module.name!r} is loaded twice")
            self.modules[module.name] = module
        self.route_orders = dict(route_orders or {})
        for route, names in self.route_orders.items():
            unknown = [name for name in names if name not in self.modules]
            if unknown:
                raise ModuleFailure(f"route {route!r} names unknown modules {unknown}")
        self._check_priorities()
        self.disabled = {name for name in disabled if name in self.modules}
        # Switched off for now by overload shedding (pitcher_rpc.degrade.overload).
        self.shed = {name for name in shed if name in self.modules}
        # Whether each module may be shed: its own say, unless the configuration's.
        self.essential = {
            name: (essential or {}).get(name, module.essential)
            for name, module in self.modules.items()
        }
        self.failures: Counter[str] = Counter()
        self.default = Chains({})
        self.routes: dict[str, Chains] = {}
        self.timed = False
        self._build()

    def _check_priorities(self) -> None:
        for hook in Hook:
            seen: dict[int, str] = {}
            for module in self.modules.values():
                if hook in module.hooks():
                    other = seen.setdefault(module.priority, module.name)
                    if other != module.name:
                        raise ModuleFailure(
                            f"modules {other!r} and {module.name!r} share priority"
                            f" {module.priority} on {hook.name}: order must be explicit"
                        )

    def _chains(self, ordered: Sequence[Module]) -> Chains:
        return Chains(
            {
                hook: tuple(
                    (module, getattr(module, hook.method))
                    for module in ordered
                    if module.name not in self.disabled
                    and module.name not in self.shed
                    and hook in module.hooks()
                )
                for hook in Hook
            }
        )

    def _build(self) -> None:
        by_priority = sorted(self.modules.values(), key=lambda m: -m.priority)
        self.default = self._chains(by_priority)
        self.routes = {
            route: self._chains([self.modules[name] for name in names])
            for route, names in self.route_orders.items()
        }
        # Whether a request's times are worth taking: only modules that run at
        # REQUEST_FINISH (an access log, metrics) read them.
        self.timed = bool(self.default.request_finish) or any(
            chains.request_finish for chains in self.routes.values()
        )

    def for_route(self, route: str) -> Chains:
        return self.routes.get(route, self.default)

    def set_enabled(self, name: str, enabled: bool) -> None:
        """Switch a module on or off for every route; KeyError for an unknown name."""
        if name not in self.modules:
            raise KeyError(name)
        if enabled:
            self.disabled.discard(name)
        else:
            self.disabled.add(name)
        self.shed.discard(name)
        self._build()

    def set_shed(self, shed: Iterable[str]) -> None:
        """The modules overload shedding has switched off now."""
        self.shed = {name for name in shed if name in self.modules}
        self._build()

    def sheddable(self) -> list[str]:
        """Modules on now that are not essential, lowest priority first."""
        return [
            module.name
            for module in sorted(self.modules.values(), key=lambda m: m.priority)
            if not self.essential[module.name]
            and module.name not in self.disabled
            and module.name not in self.shed
        ]

    def run(self, handlers: tuple[Handler, ...], argument: Any) -> Answer | None:
        """Call each handler with ``argument`` (the exchange, or the connection) in order.

        The first Answer ends the chain.

        A handler that raises is logged with its module's name and counted;
        the chain goes on without it, or, for a module whose policy is
        "fail", the request is answered 500.
        """
        for module, handler in handlers:
            try:
                answer = handler(argument)
            except Exception:
                self.failures[module.name] += 1
                log.exception("module %s failed", module.name)
                if module.failure_policy == "fail":
                    return Answer(_MODULE_FAILED, f"module {module.name} failed")
                continue
            if answer is not None:
                return answer
        return None

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "name": module.name,
                "priority": module.priority,
                "essential": self.essential[module.name],
                "enabled": module.name not in self.disabled,
                "shed": module.name in self.shed,
                "hooks": [hook.name for hook in module.hooks()],
                "failures": self.failures[module.name],
                "stats": _stats(module),
            }
            for module in sorted(self.modules.values(), key=lambda m: -m.priority)
        ]


def _stats(module: Module) -> dict[str, Any]:
    try:
        return module.stats()
    except Exception:
        log.exception("module %s failed to report", module.name)
        return {"error": "failed to report"}


EMPTY = HookChains(())
