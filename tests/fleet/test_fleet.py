"""Three proxies (separate processes) and one etcd: services join and leave all of them at once.

Each proxy runs a master and one worker on the same file; the cluster has one
node in the file ("static") and takes the rest from etcd. A service started
with ``--register etcd://...`` must be reached through every proxy within a
second; SIGTERM must remove it everywhere without a failed request; SIGKILL
within its lease's TTL; and etcd going away and coming back under load must
fail no request and leave the watch running.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest

from pitcher_rpc.fleet.etcd import EtcdClient
from tests.proxy.conftest import Launcher, Process, Proxy, get, pitcher_command, toml_config
from tests.servers import Server, etcd_server

TTL = 2
PREFIX = "/pitcher/nodes/app/"


class Fleet:
    def __init__(self, launcher: Launcher, etcd: Server, proxies: list[Proxy]) -> None:
        self.launcher = launcher
        self.etcd = etcd
        self.proxies = proxies
        self.admins = [admin_port(proxy) for proxy in proxies]

    def nodes(self, index: int) -> list[str]:
        url = f"http://127.0.0.1:{self.admins[index]}/admin/clusters"
        with urllib.request.urlopen(url, timeout=5) as answer:
            return [n["uri"] for n in json.load(answer)["clusters"]["app"]["nodes"]]

    def state(self, index: int) -> dict:
        url = f"http://127.0.0.1:{self.admins[index]}/admin/clusters"
        with urllib.request.urlopen(url, timeout=5) as answer:
            return json.load(answer)["clusters"]["app"]["discovery"][0]

    def metrics(self, index: int) -> str:
        url = f"http://127.0.0.1:{self.admins[index]}/metrics"
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.read().decode()

    def register(self, name: str, uri: str) -> Process:
        env = {
            "TEST_BACKEND_NAME": name,
            "TEST_MARK_DIR": self.launcher.mark_dir,
            "PYTHONPATH": self.launcher.tmpdir + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }
        return self.launcher.spawn(
            [
                *pitcher_command(),
                "backend",
                "testapp:app",
                "--listen",
                uri,
                "--register",
                f"etcd://127.0.0.1:{self.etcd.port}/app",
                "--ttl",
                str(TTL),
                "--metadata",
                f"name={name}",
            ],
            env=env,
        )

    def until_everywhere(self, predicate, timeout: float) -> list[float]:
        """Per proxy, the seconds until ``predicate(index)`` held (polled every 5 ms)."""
        start = time.monotonic()
        took: list[float | None] = [None] * len(self.proxies)
        while None in took:
            for index in range(len(self.proxies)):
                if took[index] is None and predicate(index):
                    took[index] = time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise AssertionError(f"not everywhere within {timeout}s: {took}")
            time.sleep(0.005)
        return [t for t in took if t is not None]


def admin_port(proxy: Proxy) -> int:
    line = proxy.process.wait_for_line("admin on ")
    return int(line.split("admin on ", 1)[1].split(",", 1)[0].rpartition(":")[2])


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    etcd = etcd_server()
    launcher = Launcher()
    try:
        etcd.start()
        static = launcher.test_backend("tcp", name="static")
        text = toml_config(
            [{"prefix": "/", "cluster": "app", "retries": 1}], {"app": {"nodes": [static.uri]}}
        )
        text += f'\n[clusters.app.discovery]\netcd = ["{etcd.url}"]\n'
        proxies = [launcher.proxy(text, workers=1) for _ in range(3)]
        yield Fleet(launcher, etcd, proxies)
    finally:
        launcher.close()
        etcd.close()


class Load:
    """Requests through every proxy from a few threads, bounded in count and in time."""

    def __init__(self, proxies: list[Proxy], seconds: float, threads: int = 3) -> None:
        self.answers: list[tuple[int, int, str]] = []  # (proxy, status, backend)
        self._stop = threading.Event()
        self._deadline = time.monotonic() + seconds
        self._threads = [
            threading.Thread(target=self._ask, args=(proxies, n)) for n in range(threads)
        ]

    def _ask(self, proxies: list[Proxy], offset: int) -> None:
        sent = offset
        while not self._stop.is_set() and time.monotonic() < self._deadline and sent < 20000:
            index = sent % len(proxies)
            try:
                response = get(proxies[index], "/")
                backend = response.json()["backend"] if response.status == 200 else ""
                self.answers.append((index, response.status, backend))
            except OSError as exc:
                self.answers.append((index, 0, repr(exc)))
            sent += 1

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    @property
    def failed(self) -> list[tuple[int, int, str]]:
        return [answer for answer in self.answers if answer[1] != 200]


def test_a_registered_service_is_reached_through_every_proxy_within_a_second(
    fleet: Fleet,
) -> None:
    uri = fleet.launcher.uri("tcp")
    joiner = fleet.register("joiner", uri)
    joiner.wait_for_line("registered ")
    listed = fleet.until_everywhere(lambda i: uri in fleet.nodes(i), timeout=1.0)

    def reached(index: int) -> bool:
        return any(get(fleet.proxies[index], "/").json()["backend"] == "joiner" for _ in range(4))

    served = fleet.until_everywhere(reached, timeout=1.0)
    print(f"listed after {[round(t, 3) for t in listed]} s, served after {served} s")
    assert max(listed) < 1.0 and max(served) < 1.0
    state = fleet.state(0)
    assert state["state"] == "ok" and state["metadata"][uri] == {"name": "joiner"}

    # SIGTERM under load: the key goes first, then the service drains; no request fails.
    with Load(fleet.proxies, seconds=4.0) as load:
        time.sleep(0.3)
        joiner.signal(signal.SIGTERM)
        assert joiner.stop(timeout=10) == 0
        time.sleep(0.2)
    assert load.failed == []
    assert {backend for _, _, backend in load.answers} == {"static", "joiner"}
    assert all(uri not in fleet.nodes(i) for i in range(3))
    assert "left cluster app" in joiner.output


def test_a_killed_service_is_dropped_everywhere_within_its_lease(fleet: Fleet) -> None:
    uri = fleet.launcher.uri("tcp")
    victim = fleet.register("victim", uri)
    victim.wait_for_line("registered ")
    fleet.until_everywhere(lambda i: uri in fleet.nodes(i), timeout=1.0)
    victim.signal(signal.SIGKILL)
    victim.stop()
    gone = fleet.until_everywhere(lambda i: uri not in fleet.nodes(i), timeout=TTL + 2.0)
    print(f"dropped after {[round(t, 2) for t in gone]} s (lease {TTL} s)")
    # etcd checks for expired leases twice a second; the slack is for a busy machine.
    assert max(gone) <= TTL + 1.0


def test_etcd_stopped_and_restarted_under_load_fails_nothing_and_the_watch_resumes(
    fleet: Fleet,
) -> None:
    extra = fleet.launcher.test_backend("tcp", name="extra")
    later = fleet.launcher.test_backend("tcp", name="later")

    def put(name: str, uri: str) -> None:
        async def write() -> None:
            client = EtcdClient([fleet.etcd.url])
            try:
                await client.put(PREFIX + name, json.dumps({"uri": uri}).encode())
            finally:
                await client.close()

        asyncio.run(write())

    put("extra", extra.uri)
    fleet.until_everywhere(lambda i: extra.uri in fleet.nodes(i), timeout=1.0)
    revision = fleet.state(0)["revision"]
    with Load(fleet.proxies, seconds=8.0, threads=2) as load:
        time.sleep(0.2)
        fleet.etcd.stop()
        fleet.until_everywhere(lambda i: fleet.state(i)["state"] == "unreachable", timeout=3.0)
        # The last known nodes stay, and every proxy says why.
        assert all(extra.uri in fleet.nodes(i) for i in range(3))
        assert 'pitcher_discovery_up{cluster="app",source="etcd"} 0.0' in fleet.metrics(1)
        time.sleep(0.5)
        fleet.etcd.start()
        put("later", later.uri)
        seen = fleet.until_everywhere(lambda i: later.uri in fleet.nodes(i), timeout=7.0)
        time.sleep(0.2)
    print(f"after the restart, a new key was seen after {[round(t, 2) for t in seen]} s")
    assert load.failed == []
    assert len(load.answers) > 50
    for index in range(3):
        state = fleet.state(index)
        assert state["state"] == "ok"
        assert state["reads"] == 1  # resumed from its revision, not read again
        assert state["revision"] > revision
    output = fleet.proxies[2].process.output
    assert "etcd of cluster app unreachable" in output
    assert "etcd of cluster app is back" in output
