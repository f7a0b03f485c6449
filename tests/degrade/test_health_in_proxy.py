"""Node health wired into the proxy: config, balancing by health, the book, a real proxy."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from types import SimpleNamespace

import pytest

from pitcher_rpc.config import parse_config
from pitcher_rpc.degrade.book import HealthBook
from pitcher_rpc.degrade.health import HealthPolicy
from pitcher_rpc.proxy.balance import HealthWeighted
from pitcher_rpc.proxy.server import ProxyServer
from pitcher_rpc.sdk import Request, Response, Service
from tests.inprocess import answering, config_errors, running_proxy, serving

BASE = """
[[routes]]
prefix = "/"
cluster = "c"
[clusters.c]
nodes = ["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"]
[clusters.c.health]
"""


def test_health_table_is_read_with_defaults() -> None:
    config = parse_config(BASE + "ejection_time = 2\nfailures = ['connect', '4xx']\n")
    health = config.clusters["c"].health
    assert health is not None
    assert health.policy == HealthPolicy(ejection_time=2.0)
    assert health.failures == {"connect", "4xx"}
    assert health.ramp_in_flight == 100
    assert parse_config(BASE.replace("[clusters.c.health]\n", "")).clusters["c"].health is None


def test_bad_health_settings_are_refused_at_their_line() -> None:
    errors = config_errors(
        BASE + "failure_ratio = 2\nfailures = ['3xx']\nramp_in_flight = 0\nwindow = 3\n",
        "h.toml",
    )
    assert errors.splitlines() == [
        "h.toml:8: clusters.c.health.failure_ratio: must be in (0, 1], got 2",
        "h.toml:9: clusters.c.health.failures[0]: must be one of "
        '"connect", "timeout", "reset", "error", "5xx", "4xx", got "3xx"; did you mean "5xx"?',
        "h.toml:10: clusters.c.health.ramp_in_flight: must be between 1 and 1000000, got 0",
        "h.toml:11: clusters.c.health.window: unknown key (did you mean window_seconds?)",
    ]


def node(name: str, effective: float, cap: int = 0, in_flight: int = 0) -> SimpleNamespace:
    return SimpleNamespace(
        name=name, effective=effective, cap=cap, stats=SimpleNamespace(in_flight=in_flight)
    )


def test_balancing_follows_effective_weights_caps_and_exclusions() -> None:
    a, b, c = node("a", 1.0), node("b", 0.25), node("c", 0.0)
    balancer = HealthWeighted([a, b, c])
    picks = collections.Counter(balancer.pick().name for _ in range(1000))
    assert picks == {"a": 800, "b": 200}
    b.cap, b.stats.in_flight = 2, 2  # ramping node with its cap in flight
    assert {balancer.pick().name for _ in range(50)} == {"a"}
    assert balancer.pick(exclude=[a]) is None


def test_the_book_merges_keeps_state_over_reloads_and_forgets_removed_nodes() -> None:
    text = BASE + "slow_start = 0\nconsecutive_failures = 3\nejection_time = 10\n"
    book = HealthBook()
    book.configure(parse_config(text), 0.0)
    verdicts = book.tick({"tcp://127.0.0.1:1": (0, 3, 3)}, 1.0)
    assert verdicts == {"c": {"tcp://127.0.0.1:1": 0.0, "tcp://127.0.0.1:2": 1.0}}
    assert book.events[("c", "ejected")] == 1
    # The same health settings after a reload: the ejection stands.
    book.configure(parse_config(text.replace("127.0.0.1:2", "127.0.0.1:3")), 2.0)
    assert book.tick({}, 2.0) == {"c": {"tcp://127.0.0.1:1": 0.0, "tcp://127.0.0.1:3": 1.0}}
    assert book.describe(2.0)["c"]["nodes"]["tcp://127.0.0.1:1"]["state"] == "ejected"
    # Outcomes of nodes no cluster watches are ignored.
    assert book.tick({"tcp://127.0.0.1:9": (0, 50, 50)}, 3.0)["c"]["tcp://127.0.0.1:3"] == 1.0


# -- a real proxy: one node answers 500 ---------------------------------------------------

good = answering("good", 200, "good")
bad = answering("bad", 500, "bad")


PROXY = """
[server]
listen = "127.0.0.1:0"
[[routes]]
prefix = "/"
cluster = "c"
retries = 0
[clusters.c]
nodes = ["{good}", "{bad}"]
[clusters.c.health]
slow_start = 0
ejection_time = 30
{extra}
"""


async def ask(port: int, count: int) -> collections.Counter[str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    bodies: collections.Counter[str] = collections.Counter()
    try:
        for _ in range(count):
            writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            bodies[(await reader.readexactly(length)).decode()] += 1
            await asyncio.sleep(0.002)
    finally:
        writer.close()
    return bodies


def run_proxy(extra: str) -> tuple[collections.Counter[str], ProxyServer]:
    async def main() -> tuple[collections.Counter[str], ProxyServer]:
        async with serving(good, bad) as [good_node, bad_node]:
            text = PROXY.format(good=good_node, bad=bad_node, extra=extra)
            async with running_proxy(text) as (proxy, port):
                return await ask(port, 300), proxy

    return asyncio.run(main())


def test_when_every_node_looks_bad_the_cluster_panics_and_keeps_sending(
    caplog: pytest.LogCaptureFixture,
) -> None:
    worse = answering("worse", 500, "worse")

    async def main() -> tuple[collections.Counter[str], ProxyServer]:
        async with serving(bad, worse) as nodes:
            text = PROXY.format(good=nodes[1], bad=nodes[0], extra="")
            async with running_proxy(text) as (proxy, port):
                return await ask(port, 100), proxy

    with caplog.at_level(logging.WARNING, "pitcher.health"):
        bodies, proxy = asyncio.run(main())
    assert proxy.health is not None
    # One of two may be ejected (the cap); the other goes bad too: panic. The
    # proxy keeps sending to both rather than answering 503 to everyone.
    assert set(bodies) == {"bad", "worse"}, bodies
    assert min(bodies.values()) >= 40, bodies
    described = proxy.health.describe(time.monotonic())["c"]
    assert described["panic"] is True
    assert described["events"]["ejected"] == 1
    assert described["events"]["ejection_refused"] == 1
    assert described["events"]["panic"] == 1
    assert "panic: too many nodes look bad; sending to every node" in caplog.text


def test_a_node_answering_500_is_ejected_and_traffic_moves_away() -> None:
    bodies, proxy = run_proxy("")
    assert proxy.health is not None
    # Five 500s in a row eject it (consecutive detector): judged at once, not at the tick.
    assert bodies["bad"] == 5, bodies
    assert bodies["good"] >= 285
    described = proxy.health.describe(time.monotonic())["c"]
    bad_node = next(n for n in described["nodes"].values() if n["state"] == "ejected")
    assert bad_node["factor"] == 0.0
    assert described["events"] == {"ejected": 1}


def test_detect_only_counts_the_ejection_and_changes_nothing() -> None:
    bodies, proxy = run_proxy("detect_only = true")
    assert proxy.health is not None
    assert abs(bodies["bad"] - bodies["good"]) <= 2  # still round robin
    described = proxy.health.describe(time.monotonic())["c"]
    assert described["events"] == {"would_eject": 1}
    assert {n["state"] for n in described["nodes"].values()} == {"healthy"}


def test_5xx_need_not_count() -> None:
    bodies, _ = run_proxy("failures = ['connect', 'timeout', 'reset']")
    assert abs(bodies["bad"] - bodies["good"]) <= 2


# -- an all-new cluster ramps the load it admits ------------------------------------------

slow = Service("slow")


@slow.route("/")
async def slowly(request: Request) -> Response:
    await asyncio.sleep(0.25)
    return Response(200, "slow")


RAMP = """
[server]
listen = "127.0.0.1:0"
[[routes]]
prefix = "/"
cluster = "c"
[clusters.c]
nodes = ["{node}"]
[clusters.c.health]
slow_start = 1.5
min_weight_percent = 10
ramp_in_flight = 10
"""


async def burst(port: int, count: int) -> collections.Counter[str]:
    async def one() -> str:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        answer = await reader.read()
        writer.close()
        status = answer.split()[1].decode()
        if status == "503":
            assert b"\r\nretry-after: 1\r\n" in answer.lower()
        return status

    return collections.Counter(await asyncio.gather(*(one() for _ in range(count))))


def test_a_cold_start_admits_the_whole_load_at_once() -> None:
    """No node has failed yet: none ramps, none refuses (it once capped every node)."""

    async def main() -> list[collections.Counter[str]]:
        answers = []
        async with (
            serving(slow) as [node],
            running_proxy(RAMP.format(node=node)) as (_, port),
        ):
            started = time.monotonic()
            # Before the first tick (0.1 s), after it, and midway through what was the ramp.
            for at in (0.0, 0.15, 0.75):
                await asyncio.sleep(max(0.0, started + at - time.monotonic()))
                answers.append(await burst(port, 10))
        return answers

    assert asyncio.run(main()) == [{"200": 10}] * 3


def test_a_node_back_from_ejection_ramps_with_its_in_flight_cap() -> None:
    text = RAMP.format(node="tcp://127.0.0.1:1") + (
        "consecutive_failures = 3\nejection_time = 1\nprobation_requests = 1\n"
        "max_ejection_percent = 100\n"
    )
    config = parse_config(text)
    book = HealthBook()
    book.configure(config, 0.0)
    assert book.tick({}, 0.1) == {"c": {"tcp://127.0.0.1:1": 1.0}}
    book.tick({"tcp://127.0.0.1:1": (0, 3, 3)}, 0.2)
    assert book.describe(0.2)["c"]["nodes"]["tcp://127.0.0.1:1"]["state"] == "ejected"
    assert book.tick({}, 1.3)["c"]["tcp://127.0.0.1:1"] == 0.1  # probation: a trickle
    assert book.tick({"tcp://127.0.0.1:1": (1, 0, 0)}, 1.4)["c"]["tcp://127.0.0.1:1"] == 0.1
    assert book.describe(1.4)["c"]["nodes"]["tcp://127.0.0.1:1"]["state"] == "slow_start"
    halfway = book.tick({}, 1.4 + 0.75)

    async def caps() -> list[int]:
        proxy = ProxyServer(config, local_health=False)
        proxy.apply_health(halfway)
        found = [node.cap for node in proxy.snapshot.clusters["c"].nodes]
        await proxy.stop(0.0)
        return found

    # Half of ramp_in_flight (10) halfway through the 1.5 s ramp.
    assert asyncio.run(caps()) == [5]


def test_only_nodes_joining_a_serving_cluster_ramp() -> None:
    text = BASE + "slow_start = 10\n"
    book = HealthBook()
    book.configure(parse_config(text), 0.0)  # cold: nothing has failed
    assert set(book.tick({}, 1.0)["c"].values()) == {1.0}
    # New thresholds for the cluster, and a node it did not have: only that one ramps.
    changed = (text + "min_failures = 7\n").replace(
        '"tcp://127.0.0.1:2"]', '"tcp://127.0.0.1:2", "tcp://127.0.0.1:3"]'
    )
    book.configure(parse_config(changed), 2.0)
    assert book.tick({}, 2.0)["c"] == {
        "tcp://127.0.0.1:1": 1.0,
        "tcp://127.0.0.1:2": 1.0,
        "tcp://127.0.0.1:3": 0.1,
    }
    # Every node replaced, and a cluster added: no node is left to take the load
    # while they would ramp, so none does.
    replaced = changed.replace("127.0.0.1:1", "127.0.0.1:4").replace("127.0.0.1:2", "127.0.0.1:5")
    replaced = replaced.replace("127.0.0.1:3", "127.0.0.1:6")
    added = replaced + '[clusters.d]\nnodes = ["tcp://127.0.0.1:7"]\n[clusters.d.health]\n'
    book.configure(parse_config(added), 3.0)
    assert book.tick({}, 3.0) == {
        "c": {"tcp://127.0.0.1:4": 1.0, "tcp://127.0.0.1:5": 1.0, "tcp://127.0.0.1:6": 1.0},
        "d": {"tcp://127.0.0.1:7": 1.0},
    }


def test_a_worker_gives_full_weight_until_the_book_knows_a_node_of_the_cluster() -> None:
    async def main() -> list[list[tuple[float, int]]]:
        text = BASE + "ramp_in_flight = 100\n"
        proxy = ProxyServer(parse_config(text), local_health=False)
        seen = []
        for verdicts in (
            {},  # no tick yet
            {"c": {"tcp://127.0.0.1:9": 1.0}},  # the book knows none of these nodes
            {"c": {"tcp://127.0.0.1:1": 1.0}},  # it knows one: the other starts ramping
        ):
            proxy.apply_health(verdicts)
            seen.append([(n.effective, n.cap) for n in proxy.snapshot.clusters["c"].nodes])
        await proxy.stop(0.0)
        return seen

    assert asyncio.run(main()) == [
        [(1.0, 0), (1.0, 0)],
        [(1.0, 0), (1.0, 0)],
        [(1.0, 0), (0.1, 10)],
    ]


def test_a_worker_takes_its_part_of_a_ramping_node_s_in_flight_cap() -> None:
    async def main() -> list[int]:
        text = BASE + "ramp_in_flight = 100\n"
        proxy = ProxyServer(parse_config(text), default_share=0.25, local_health=False)
        proxy.apply_health({"c": {"tcp://127.0.0.1:1": 0.1, "tcp://127.0.0.1:2": 1.0}})
        caps = [node.cap for node in proxy.snapshot.clusters["c"].nodes]
        await proxy.stop(0.0)
        return caps

    # 10% of 100 for the whole proxy; this worker is one of four: 3 (2.5, rounded up).
    assert asyncio.run(main()) == [3, 0]
