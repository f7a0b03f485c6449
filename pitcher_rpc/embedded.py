"""Configuration files shipped with the package (the repository's ``conf/``)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def embedded_config(name: str) -> str:
    """Text of ``conf/NAME``: from the installed package, else from a source checkout."""
    packaged = resources.files("pitcher_rpc").joinpath("_conf").joinpath(name)
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    # An editable install runs from the checkout, where conf/ sits beside the package.
    return (Path(__file__).resolve().parent.parent / "conf" / name).read_text(encoding="utf-8")
