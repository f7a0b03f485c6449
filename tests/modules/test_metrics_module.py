"""metrics: counts, histograms and bytes per route, through a real proxy; kept over reloads."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from pitcher_rpc.config import parse_config
from pitcher_rpc.modules import Hook
from pitcher_rpc.modules.metrics import (
    DEFAULT_BUCKETS,
    UNROUTED,
    Histogram,
    Metrics,
    merge_reports,
)
from pitcher_rpc.modules.registry import module_class
from pitcher_rpc.proxy.server import ProxyServer
from pitcher_rpc.sdk import Request, Response, Service
from tests.inprocess import (
    assert_module_refuses,
    running_proxy,
    serving,
)
from tests.proxy.conftest import free_port

CONFIG = """
[server]
listen = "127.0.0.1:0"
{modules}
[[routes]]
name = "a"
prefix = "/a/"
cluster = "backend"

[[routes]]
name = "b"
prefix = "/b/"
cluster = "backend"

[[routes]]
name = "slow"
prefix = "/slow/"
cluster = "backend"

[[routes]]
name = "dead"
prefix = "/dead/"
cluster = "dead"
{more_routes}
[clusters.backend]
nodes = ["{node}"]

[clusters.dead]
nodes = ["tcp://127.0.0.1:{dead_port}"]
"""

SLEEP = 0.05

app = Service("metrics-test")


@app.route("/a/")
def fine(request: Request) -> Response:
    return Response(200, "fine\n")


@app.route("/b/")
def broken(request: Request) -> Response:
    return Response(500, "broken\n")


@app.route("/slow/")
async def slow(request: Request) -> Response:
    await asyncio.sleep(SLEEP)
    return Response(200, "slow\n")


def config(node: str, dead_port: int, modules: str, more_routes: str = "") -> str:
    return CONFIG.format(node=node, dead_port=dead_port, modules=modules, more_routes=more_routes)


async def get(port: int, path: str) -> tuple[int, int]:
    """The status and the number of bytes the client received (the proxy closes after)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return int(data.split(b" ", 2)[1]), len(data)


Check = Callable[[ProxyServer, int, Callable[[str, str], ProxyServer]], Awaitable[None]]


def with_proxy(modules: str, check: Check) -> None:
    """Run ``check(proxy, port, reload)``; ``reload(modules, more_routes)`` reloads the proxy."""

    async def main() -> None:
        async with serving(app) as [node]:
            dead_port = free_port()
            async with running_proxy(config(node, dead_port, modules)) as (proxy, port):

                def reload(modules: str, more_routes: str = "") -> ProxyServer:
                    proxy.reload(parse_config(config(node, dead_port, modules, more_routes)))
                    return proxy

                await check(proxy, port, reload)

    asyncio.run(main())


def route_stats(proxy: ProxyServer) -> dict[str, Any]:
    stats = proxy.module_stats()["metrics"]
    # It crosses the JSON control channel as it is.
    assert json.loads(json.dumps(stats)) == stats
    return stats["routes"]  # type: ignore[no-any-return]


def test_a_known_mix_is_counted_exactly() -> None:
    async def check(proxy: ProxyServer, port: int, reload: Any) -> None:
        sent: dict[str, int] = {}
        expected = [
            ("/a/x", 200, 5, "a"),
            ("/nowhere", 404, 3, UNROUTED),
            ("/b/x", 500, 2, "b"),
            ("/dead/x", 502, 1, "dead"),
            ("/slow/x", 200, 1, "slow"),
        ]
        for path, status, times, route in expected:
            for _ in range(times):
                answered, length = await get(port, path)
                assert answered == status
                sent[route] = sent.get(route, 0) + length

        routes = route_stats(proxy)
        assert set(routes) == {"a", UNROUTED, "b", "dead", "slow"}
        for _, status, times, route in expected:
            numbers = routes[route]
            assert numbers["requests"] == {str(status): times}
            # Every byte the client read, head included.
            assert numbers["response_bytes"] == sent[route]
            duration, backend, residence = (
                numbers[key] for key in ("duration", "backend_latency", "residence")
            )
            assert duration["count"] == residence["count"] == times
            assert backend["count"] == (0 if route == UNROUTED else times)
            for histogram in (duration, backend, residence):
                assert histogram["bounds"] == list(DEFAULT_BUCKETS)
                assert sum(histogram["counts"]) == histogram["count"]
                assert histogram["sum"] >= 0.0
            assert backend["sum"] <= duration["sum"]
            # Residence is what the backend leaves of the total, request by request.
            assert residence["sum"] == pytest.approx(duration["sum"] - backend["sum"], abs=1e-9)
        assert routes[UNROUTED]["backend_latency"]["sum"] == 0.0

        # The slow backend is seen where it is slow: in the backend's share.
        slow = routes["slow"]
        assert slow["backend_latency"]["sum"] >= SLEEP
        below = DEFAULT_BUCKETS.index(0.025) + 1
        assert sum(slow["backend_latency"]["counts"][:below]) == 0
        assert slow["residence"]["sum"] < SLEEP

    with_proxy("[modules.metrics]\n", check)


