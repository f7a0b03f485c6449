"""Real etcd and Redis servers for tests: Debian's binaries, on free loopback ports.

Each server runs in a temporary directory of its own and is stopped by its
process id. Where a binary is missing, a test asking for it is skipped with
the package to install, unless ``PITCHER_REQUIRE_SERVERS`` is set (CI sets
it, having installed them): then it fails, so a missing server never hides
a test there.

A server can be stopped and started again on the same port and data
directory (:meth:`Server.stop` then :meth:`Server.start`), for the tests of
what the proxy does while it is away.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence

import pytest

from tests.proxy.conftest import Process, free_port

__all__ = ["Server", "etcd_server", "redis_server", "require_binary"]

START_TIMEOUT = 20.0


def require_binary(name: str, package: str) -> str:
    """The path of ``name``; skips (or fails under PITCHER_REQUIRE_SERVERS) when absent."""
    path = shutil.which(name)
    if path is None and os.access(f"/usr/bin/{name}", os.X_OK):
        path = f"/usr/bin/{name}"
    if path is not None:
        return path
    reason = f"{name} is not installed (apt-get install {package})"
    if os.environ.get("PITCHER_REQUIRE_SERVERS"):
        pytest.fail(f"{reason}, and PITCHER_REQUIRE_SERVERS is set")
    pytest.skip(reason)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class Server:
    """One server process; ``url`` is where clients reach it."""

    def __init__(
        self,
        name: str,
        command: Callable[[], Sequence[str]],
        port: int,
        url: str,
        tmpdir: str,
        ready: Callable[[], bool] | None = None,
    ) -> None:
        self.name = name
        self._command = command
        self.port = port
        self.url = url
        self.tmpdir = tmpdir
        self._ready = ready or (lambda: _accepts(port))
        self.process: Process | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} is not running"
        return self.process.pid

    def start(self) -> Server:
        if self.process is not None and self.process.alive():
            return self
        self.process = Process(list(self._command()), cwd=self.tmpdir)
        deadline = time.monotonic() + START_TIMEOUT
        while not self._ready():
            if not self.process.alive():
                raise AssertionError(f"{self.name} exited at start:\n{self.process.output}")
            if time.monotonic() > deadline:
                output = self.process.output
                self.process.stop()
                raise AssertionError(f"{self.name} not ready in {START_TIMEOUT}s:\n{output}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """Stops the server (SIGTERM, then SIGKILL); its data directory stays."""
        if self.process is not None:
            self.process.stop()

    def kill(self) -> None:
        """Stops the server at once, as a crash would (SIGKILL)."""
        if self.process is not None:
            self.process.signal(signal.SIGKILL)
            self.process.stop()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def etcd_server() -> Server:
    """A one-member etcd on a free loopback port (not started yet: call start())."""
    binary = require_binary("etcd", "etcd-server")
    tmpdir = tempfile.mkdtemp(prefix="pitcher-etcd-", dir="/tmp")
    client, peer = free_port(), free_port()
    url = f"http://127.0.0.1:{client}"

    def command() -> list[str]:
        return [
            binary,
            "--name=test",
            f"--data-dir={tmpdir}/data",
            f"--listen-client-urls={url}",
            f"--advertise-client-urls={url}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=test=http://127.0.0.1:{peer}",
            "--log-level=warn",
        ]

    def ready() -> bool:
        # The port opens before the member has elected itself leader.
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=0.5) as answer:
                return bool(json.load(answer).get("health") == "true")
        except (OSError, ValueError):
            return False

    return Server("etcd", command, client, url, tmpdir, ready)


def redis_server() -> Server:
    """A Redis on a free loopback port, no persistence (not started yet: call start())."""
    binary = require_binary("redis-server", "redis-server")
    tmpdir = tempfile.mkdtemp(prefix="pitcher-redis-", dir="/tmp")
    port = free_port()

    def command() -> list[str]:
        return [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            tmpdir,
        ]

    return Server("redis", command, port, f"redis://127.0.0.1:{port}", tmpdir)
