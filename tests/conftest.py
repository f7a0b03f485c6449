"""Fixtures every test folder may use, and which tests run on one build only.

CI runs the suite on the compiled build, then on the pure-Python one. The
second run needs only the tests whose subject is code the compiled build
replaces (see COMPILED in transports/native.py): with
``PITCHER_ONE_BUILD_ONCE=1`` in the environment, the tests listed in
ONE_BUILD are left out, and the run says how many. A plain ``pytest`` runs
them all.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.proxy.conftest import Launcher
from tests.servers import Server, redis_server

# Tests of code that is never compiled (configuration, the master and its
# restarts, node health and nodes at run time, the command line, the fleet,
# the ASGI and HTTP bridges, the admin door and status page, the W3C trace
# header, static checks): they run the same on either
# build, so once is enough. A folder ends with "/".
ONE_BUILD = (
    "tests/asgi/",
    "tests/bridge/",
    "tests/config/",
    "tests/fleet/",
    "tests/degrade/test_cold_start.py",
    "tests/degrade/test_failover.py",
    "tests/degrade/test_health.py",
    "tests/process/test_descriptors.py",
    "tests/process/test_gc_tuning.py",
    "tests/process/test_master.py",
    "tests/process/test_notify.py",
    "tests/process/test_restart.py",
    "tests/degrade/test_registration.py",
    "tests/degrade/test_runtime_nodes.py",
    "tests/degrade/test_scale_out.py",
    "tests/test_bench_command.py",
    "tests/test_cli.py",
    "tests/test_layers.py",
    "tests/test_proto_current.py",
    "tests/process/test_admin_door.py",
    "tests/process/test_metrics_keeper.py",
    "tests/process/test_status.py",
    "tests/process/test_status_book.py",
    "tests/process/test_status_browser.py",
    "tests/process/test_status_demo.py",
    "tests/test_cli_admin.py",
    "tests/test_cli_output.py",
    "tests/test_logs.py",
    "tests/tracing/test_module_settings.py",
    "tests/tracing/test_trace_context.py",
    "tests/tls/test_tls_config.py",
    "tests/sdk/test_asgi_streams.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not os.environ.get("PITCHER_ONE_BUILD_ONCE"):
        return
    root = str(config.rootpath) + os.sep
    kept: list[pytest.Item] = []
    left: list[pytest.Item] = []
    for item in items:
        path = str(item.path).removeprefix(root).replace(os.sep, "/")
        (left if path.startswith(ONE_BUILD) else kept).append(item)
    if left:
        config.hook.pytest_deselected(items=left)
        items[:] = kept
        config.stash[_LEFT_OUT] = len(left)


_LEFT_OUT = pytest.StashKey[int]()


def pytest_report_header(config: pytest.Config) -> str | None:
    if os.environ.get("PITCHER_ONE_BUILD_ONCE"):
        return "PITCHER_ONE_BUILD_ONCE: tests that do not depend on the build are left out"
    return None


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    left = terminalreporter.config.stash.get(_LEFT_OUT, 0)
    if left:
        terminalreporter.write_line(
            f"{left} tests that run the same on either build were left out"
            " (PITCHER_ONE_BUILD_ONCE); the other build's run has them"
        )


@pytest.fixture
def redis() -> Iterator[Server]:
    """A Redis of its own (tests/servers.py), stopped at the end."""
    server = redis_server()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def launcher() -> Iterator[Launcher]:
    launcher = Launcher()
    try:
        yield launcher
    finally:
        launcher.close()