def test_numbers_survive_a_reload_that_keeps_the_settings_and_restart_when_they_change() -> None:
    async def check(proxy: ProxyServer, port: int, reload: Any) -> None:
        for _ in range(3):
            assert (await get(port, "/a/x"))[0] == 200
        module = proxy.snapshot.modules.modules["metrics"]

        # Other parts of the file change; the metrics table does not.
        reload("[modules.metrics]\n", '[[routes]]\nname = "c"\nprefix = "/c/"\ncluster = "backend"')
        assert proxy.snapshot.modules.modules["metrics"] is module
        assert (await get(port, "/a/x"))[0] == 200
        assert route_stats(proxy)["a"]["requests"] == {"200": 4}

        # The default buckets written out are the same settings.
        reload(f"[modules.metrics]\nbuckets = {list(DEFAULT_BUCKETS)}\n")
        assert proxy.snapshot.modules.modules["metrics"] is module
        assert route_stats(proxy)["a"]["duration"]["count"] == 4

        # New buckets: a new instance, counting from zero with them.
        reload("[modules.metrics]\nbuckets = [0.5, 5]\n")
        assert proxy.snapshot.modules.modules["metrics"] is not module
        assert proxy.module_stats()["metrics"] == {
            "bounds": [0.5, 5.0],
            "routes": {},
            "refusals": {},
        }
        assert (await get(port, "/a/x"))[0] == 200
        numbers = route_stats(proxy)["a"]
        assert numbers["requests"] == {"200": 1}
        assert numbers["duration"]["bounds"] == [0.5, 5.0]
        assert numbers["duration"]["counts"] == [1, 0, 0]

    with_proxy("[modules.metrics]\n", check)


def test_the_module_subscribes_only_to_request_finish_and_is_essential() -> None:
    assert module_class("metrics") is Metrics
    assert Metrics.hooks() == (Hook.REQUEST_FINISH,)
    assert Metrics.essential


# ---------------------------------------------------------------------- histograms


def test_a_value_on_a_bound_goes_in_that_bound_s_bucket() -> None:
    histogram = Histogram((0.1, 1.0, 10.0))
    for value in (0.0, 0.1, 0.1000001, 1.0, 1, 9.99, 10.0, 10.5, 1e9):
        histogram.observe(value)
    assert histogram.counts == [2, 3, 2, 2]
    assert histogram.cumulative() == [2, 5, 7, 9]
    assert histogram.count == 9
    assert histogram.sum == pytest.approx(sum((0.0, 0.1, 0.1000001, 1.0, 1, 9.99, 10.0, 10.5, 1e9)))
    assert histogram.snapshot() == {
        "bounds": [0.1, 1.0, 10.0],
        "counts": [2, 3, 2, 2],
        "sum": histogram.sum,
        "count": 9,
    }


def test_merge_adds_snapshots_of_the_same_bounds_and_refuses_others() -> None:
    one, two = Histogram((1.0, 2.0)), Histogram((1.0, 2.0))
    one.observe(0.5)
    one.observe(3.0)
    two.observe(2.0)
    merged = Histogram.merge([one.snapshot(), two.snapshot()])
    assert merged.bounds == (1.0, 2.0)
    assert merged.counts == [1, 1, 1]
    assert merged.sum == 5.5
    assert merged.count == 3
    # The parts are left as they were.
    assert one.counts == [1, 0, 1] and two.counts == [0, 1, 0]

    with pytest.raises(ValueError, match="bucketed by"):
        Histogram.merge([one.snapshot(), Histogram((1.0, 3.0)).snapshot()])
    with pytest.raises(ValueError, match="no histogram"):
        Histogram.merge([])


def report(bounds: tuple[float, ...], route: str, statuses: dict[str, int], *values: float) -> Any:
    histogram = Histogram(bounds)
    for value in values:
        histogram.observe(value)
    snapshot = histogram.snapshot()
    return {
        "bounds": list(bounds),
        "routes": {
            route: {
                "requests": statuses,
                "response_bytes": 100,
                "duration": snapshot,
                "backend_latency": snapshot,
                "residence": snapshot,
            }
        },
    }


def test_merge_reports_adds_counters_from_all_and_histograms_of_the_common_bounds() -> None:
    merged = merge_reports(
        [
            report((1.0,), "a", {"200": 2, "500": 1}, 0.5, 0.5, 2.0),
            report((1.0,), "a", {"200": 1}, 0.1),
            # A worker still on old buckets, mid-reload: counted, not bucketed.
            report((5.0,), "a", {"200": 4}, 1, 1, 1, 1),
        ]
    )
    assert set(merged) == {"a"}
    route = merged["a"]
    assert dict(route.requests) == {"200": 7, "500": 1}
    assert route.response_bytes == 300
    duration = route.histograms["duration"]
    assert duration.bounds == (1.0,)
    assert duration.counts == [3, 1]
    assert merge_reports([]) == {}


# ---------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("buckets = []", "buckets must be a non-empty array of seconds"),
        ("buckets = 1", "buckets must be a non-empty array of seconds"),
        ("buckets = [1, 0.5]", "strictly increasing: 0.5 after 1.0"),
        ("buckets = [1, 1]", "strictly increasing: 1 after 1.0"),
        ("buckets = [0, 1]", "0 is not a positive, finite number of seconds"),
        ("buckets = [-1]", "-1 is not a positive, finite number of seconds"),
        ("buckets = [1, inf]", "inf is not a positive, finite number of seconds"),
        ("buckets = ['1']", "'1' is not a number of seconds"),
        ("buckets = [true]", "True is not a number of seconds"),
        (f"buckets = {list(range(1, 66))}", "65 bounds, at most 64"),
        ("bucket = [1]", "unknown key 'bucket'"),
    ],
)
def test_bad_settings_are_refused_with_their_line(section: str, message: str) -> None:
    assert_module_refuses("metrics", section, message)


def test_good_settings_are_kept_as_floats() -> None:
    assert Metrics.validate({}) == {"buckets": DEFAULT_BUCKETS}
    assert Metrics.validate({"buckets": [1, 2.5]}) == {"buckets": (1.0, 2.5)}
    # What validate() returns is valid settings too (the proxy builds from it).
    assert Metrics({"buckets": (1.0, 2.5)}).bounds == (1.0, 2.5)
