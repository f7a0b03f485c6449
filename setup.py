"""Build of the package: the request path compiled by mypyc when it can be.

Everything else about the package is in pyproject.toml. The modules listed in
``transports/native.py`` are compiled from their own ``.py`` files (which are
installed too); when mypyc or a C compiler is missing, or the compilation
fails, or ``PITCHER_PURE_PYTHON=1`` is set, the package is built pure Python
and runs the same way, slower. The build writes ``transports/native.json``:
which compiler ran and a digest of each source, so that an extension is only
ever used with the source it was compiled from.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
NATIVE = runpy.run_path(str(HERE / "transports" / "native.py"))
MODULES: tuple[str, ...] = NATIVE["COMPILED"]
PURE = os.environ.get(NATIVE["PURE_ENV"], "") not in ("", "0")


def note(message: str) -> None:
    print(f"pitcher-rpc build: {message}", file=sys.stderr)


def sources() -> list[str]:
    """The compiled modules' files, relative to the project root (where builds run)."""
    return [str(NATIVE["module_source"](name, Path())) for name in MODULES]


# The commands that build extensions; the others (metadata, sdist) need no mypyc run.
BUILDING = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}


def compiled_extensions() -> list:
    if BUILDING.isdisjoint(sys.argv[1:]):
        return []
    if PURE:
        note(f"{NATIVE['PURE_ENV']} is set: building pure Python")
        return []
    try:
        from mypyc.build import mypycify
    except ImportError as exc:
        note(f"mypyc is not available ({exc}): building pure Python")
        return []
    try:
        return mypycify(sources(), opt_level="3", group_name="pitcher_rpc_native")
    except (Exception, SystemExit) as exc:  # mypyc exits on a type error
        note(f"mypyc could not compile the request path ({exc!r}): building pure Python")
        return []


class OptionalBuildExt(build_ext):
    """Builds the extensions, or none of them: a failure leaves the pure package."""

    def run(self) -> None:
        if not self.extensions:
            return
        manifest = Path(self.get_ext_fullpath("transports.native")).with_name("native.json")
        manifest.unlink(missing_ok=True)
        try:
            super().run()
        except Exception as exc:  # no C compiler, a compile error, a missing header
            note(f"compiling failed ({exc}): building pure Python")
            for ext in self.extensions:
                Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
            return
        import mypy.version

        # The digest the import-time check compares with (transports/native.py).
        digests = {
            name: NATIVE["source_digest"](NATIVE["module_source"](name, HERE)) for name in MODULES
        }
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text(
            json.dumps({"compiler": f"mypyc {mypy.version.__version__}", "modules": digests})
            + "\n",
            encoding="utf-8",
        )
        note(f"compiled {len(MODULES)} modules with mypyc; manifest {manifest}")


setup(
    packages=[*find_packages(include=["pitcher_rpc*", "transports*"]), "pitcher_rpc._conf"],
    # The repository's conf/ (the demo's configuration, service files) ships
    # inside the package (pitcher_rpc/embedded.py reads it from there).
    package_dir={"pitcher_rpc._conf": "conf"},
    package_data={
        "pitcher_rpc": ["py.typed", "pb/*.pyi", "process/status_page.html"],
        "pitcher_rpc._conf": ["*.toml", "*.service", "*.conf"],
    },
    ext_modules=compiled_extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
)
