"""A fleet rate shared through Redis: three proxies (separate processes), one Redis, real load.

The proxies take tokens from Redis in batches and spend them locally, so the
fleet admits at most ``rate * T + burst + 2 * max_batch * workers``
(pitcher_rpc.fleet.redis_limits). Redis is killed under load and started
again: a business with ``fail = "open"`` admits everything while it is away,
one with ``fail = "closed"`` holds each proxy to its share of the rate, and
both are back on the fleet's rate once Redis answers again, with no restart.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from dataclasses import dataclass

from pitcher_rpc.fleet.redis_limits import max_batch
from tests.process.test_master import admin_port
from tests.process.test_module_metrics import scrape
from tests.proxy.conftest import Launcher, get, toml_config
from tests.servers import Server

RATE = 200.0
BURST = 50.0
# The fleet: proxy 0 runs two workers, proxies 1 and 2 one process each.
WORKERS = (2, 0, 0)
PROCESSES = sum(max(1, workers) for workers in WORKERS)
# Offered load per business, split unevenly over the proxies.
OFFERED = 260.0
SPLIT = (0.6, 0.3, 0.1)
# Tokens the workers may hold beyond what the fleet's bucket gave out.
HELD = 2 * max_batch(RATE, BURST) * PROCESSES

# The run, in seconds from the start of the load.
KILL_AT = 1.5
START_AT = 2.7
# Redis back for a second: every worker has tried again (every 0.5 s at most) and found it.
MEASURE_AGAIN = 3.7
END_AT = 4.9


@dataclass
class Sent:
    at: float  # seconds from the start of the load
    proxy: int
    business: str
    status: int


class Connection:
    """One keep-alive client connection; reconnects when the proxy closes it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> int:
        for attempt in range(2):
            try:
                if self.writer is None:
                    self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
                assert self.reader is not None
                self.writer.write(f"GET {path} HTTP/1.1\r\nHost: fleet\r\n\r\n".encode())
                head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5)
                lines = head.decode("latin-1").split("\r\n")
                fields = dict(line.lower().split(": ", 1) for line in lines[1:] if line)
                await self.reader.readexactly(int(fields.get("content-length", "0")))
                if fields.get("connection") == "close":
                    self.close()
                return int(lines[0].split()[1])
            except (ConnectionError, asyncio.IncompleteReadError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def load(ports: list[int], events: dict[float, object]) -> list[Sent]:
    """OFFERED req/s per business, SPLIT over the proxies, until END_AT; ``events`` run on time."""
    sent: list[Sent] = []
    start = time.monotonic()

    async def stream(proxy: int, business: str, rate: float) -> None:
        connection = Connection(ports[proxy])
        index = 0
        try:
            while True:
                due = index / rate
                if due >= END_AT:
                    return
                delay = start + due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                at = time.monotonic() - start
                sent.append(Sent(at, proxy, business, await connection.get(f"/{business}/x")))
                index += 1
        finally:
            connection.close()

    async def timeline() -> None:
        for at, action in sorted(events.items()):
            delay = start + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await asyncio.to_thread(action)  # type: ignore[arg-type]

    streams = [
        # Two connections per proxy and business, each half of its rate.
        stream(proxy, business, OFFERED * share / 2)
        for proxy, share in enumerate(SPLIT)
        for business in ("open", "closed")
        for _ in range(2)
    ]
    await asyncio.gather(timeline(), *streams)
    return sent


def statuses(
    sent: list[Sent], business: str, since: float, until: float, proxy: int | None = None
) -> collections.Counter[int]:
    return collections.Counter(
        s.status
        for s in sent
        if s.business == business and since <= s.at < until and (proxy is None or s.proxy == proxy)
    )


def test_three_proxies_share_a_rate_and_hold_their_fail_modes_while_redis_is_away(
    launcher: Launcher, redis: Server
) -> None:
    echo = launcher.echo_backend("tcp")
    text = toml_config(
        [
            {"name": "open", "prefix": "/open/", "cluster": "echo", "business": "open"},
            {"name": "closed", "prefix": "/closed/", "cluster": "echo", "business": "closed"},
        ],
        {"echo": {"nodes": [echo.uri]}},
    )
    text += f"""
[modules.throttle]
scope = "fleet"
redis = "{redis.url}/0"
redis_timeout = 0.5

[modules.throttle.business.open]
rate = {RATE}
burst = {BURST}
fail = "open"

[modules.throttle.business.closed]
rate = {RATE}
burst = {BURST}
fail = "closed"
"""
    proxies = [launcher.proxy(text, workers=workers) for workers in WORKERS]
    # Every worker has said once which part of its proxy it is (the heartbeat).
    time.sleep(1.2)

    sent = asyncio.run(
        load([proxy.port for proxy in proxies], {KILL_AT: redis.kill, START_AT: redis.start})
    )

    # -- Redis answering: the fleet's rate, within the bound, whoever takes the load.
    for business in ("open", "closed"):
        healthy = statuses(sent, business, 0.0, KILL_AT)
        assert set(healthy) == {200, 429}, healthy
        bound = RATE * KILL_AT + BURST + HELD
        assert 0.8 * RATE * KILL_AT <= healthy[200] <= bound, (business, healthy, bound)
    # The proxy with most of the load got most of the tokens: no fixed split.
    busiest = statuses(sent, "open", 0.0, KILL_AT, proxy=0)[200]
    assert busiest > statuses(sent, "open", 0.0, KILL_AT, proxy=2)[200] * 2

    # -- Redis away: fail open admits everything (after the kill is noticed) ...
    away = statuses(sent, "open", KILL_AT + 0.2, START_AT)
    assert away == {200: sum(away.values())}, away
    # ... fail closed holds each proxy to its share (a third of the rate, three proxies).
    share = RATE / len(WORKERS)
    window = START_AT - KILL_AT
    for proxy, offered in enumerate(SPLIT):
        closed = statuses(sent, "closed", KILL_AT, START_AT, proxy=proxy)
        demand = OFFERED * offered
        if demand > share:
            # Its share, what it held of the fleet's tokens, and a worker's burst.
            assert closed[200] <= share * window + BURST / len(WORKERS) + HELD, (proxy, closed)
            assert closed[200] >= 0.6 * share * (window - 0.2), (proxy, closed)
            assert closed[429] > 0, (proxy, closed)
        else:
            # A proxy whose demand is below its share refuses nothing.
            assert closed[429] <= 2, (proxy, closed)

    # -- Redis back (a new, empty one): the fleet's rate again, without a restart.
    for business in ("open", "closed"):
        again = statuses(sent, business, MEASURE_AGAIN, END_AT)
        span = END_AT - MEASURE_AGAIN
        assert again[429] > 0, (business, again)
        assert again[200] <= RATE * span + BURST + HELD, (business, again)
        assert again[200] >= 0.7 * RATE * span, (business, again)

    # Nothing crashed; each worker said once that Redis went, once that it came back.
    for index, proxy in enumerate(proxies):
        output = proxy.process.output
        assert proxy.process.alive(), output
        assert "Traceback" not in output, output
        lines = output.splitlines()
        went = [line for line in lines if "fleet limits: Redis at" in line and "failed (" in line]
        back = [
            line for line in lines if "fleet limits: Redis at" in line and "again after" in line
        ]
        assert len(went) == len(back) == max(1, WORKERS[index]), output


def test_metrics_say_whether_redis_answers_and_what_each_worker_holds(
    launcher: Launcher, redis: Server
) -> None:
    echo = launcher.echo_backend("tcp")
    text = toml_config(
        [{"name": "shop", "prefix": "/", "cluster": "echo", "business": "shop"}],
        {"echo": {"nodes": [echo.uri]}},
    )
    text += f"""
[modules.throttle]
scope = "fleet"
redis = "{redis.url}/0"
redis_timeout = 0.3

[modules.throttle.business.shop]
rate = 500
fail = "closed"
"""
    proxy = launcher.proxy(text, workers=1)
    port = admin_port(proxy)

    def sample(name: str, **labels: str) -> float:
        family = scrape(port).get(name)
        assert family is not None, f"{name} is not on /metrics"
        for each in family.samples:
            if all(each.labels.get(key) == value for key, value in labels.items()):
                return float(each.value)
        raise AssertionError(f"no {name} sample with {labels}: {family.samples}")

    def settles(check: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 5.0
        while not check():
            assert time.monotonic() < deadline, what
            get(proxy, "/")  # a request spends a token: the worker refills
            time.sleep(0.1)

    settles(lambda: sample("pitcher_throttle_fleet_connected", worker="0") == 1.0, "Redis up")
    assert sample("pitcher_throttle_fleet_fail_mode", limit="shop.rate", worker="0") == 0.0
    assert sample("pitcher_throttle_fleet_refills", limit="shop.rate") >= 1
    assert sample("pitcher_throttle_fleet_proxies") == 1.0
    redis.kill()
    settles(lambda: sample("pitcher_throttle_fleet_connected", worker="0") == 0.0, "Redis away")
    assert sample("pitcher_throttle_fleet_fail_mode", limit="shop.rate", worker="0") == 1.0
    assert sample("pitcher_throttle_fleet_outages") >= 1
    redis.start()
    settles(lambda: sample("pitcher_throttle_fleet_connected", worker="0") == 1.0, "Redis back")
    assert sample("pitcher_throttle_fleet_fail_mode", limit="shop.rate", worker="0") == 0.0
