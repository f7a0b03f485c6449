"""Fixtures every test folder may use: the launcher of real processes (see tests/proxy)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.proxy.conftest import Launcher


@pytest.fixture
def launcher() -> Iterator[Launcher]:
    launcher = Launcher()
    try:
        yield launcher
    finally:
        launcher.close()
