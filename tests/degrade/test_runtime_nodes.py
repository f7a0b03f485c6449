"""Nodes added, drained and removed at run time: the overlay, the admin API, the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from pitcher_rpc.config import parse_config
from pitcher_rpc.config.overlay import NodeChange, Overlay, OverlayError
from tests.proxy.conftest import (
    Launcher,
    Proxy,
    free_port,
    get,
    pitcher_command,
    toml_config,
)

FILE = """
[[routes]]
prefix = "/"
cluster = "app"
[clusters.app]
nodes = ["tcp://127.0.0.1:7001"]
[clusters.other]
nodes = ["tcp://127.0.0.1:7101", "tcp://127.0.0.1:7102"]
"""


def uris(config: Any, cluster: str = "app") -> list[str]:
    return [node.uri for node in config.clusters[cluster].nodes]


def test_changes_apply_in_order_and_fold_per_node() -> None:
    config = parse_config(FILE)
    overlay = Overlay()
    overlay = overlay.change(config, NodeChange("add", "app", "tcp://127.0.0.1:7002", 3))
    overlay = overlay.change(config, NodeChange("drain", "app", "tcp://127.0.0.1:7001"))
    applied = overlay.apply(config)
    assert uris(applied) == ["tcp://127.0.0.1:7002"]
    assert applied.clusters["app"].nodes[0].weight == 3
    assert overlay.draining(config) == {"app": ["tcp://127.0.0.1:7001"]}
    # Removing the node only the API added leaves nothing to record about it.
    overlay = overlay.change(config, NodeChange("add", "app", "tcp://127.0.0.1:7003"))
    overlay = overlay.change(config, NodeChange("remove", "app", "tcp://127.0.0.1:7003"))
    assert [c.uri for c in overlay.changes] == ["tcp://127.0.0.1:7002", "tcp://127.0.0.1:7001"]
    assert Overlay.from_json(json.loads(json.dumps(overlay.to_json()))) == overlay


@pytest.mark.parametrize(
    ("change", "status", "message"),
    [
        (NodeChange("add", "nope", "tcp://127.0.0.1:1"), 404, "no cluster named 'nope'"),
        (NodeChange("add", "app", "tcp://127.0.0.1:7001"), 409, "already a node of app"),
        (NodeChange("add", "app", "carrier-pigeon://x"), 400, "carrier-pigeon"),
        (NodeChange("add", "app", "tcp://127.0.0.1:2", weight=0), 400, "weight must be"),
        (NodeChange("remove", "app", "tcp://127.0.0.1:9"), 404, "is not a node of app"),
        (NodeChange("drain", "app", "tcp://127.0.0.1:7001"), 409, "last node of app"),
        (NodeChange("promote", "app", "tcp://127.0.0.1:7001"), 400, "unknown action"),
    ],
)
def test_impossible_changes_are_refused(change: NodeChange, status: int, message: str) -> None:
    with pytest.raises(OverlayError) as caught:
        Overlay().change(parse_config(FILE), change)
    assert caught.value.status == status
    assert message in str(caught.value)


def test_only_kept_changes_outlive_a_reload_and_moot_ones_are_dropped() -> None:
    config = parse_config(FILE)
    overlay = Overlay()
    for change in [
        NodeChange("add", "app", "tcp://127.0.0.1:7002", keep=True),
        NodeChange("add", "app", "tcp://127.0.0.1:7003"),
        NodeChange("remove", "other", "tcp://127.0.0.1:7102", keep=True),
    ]:
        overlay = overlay.change(config, change)
    kept, dropped = overlay.for_reload(config)
    assert [c.uri for c in kept.changes] == ["tcp://127.0.0.1:7002", "tcp://127.0.0.1:7102"]
    assert dropped == []
    # A new file that lists the added node and no longer has "other".
    new_file = FILE.replace(
        '"tcp://127.0.0.1:7001"]', '"tcp://127.0.0.1:7001", "tcp://127.0.0.1:7002"]'
    )
    new_file = new_file.split("[clusters.other]")[0]
    kept, dropped = overlay.for_reload(parse_config(new_file))
    assert kept.changes == ()
    assert [c.uri for c in dropped] == ["tcp://127.0.0.1:7002", "tcp://127.0.0.1:7102"]


# -- the admin API, with two workers --------------------------------------------------


def admin_port(proxy: Proxy) -> int:
    line = proxy.process.wait_for_line("admin on ")
    return int(line.split("admin on ")[1].split(",")[0].rpartition(":")[2])


def call(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def served_by(proxy: Proxy, path: str = "/") -> str:
    return get(proxy, path).json()["backend"]


HEALTH = """
[clusters.app.health]
slow_start = 2.0
"""


def test_a_node_added_at_run_time_takes_traffic_within_a_second(launcher: Launcher) -> None:
    first = launcher.test_backend("tcp", name="first")
    second = launcher.test_backend("tcp", name="second")
    text = toml_config([{"prefix": "/", "cluster": "app"}], {"app": {"nodes": [first.uri]}})
    proxy = launcher.proxy(text + HEALTH, workers=2)
    port = admin_port(proxy)
    assert served_by(proxy) == "first"
    time.sleep(2.2)  # the start-up ramp of the (all-new) cluster is over

    seen: list[tuple[float, str]] = []
    stop = threading.Event()

    def ask() -> None:
        while not stop.is_set():
            seen.append((time.monotonic(), served_by(proxy)))

    asker = threading.Thread(target=ask)
    asker.start()
    try:
        time.sleep(0.2)
        began = time.monotonic()
        status, answer = call(
            port, "POST", "/admin/clusters/app/nodes", {"uri": second.uri, "weight": 2}
        )
        assert status == 201 and answer["complete"] is True, answer
        assert answer["nodes"] == [first.uri, second.uri]
        time.sleep(2.5)
    finally:
        stop.set()
        asker.join(10)
    arrived = next(at for at, who in seen if who == "second")
    assert arrived - began < 1.0
    # Through slow start: a small share first, then its weight (2 of 3).
    early = [who for at, who in seen if began < at < began + 0.5]
    late = [who for at, who in seen if at > began + 2.2]
    assert early.count("second") / len(early) < 0.4
    assert late.count("second") / len(late) > 0.5

    status, listing = call(port, "GET", "/admin/clusters")
    nodes = listing["clusters"]["app"]["health"]["nodes"]
    assert set(nodes) == {first.uri, second.uri}


def test_drain_finishes_in_flight_then_remove_and_reload_rules(launcher: Launcher) -> None:
    first = launcher.test_backend("tcp", name="first")
    second = launcher.test_backend("tcp", name="second")
    third = launcher.test_backend("tcp", name="third")
    text = toml_config(
        [{"prefix": "/", "cluster": "app"}], {"app": {"nodes": [first.uri, second.uri]}}
    )
    proxy = launcher.proxy(text, workers=2)
    port = admin_port(proxy)

    # A slow request in flight to "first" while it is drained still gets its answer.
    async def slow_then_drain() -> tuple[Any, tuple[int, Any]]:
        slow = asyncio.create_task(
            asyncio.to_thread(get, proxy, "/?sleep=0.6&only=first&mark=slow-drain")
        )
        await asyncio.to_thread(launcher.wait_for_mark, "slow-drain")
        drained = await asyncio.to_thread(
            call, port, "POST", "/admin/clusters/app/nodes/drain", {"uri": first.uri}
        )
        return await slow, drained

    slow_answer, (status, answer) = asyncio.run(slow_then_drain())
    assert status == 200 and answer["draining"] == [first.uri]
    assert slow_answer.status == 200 and slow_answer.json()["backend"] == "first"
    assert {served_by(proxy) for _ in range(8)} == {"second"}

    status, answer = call(port, "DELETE", f"/admin/clusters/app/nodes?uri={first.uri}")
    assert status == 200 and answer["draining"] == [] and answer["nodes"] == [second.uri]
    status, _ = call(port, "POST", "/admin/clusters/app/nodes", {"uri": third.uri, "keep": True})
    assert status == 201

    # A reload keeps the kept change only: "first" is back (the file lists it), "third" stays.
    status, _ = call(port, "POST", "/admin/reload")
    assert status == 200
    status, listing = call(port, "GET", "/admin/clusters")
    assert [n["uri"] for n in listing["clusters"]["app"]["nodes"]] == [
        first.uri,
        second.uri,
        third.uri,
    ]
    assert {served_by(proxy) for _ in range(12)} == {"first", "second", "third"}


def test_bad_calls_get_clear_errors(launcher: Launcher) -> None:
    echo = launcher.echo_backend("tcp")
    text = toml_config([{"prefix": "/", "cluster": "app"}], {"app": {"nodes": [echo.uri]}})
    proxy = launcher.proxy(text, workers=1)
    port = admin_port(proxy)
    nodes = "/admin/clusters/app/nodes"
    cases = [
        ("POST", "/admin/clusters/ghost/nodes", {"uri": "tcp://127.0.0.1:1"}, 404),
        ("POST", nodes, {"uri": echo.uri}, 409),
        ("POST", nodes, {"uri": "ftp://x"}, 400),
        ("POST", nodes, {"uri": "tcp://127.0.0.1:1", "weight": "heavy"}, 400),
        ("POST", nodes, {"uri": "tcp://127.0.0.1:1", "colour": "red"}, 400),
        ("POST", nodes, ["tcp://127.0.0.1:1"], 400),
        ("POST", nodes, {}, 400),
        ("DELETE", nodes + "?uri=tcp://127.0.0.1:9", None, 404),
        ("POST", nodes + "/drain", {"uri": echo.uri}, 409),
        ("DELETE", nodes + f"?uri={echo.uri}", None, 409),  # the last node
    ]
    for method, path, body, expected in cases:
        status, answer = call(port, method, path, body)
        assert (status, bool(answer.get("error"))) == (expected, True), (path, body, answer)
    # Nothing changed, traffic carries on.
    assert get(proxy, "/x").status == 200
    assert call(port, "GET", "/admin/clusters")[1]["changes"] == []


def test_the_cli_adds_and_removes(launcher: Launcher) -> None:
    first = launcher.test_backend("tcp", name="first")
    second = launcher.test_backend("tcp", name="second")
    text = toml_config([{"prefix": "/", "cluster": "app"}], {"app": {"nodes": [first.uri]}})
    # The CLI finds the admin API where the file says: a real port, not 0.
    admin = '[admin]\nlisten = "127.0.0.1:0"'
    assert admin in text
    text = text.replace(admin, f'[admin]\nlisten = "127.0.0.1:{free_port()}"')
    proxy = launcher.proxy(text, workers=1)
    admin_port(proxy)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*pitcher_command(), "nodes", *args, "--json", "-c", proxy.config_path],
            capture_output=True,
            text=True,
            timeout=30,
        )

    added = cli("add", "app", second.uri, "--weight", "5")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["nodes"] == [first.uri, second.uri]
    assert "second" in {served_by(proxy) for _ in range(12)}
    removed = cli("remove", "app", second.uri)
    assert removed.returncode == 0 and json.loads(removed.stdout)["nodes"] == [first.uri]
    refused = cli("remove", "app", second.uri)
    assert refused.returncode == 1 and "is not a node of app" in refused.stdout
    assert cli("drain", "app").returncode == 2  # usage: the URI is missing


def test_a_replaced_worker_accepts_only_once_it_has_the_run_time_nodes(
    launcher: Launcher,
) -> None:
    # The file's only node is dead; the live one exists only at run time. A
    # worker that accepted before the master brought it up to date would
    # send its first requests to the dead node.
    live = launcher.test_backend("tcp", name="live")
    dead = f"tcp://127.0.0.1:{free_port()}"
    text = toml_config([{"prefix": "/", "cluster": "app"}], {"app": {"nodes": [dead]}})
    proxy = launcher.proxy(text, workers=1)
    port = admin_port(proxy)
    status, _ = call(port, "POST", "/admin/clusters/app/nodes", {"uri": live.uri})
    assert status == 201
    status, _ = call(port, "DELETE", f"/admin/clusters/app/nodes?uri={dead}")
    assert status == 200
    assert served_by(proxy) == "live"

    outcomes: list[int] = []
    stop = threading.Event()

    def ask() -> None:
        deadline = time.monotonic() + 10
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                outcomes.append(get(proxy, "/").status)
            except OSError:
                outcomes.append(0)  # the connection the killed worker held

    _, workers = call(port, "GET", "/admin/workers")
    before = workers["workers"][0]["pid"]
    asker = threading.Thread(target=ask)
    asker.start()
    try:
        time.sleep(0.3)
        os.kill(before, signal.SIGKILL)

        def replaced() -> bool:
            _, now = call(port, "GET", "/admin/workers")
            return any(w.get("pid") not in (None, before) for w in now["workers"])

        deadline = time.monotonic() + 10
        while not replaced():
            assert time.monotonic() < deadline, "no replacement worker"
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        stop.set()
        asker.join(15)
    assert outcomes.count(200) > 20, outcomes[-20:]
    # Only what the killed worker held may fail; never a 502 from the dead node.
    assert 502 not in outcomes and outcomes.count(0) <= 1, [s for s in outcomes if s != 200]
