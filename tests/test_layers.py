"""The layer rules.

``transports/`` stands alone, without the proxy or protobuf. Inside
``pitcher_rpc`` each package imports only the layers below its own (LAYERS).
Codecs and parsers import no asyncio, directly or through what they import.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRANSPORTS = ROOT / "transports"
PACKAGE = ROOT / "pitcher_rpc"
FORBIDDEN = ("pitcher_rpc", "google.protobuf")


def transport_sources() -> list[Path]:
    files = sorted(TRANSPORTS.rglob("*.py"))
    assert files, f"no sources under {TRANSPORTS}"
    return files


def package_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])


def absolute_module(node: ast.ImportFrom, package: str) -> str:
    """The module a ``from ... import`` reads from, relative imports resolved."""
    if not node.level:
        return node.module or ""
    # Resolve relative imports so "from .. import x" cannot hide an escape.
    parts = package.split(".")
    base = parts[: len(parts) - node.level + 1] if node.level <= len(parts) else []
    if not base:
        return "<above the top level>"
    return ".".join([*base, node.module] if node.module else base)


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement, however nested."""
    tree = ast.parse(source)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, absolute_module(node, package)))
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


# -- inside pitcher_rpc: nothing imports upward ----------------------------------

# The layers of pitcher_rpc, lowest first; each name is a subpackage or a top-level
# module. A module may import its own package and any package of a lower layer,
# never one of its own layer (siblings stay independent) nor one above. Derived
# from the imports as they are and from DESIGN.md; where DESIGN.md groups two
# packages that import one way only (modules uses degrade's token buckets, cli
# starts the demo), the one imported sits lower. A dependency meant to go the
# other way is a change to this table, made on purpose.
LAYERS: tuple[tuple[str, ...], ...] = (
    # Generated protobuf classes; the configuration text shipped in the package; the
    # rate-limited warning log.
    ("pb", "embedded", "logs"),
    # Frames <-> protobuf; the sans-IO HTTP/1.1 core. Neither knows the other.
    ("codec", "http"),
    ("config",),
    # Node health, limits, overload shedding, scale-out: configuration applied.
    ("degrade",),
    # A fleet of proxies: what they agree on in etcd (nodes), share in Redis (limits).
    ("fleet",),
    ("modules",),
    # The proxy's request path; the SDK of split services (which runs no proxy).
    ("proxy", "sdk"),
    # The transport benchmark; master, workers and the admin API.
    ("benchmark", "process"),
    ("demo",),
    ("cli_output",),
    ("cli",),
)
LAYER_OF = {name: rank for rank, names in enumerate(LAYERS) for name in names}
ROOT_PACKAGE = "<pitcher_rpc/__init__.py>"  # below every layer: it imports nothing of its own

# Module names in strings that are loaded at run time: importlib.import_module("a.b"),
# __import__("a.b"), and plug-in targets "a.b:Attribute" (entry-point form).
_PLUGIN_TARGET = re.compile(r"pitcher_rpc(?:\.[A-Za-z_]\w*)+:[A-Za-z_][\w.]*")
_IMPORT_CALLS = frozenset(("import_module", "__import__"))
# Run-time loads allowed across layers, with the reason. config/ finds the module
# catalog that checks [modules.NAME] tables by name, as it finds third-party
# modules through entry points; its code depends only on the ModuleCatalog protocol
# it defines, and a caller may pass the catalog instead (then nothing of modules/
# is loaded: tests/config/test_module_catalog.py).
RUNTIME_LOADS_ALLOWED = {
    ("pitcher_rpc/config/modules.py", "pitcher_rpc.modules.registry"),
}


def layer_name(module: str) -> str | None:
    """The entry of LAYERS that ``module`` (a dotted name) belongs to; None outside pitcher_rpc."""
    parts = module.split(".")
    if parts[0] != "pitcher_rpc":
        return None
    return parts[1] if len(parts) > 1 else ROOT_PACKAGE


def rank(name: str) -> int:
    return -1 if name == ROOT_PACKAGE else LAYER_OF[name]


