"""Nodes from DNS: A/AAAA records through the loop's resolver, re-resolved, kept on failure.

Names that resolve on loopback with no network: ``localhost`` (the hosts
file) and address literals (no lookup at all).
"""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request
from typing import Any

import pytest

from pitcher_rpc.config.model import DiscoveryConfig
from pitcher_rpc.fleet.discovery import DnsSource
from tests.proxy.conftest import Launcher, get, toml_config, wait_until


@pytest.fixture
def launcher() -> Any:
    launcher = Launcher()
    try:
        yield launcher
    finally:
        launcher.close()


def dns_config(name: str, port: int) -> str:
    text = toml_config([{"prefix": "/", "cluster": "app"}], {"app": {}})
    return text + f'\n[clusters.app.discovery]\ndns = "{name}:{port}"\ninterval = 0.5\n'


@pytest.mark.parametrize(("name", "workers"), [("localhost", 1), ("127.0.0.1", 0)])
def test_a_cluster_of_the_addresses_a_name_gives(
    launcher: Launcher, name: str, workers: int
) -> None:
    backend = launcher.test_backend("tcp", name="dns")
    proxy = launcher.proxy(dns_config(name, backend.port), workers=workers)
    wait_until(lambda: get(proxy, "/").status == 200, 3.0, "the node DNS gives")
    assert {get(proxy, "/").json()["backend"] for _ in range(4)} == {"dns"}
    if workers:
        line = proxy.process.wait_for_line("admin on ")
        port = line.split("admin on ", 1)[1].split(",", 1)[0].rpartition(":")[2]
        url = f"http://127.0.0.1:{port}/admin/clusters"
        with urllib.request.urlopen(url, timeout=5) as answer:
            cluster = json.load(answer)["clusters"]["app"]
        assert cluster["nodes"] == [{"uri": backend.uri, "weight": 1}]
        source = cluster["discovery"][0]
        assert source["source"] == "dns" and source["state"] == "ok"
        assert source["target"] == f"tcp://localhost:{backend.port}"


class FailingDns(DnsSource):
    """The real resolver, except while ``failing``: no network here to make a lookup fail."""

    failing = False

    async def resolve(self) -> list[str]:
        if self.failing:
            raise OSError("Temporary failure in name resolution")
        return await super().resolve()


def test_re_resolved_every_interval_and_kept_while_resolution_fails() -> None:
    settings = DiscoveryConfig(dns=("127.0.0.1", 7001), dns_weight=2, interval=0.2)

    async def scenario() -> None:
        changes: list[tuple[str, ...]] = []
        source = FailingDns(
            "app", settings, lambda _: changes.append(tuple(n.uri for n in source.nodes or ()))
        )
        source.start()
        try:
            await until(lambda: source.state == "ok")
            assert source.nodes is not None and source.nodes[0].weight == 2
            source.name = "127.0.0.2"  # what the name gives changes
            await until(lambda: len(changes) == 2)
            source.failing = True
            await until(lambda: source.state == "unreachable")
            failures = source.failures
            await asyncio.sleep(0.5)
            # Kept, and retried more often than every interval while it fails.
            assert source.nodes is not None and len(source.nodes) == 1
            assert source.failures >= failures + 2
            assert "Temporary failure" in source.describe()["error"]
            source.failing = False
            source.name = "localhost"
            await until(lambda: source.state == "ok" and len(changes) == 3)
            assert changes == [
                ("tcp://127.0.0.1:7001",),
                ("tcp://127.0.0.2:7001",),
                ("tcp://127.0.0.1:7001",),  # localhost, from the hosts file
            ]
        finally:
            await source.close()

    asyncio.run(scenario())


def test_an_ipv6_address_is_bracketed() -> None:
    try:
        socket.getaddrinfo("::1", 1, socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 on this machine")
    settings = DiscoveryConfig(dns=("::1", 7001))
    source = DnsSource("app", settings, lambda _: None)
    assert asyncio.run(source.resolve()) == ["tcp://[::1]:7001"]


async def until(predicate: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)
