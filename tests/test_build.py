"""The two builds of the request path: compiled by mypyc, or pure Python.

CI runs the whole suite on the compiled build and, on the pure-Python one,
the tests whose subject is compiled (tests/conftest.py ONE_BUILD); it says
which build it expects in PITCHER_EXPECT_BUILD ("compiled" or "pure"), and
the first test then proves that the modules of that build were the ones
imported in this run.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from transports import native

ROOT = Path(__file__).resolve().parents[1]
EXTENSION_SUFFIXES = tuple(importlib.machinery.EXTENSION_SUFFIXES)


def loaded_from(names: tuple[str, ...]) -> dict[str, str]:
    """Each module's file kind as imported in this process: "compiled" or "pure"."""
    kinds = {}
    for name in names:
        path = importlib.import_module(name).__file__ or ""
        kinds[name] = "compiled" if path.endswith(EXTENSION_SUFFIXES) else "pure"
    return kinds


def test_every_module_of_the_request_path_comes_from_the_build_chosen() -> None:
    build = native.choose()
    expected = "compiled" if build.compiled else "pure"
    assert set(loaded_from(native.COMPILED).values()) == {expected}, build.reason
    asked = os.environ.get("PITCHER_EXPECT_BUILD")
    if asked is not None:
        assert asked in ("compiled", "pure"), f"PITCHER_EXPECT_BUILD={asked!r}"
        assert expected == asked, f"this run was to test the {asked} build: {build.reason}"


def test_the_compiled_modules_are_the_sources_of_the_package() -> None:
    # Every module named for compiling exists as source, and setup.py builds
    # exactly that list (read by it from the same file).
    for name in native.COMPILED:
        assert native.module_source(name).is_file(), name
    setup = (ROOT / "setup.py").read_text()
    assert 'NATIVE["COMPILED"]' in setup


def test_pure_python_is_run_when_the_environment_asks_for_it() -> None:
    script = (
        "import json, transports.native as n, importlib\n"
        "files = {m: importlib.import_module(m).__file__ for m in n.COMPILED}\n"
        "print(json.dumps({'reason': n.describe(), 'files': files}))\n"
    )
    env = {**os.environ, native.PURE_ENV: "1"}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    seen = json.loads(out.stdout)
    assert seen["reason"] == "pure Python (PITCHER_PURE_PYTHON is set)"
    assert all(path.endswith(".py") for path in seen["files"].values()), seen["files"]


def test_the_version_and_the_startup_lines_say_which_build_runs() -> None:
    from pitcher_rpc.cli import main

    result = CliRunner().invoke(main, ["--version"], prog_name="pitcher")
    assert result.exit_code == 0
    assert result.output.startswith("pitcher, version ")
    assert result.output.endswith(f", {native.describe()}\n")


# -- the choice, on a tree of real files made for it -------------------------

MODULES = ("pkg.fast", "pkg.sub.faster")


def make_tree(root: Path, *, compiled: bool = True, manifest: bool = True) -> None:
    for name in MODULES:
        source = native.module_source(name, root)
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text(f"NAME = {name!r}\n")
        if compiled:
            source.with_name(source.stem + EXTENSION_SUFFIXES[0]).write_bytes(b"\x7fELF")
    if manifest:
        digests = {name: native.source_digest(native.module_source(name, root)) for name in MODULES}
        (root / "transports").mkdir(exist_ok=True)
        (root / "transports" / native.MANIFEST).write_text(
            json.dumps({"compiler": "mypyc 9.9", "modules": digests})
        )


def choice(root: Path, **env: str) -> native.Build:
    return native.inspect_build(root, MODULES, env)


def test_a_complete_build_with_matching_sources_is_taken(tmp_path: Path) -> None:
    make_tree(tmp_path)
    build = choice(tmp_path)
    assert build.compiled
    assert str(build) == "compiled (mypyc 9.9, 2 modules)"


def test_the_environment_overrides_a_complete_build(tmp_path: Path) -> None:
    make_tree(tmp_path)
    assert not choice(tmp_path, PITCHER_PURE_PYTHON="1").compiled
    assert choice(tmp_path, PITCHER_PURE_PYTHON="0").compiled
    assert choice(tmp_path, PITCHER_PURE_PYTHON="").compiled


def test_an_edited_source_is_run_instead_of_its_stale_extension(tmp_path: Path) -> None:
    make_tree(tmp_path)
    native.module_source("pkg.sub.faster", tmp_path).write_text("NAME = 'edited'\n")
    build = choice(tmp_path)
    assert not build.compiled
    assert "pkg/sub/faster.py changed since it was compiled" in build.reason


def test_a_partial_build_is_not_mixed_with_sources(tmp_path: Path) -> None:
    make_tree(tmp_path)
    source = native.module_source("pkg.fast", tmp_path)
    source.with_name(source.stem + EXTENSION_SUFFIXES[0]).unlink()
    build = choice(tmp_path)
    assert not build.compiled
    assert "pkg.fast is missing" in build.reason


@pytest.mark.parametrize("damage", ["missing", "not json", "no digests"])
def test_extensions_without_a_readable_manifest_are_not_trusted(
    tmp_path: Path, damage: str
) -> None:
    make_tree(tmp_path, manifest=damage != "missing")
    manifest = tmp_path / "transports" / native.MANIFEST
    if damage == "not json":
        manifest.write_text("{")
    elif damage == "no digests":
        manifest.write_text(json.dumps({"compiler": "mypyc 9.9"}))
    build = choice(tmp_path)
    assert not build.compiled
    assert "no readable build manifest" in build.reason


def test_a_tree_without_extensions_is_pure_python(tmp_path: Path) -> None:
    make_tree(tmp_path, compiled=False, manifest=False)
    assert str(choice(tmp_path)) == "pure Python (no compiled modules in this install)"


def test_the_source_finder_loads_the_py_file_beside_an_extension(tmp_path: Path) -> None:
    make_tree(tmp_path)
    finder = native._SourceFinder(MODULES)
    spec = finder.find_spec("pkg.sub.faster", [str(tmp_path / "pkg" / "sub")])
    assert spec is not None and spec.origin == str(tmp_path / "pkg" / "sub" / "faster.py")
    assert finder.find_spec("pkg.other", [str(tmp_path / "pkg")]) is None


def test_every_source_directory_is_a_package_the_build_ships() -> None:
    # setup.py ships what find_packages() finds; a directory without an
    # __init__.py would be left out of an installed (non-editable) package.
    from setuptools import find_packages

    found = set(find_packages(str(ROOT), include=["pitcher_rpc*", "transports*"]))
    with_sources = {
        ".".join(path.parent.relative_to(ROOT).parts)
        for top in ("pitcher_rpc", "transports")
        for path in (ROOT / top).rglob("*.py")
    }
    assert with_sources <= found, sorted(with_sources - found)


def test_the_tests_left_to_one_build_exist_and_touch_no_compiled_module() -> None:
    from tests.conftest import ONE_BUILD

    compiled_sources = {name.replace(".", "/") for name in native.COMPILED}
    for entry in ONE_BUILD:
        path = ROOT / entry
        assert path.is_dir() if entry.endswith("/") else path.is_file(), entry
        # A test file named after a compiled module tests it: it runs on both builds.
        stem = path.stem.removeprefix("test_")
        assert not any(source.endswith("/" + stem) for source in compiled_sources), entry