def pitcher_sources() -> list[Path]:
    files = sorted(path for path in PACKAGE.rglob("*.py") if "__pycache__" not in path.parts)
    assert len(files) > 50, f"too few sources under {PACKAGE}"
    return files


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, package: str) -> list[tuple[int, str, str]]:
    """(line, the import as written, each absolute name it loads) for every import.

    Imports at module level, inside functions and under ``if TYPE_CHECKING:`` all
    count: a type-only import upward still ties a lower layer to a higher one (and
    the annotations it names show in the lower layer's API). ``from P import N``
    yields ``P.N``, as N may be a submodule (``from pitcher_rpc import cli``).
    Names in strings that are loaded at run time count too (see _PLUGIN_TARGET).
    """
    found: list[tuple[int, str, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            written = ast.unparse(node)
            found.extend((node.lineno, written, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            written, module = ast.unparse(node), absolute_module(node, package)
            found.extend(
                (node.lineno, written, module if alias.name == "*" else f"{module}.{alias.name}")
                for alias in node.names
            )
        elif isinstance(node, ast.Call) and node.args:
            callee = node.func
            called = callee.attr if isinstance(callee, ast.Attribute) else getattr(callee, "id", "")
            target = node.args[0]
            if (
                called in _IMPORT_CALLS
                and isinstance(target, ast.Constant)
                and isinstance(target.value, str)
            ):
                found.append((node.lineno, ast.unparse(node), target.value))
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and _PLUGIN_TARGET.fullmatch(node.value)
        ):
            found.append((node.lineno, repr(node.value), node.value.partition(":")[0]))
    return sorted(found)


def upward_imports(path: Path, source: str) -> list[str]:
    """Each import of ``path`` that reaches its own layer (another package) or above."""
    relative = path.relative_to(ROOT).as_posix()
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    own = layer_name(name)
    assert own is not None
    offenders = []
    for line, written, target in imports_of(source, package):
        theirs = layer_name(target)
        if theirs is None or theirs == own or (relative, target) in RUNTIME_LOADS_ALLOWED:
            continue
        if theirs not in LAYER_OF and theirs != ROOT_PACKAGE:
            continue  # no such package: the import fails on its own; rank() needs a known name
        if rank(theirs) >= rank(own):
            where = "beside it in its layer" if rank(theirs) == rank(own) else "a layer above"
            offenders.append(f"{relative}:{line}: {written}  ({own} imports {theirs}, {where})")
    return list(dict.fromkeys(offenders))  # once per statement, not once per name


@pytest.mark.parametrize("path", pitcher_sources(), ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_no_module_imports_its_own_layer_or_above(path: Path) -> None:
    offenders = upward_imports(path, path.read_text(encoding="utf-8"))
    assert not offenders, (
        "import only from lower layers (or change LAYERS in tests/test_layers.py on purpose):\n"
        + "\n".join(offenders)
    )


def test_the_layer_table_names_every_package_and_nothing_else() -> None:
    present = {
        path.stem if path.is_file() else path.name
        for path in PACKAGE.iterdir()
        if (path.suffix == ".py" and path.name != "__init__.py")
        # proxy/ has no __init__.py: a namespace package is a package all the same.
        or (path.is_dir() and any(path.glob("*.py")))
    }
    listed = [name for names in LAYERS for name in names]
    assert len(listed) == len(set(listed)), "a package is in two layers"
    assert sorted(present - set(listed)) == [], "add it to LAYERS"
    assert sorted(set(listed) - present) == [], "LAYERS names a package that does not exist"


def test_the_layer_scan_would_see_an_offender() -> None:
    # config/ sits above http and below modules, proxy, sdk, process, demo and cli.
    source = (
        "from __future__ import annotations\n"
        "import importlib\n"
        "from typing import TYPE_CHECKING\n"
        "from pitcher_rpc.http.headers import HOP_BY_HOP\n"
        "from . import model\n"
        "from transports.registry import parse_address\n"
        "from ..modules.registry import CATALOG\n"
        "from pitcher_rpc import proxy, embedded\n"
        "if TYPE_CHECKING:\n"
        "    from pitcher_rpc.sdk import Service\n"
        "def late():\n"
        "    import pitcher_rpc.cli\n"
        "    importlib.import_module('pitcher_rpc.process.master')\n"
        "TARGET = 'pitcher_rpc.demo:run_demo'\n"
        "NOT_A_TARGET = 'see pitcher_rpc.proxy.server for why'\n"
    )
    found = upward_imports(PACKAGE / "config" / "example.py", source)
    assert [entry.split(":", 2)[1] for entry in found] == ["7", "8", "10", "12", "13", "14"]
    assert found[0] == (
        "pitcher_rpc/config/example.py:7: from ..modules.registry import CATALOG"
        "  (config imports modules, a layer above)"
    )
    assert "(config imports proxy, a layer above)" in found[1]
    # Siblings may not lean on each other; the package's __init__ imports nothing.
    [sibling] = upward_imports(PACKAGE / "http" / "example.py", "import pitcher_rpc.codec\n")
    assert sibling.endswith("(http imports codec, beside it in its layer)")
    assert upward_imports(PACKAGE / "__init__.py", "from .codec import decode_request\n")
    assert upward_imports(PACKAGE / "codec.py", "from pitcher_rpc.pb import pitcher_pb2\n") == []


# -- codecs and parsers import no asyncio ----------------------------------------

SANS_IO = sorted(
    {
        "pitcher_rpc.codec",
        "transports.frame",
        "transports.decoder",
        "transports.control",
        # The HTTP/1.1 core has no I/O (DESIGN.md): all of pitcher_rpc/http/, whatever
        # it grows (connection.py), and the configuration, which is pure validation.
        *(module_name(path) for path in sorted((PACKAGE / "http").glob("*.py"))),
        *(module_name(path) for path in sorted((PACKAGE / "config").glob("*.py"))),
    }
)

# Loads the module alone and, if asyncio came with it, names the import chain that
# brought it: every frame of the project's own files on the stack at that moment.
_ASYNCIO_PROBE = """\
import importlib, sys, traceback

class Watch:
    chain = None
    def find_spec(self, name, path=None, target=None):
        if name == "asyncio" and Watch.chain is None:
            Watch.chain = [
                f"{frame.filename}:{frame.lineno}: {frame.line}"
                for frame in traceback.extract_stack()
                if "/pitcher_rpc/" in frame.filename or "/transports/" in frame.filename
            ]
        return None

assert "asyncio" not in sys.modules, "the interpreter loaded asyncio by itself"
sys.meta_path.insert(0, Watch())
importlib.import_module(sys.argv[1])
if "asyncio" in sys.modules:
    print("\\n".join(Watch.chain or ["(no import of ours on the stack)"]))
    sys.exit(1)
"""


@pytest.mark.parametrize("module", SANS_IO)
def test_codecs_and_parsers_load_no_asyncio(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _ASYNCIO_PROBE, module],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert result.returncode == 0, (
        f"importing {module} loads asyncio, through:\n{result.stdout}{result.stderr}"
    )


def test_the_asyncio_probe_would_see_it() -> None:
    # A module of the project that does import asyncio must fail the same probe.
    result = subprocess.run(
        [sys.executable, "-c", _ASYNCIO_PROBE, "transports.stream"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert result.returncode == 1
    assert "transports/stream" in result.stdout
