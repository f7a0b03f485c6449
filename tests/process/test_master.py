"""The master and its workers, as real processes: serving, reloading, replacing, stopping."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.proxy.conftest import (
    Launcher,
    Proxy,
    child_pids,
    get,
    toml_config,
    wait_until,
)


def admin_port(proxy: Proxy) -> int:
    line = proxy.process.wait_for_line("admin on ")
    return int(line.split("admin on ", 1)[1].split()[0].rstrip(",").rpartition(":")[2])


def admin(port: int, path: str, method: str = "GET") -> tuple[int, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def config_text(echo_uri: str, extra_route: bool = False) -> str:
    routes = [{"name": "echo", "prefix": "/", "cluster": "echo"}]
    if extra_route:
        routes.insert(0, {"name": "added", "prefix": "/added/", "cluster": "echo"})
    return toml_config(routes, {"echo": {"nodes": [echo_uri]}}, server={"drain_timeout": 2.0})


@pytest.fixture
def site(launcher: Launcher) -> tuple[Launcher, Proxy, int, str]:
    echo = launcher.echo_backend("tcp")
    proxy = launcher.proxy(config_text(echo.uri), workers=2)
    return launcher, proxy, admin_port(proxy), echo.uri


def worker_pids(port: int) -> list[int]:
    status, body = admin(port, "/admin/workers")
    assert status == 200, body
    return [worker["pid"] for worker in body["workers"] if "pid" in worker]


def test_workers_share_the_listener_and_the_admin_api_speaks_for_all(
    site: tuple[Launcher, Proxy, int, str],
) -> None:
    _, proxy, port, _ = site
    pids = worker_pids(port)
    assert len(set(pids)) == 2
    assert set(pids) <= set(child_pids(proxy.process.pid))
    for _ in range(20):
        assert get(proxy, "/hello").status == 200
    assert admin(port, "/healthz") == (200, {"status": "serving"})
    status, config = admin(port, "/admin/config")
    assert status == 200
    checksums = {worker["checksum"] for worker in config["workers"]}
    assert checksums == {config["checksum"]}


def test_a_reload_reaches_every_worker_and_a_bad_file_changes_nothing(
    site: tuple[Launcher, Proxy, int, str],
) -> None:
    _, proxy, port, echo_uri = site
    assert get(proxy, "/added/x").json()["route"] == "echo"
    with open(proxy.config_path, "w") as file:
        file.write(config_text(echo_uri, extra_route=True))
    status, result = admin(port, "/admin/reload", "POST")
    assert status == 200, result
    assert result["complete"] is True
    assert {w["checksum"] for w in result["workers"]} == {result["checksum"]}
    # Every worker serves the new route, whichever takes the connection.
    for _ in range(10):
        assert get(proxy, "/added/x").json()["route"] == "added"

    bad = config_text(echo_uri) + "\n[server.bogus]\n"
    with open(proxy.config_path, "w") as file:
        file.write(bad)
    status, result = admin(port, "/admin/reload", "POST")
    assert status == 400
    line = bad.splitlines().index("[server.bogus]") + 1
    assert f"{proxy.config_path}:{line}: server.bogus: unknown key" in result["error"]
    status, config = admin(port, "/admin/config")
    assert {w["checksum"] for w in config["workers"]} == {config["checksum"]}
    assert get(proxy, "/added/x").json()["route"] == "added"


def test_sighup_reloads_every_worker(site: tuple[Launcher, Proxy, int, str]) -> None:
    _, proxy, port, echo_uri = site
    with open(proxy.config_path, "w") as file:
        file.write(config_text(echo_uri, extra_route=True))
    proxy.process.signal(signal.SIGHUP)

    def everywhere() -> bool:
        status, config = admin(port, "/admin/config")
        return (
            status == 200
            and all(w.get("checksum") == config["checksum"] for w in config["workers"])
            and config["reloads"] == 1
        )

    wait_until(everywhere, 5.0, "every worker on the new file")


def test_a_killed_worker_is_replaced_and_traffic_goes_on(
    site: tuple[Launcher, Proxy, int, str],
) -> None:
    _, proxy, port, _ = site
    before = worker_pids(port)
    failures: list[int] = []
    served = 0
    stop = threading.Event()

    def load() -> None:
        nonlocal served
        deadline = time.monotonic() + 10
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                status = get(proxy, "/load").status
            except (ConnectionError, OSError):
                status = 0
            if status == 200:
                served += 1
            else:
                failures.append(status)

    loader = threading.Thread(target=load)
    loader.start()
    time.sleep(0.3)
    os.kill(before[0], signal.SIGKILL)
    wait_until(lambda: len(set(worker_pids(port)) - set(before)) == 1, 5.0, "a new worker")
    time.sleep(0.3)
    stop.set()
    loader.join(10)
    assert served > 20
    # Only requests that the killed worker had in flight may fail (one client here).
    assert len(failures) <= 1, failures


def test_sigterm_stops_master_and_workers_leaving_no_process(
    site: tuple[Launcher, Proxy, int, str],
) -> None:
    _, proxy, port, _ = site
    pids = worker_pids(port)
    proxy.process.signal(signal.SIGTERM)
    assert proxy.process.popen.wait(10) == 0
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), f"worker {pid} outlived its master"


def test_metrics_combine_every_worker_in_prometheus_text(
    site: tuple[Launcher, Proxy, int, str],
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    _, proxy, port, _ = site
    for _ in range(30):
        assert get(proxy, "/counted").status == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.headers["content-type"].startswith("text/plain")
        text = response.read().decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    requests = families["pitcher_requests"]
    assert sum(s.value for s in requests.samples if s.name == "pitcher_requests_total") >= 30
    assert {s.labels["worker"] for s in requests.samples} == {"0", "1"}
    assert families["pitcher_workers"].samples[0].value == 2
    pauses = families["pitcher_gc_pause_seconds"]
    generations = {s.labels["generation"] for s in pauses.samples}
    assert generations == {"0", "1", "2"}


def test_healthz_turns_503_while_draining_and_in_flight_requests_finish(
    launcher: Launcher,
) -> None:
    backend = launcher.test_backend("tcp")
    proxy = launcher.proxy(config_text(backend.uri), workers=1)
    port = admin_port(proxy)
    outcome: dict[str, int] = {}

    def slow() -> None:
        with proxy.connect() as client:
            outcome["status"] = client.request("GET", "/slow?sleep=1.0&mark=drain").status

    request = threading.Thread(target=slow)
    request.start()
    launcher.wait_for_mark("drain")
    proxy.process.signal(signal.SIGTERM)
    wait_until(lambda: admin(port, "/healthz")[0] == 503, 2.0, "healthz to turn 503")
    assert admin(port, "/healthz") == (503, {"status": "draining"})
    request.join(5)
    assert outcome == {"status": 200}
    assert proxy.process.popen.wait(10) == 0


def test_sigint_stops_everything_at_once(site: tuple[Launcher, Proxy, int, str]) -> None:
    _, proxy, port, _ = site
    pids = worker_pids(port)
    started = time.monotonic()
    proxy.process.signal(signal.SIGINT)
    assert proxy.process.popen.wait(10) == 0
    assert time.monotonic() - started < 3.0
    for pid in pids:
        wait_until(lambda pid=pid: not os.path.exists(f"/proc/{pid}"), 3.0, f"worker {pid}")


def test_a_worker_that_does_not_drain_is_killed_after_the_grace(launcher: Launcher) -> None:
    echo = launcher.echo_backend("tcp")
    text = toml_config(
        [{"prefix": "/", "cluster": "echo"}],
        {"echo": {"nodes": [echo.uri]}},
        server={"drain_timeout": 0.2},
    )
    proxy = launcher.proxy(text, workers=1)
    port = admin_port(proxy)
    (stuck,) = worker_pids(port)
    os.kill(stuck, signal.SIGSTOP)  # it can no longer act on SIGTERM
    try:
        proxy.process.signal(signal.SIGTERM)
        # drain_timeout plus the master's 5 s of patience, then SIGKILL.
        assert proxy.process.popen.wait(15) == 0
        wait_until(lambda: not os.path.exists(f"/proc/{stuck}"), 3.0, "the stuck worker")
    finally:
        if os.path.exists(f"/proc/{stuck}"):
            os.kill(stuck, signal.SIGKILL)
