"""metrics: each node's calls, failures by kind, pool and sizes, through a real proxy."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from pitcher_rpc.config import parse_config
from pitcher_rpc.modules.metrics import SIZE_BUCKETS
from pitcher_rpc.proxy.server import ProxyServer
from pitcher_rpc.proxy.upstream import FAILURE_KINDS, Cluster, Node, NodeStats
from pitcher_rpc.sdk import Request, Response, Service
from tests.inprocess import running_proxy, serving
from tests.proxy.conftest import free_port

CONFIG = """
[server]
listen = "127.0.0.1:0"

[modules.metrics]

[[routes]]
name = "api"
prefix = "/api/"
cluster = "backend"
timeout = 0.3
retries = 0

[[routes]]
name = "dead"
prefix = "/dead/"
cluster = "dead"
retries = 0

[clusters.backend]
nodes = ["{node}"]

[clusters.dead]
nodes = ["tcp://127.0.0.1:{dead_port}"]
{health}
"""

app = Service("nodes-test")


@app.route("/api/fine", methods=["GET", "POST"])
def fine(request: Request) -> Response:
    return Response(200, b"x" * 300)


@app.route("/api/broken")
def broken(request: Request) -> Response:
    return Response(503, "broken\n")


@app.route("/api/slow")
async def slow(request: Request) -> Response:
    await asyncio.sleep(1.0)
    return Response(200, "late\n")


async def ask(port: int, method: str, path: str, body: bytes = b"") -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n"
    writer.write(head.encode() + b"Connection: close\r\n\r\n" + body)
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return int(data.split(b" ", 2)[1])


def stats(proxy: ProxyServer) -> dict[str, Any]:
    report = proxy.module_stats()["metrics"]
    # It crosses the JSON control channel as it is.
    assert json.loads(json.dumps(report)) == report
    return report  # type: ignore[no-any-return]


def test_each_node_s_calls_and_failures_are_counted_by_kind_with_its_pool() -> None:
    async def main() -> None:
        async with serving(app) as [node]:
            text = CONFIG.format(node=node, dead_port=free_port(), health="")
            async with running_proxy(text) as (proxy, port):
                assert "nodes" not in stats(proxy)  # no request has shown it its proxy yet
                for _ in range(4):
                    assert await ask(port, "GET", "/api/fine") == 200
                assert await ask(port, "POST", "/api/fine", b"b" * 2000) == 200
                for _ in range(2):
                    assert await ask(port, "GET", "/api/broken") == 503
                assert await ask(port, "GET", "/api/slow") == 504
                for _ in range(3):
                    assert await ask(port, "GET", "/dead/x") == 502
                report = stats(proxy)

        nodes = report["nodes"]
        assert set(nodes) == {"backend", "dead"}
        [(uri, numbers)] = nodes["backend"].items()
        assert uri == node
        assert numbers["requests"] == 8
        assert numbers["failures"] == {
            kind: {"5xx": 2, "timeout": 1}.get(kind, 0) for kind in FAILURE_KINDS
        }
        assert numbers["in_flight"] == 0
        assert numbers["connections"] == 1
        [dead] = nodes["dead"].values()
        assert dead["requests"] == 3
        assert dead["failures"]["connect"] == 3
        assert dead["connections"] == 0

        api = report["routes"]["api"]
        body = api["request_body_size"]
        assert body["bounds"] == list(SIZE_BUCKETS)
        # Seven bodiless requests in the first bucket (le 0), the POST's 2000 bytes below 4096.
        assert body["counts"][0] == 7
        assert body["counts"][SIZE_BUCKETS.index(4096.0)] == 1
        assert body["sum"] == 2000
        answers = api["response_size"]
        assert sum(answers["counts"]) == 8
        assert answers["sum"] == api["response_bytes"]

    asyncio.run(main())


def test_a_reload_keeps_a_node_s_totals() -> None:
    async def main() -> None:
        async with serving(app) as [node]:
            dead_port = free_port()
            text = CONFIG.format(node=node, dead_port=dead_port, health="")
            async with running_proxy(text) as (proxy, port):
                assert await ask(port, "GET", "/api/fine") == 200
                # A health table on another cluster: a new snapshot, the node kept.
                proxy.reload(
                    parse_config(
                        CONFIG.format(
                            node=node, dead_port=dead_port, health="[clusters.dead.health]\n"
                        )
                    )
                )
                assert await ask(port, "GET", "/api/fine") == 200
                assert stats(proxy)["nodes"]["backend"][node]["requests"] == 2

    asyncio.run(main())


def test_an_overloaded_node_is_counted_but_not_judged() -> None:
    stats = NodeStats()
    node = Node("tcp://n:1", 1, client=None, stats=stats, failure_kinds=frozenset({"5xx"}))  # type: ignore[arg-type]
    for kind in (None, "4xx", "5xx", "overloaded", "timeout", "connect", "reset", "error"):
        node.record(kind)
    report = stats.report()
    assert report["requests"] == 8
    assert report["failures"] == {kind: 1 for kind in FAILURE_KINDS}
    # For health: 5xx is this cluster's only failure kind; overloaded is neither.
    assert (stats.successes, stats.failures) == (6, 1)
    assert stats.take() == (6, 1, 0)
    assert report["failures"]["overloaded"] == 1


def test_a_retry_is_counted_on_the_node_that_takes_it() -> None:
    a, b = (Node(f"tcp://{n}:1", 1, client=None, stats=NodeStats()) for n in "ab")  # type: ignore[arg-type]
    cluster = Cluster("c", [a, b], "round_robin")
    first = cluster.pick()
    assert first is not None
    other = cluster.pick((first,))  # the exchange's retry: avoid the node tried
    assert other is not None and other is not first
    assert (first.stats.retries, other.stats.retries) == (0, 1)  # type: ignore[union-attr]
    # A lone node takes its own retry: the pick that avoids it finds none, the next counts.
    lone = Node("tcp://l:1", 1, client=None, stats=NodeStats())  # type: ignore[arg-type]
    alone = Cluster("l", [lone], "round_robin")
    assert alone.pick() is lone
    assert alone.pick((lone,)) is None
    assert alone.pick() is lone
    assert alone.pick() is lone  # a first attempt again
    assert lone.stats.retries == 1  # type: ignore[union-attr]
