"""throttle with scope = "fleet": a rate shared through a real Redis, through real proxies.

The load test with three proxy processes is tests/fleet/test_redis_limits.py;
here each behaviour on its own: the shared bucket, Retry-After, the fail
modes while Redis is down or slow and the recovery, a flushed script cache,
keys that expire, detect mode, the settings, and that a proxy without a
fleet limit loads neither redis-py nor the fleet layer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis as redis_py

from pitcher_rpc.fleet.redis_limits import max_batch
from pitcher_rpc.proxy.server import ProxyServer
from pitcher_rpc.sdk import Request, Response, Service
from tests.inprocess import assert_module_refuses, running_proxy, serving
from tests.modules.test_throttle import get
from tests.servers import Server

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIG = """
[server]
listen = "127.0.0.1:0"

[modules.throttle]
scope = "fleet"
redis = "{redis}"
redis_timeout = 0.2
{throttle}

[[routes]]
name = "a"
prefix = "/a/"
cluster = "backend"
business = "a"

[clusters.backend]
nodes = ["{node}"]
"""

app = Service("fleet-throttle-test")


@app.route("/")
async def answer(request: Request) -> Response:
    return Response(200, "ok")


def client(server: Server) -> redis_py.Redis:
    return redis_py.Redis(host="127.0.0.1", port=server.port, socket_timeout=2)


def fleet(proxy: ProxyServer) -> dict[str, Any]:
    return proxy.module_stats()["throttle"]["fleet"]  # type: ignore[no-any-return]


async def until(predicate: Callable[[], bool], what: str, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


Check = Callable[[list[tuple[ProxyServer, int]]], Awaitable[None]]


def run(server: Server, throttle: str, check: Check, proxies: int = 1) -> None:
    """``check`` against ``proxies`` in-process proxies sharing ``server``, before one app."""

    async def main() -> None:
        async with serving(app) as [node]:
            text = CONFIG.format(redis=server.url, throttle=throttle, node=node)
            contexts = [running_proxy(text) for _ in range(proxies)]
            started = [await context.__aenter__() for context in contexts]
            try:
                # Every proxy has its first batch (the refill starts with the proxy).
                await until(
                    lambda: all(fleet(p)["limits"]["a.rate"]["refills"] for p, _ in started),
                    "the first refill",
                )
                await check(started)
            finally:
                for context in reversed(contexts):
                    await context.__aexit__(None, None, None)

    asyncio.run(main())


BUSINESS = "[modules.throttle.business.a]\nrate = {rate}\nburst = {burst}\n{extra}"


def business(rate: float, burst: float, extra: str = "") -> str:
    return BUSINESS.format(rate=rate, burst=burst, extra=extra)


def test_two_proxies_share_one_rate_and_a_refusal_says_when_to_retry(redis: Server) -> None:
    rate, burst, batch = 5.0, 10.0, 2

    async def check(proxies: list[tuple[ProxyServer, int]]) -> None:
        started = time.monotonic()
        answers = [await get(proxies[index % 2][1]) for index in range(40)]
        elapsed = time.monotonic() - started
        admitted = sum(1 for status, _ in answers if status == 200)
        # The fleet's burst and rate, plus what two proxies may hold: never each its own.
        bound = burst + rate * elapsed + 2 * 2 * batch
        assert burst - 2 <= admitted <= bound, (admitted, bound)
        assert admitted < 2 * burst
        refused = [fields for status, fields in answers if status == 429]
        assert refused and all(int(fields["retry-after"]) >= 1 for fields in refused)
        for proxy, _ in proxies:
            numbers = fleet(proxy)
            assert numbers["errors"] == 0 and numbers["connected"]
            limit = numbers["limits"]["a.rate"]
            assert limit["mode"] == "fleet" and limit["max_batch"] == batch
            assert limit["held"] <= 2 * batch
        # The fleet counts two proxies (each one process: its whole share).
        await until(lambda: fleet(proxies[0][0])["proxies"] == 2.0, "two proxies counted")

        # The bucket lives in Redis under the prefix, and goes once it would be full.
        keys = client(redis)
        ttl = keys.pttl("{pitcher}:a.rate")
        assert 0 < ttl <= burst / rate * 1000 + 1000, ttl
        assert 0 < keys.pttl("{pitcher}:workers") <= 5000

    run(redis, business(rate, burst, f"batch = {batch}"), check, proxies=2)


def test_batches_default_to_50_ms_of_the_rate_within_the_burst() -> None:
    assert max_batch(200, 200) == 10
    assert max_batch(200, 4) == 4
    assert max_batch(1, 1) == 1
    assert max_batch(100_000, 100_000) == 5000


def test_fail_open_admits_while_redis_is_down_logs_once_and_recovers(
    redis: Server, caplog: pytest.LogCaptureFixture
) -> None:
    async def check(proxies: list[tuple[ProxyServer, int]]) -> None:
        proxy, port = proxies[0]
        assert {(await get(port))[0] for _ in range(12)} == {200, 429}
        await asyncio.to_thread(redis.kill)
        with caplog.at_level(logging.WARNING, logger="pitcher.fleet"):
            # Until the next refill finds Redis gone, the fleet's bucket is as it was
            # last seen (empty here: refusals); that is at most a batch's wait away.
            started = time.monotonic()
            while fleet(proxy)["limits"]["a.rate"]["mode"] != "open":
                assert time.monotonic() - started < 1.0, "Redis's death went unnoticed"
                await get(port)
            statuses = [(await get(port))[0] for _ in range(30)]
            await asyncio.sleep(0.3)  # retries with a backoff meanwhile
            statuses += [(await get(port))[0] for _ in range(10)]
        assert statuses == [200] * 40, statuses
        numbers = fleet(proxy)
        assert numbers["limits"]["a.rate"]["mode"] == "open"
        assert numbers["errors"] >= 2 and numbers["outages"] == 1
        assert numbers["limits"]["a.rate"]["unchecked"] >= 40
        went = [r for r in caplog.records if "failed" in r.getMessage()]
        assert len(went) == 1, [r.getMessage() for r in caplog.records]
        assert "fail open" in went[0].getMessage()

        await asyncio.to_thread(redis.start)
        await until(lambda: fleet(proxy)["limits"]["a.rate"]["mode"] == "fleet", "recovery")
        # A new Redis: a full bucket, then refusals again.
        assert {(await get(port))[0] for _ in range(12)} == {200, 429}
        assert any("again after" in r.getMessage() for r in caplog.records)

    run(redis, business(20, 3, "batch = 2"), check)


def test_a_proxy_started_while_redis_is_down_serves_and_joins_the_fleet_later(
    redis: Server,
) -> None:
    redis.kill()

    async def main() -> None:
        async with serving(app) as [node]:
            text = CONFIG.format(redis=redis.url, throttle=business(20, 3, "batch = 2"), node=node)
            async with running_proxy(text) as (proxy, port):
                # Fail open from the start: nothing is refused for want of a first batch.
                assert [(await get(port))[0] for _ in range(10)] == [200] * 10
                await until(lambda: fleet(proxy)["errors"] > 0, "the failed first refill")
                assert fleet(proxy)["limits"]["a.rate"]["mode"] == "open"
                await asyncio.to_thread(redis.start)
                await until(lambda: fleet(proxy)["limits"]["a.rate"]["mode"] == "fleet", "Redis")
                assert {(await get(port))[0] for _ in range(12)} == {200, 429}

    asyncio.run(main())


def test_fail_closed_enforces_the_proxys_share_locally(redis: Server) -> None:
    rate, burst = 4.0, 4.0

    async def check(proxies: list[tuple[ProxyServer, int]]) -> None:
        proxy, port = proxies[0]
        await until(lambda: fleet(proxy)["proxies"] == 1.0, "the heartbeat")
        await asyncio.to_thread(redis.kill)
        started = time.monotonic()
        statuses = [(await get(port))[0] for _ in range(30)]
        elapsed = time.monotonic() - started
        limit = fleet(proxy)["limits"]["a.rate"]
        assert limit["mode"] == "closed" and limit["unchecked"] == 0
        # One proxy in the fleet: its share is the whole rate, and it held a batch or two.
        admitted = statuses.count(200)
        assert 1 <= admitted <= burst + rate * elapsed + 2 * limit["max_batch"], statuses
        assert statuses.count(429) >= 30 - admitted

        await asyncio.to_thread(redis.start)
        await until(lambda: fleet(proxy)["limits"]["a.rate"]["mode"] == "fleet", "recovery")

    run(redis, business(rate, burst, 'fail = "closed"'), check)


def test_a_slow_redis_is_a_failure_after_the_timeout_and_no_request_waits(redis: Server) -> None:
    async def check(proxies: list[tuple[ProxyServer, int]]) -> None:
        proxy, port = proxies[0]
        # Redis stops answering every client for a second (CLIENT PAUSE): slow, not gone.
        client(redis).execute_command("CLIENT", "PAUSE", "1000", "ALL")
        started = time.monotonic()
        timings = []
        answered_while_waiting = 0
        while fleet(proxy)["limits"]["a.rate"]["mode"] != "open":
            assert time.monotonic() - started < 2.0, "the timeout never fired"
            before = time.monotonic()
            await get(port)
            timings.append(time.monotonic() - before)
            answered_while_waiting += fleet(proxy)["waiting"] > 0
        # Requests were answered while a refill waited for Redis: none waited with it.
        assert answered_while_waiting >= 3, (answered_while_waiting, timings)
        assert sorted(timings)[len(timings) // 2] < 0.05, timings
        # After the 0.2 s timeout, fail open admits.
        assert [(await get(port))[0] for _ in range(10)] == [200] * 10
        numbers = fleet(proxy)
        assert numbers["last_error"] == "no answer in time"
        await until(lambda: fleet(proxy)["limits"]["a.rate"]["mode"] == "fleet", "recovery")

    run(redis, business(2, 3), check)


def test_a_flushed_script_cache_is_loaded_again(redis: Server) -> None:
    async def check(proxies: list[tuple[ProxyServer, int]]) -> None:
        proxy, port = proxies[0]
        client(redis).script_flush()
        refills = fleet(proxy)["limits"]["a.rate"]["refills"]
        statuses = [(await get(port))[0] for _ in range(10)]
        assert 200 in statuses
        await until(lambda: fleet(proxy)["limits"]["a.rate"]["refills"] > refills, "a refill")
        assert fleet(proxy)["errors"] == 0

    run(redis, business(100, 100, "batch = 2"), check)


def test_closing_the_module_ends_its_refills_and_its_redis_connection(redis: Server) -> None:
    def connections() -> int:
        listed = client(redis).client_list()
        return sum(1 for entry in listed if entry.get("name") == "pitcher-fleet-limits")

    async def check(proxies: list[tuple[ProxyServer, int]]) -> None:
        proxy, port = proxies[0]
        assert connections() == 1
        throttle: Any = proxy.snapshot.modules.modules["throttle"]
        await throttle.aclose()
        await until(lambda: connections() == 0, "the connection closed")
        # Nothing refills any more: what the worker held is all it spends.
        refills = fleet(proxy)["limits"]["a.rate"]["refills"]
        statuses = [(await get(port))[0] for _ in range(8)]
        await asyncio.sleep(0.2)
        assert fleet(proxy)["limits"]["a.rate"]["refills"] == refills
        assert statuses.count(429) >= 8 - 2 * 2, statuses

    run(redis, business(100, 100, "batch = 2"), check)


def test_detect_mode_takes_fleet_tokens_and_refuses_nothing(redis: Server) -> None:
    async def check(proxies: list[tuple[ProxyServer, int]]) -> None:
        proxy, port = proxies[0]
        assert [(await get(port))[0] for _ in range(12)] == [200] * 12
        numbers = proxy.module_stats()["throttle"]
        assert numbers["mode"] == "detect" and numbers["refused"] == {}
        assert numbers["would_refuse"]["a:rate"] >= 6

    run(redis, 'mode = "detect"\n' + business(1, 3), check)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ('scope = "galaxy"\nrate = 1', 'scope must be "proxy" or "fleet"'),
        ('scope = "fleet"\nrate = 1', 'scope = "fleet" needs redis = "redis://'),
        ('scope = "fleet"\nrate = 1\nredis = "http://h:1"', "redis must be a redis://"),
        ('scope = "fleet"\nrate = 1\nredis = "redis://h:x"', "bad port"),
        ('scope = "fleet"\nredis = "redis://h"', 'scope = "fleet" shares a rate'),
        ('scope = "fleet"\nrate = 1\nredis = "redis://h"\nfail = "maybe"', 'fail must be "open"'),
        (
            'scope = "fleet"\nrate = 9\nburst = 4\nredis = "redis://h"\nbatch = 5',
            "exceed the burst",
        ),
        ('scope = "fleet"\nrate = 1\nredis = "redis://h"\nredis_timeout = 0', "redis_timeout"),
        ("rate = 1\nbatch = 2", 'batch applies to scope = "fleet" only'),
        ('rate = 1\nredis = "redis://h"', 'redis settings apply to scope = "fleet" only'),
        (
            'redis = "redis://h"\n[modules.throttle.business.a]\nscope = "fleet"\nconcurrency = 3',
            'business.a.scope = "fleet" shares a rate',
        ),
    ],
)
def test_bad_fleet_settings_are_refused_with_their_line(section: str, message: str) -> None:
    assert_module_refuses("throttle", section, message)


def test_a_password_in_the_url_is_never_shown(
    redis: Server, caplog: pytest.LogCaptureFixture
) -> None:
    error = assert_module_refuses(
        "throttle", 'scope = "fleet"\nrate = 1\nredis = "redis://u:s3cret@h:x/0"', "bad port"
    )
    assert "s3cret" not in error.text and "redis://u:***@h:x/0" in error.text

    # This Redis has no such user: AUTH fails, and neither the log nor the stats show it.
    url = f"redis://nobody:s3cret@127.0.0.1:{redis.port}/0"

    async def main() -> None:
        async with serving(app) as [node]:
            text = CONFIG.format(redis=url, throttle=business(5, 5), node=node)
            async with running_proxy(text) as (proxy, _):
                await until(lambda: fleet(proxy)["errors"] > 0, "the failed AUTH")
                numbers = fleet(proxy)
                assert numbers["redis"] == f"redis://nobody:***@127.0.0.1:{redis.port}/0"
                assert "s3cret" not in repr(numbers)

    with caplog.at_level(logging.WARNING, logger="pitcher.fleet"):
        asyncio.run(main())
    assert caplog.records and "s3cret" not in caplog.text


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def test_check_without_the_redis_client_names_the_pip_command(tmp_path: Any) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(
        '[[routes]]\ncluster = "a"\n[clusters.a]\nnodes = ["tcp://127.0.0.1:1"]\n'
        '[modules.throttle]\nrate = 5\nscope = "fleet"\nredis = "redis://127.0.0.1:6379/0"\n'
    )
    # As if the fleet extra were not installed: "import redis" finds nothing.
    hidden = "import sys\nsys.modules['redis'] = None\nfrom pitcher_rpc.cli import main\nmain()\n"
    result = _python(hidden, "check", "-c", str(path))
    assert result.returncode == 1, result
    assert "fleet.toml:7: modules.throttle.scope:" in result.stderr
    assert "pip install 'pitcher-rpc[fleet]'" in result.stderr + result.stdout
    # With the client, the same file is fine.
    result = _python("from pitcher_rpc.cli import main\nmain()\n", "check", "-c", str(path))
    assert result.returncode == 0, result


def test_a_proxy_without_a_fleet_limit_loads_no_redis_and_no_fleet_layer() -> None:
    result = _python(
        """
        import sys
        from pitcher_rpc.config import parse_config
        from pitcher_rpc.modules.throttle import Throttle
        config = parse_config(
            '[[routes]]\\ncluster = "a"\\nbusiness = "b"\\n[clusters.a]\\n'
            'nodes = ["tcp://127.0.0.1:1"]\\n[modules.throttle]\\nrate = 5\\n'
            '[modules.throttle.business.b]\\nrate = 2\\n'
        )
        Throttle(next(m for m in config.modules if m.name == "throttle").settings)
        prefixes = ("redis", "pitcher_rpc.fleet")
        print(sorted(m for m in sys.modules if m.startswith(prefixes)))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
