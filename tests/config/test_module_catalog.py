"""[modules.NAME] tables are checked through a catalog the caller may pass: config/
knows no module of its own and imports nothing of modules/."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

import pytest

from pitcher_rpc.config import ConfigError, load_config, parse_config
from pitcher_rpc.config.modules import ModuleCatalog, ModuleSpec, default_catalog

ROOT = Path(__file__).resolve().parents[2]
ROUTES = """\
[[routes]]
cluster = "echo"

[clusters.echo]
nodes = ["tcp://127.0.0.1:7101"]
"""


class Point(Enum):
    EARLY = "early"
    LATE = "late"


class Beacon:
    """A module class as the configuration sees one: priority, hooks, a settings check."""

    priority: ClassVar[int] = 10

    @classmethod
    def validate(cls, settings: Mapping[str, Any]) -> Mapping[str, Any]:
        unknown = set(settings) - {"every"}
        if unknown:
            raise ValueError(f"unknown key {sorted(unknown)[0]!r}")
        every = settings.get("every", 1)
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        return {"every": every}  # the checked form, defaults filled in

    @classmethod
    def hooks(cls) -> tuple[Enum, ...]:
        return (Point.EARLY,)


class Lamp(Beacon):
    """Same priority and hook as Beacon: two of them could run in no defined order."""


class Catalog:
    def __init__(self, defaults: tuple[str, ...] = ()) -> None:
        self._defaults = defaults
        self.asked: list[str] = []

    @property
    def defaults(self) -> tuple[str, ...]:
        return self._defaults

    def spec(self, name: str) -> ModuleSpec:
        self.asked.append(name)
        known = {"beacon": Beacon, "lamp": Lamp}
        if name not in known:
            raise LookupError(f"no such module {name!r} here")
        return known[name]


def problems(text: str, catalog: ModuleCatalog) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "m.toml", modules=catalog)
    return [str(issue) for issue in info.value.errors]


def test_a_catalog_given_by_the_caller_checks_the_module_tables() -> None:
    catalog = Catalog()
    text = ROUTES + "[modules.beacon]\nenabled = false\nevery = 3\n"
    config = parse_config(text, modules=catalog)
    assert catalog.asked == ["beacon"]
    [module] = config.modules
    assert (module.name, module.enabled, dict(module.settings)) == ("beacon", False, {"every": 3})


def test_the_catalogs_defaults_are_loaded_without_a_table() -> None:
    config = parse_config(ROUTES, modules=Catalog(defaults=("beacon",)))
    assert [(m.name, m.enabled, dict(m.settings)) for m in config.modules] == [
        ("beacon", True, {"every": 1})
    ]
    assert parse_config(ROUTES, modules=Catalog()).modules == ()


def test_a_modules_refusal_is_reported_at_its_key_and_an_unknown_name_at_its_table() -> None:
    text = ROUTES + "[modules.beacon]\nevery = 0\n\n[modules.nope]\n"
    assert problems(text, Catalog()) == [
        "m.toml:7: modules.beacon.every: module beacon: every must be a positive integer, got 0",
        "m.toml:9: modules.nope: no such module 'nope' here",
    ]


def test_two_modules_at_one_priority_on_one_hook_are_refused() -> None:
    text = ROUTES + "[modules.beacon]\n[modules.lamp]\n"
    assert problems(text, Catalog()) == [
        "m.toml:7: modules.lamp: shares priority 10 with module 'beacon' on EARLY"
    ]


def test_load_config_passes_the_catalog_on(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text(ROUTES + "[modules.beacon]\n")
    catalog = Catalog()
    assert [m.name for m in load_config(path, modules=catalog).modules] == ["beacon"]
    assert catalog.asked == ["beacon"]


def test_without_a_catalog_the_built_in_modules_are_known() -> None:
    from pitcher_rpc.modules import registry

    assert default_catalog() is registry.CATALOG
    assert [m.name for m in parse_config(ROUTES).modules] == list(registry.DEFAULT_MODULES)
    with pytest.raises(ConfigError, match=r"modules\.beacon: no module named 'beacon'"):
        parse_config(ROUTES + "[modules.beacon]\n")


def test_with_a_catalog_of_its_own_config_loads_nothing_of_modules() -> None:
    script = (
        "import sys\n"
        "from pitcher_rpc.config import parse_config\n"
        "from tests.config.test_module_catalog import ROUTES, Catalog\n"
        "config = parse_config(ROUTES + '[modules.beacon]\\n', modules=Catalog())\n"
        "assert [m.name for m in config.modules] == ['beacon']\n"
        "print(sorted(m for m in sys.modules if m.startswith('pitcher_rpc.')"
        " and not m.startswith('pitcher_rpc.config')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
