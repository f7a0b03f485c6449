"""The layer rule: ``transports/`` stands alone, without the proxy or protobuf."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRANSPORTS = ROOT / "transports"
FORBIDDEN = ("pitcher_rpc", "google.protobuf")


def transport_sources() -> list[Path]:
    files = sorted(TRANSPORTS.rglob("*.py"))
    assert files, f"no sources under {TRANSPORTS}"
    return files


def package_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement, however nested."""
    tree = ast.parse(source)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # Resolve relative imports so "from .. import x" cannot hide an escape.
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1] if node.level <= len(parts) else []
                module = ".".join([*base, node.module] if node.module else base)
                if not base:
                    module = "<above the top level>"
            else:
                module = node.module or ""
            found.append((node.lineno, module))
    return sorted(found)


def is_forbidden(module: str) -> bool:
    return module == "<above the top level>" or any(
        module == name or module.startswith(name + ".") for name in FORBIDDEN
    )


@pytest.mark.parametrize("path", transport_sources(), ids=lambda p: p.name)
def test_no_transport_source_imports_the_proxy_or_protobuf(path: Path) -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: imports {module}"
        for line, module in imported_modules(path.read_text(), package_of(path))
        if is_forbidden(module)
    ]
    assert not offenders, "transports/ must stand alone:\n" + "\n".join(offenders)


def test_the_import_scan_would_see_an_offender() -> None:
    # The rule is only as good as the scanner; prove it catches every spelling.
    assert is_forbidden("pitcher_rpc")
    assert is_forbidden("pitcher_rpc.pb.pitcher_pb2")
    assert is_forbidden("google.protobuf.message")
    assert not is_forbidden("pitcher_rpcx")
    source = (
        "import os\n"
        "def f():\n    import pitcher_rpc.config\n"
        "from .. import sneaky\n"
        "from google.protobuf import message\n"
        "from .frame import HEADER\n"
    )
    modules = imported_modules(source, "transports")
    assert [m for _, m in modules] == [
        "os",
        "pitcher_rpc.config",
        "<above the top level>",
        "google.protobuf",
        "transports.frame",
    ]
    assert [m for _, m in modules if is_forbidden(m)] == [
        "pitcher_rpc.config",
        "<above the top level>",
        "google.protobuf",
    ]


def test_importing_every_transport_module_loads_neither_proxy_nor_protobuf() -> None:
    script = (
        "import importlib, pkgutil, sys\n"
        "import transports\n"
        "names = [m.name for m in pkgutil.walk_packages(transports.__path__, 'transports.')]\n"
        "assert names, 'found no transport modules'\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "from transports.registry import get_transport\n"
        "get_transport('tcp'); get_transport('unix')\n"
        "bad = sorted(m for m in sys.modules if m == 'pitcher_rpc'"
        " or m.startswith(('pitcher_rpc.', 'google.protobuf')))\n"
        "print(len(names), bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, cwd=ROOT
    )
    assert result.returncode == 0, (result.stdout, result.stderr)
    count, loaded = result.stdout.split(" ", 1)
    assert int(count) >= 7
    assert loaded.strip() == "[]"
