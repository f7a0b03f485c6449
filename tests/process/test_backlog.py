"""The listen backlog: configured, capped by the kernel's somaxconn, reported at start."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pitcher_rpc.proxy.backlog import describe_backlog, listen_backlog
from tests.proxy.conftest import Launcher, toml_config


def listen_queue_size(port: int) -> int:
    """The accept-queue size of a listening TCP socket, as ss reports it (Send-Q)."""
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    return int(out.split()[2])


def somaxconn() -> int:
    return int(Path("/proc/sys/net/core/somaxconn").read_text())


@pytest.mark.parametrize("workers", [0, 2])
def test_the_configured_backlog_is_used_and_reported(launcher: Launcher, workers: int) -> None:
    echo = launcher.echo_backend("tcp")
    text = toml_config([{"prefix": "/", "cluster": "echo"}], {"echo": {"nodes": [echo.uri]}})
    text = text.replace("[server]\n", "[server]\nbacklog = 123\n", 1)
    assert "backlog = 123" in text
    proxy = launcher.proxy(text, workers=workers)
    line = proxy.process.wait_for_line("listening on ")
    assert f"(backlog 123, kernel somaxconn {somaxconn()}" in line
    assert listen_queue_size(proxy.port) == 123


def test_a_backlog_above_somaxconn_is_reported_as_capped() -> None:
    cap = somaxconn()
    assert listen_backlog(cap + 1) == (cap, cap)
    assert listen_backlog(cap - 1) == (cap - 1, cap)
    assert describe_backlog(cap + 1) == (
        f"backlog {cap}: server.backlog {cap + 1} is capped by the kernel's"
        f" net.core.somaxconn {cap}"
    )
