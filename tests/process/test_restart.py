"""Graceful restart under load: a new generation takes the sockets, nothing is lost."""

from __future__ import annotations

import os
import signal
import threading
import time

from tests.process.test_master import admin, admin_port, config_text
from tests.proxy.conftest import Launcher, RawClient, build_request, wait_until

RESTARTS = 5


class Load:
    """Keep-alive and one-request-per-connection clients, counting every failure."""

    def __init__(self, host: str, port: int, seconds: float = 60.0) -> None:
        self.host = host
        self.port = port
        self.seconds = seconds  # every client stops by itself after this long
        self.stop = threading.Event()
        self.served = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._keep_alive, daemon=True) for _ in range(3)
        ] + [threading.Thread(target=self._one_shot, daemon=True) for _ in range(2)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(10)

    def _count(self, ok: bool, what: str = "") -> None:
        with self._lock:
            if ok:
                self.served += 1
            else:
                self.failures.append(what)

    def _keep_alive(self) -> None:
        deadline = time.monotonic() + self.seconds
        client: RawClient | None = None
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                if client is None:
                    client = RawClient.connect(self.host, self.port)
                client.send(build_request("GET", "/keep-alive", (), b"", "localhost", "1.1"))
                response = client.response()
                self._count(response.status == 200, f"status {response.status}")
                if response.header("connection") == "close":
                    client.close()
                    client = None
            except OSError as exc:  # resets and refusals are failures too
                self._count(False, repr(exc))
                if client is not None:
                    client.close()
                client = None
        if client is not None:
            client.close()

    def _one_shot(self) -> None:
        deadline = time.monotonic() + self.seconds
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                with RawClient.connect(self.host, self.port) as client:
                    client.send(
                        build_request(
                            "GET", "/fresh", (("Connection", "close"),), b"", "localhost", "1.1"
                        )
                    )
                    response = client.response()
                    self._count(response.status == 200, f"status {response.status}")
            except OSError as exc:
                self._count(False, repr(exc))


def test_five_graceful_restarts_under_load_lose_nothing(launcher: Launcher) -> None:
    echo = launcher.echo_backend("tcp")
    proxy = launcher.proxy(config_text(echo.uri), workers=2)
    port = admin_port(proxy)
    masters = [proxy.process.pid]
    try:
        with Load(proxy.host, proxy.port) as load:
            time.sleep(0.5)
            for _ in range(RESTARTS):
                served_before = load.served
                status, answer = admin(port, "/admin/restart", "POST")
                assert status == 200, answer
                masters.append(answer["new_master_pid"])
                # The old generation drains while the new one serves.
                wait_until(lambda before=served_before: load.served > before + 50, 10.0, "traffic")
                time.sleep(0.8)
            time.sleep(0.5)
        assert load.failures == [], load.failures[:5]
        assert load.served > 500
        status, workers = admin(port, "/admin/workers")
        assert status == 200 and len(workers["workers"]) == 2
        for old in masters[:-1]:
            wait_until(lambda pid=old: not _alive(pid), 10.0, f"old master {old} to exit")
    finally:
        for pid in masters[1:]:
            _stop(pid)


def test_a_successor_that_cannot_start_leaves_the_old_generation_serving(
    launcher: Launcher,
) -> None:
    echo = launcher.echo_backend("tcp")
    proxy = launcher.proxy(config_text(echo.uri), workers=1)
    port = admin_port(proxy)
    with open(proxy.config_path, "a") as file:
        file.write("\n[server.oops]\n")  # the new master refuses this file
    status, answer = admin(port, "/admin/restart", "POST")
    assert status == 500
    assert "still serving" in answer["error"]
    assert admin(port, "/healthz") == (200, {"status": "serving"})
    with RawClient.connect(proxy.host, proxy.port) as client:
        assert client.request("GET", "/still").status == 200


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent has not collected it yet.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _stop(pid: int) -> None:
    """Masters started by a restart are not children of the test: stop them by pid."""
    if not _alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
