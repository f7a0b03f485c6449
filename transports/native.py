"""Which build of the hot path this process runs: compiled by mypyc, or pure Python.

``pip install .`` compiles the modules named in ``COMPILED`` with mypyc when a
C compiler is at hand (see ``setup.py``); the ``.py`` files are installed
beside the extensions either way, and are the one source of both builds.
The choice is made once per process, before any of those modules is
imported (``transports/__init__.py`` calls :func:`choose`), and it is all or
nothing, because compiled modules call each other directly:

- ``PITCHER_PURE_PYTHON=1`` asks for the pure-Python modules;
- the compiled ones are taken only when every one is there and the build's
  manifest (``native.json``, written by the build) shows that each was
  compiled from the very source beside it; an edited checkout runs its
  edits, not a stale extension, until it is built again.

When the pure modules are chosen while extensions are present, an import
finder put first in ``sys.meta_path`` loads those names from their ``.py``
files.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType

# The modules of the request path on both sides, compiled as one group: the
# proxy's HTTP connection, exchange, codec and the built-in modules it runs per
# request; the transports' stream and UDP clients and servers; the SDK's
# server path. Order does not matter.
COMPILED = (
    "pitcher_rpc.codec",
    "pitcher_rpc.degrade.limits",
    "pitcher_rpc.http.connection",
    "pitcher_rpc.http.headers",
    "pitcher_rpc.http.parser",
    "pitcher_rpc.http.request",
    "pitcher_rpc.http.response",
    "pitcher_rpc.modules.access_log",
    "pitcher_rpc.modules.base",
    "pitcher_rpc.modules.chain",
    "pitcher_rpc.modules.metrics",
    "pitcher_rpc.modules.request_id",
    "pitcher_rpc.modules.throttle",
    "pitcher_rpc.process.admin_http",
    "pitcher_rpc.proxy.balance",
    "pitcher_rpc.proxy.exchange",
    "pitcher_rpc.proxy.frontend",
    "pitcher_rpc.proxy.glue",
    "pitcher_rpc.proxy.module_host",
    "pitcher_rpc.proxy.routing",
    "pitcher_rpc.proxy.snapshot",
    "pitcher_rpc.proxy.upstream",
    "pitcher_rpc.sdk.service",
    "transports.bodies",
    "transports.datagram",
    "transports.decoder",
    "transports.flow",
    "transports.frame",
    "transports.handlers",
    "transports.stream_client",
    "transports.stream_io",
    "transports.stream_server",
    "transports.udp_client",
    "transports.udp_server",
)

# Set to anything but "" or "0": run the pure-Python modules.
PURE_ENV = "PITCHER_PURE_PYTHON"
# Written by the build beside this file: the compiler and each module's source digest.
MANIFEST = "native.json"

# The directory holding the pitcher_rpc and transports packages.
_ROOT = Path(__file__).resolve().parent.parent


class Build:
    """What :func:`choose` decided, and why; ``extensions``: whether any are installed."""

    __slots__ = ("compiled", "extensions", "reason")

    def __init__(self, compiled: bool, reason: str, extensions: bool) -> None:
        self.compiled = compiled
        self.reason = reason
        self.extensions = extensions

    def __str__(self) -> str:
        return self.reason


def source_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def module_source(name: str, root: Path = _ROOT) -> Path:
    return root.joinpath(*name.split(".")).with_suffix(".py")


def module_extension(name: str, root: Path = _ROOT) -> Path | None:
    """The compiled extension of module ``name`` under ``root``, if there is one."""
    stem = root.joinpath(*name.split("."))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = stem.with_name(stem.name + suffix)
        if candidate.is_file():
            return candidate
    return None


def inspect_build(
    root: Path = _ROOT, modules: Sequence[str] = COMPILED, env: Mapping[str, str] | None = None
) -> Build:
    """Which build the files under ``root`` allow, given the environment."""
    if env is None:
        env = os.environ
    present = [name for name in modules if module_extension(name, root) is not None]

    def pure(reason: str) -> Build:
        return Build(False, f"pure Python ({reason})", bool(present))

    if env.get(PURE_ENV, "") not in ("", "0"):
        return pure(f"{PURE_ENV} is set")
    if not present:
        return pure("no compiled modules in this install")
    missing = [name for name in modules if name not in present]
    if missing:
        return pure(f"compiled build incomplete: {missing[0]} is missing")
    manifest_path = root / "transports" / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        digests: dict[str, str] = manifest["modules"]
        compiler = str(manifest["compiler"])
    except (OSError, ValueError, KeyError, TypeError):
        return pure(f"no readable build manifest at {manifest_path}")
    for name in modules:
        source = module_source(name, root)
        try:
            digest = source_digest(source)
        except OSError:
            return pure(f"{source} is missing")
        if digests.get(name) != digest:
            relative = source.relative_to(root)
            return pure(f"{relative} changed since it was compiled; install again to rebuild")
    return Build(True, f"compiled ({compiler}, {len(modules)} modules)", True)


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Loads the compiled modules' names from their ``.py`` files."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = frozenset(names)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.names:
            return None
        leaf = fullname.rpartition(".")[2] + ".py"
        for entry in path or sys.path:
            source = os.path.join(entry, leaf)
            if os.path.isfile(source):
                return importlib.util.spec_from_file_location(fullname, source)
        return None


_chosen: Build | None = None


def choose() -> Build:
    """Decide this process's build (once) and make imports follow it."""
    global _chosen
    if _chosen is not None:
        return _chosen
    build = inspect_build()
    if not build.compiled and build.extensions:
        sys.meta_path.insert(0, _SourceFinder(COMPILED))
    _chosen = build
    return build


def describe() -> str:
    """One line for logs and ``--version``: which build runs, and why."""
    return choose().reason
