"""The sections of a configuration about modules and degradation.

``[modules.NAME]`` (each module checks its own settings, found through the
catalog of config/modules.py; its error is reported at the line of the key it
names), ``[overload]``, a cluster's ``health`` and
``scale_out`` tables, and a route's ``business``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from .checks import Checks
from .health import HealthPolicy
from .issues import one_of_message, show, type_message
from .lines import KeyPath
from .model import (
    DEFAULT_FAILURES,
    FAILURE_KINDS,
    HealthConfig,
    ModuleConfig,
    OverloadConfig,
    ScaleOutConfig,
)
from .modules import ModuleCatalog
from .schema import OVERLOAD_KEYS, SCALE_OUT_KEYS

_BUSINESS_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# What a module's error message names first: "rate must be ...", "business.shop.rate
# must ...", "unknown key 'colour'".
_LEADING_KEY = re.compile(r"(?:unknown key '([^']+)'|([A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*))")


def _key_named(section: Mapping[str, Any], path: KeyPath, message: str) -> KeyPath:
    """The path of the key a module's error names, when it is in ``section``; else ``path``.

    So the line reported is the key's, not the table's.
    """
    match = _LEADING_KEY.match(message)
    if match is None:
        return path
    parts = (match.group(1) or match.group(2)).split(".")
    table: Any = section
    for part in parts:
        if not isinstance(table, Mapping) or part not in table:
            return path
        table = table[part]
    return (*path, *parts)


class PolicySections(Checks):
    __slots__ = ("_businesses", "_catalog", "_module_names")

    def __init__(self, text: str, source: str, catalog: ModuleCatalog) -> None:
        super().__init__(text, source)
        self._catalog = catalog
        self._module_names: set[str] = set()
        # Businesses the throttle module has quotas for (None: no quota table).
        self._businesses: set[str] | None = None

    def _overload(self, document: Mapping[str, Any]) -> OverloadConfig:
        path: KeyPath = ("overload",)
        table = self._table(document, path)
        defaults = OverloadConfig()
        if table is None:
            return defaults
        self._check_keys(table, path, OVERLOAD_KEYS)
        mode = self._string(table, (*path, "mode")) or defaults.mode
        if mode not in ("enforce", "detect", "off"):
            self.report((*path, "mode"), f'must be "enforce", "detect" or "off", got {show(mode)}')
        config = OverloadConfig(
            mode=mode,
            lag_high=self._seconds(table, (*path, "lag_high"), defaults.lag_high),
            lag_low=self._seconds(table, (*path, "lag_low"), defaults.lag_low),
            in_flight_high=self._integer(table, (*path, "in_flight_high"), 0, 0),
            in_flight_low=self._integer(table, (*path, "in_flight_low"), 0, 0),
            recover_after=self._seconds(table, (*path, "recover_after"), defaults.recover_after),
            step=self._seconds(table, (*path, "step"), defaults.step),
        )
        if config.lag_low > config.lag_high:
            self.report((*path, "lag_low"), "must not be above lag_high")
        if config.in_flight_low > config.in_flight_high:
            self.report((*path, "in_flight_low"), "must not be above in_flight_high")
        return config

    def _scale_out(self, cluster: Mapping[str, Any], path: KeyPath) -> ScaleOutConfig | None:
        table = self._table(cluster, path)
        if table is None:
            return None
        self._check_keys(table, path, SCALE_OUT_KEYS)
        command = table.get("command")
        if (
            not isinstance(command, list)
            or not command
            or not all(isinstance(part, str) and part for part in command)
        ):
            self.report(
                (*path, "command"),
                "required: the program and its arguments, as an array of strings (no shell)",
            )
            return None
        below = table.get("below", 0.5)
        if isinstance(below, bool) or not isinstance(below, int | float) or not 0 < below <= 1:
            self.report((*path, "below"), f"must be a share in (0, 1], got {below!r}")
        detect = self._boolean(table, (*path, "detect_only"))
        return ScaleOutConfig(
            command=tuple(command),
            below=float(below) if isinstance(below, int | float) else 0.5,
            cooldown=self._seconds(table, (*path, "cooldown"), 300.0),
            timeout=self._seconds(table, (*path, "timeout"), 60.0),
            detect_only=bool(detect),
        )

    def _health(self, cluster: Mapping[str, Any], path: KeyPath) -> HealthConfig | None:
        table = self._table(cluster, path)
        if table is None:
            return None
        settings = dict(table)
        failures = settings.pop("failures", None)
        kinds = DEFAULT_FAILURES
        if failures is not None:
            if not isinstance(failures, list) or not all(isinstance(f, str) for f in failures):
                self.report((*path, "failures"), type_message("an array of strings", failures))
            else:
                for index, kind in enumerate(failures):
                    if kind not in FAILURE_KINDS:
                        self.report((*path, "failures", index), one_of_message(kind, FAILURE_KINDS))
                kinds = frozenset(failures)
        ramp = HealthConfig().ramp_in_flight
        if "ramp_in_flight" in settings:
            settings.pop("ramp_in_flight")
            ramp = self._integer(table, (*path, "ramp_in_flight"), ramp, 1, 1_000_000)
        try:
            policy = HealthPolicy.from_settings(settings)
        except ValueError as exc:
            # "key: message; key: message": each reported at its own key.
            for problem in str(exc).split("; "):
                key, _, message = problem.partition(": ")
                where = (*path, key) if key in table else path
                self.report(where, message if key in table else problem)
            return None
        return HealthConfig(policy=policy, failures=kinds, ramp_in_flight=ramp)

    def _business(self, item: Mapping[str, Any], path: KeyPath) -> str:
        value = self._string(item, path)
        if value is None:
            return "default"
        if _BUSINESS_NAME.fullmatch(value) is None:
            self.report(path, f"must be a name of letters, digits, - and _, got {show(value)}")
        elif self._businesses is not None and value not in self._businesses | {"default"}:
            known = sorted(self._businesses)
            close = difflib.get_close_matches(value, known, n=1)
            hint = f"; did you mean {show(close[0])}?" if close else ""
            self.report(
                path,
                f"no [modules.throttle.business.{value}] quota (known: {', '.join(known)}){hint}",
            )
        return value

    def _route_modules(self, item: Mapping[str, Any], path: KeyPath) -> tuple[str, ...] | None:
        value = item.get("modules")
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
            self.report(path, type_message("an array of module names", value))
            return None
        for index, name in enumerate(value):
            if name not in self._module_names:
                self.report((*path, index), f"no [modules.{name}] table configures {show(name)}")
        if len(set(value)) != len(value):
            self.report(path, "names a module twice")
        return tuple(value)

    def _modules(self, document: Mapping[str, Any]) -> tuple[ModuleConfig, ...]:
        path: KeyPath = ("modules",)
        table = dict(self._table(document, path) or {})
        # Modules loaded without a table of their own (they can be switched off in one).
        for name in self._catalog.defaults:
            table.setdefault(name, {})
        modules = []
        priorities: dict[tuple[Any, int], str] = {}
        for name, section in table.items():
            section_path = (*path, name)
            if not isinstance(section, Mapping):
                self.report(section_path, type_message("a table", section))
                continue
            try:
                cls = self._catalog.spec(name)
            except LookupError as exc:
                self.report(section_path, str(exc))
                continue
            enabled = self._boolean(section, (*section_path, "enabled"))
            essential = self._boolean(section, (*section_path, "essential"))
            settings = {
                key: value for key, value in section.items() if key not in ("enabled", "essential")
            }
            try:
                checked = cls.validate(settings)
            except (ValueError, TypeError) as exc:
                self.report(_key_named(section, section_path, str(exc)), f"module {name}: {exc}")
                continue
            modules.append(
                ModuleConfig(
                    name=name,
                    enabled=True if enabled is None else enabled,
                    essential=essential,
                    settings=MappingProxyType(dict(checked)),
                )
            )
            # Two modules at one priority on one hook would run in no defined order.
            for hook in cls.hooks():
                other = priorities.setdefault((hook, cls.priority), name)
                if other != name:
                    self.report(
                        section_path,
                        f"shares priority {cls.priority} with module {other!r} on {hook.name}",
                    )
        return tuple(modules)
