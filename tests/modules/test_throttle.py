"""throttle: proxy-wide rate and concurrency limits and business quotas, through a real proxy."""

from __future__ import annotations

import asyncio
import collections
import socket
import struct
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pitcher_rpc.config import parse_config
from pitcher_rpc.proxy.server import ProxyServer
from pitcher_rpc.sdk import Request, Response, Service
from tests.inprocess import (
    assert_module_refuses,
    check_through_proxy,
    config_errors,
)
from tests.proxy.conftest import Launcher, toml_config

CONFIG = """
[server]
listen = "127.0.0.1:0"

[modules.throttle]
{throttle}

[[routes]]
name = "a"
prefix = "/a/"
cluster = "backend"
business = "a"

[[routes]]
name = "b"
prefix = "/b/"
cluster = "backend"
business = "b"

[[routes]]
name = "slow"
prefix = "/slow/"
cluster = "backend"

[clusters.backend]
nodes = ["{node}"]
"""

app = Service("throttle-test")


@app.route("/")
async def answer(request: Request) -> Response:
    if request.path.startswith("/slow/"):
        await asyncio.sleep(0.3)
    return Response(200, "ok")


async def get(port: int, path: str = "/a/x") -> tuple[int, dict[str, str]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head = data.partition(b"\r\n\r\n")[0].decode().split("\r\n")
    fields = dict(line.lower().split(": ", 1) for line in head[1:])
    return int(head[0].split()[1]), fields


def stats(proxy: ProxyServer) -> dict:
    return proxy.module_stats()["throttle"]


def test_rate_limit_refuses_with_429_and_retry_after_then_refills() -> None:
    async def check(proxy: ProxyServer, port: int) -> None:
        answers = [await get(port, "/a/x") for _ in range(8)]
        statuses = [status for status, _ in answers]
        assert statuses == [200] * 5 + [429] * 3
        assert answers[-1][1]["retry-after"] == "1"
        # A refusal carries the request id like any answer.
        assert answers[-1][1]["x-request-id"]
        await asyncio.sleep(0.25)  # 4 tokens/s: one more
        assert (await get(port, "/a/x"))[0] == 200
        assert stats(proxy)["refused"] == {"proxy:rate": 3}
        assert stats(proxy)["admitted"] == 6

    check_through_proxy(app, CONFIG, check, throttle="rate = 4\nburst = 5")


def test_concurrency_limit_refuses_with_503_and_frees_places() -> None:
    async def check(proxy: ProxyServer, port: int) -> None:
        first = [asyncio.create_task(get(port, "/slow/x")) for _ in range(2)]
        await asyncio.sleep(0.1)
        status, fields = await get(port, "/a/x")
        assert status == 503 and fields["retry-after"] == "1"
        assert [status for status, _ in await asyncio.gather(*first)] == [200, 200]
        assert (await get(port, "/a/x"))[0] == 200

        # A client that goes away (a reset) frees its place: the request ends as 499.
        for _ in range(3):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /slow/x HTTP/1.1\r\nHost: t\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()
        await asyncio.sleep(0.1)
        assert stats(proxy)["in_flight"] == {"concurrency": 0}
        assert (await get(port, "/a/x"))[0] == 200

    check_through_proxy(app, CONFIG, check, throttle="concurrency = 2")


def test_detect_mode_counts_and_refuses_nothing() -> None:
    async def check(proxy: ProxyServer, port: int) -> None:
        answers = [await get(port, "/a/x") for _ in range(6)]
        assert [status for status, _ in answers] == [200] * 6
        numbers = stats(proxy)
        assert numbers["mode"] == "detect"
        assert numbers["refused"] == {}
        assert numbers["would_refuse"] == {"proxy:rate": 4}

    check_through_proxy(app, CONFIG, check, throttle='rate = 1\nburst = 2\nmode = "detect"')


async def flood(port: int, path: str, rate: float, seconds: float) -> collections.Counter[int]:
    """Send requests at ``rate`` per second for ``seconds``, each on its own connection."""
    statuses: collections.Counter[int] = collections.Counter()
    tasks = []

    async def one() -> None:
        status, _ = await get(port, path)
        statuses[status] += 1

    start = time.monotonic()
    count = int(rate * seconds)
    for index in range(count):
        delay = start + index / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    return statuses


def test_a_business_flooding_at_ten_times_its_quota_leaves_another_untouched() -> None:
    throttle = """
rate = 60
burst = 20
[modules.throttle.business.a]
rate = 20
burst = 5
[modules.throttle.business.b]
rate = 20
burst = 5
reserved = 0.25
"""
    # B's reserve holds 5 tokens (a quarter of the burst), so B's requests may
    # arrive bunched by a busy event loop and still find a token.

    async def check(proxy: ProxyServer, port: int) -> None:
        a, b = await asyncio.gather(
            flood(port, "/a/x", rate=200, seconds=2.0), flood(port, "/b/x", rate=10, seconds=2.0)
        )
        assert b == {200: 20}
        # A got about its quota (20/s + burst), and was told to back off.
        assert 30 <= a[200] <= 50, a
        assert a[429] == 400 - a[200]

    check_through_proxy(app, CONFIG, check, throttle=throttle)


def test_a_reserved_share_holds_when_a_flood_drains_the_common_pool() -> None:
    # A's own quota is above the proxy's: A alone can empty the common pool.
    # B's reserve holds 6 tokens (30% of the burst), so B's requests may arrive
    # bunched by a busy event loop and still find a token.
    throttle = """
rate = 40
burst = 20
[modules.throttle.business.a]
rate = 1000
[modules.throttle.business.b]
reserved = 0.3
"""

    async def check(proxy: ProxyServer, port: int) -> None:
        a, b = await asyncio.gather(
            flood(port, "/a/x", rate=200, seconds=2.0), flood(port, "/b/x", rate=10, seconds=2.0)
        )
        assert b == {200: 20}
        assert a[429] > 300
        # At most the common pool (70% of the rate and of the burst) over the
        # flood's 2 s, with half a second for a slow finish; B's reserve stays B's.
        assert a[200] <= 0.7 * 40 * 2.5 + 0.7 * 20, a

    check_through_proxy(app, CONFIG, check, throttle=throttle)


def test_limits_hold_for_the_whole_proxy_with_two_workers(launcher: Launcher) -> None:
    echo = launcher.echo_backend("tcp")
    text = toml_config([{"prefix": "/", "cluster": "echo"}], {"echo": {"nodes": [echo.uri]}})
    text += "\n[modules.throttle]\nrate = 50\nburst = 10\n"
    proxy = launcher.proxy(text, workers=2)

    async def main() -> tuple[collections.Counter[int], collections.Counter[int]]:
        # Well below the limit, whichever worker takes each connection: nothing refused.
        calm = await flood(proxy.port, "/x", rate=8, seconds=3.0)
        return calm, await flood(proxy.port, "/x", rate=250, seconds=3.0)

    calm, statuses = asyncio.run(main())
    assert calm == {200: 24}
    # 50/s for 3 s plus the burst, whichever worker took each connection.
    assert 120 <= statuses[200] <= 50 * 3 + 10 + 10, statuses
    assert statuses[200] + statuses[429] == 750

    # Both workers took part, and /metrics adds their refusals up.
    line = proxy.process.wait_for_line("admin on ")
    admin = line.split("admin on ")[1].split(",")[0]
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as answer:
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(answer.read().decode())
            for sample in family.samples
        }
    assert samples[("pitcher_throttle_refused_total", (("limit", "proxy:rate"),))] == statuses[429]
    assert samples[("pitcher_throttle_admitted_total", ())] == statuses[200] + calm[200]
    assert {("pitcher_event_loop_lag_seconds", (("worker", w),)) for w in "01"} <= set(samples)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("rate = -1", "rate must be positive"),
        ("burst = 3", "burst needs a rate"),
        ("concurrency = 1.5", "concurrency must be a whole number"),
        ('mode = "dry"', 'mode must be "enforce" or "detect"'),
        ("[modules.throttle.business.a]\nreserved = 0.5", "reserved is a share of the proxy's"),
        (
            "rate = 10\n[modules.throttle.business.a]\nreserved = 0.6\n"
            "[modules.throttle.business.b]\nreserved = 0.5",
            "reserved shares add up to 1.1",
        ),
        ("rate = 10\n[modules.throttle.business.a]\nreserved = 1", "between 0 and 1"),
        ("colour = 1", "unknown key 'colour'"),
    ],
)
def test_bad_settings_are_refused_with_their_line(section: str, message: str) -> None:
    assert_module_refuses("throttle", section, message)


def test_a_route_business_must_be_a_plain_name() -> None:
    text = '[[routes]]\ncluster = "a"\nbusiness = "a b"\n[clusters.a]\nnodes = ["tcp://h:1"]\n'
    assert "t.toml:3: routes[0].business: must be a name" in config_errors(text, "t.toml")


def test_a_route_naming_a_business_without_a_quota_is_refused() -> None:
    text = (
        '[[routes]]\ncluster = "a"\nbusiness = "shopp"\n[clusters.a]\nnodes = ["tcp://h:1"]\n'
        "[modules.throttle]\n[modules.throttle.business.shop]\nrate = 5\n"
    )
    assert config_errors(text, "t.toml") == (
        "t.toml:3: routes[0].business: no [modules.throttle.business.shopp] quota"
        ' (known: shop); did you mean "shop"?'
    )
    # "default" and any name are fine while no business has a quota table.
    parse_config(text.replace('business = "shopp"', 'business = "default"'))
    parse_config(text.split("[modules.throttle]")[0])
