"""Where the load goes after a worker is killed under keep-alive load: measured.

Eight keep-alive clients load two workers; one worker is killed by pid. Its
clients lose their connections (and at most the one request each had in
flight) and reconnect at once, before the replacement has started: the
survivor accepts them all. Keep-alive connections then stay where they are,
so the replacement takes only what connects later. The test prints each
worker's share of the requests per second after the kill (run with -s);
docs/process.md quotes it. It asserts what the proxy promises: the worker is
replaced, the clients go on, nothing else is lost.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from tests.process.test_master import admin, admin_port, config_text
from tests.proxy.conftest import Launcher, RawClient, build_request, wait_until

CLIENTS = 8


def requests_by_pid(port: int) -> dict[int, int]:
    status, body = admin(port, "/admin/workers")
    assert status == 200, body
    return {w["pid"]: w["requests"] for w in body["workers"] if "pid" in w}


def test_a_killed_worker_is_replaced_and_its_clients_go_on(launcher: Launcher) -> None:
    echo = launcher.echo_backend("tcp")
    proxy = launcher.proxy(config_text(echo.uri), workers=2)
    port = admin_port(proxy)
    stop = threading.Event()
    failures: list[str] = []
    served = [0] * CLIENTS

    def client(slot: int) -> None:
        deadline = time.monotonic() + 30
        connection: RawClient | None = None
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                if connection is None:
                    connection = RawClient.connect(proxy.host, proxy.port)
                connection.send(build_request("GET", "/balance"))
                if connection.response().status == 200:
                    served[slot] += 1
                time.sleep(0.002)  # a steady client, not a flood
            except OSError as exc:
                failures.append(repr(exc))
                if connection is not None:
                    connection.close()
                connection = None

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    shares: list[dict[int, float]] = []
    try:
        time.sleep(1.0)
        before = requests_by_pid(port)
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len(set(requests_by_pid(port)) - set(before)) == 1, 10.0, "a new one")
        last = requests_by_pid(port)
        for _ in range(4):
            time.sleep(1.0)
            now = requests_by_pid(port)
            total = sum(now[pid] - last.get(pid, 0) for pid in now) or 1
            shares.append({pid: (now[pid] - last.get(pid, 0)) / total for pid in now})
            last = now
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    replacement = (set(last) - set(before)).pop()
    print(
        f"\n  replacement's share of each second after it started: "
        f"{[round(share[replacement], 3) for share in shares]}"
    )
    assert all(count > 0 for count in served), served
    # Each client lost at most its connection to the killed worker.
    assert len(failures) <= CLIENTS, failures
