"""Nodes from etcd in one proxy: workers and a single process, bad values, the order of
the file, etcd and the admin API, reloads, a compacted revision, the missing extra."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
from typing import Any

import pytest

from pitcher_rpc.config.model import DiscoveryConfig
from pitcher_rpc.fleet.discovery import EtcdSource
from pitcher_rpc.fleet.etcd import EtcdClient
from tests.proxy.conftest import Launcher, Proxy, get, toml_config, wait_until
from tests.servers import Server


@pytest.fixture
def launcher() -> Any:
    launcher = Launcher()
    try:
        yield launcher
    finally:
        launcher.close()


def etcd_call(etcd: Server, *calls: tuple[str, str, bytes | None]) -> None:
    """("put", key, value) and ("delete", key, None), in order."""

    async def run() -> None:
        client = EtcdClient([etcd.url])
        try:
            for op, key, value in calls:
                if op == "put":
                    await client.put(key, value or b"")
                else:
                    await client.delete(key)
        finally:
            await client.close()

    asyncio.run(run())


def node(uri: str, weight: int = 1, **metadata: str) -> bytes:
    return json.dumps({"uri": uri, "weight": weight, "metadata": metadata}).encode()


def config(etcd: Server, prefix: str, nodes: list[str] | None = None) -> str:
    cluster: dict[str, Any] = {"nodes": nodes} if nodes else {}
    text = toml_config([{"prefix": "/", "cluster": "app"}], {"app": cluster})
    return text + f'\n[clusters.app.discovery]\netcd = ["{etcd.url}"]\nprefix = "{prefix}"\n'


def admin(proxy: Proxy, method: str = "GET", path: str = "/admin/clusters", body: Any = None):
    line = proxy.process.wait_for_line("admin on ")
    port = int(line.split("admin on ", 1)[1].split(",", 1)[0].rpartition(":")[2])
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data, method=method)
    request.add_header("content-type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as answer:
        raw = answer.read()
    return raw.decode() if path == "/metrics" else json.loads(raw)


def backends(proxy: Proxy, count: int) -> set[str]:
    seen = set()
    for _ in range(count):
        response = get(proxy, "/")
        seen.add(response.json()["backend"] if response.status == 200 else str(response.status))
    return seen


@pytest.mark.parametrize("workers", [2, 0])
def test_etcd_nodes_reach_every_worker_and_bad_values_are_skipped(
    launcher: Launcher, etcd: Server, workers: int
) -> None:
    prefix = f"/t/w{workers}/"
    one = launcher.test_backend("tcp", name="one")
    two = launcher.test_backend("tcp", name="two")
    proxy = launcher.proxy(config(etcd, prefix), workers=workers)
    assert get(proxy, "/").status == 503  # no node yet: the registry is empty
    etcd_call(
        etcd,
        ("put", prefix + "one", node(one.uri, zone="a")),
        ("put", prefix + "garbage", b"{not json"),
        ("put", prefix + "nowhere", node("gopher://h:1")),
        ("put", prefix + "heavy", node(two.uri, weight=5000)),
        ("put", prefix + "zz-copy", node(one.uri)),
    )
    wait_until(lambda: get(proxy, "/").status == 200, 2.0, "the node from etcd")
    # Fresh connections land on every worker: all have it.
    assert backends(proxy, 12) == {"one"}
    etcd_call(etcd, ("put", prefix + "two", two.uri.encode()))  # a bare URI is a node too
    wait_until(lambda: backends(proxy, 6) == {"one", "two"}, 2.0, "the second node")
    # zz-copy names one's URI too: skipped while "one" has it, the node once "one" is gone.
    etcd_call(etcd, ("delete", prefix + "one", None), ("delete", prefix + "two", None))
    wait_until(lambda: backends(proxy, 6) == {"one"}, 2.0, "zz-copy taking over")
    etcd_call(etcd, ("delete", prefix + "zz-copy", None))
    wait_until(lambda: backends(proxy, 6) == {"503"}, 2.0, "every node gone")
    output = proxy.process.output
    assert "skipped garbage: not JSON" in output
    assert "skipped nowhere:" in output
    assert "skipped heavy: weight must be a whole number in 1..1000, got 5000" in output
    assert f"skipped zz-copy: {one.uri} is already the node of one" in output
    if workers:
        state = admin(proxy)["clusters"]["app"]["discovery"][0]
        assert state["state"] == "ok" and state["source"] == "etcd"
        assert sorted(state["skipped"]) == ["garbage", "heavy", "nowhere"]
        metrics = admin(proxy, path="/metrics")
        assert 'pitcher_discovery_skipped{cluster="app",source="etcd"} 3.0' in metrics
        assert 'pitcher_discovery_up{cluster="app",source="etcd"} 1.0' in metrics


@pytest.mark.parametrize("workers", [2, 0])
def test_a_proxy_starts_with_the_nodes_etcd_holds(
    launcher: Launcher, etcd: Server, workers: int
) -> None:
    prefix = f"/t/start{workers}/"
    one = launcher.test_backend("tcp", name="one")
    etcd_call(etcd, ("put", prefix + "one", node(one.uri)))
    proxy = launcher.proxy(config(etcd, prefix), workers=workers)
    # From its first connection on, in every worker: no 503 while etcd is read.
    assert backends(proxy, 12) == {"one"}
    # A reload (SIGHUP) keeps what etcd gave, and the watch goes on.
    proxy.process.signal(signal.SIGHUP)
    proxy.process.wait_for_line("reloaded ")
    assert backends(proxy, 6) == {"one"}
    etcd_call(etcd, ("delete", prefix + "one", None))
    wait_until(lambda: backends(proxy, 4) == {"503"}, 2.0, "the node gone after the reload")


def test_a_proxy_starts_without_etcd_and_takes_its_nodes_when_it_comes(
    launcher: Launcher,
) -> None:
    from tests.servers import etcd_server

    etcd = etcd_server()
    try:
        one = launcher.test_backend("tcp", name="one")
        proxy = launcher.proxy(config(etcd, "/t/late/"), workers=1)
        assert get(proxy, "/").status == 503
        state = admin(proxy)["clusters"]["app"]["discovery"][0]
        assert state["state"] == "unreachable" and state["nodes"] is None
        etcd.start()
        etcd_call(etcd, ("put", "/t/late/one", node(one.uri)))
        wait_until(lambda: get(proxy, "/").status == 200, 8.0, "etcd's node once it is up")
    finally:
        etcd.close()


def test_the_file_then_etcd_then_the_admin_api(launcher: Launcher, etcd: Server) -> None:
    prefix = "/t/order/"
    static = launcher.test_backend("tcp", name="static")
    found = launcher.test_backend("tcp", name="found")
    proxy = launcher.proxy(config(etcd, prefix, [static.uri]), workers=1)
    etcd_call(
        etcd,
        ("put", prefix + "static", node(static.uri, weight=7)),  # the file's weight stays
        ("put", prefix + "found", node(found.uri, weight=2)),
    )
    wait_until(lambda: len(admin(proxy)["clusters"]["app"]["nodes"]) == 2, 2.0, "etcd's node")
    assert admin(proxy)["clusters"]["app"]["nodes"] == [
        {"uri": static.uri, "weight": 1},
        {"uri": found.uri, "weight": 2},
    ]
    # The admin API has the last word: a drained etcd node stays drained while etcd
    # keeps changing, and a reload keeps what etcd gave.
    admin(proxy, "POST", "/admin/clusters/app/nodes/drain", {"uri": found.uri, "keep": True})
    etcd_call(etcd, ("put", prefix + "found", node(found.uri, weight=3)))
    wait_until(
        lambda: admin(proxy)["clusters"]["app"]["discovery"][0]["updates"] >= 2, 2.0, "update"
    )
    assert backends(proxy, 6) == {"static"}
    assert admin(proxy, "POST", "/admin/reload")["complete"]
    clusters = admin(proxy)["clusters"]["app"]
    assert [n["uri"] for n in clusters["nodes"]] == [static.uri]
    assert clusters["draining"] == [found.uri]
    # Removed through the API: out, whatever etcd says, until the API adds it back.
    admin(proxy, "DELETE", "/admin/clusters/app/nodes", {"uri": found.uri})
    assert backends(proxy, 6) == {"static"}
    admin(proxy, "POST", "/admin/clusters/app/nodes", {"uri": found.uri, "weight": 4})
    assert backends(proxy, 6) == {"static", "found"}
    clusters = admin(proxy)["clusters"]["app"]
    assert clusters["nodes"][1] == {"uri": found.uri, "weight": 4}
    assert clusters["discovery"][0]["reads"] == 1


def test_etcd_nodes_are_judged_by_health_like_any_other(launcher: Launcher, etcd: Server) -> None:
    prefix = "/t/health/"
    static = launcher.test_backend("tcp", name="static")
    dead = launcher.uri("tcp")  # nothing listens there
    text = config(etcd, prefix, [static.uri]).replace(
        "[clusters.app.discovery]",
        "[clusters.app.health]\nconsecutive_failures = 2\nejection_time = 30.0\n\n"
        "[clusters.app.discovery]",
    )
    proxy = launcher.proxy(text, workers=1)
    etcd_call(etcd, ("put", prefix + "dead", node(dead)))
    wait_until(lambda: len(admin(proxy)["clusters"]["app"]["nodes"]) == 2, 2.0, "etcd's node")

    def state() -> str | None:
        health = admin(proxy)["clusters"]["app"]["health"] or {}
        return health.get("nodes", {}).get(dead, {}).get("state")

    # Requests that reach for it fail over (it refuses connections) until it is ejected.
    for _ in range(12):
        assert get(proxy, "/").status == 200
    wait_until(lambda: state() == "ejected", 3.0, "the dead etcd node ejected")
    assert backends(proxy, 6) == {"static"}


def test_a_watch_resumes_after_its_revision_and_reads_again_if_it_was_compacted(
    etcd: Server,
) -> None:
    prefix = "/t/compact/"
    settings = DiscoveryConfig(etcd=(etcd.url,), prefix=prefix)

    async def scenario() -> None:
        changes: list[tuple[str, ...]] = []
        source = EtcdSource("app", settings, lambda _: changes.append(nodes(source)))
        client = EtcdClient([etcd.url])
        try:
            await client.put(prefix + "a", b"tcp://127.0.0.1:1")
            source.start()
            await until(lambda: source.state == "ok" and source.nodes is not None)
            await source.stop()  # away: it misses what follows
            await client.put(prefix + "b", b"tcp://127.0.0.1:2")
            source.start()
            await until(lambda: len(source.nodes or ()) == 2)
            assert source.reads == 1  # resumed after its revision: nothing read twice
            await source.stop()
            await client.delete(prefix + "a")
            revision = await client.put(prefix + "c", b"tcp://127.0.0.1:3")
            body = json.dumps({"revision": str(revision)}).encode()
            request = urllib.request.Request(f"{etcd.url}/v3/kv/compaction", body)
            await asyncio.to_thread(urllib.request.urlopen, request, timeout=5)
            source.start()  # its revision is gone: the prefix is read again
            await until(lambda: source.reads == 2 and len(source.nodes or ()) == 2)
            assert nodes(source) == ("tcp://127.0.0.1:2", "tcp://127.0.0.1:3")
            assert changes == [
                ("tcp://127.0.0.1:1",),
                ("tcp://127.0.0.1:1", "tcp://127.0.0.1:2"),
                ("tcp://127.0.0.1:2", "tcp://127.0.0.1:3"),
            ]
        finally:
            await source.close()
            await client.close()

    asyncio.run(scenario())


def test_an_etcd_that_stops_answering_on_an_open_watch_is_noticed(etcd: Server) -> None:
    prefix = "/t/silent/"
    settings = DiscoveryConfig(etcd=(etcd.url,), prefix=prefix)

    async def scenario() -> None:
        source = EtcdSource("app", settings, lambda _: None)
        source.client = EtcdClient([etcd.url], timeout=0.5)
        source.probe_interval = 0.2
        writer = EtcdClient([etcd.url])
        try:
            await writer.put(prefix + "a", b"tcp://127.0.0.1:1")
            source.start()
            await until(lambda: source.state == "ok" and source.nodes is not None)
            # Frozen, not gone: its connections stay open and nothing answers.
            os.kill(etcd.pid, signal.SIGSTOP)
            try:
                await until(lambda: source.state == "unreachable", timeout=3.0)
                assert nodes(source) == ("tcp://127.0.0.1:1",)  # kept
            finally:
                os.kill(etcd.pid, signal.SIGCONT)
            await until(lambda: source.state == "ok", timeout=8.0)
            await writer.put(prefix + "b", b"tcp://127.0.0.1:2")
            await until(lambda: len(source.nodes or ()) == 2)
            assert source.reads == 1
        finally:
            await source.close()
            await writer.close()

    asyncio.run(scenario())


def nodes(source: EtcdSource) -> tuple[str, ...]:
    return tuple(sorted(n.uri for n in source.nodes or ()))


async def until(predicate: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_check_refuses_etcd_without_the_fleet_extra(launcher: Launcher, etcd: Server) -> None:
    path = launcher.write("fleet.toml", config(etcd, "/t/check/"))
    script = (
        "import sys; sys.modules['aiohttp'] = None\n"
        "from pitcher_rpc.cli import main\n"
        f"main(['check', '-c', {path!r}])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert "clusters.app.discovery.etcd: etcd needs the fleet extra" in result.stderr
    assert "pip install 'pitcher-rpc[fleet]'" in result.stderr
