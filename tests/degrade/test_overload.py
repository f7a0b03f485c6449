"""Overload shedding: non-essential modules off under event-loop lag, back on after calm."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

import pytest

from pitcher_rpc.config import OverloadConfig, parse_config
from pitcher_rpc.degrade.overload import Shedder
from pitcher_rpc.modules.base import Module
from pitcher_rpc.modules.chain import HookChains
from pitcher_rpc.modules.registry import register, unregister
from pitcher_rpc.sdk import Request, Response, Service
from tests.inprocess import config_errors, running_proxy, serving

POLICY = OverloadConfig(lag_high=0.1, lag_low=0.02, recover_after=5.0, step=1.0)


def test_sheds_lowest_priority_first_one_step_at_a_time() -> None:
    shedder = Shedder(POLICY)
    order = ["log", "extra", "other"]
    assert shedder.sample(0.0, 0.05, 0, order) is None  # below the high mark
    step = shedder.sample(1.0, 0.2, 0, order)
    assert step is not None and (step.action, step.module) == ("shed", "log")
    assert shedder.sample(1.5, 0.2, 0, ["extra", "other"]) is None  # within the step
    step = shedder.sample(2.0, 0.2, 0, ["extra", "other"])
    assert step is not None and step.module == "extra"
    assert shedder.shed == ["log", "extra"]


def test_takes_back_only_after_calm_that_lasts_and_one_at_a_time() -> None:
    shedder = Shedder(POLICY)
    shedder.sample(0.0, 0.5, 0, ["log", "extra"])
    shedder.sample(1.0, 0.5, 0, ["extra"])
    # Calm, then a lag between the marks: the calm clock starts again.
    assert shedder.sample(2.0, 0.01, 0, []) is None
    assert shedder.sample(6.0, 0.05, 0, []) is None
    assert shedder.sample(7.0, 0.01, 0, []) is None
    assert shedder.sample(11.9, 0.01, 0, []) is None
    step = shedder.sample(12.0, 0.01, 0, [])
    assert step is not None and (step.action, step.module) == ("restore", "extra")
    assert shedder.sample(16.9, 0.01, 0, []) is None
    step = shedder.sample(17.0, 0.01, 0, [])
    assert step is not None and step.module == "log"
    assert shedder.shed == []


def test_in_flight_counts_as_overload_when_set() -> None:
    shedder = Shedder(OverloadConfig(in_flight_high=100, recover_after=1.0, step=0.0))
    step = shedder.sample(0.0, 0.0, 101, ["log"])
    assert step is not None and step.module == "log"
    assert shedder.sample(5.0, 0.0, 60, []) is None  # above the default low mark (50)
    assert shedder.sample(6.0, 0.0, 50, []) is None
    step = shedder.sample(7.0, 0.0, 50, [])
    assert step is not None and step.action == "restore"


def test_an_operator_switch_takes_a_module_out_of_shedding() -> None:
    shedder = Shedder(POLICY)
    shedder.sample(0.0, 0.5, 0, ["log"])
    shedder.forget("log")
    assert shedder.shed == []


def test_bad_overload_settings_are_refused_with_their_line() -> None:
    text = (
        '[[routes]]\ncluster = "a"\n[clusters.a]\nnodes = ["tcp://h:1"]\n'
        '[overload]\nlag_high = 0.01\nlag_low = 0.5\nmode = "sometimes"\n'
    )
    assert config_errors(text, "o.toml").splitlines() == [
        "o.toml:7: overload.lag_low: must not be above lag_high",
        'o.toml:8: overload.mode: must be "enforce", "detect" or "off", got "sometimes"',
    ]


# -- a real proxy with a deliberately slow module ----------------------------------------


class Slow(Module):
    """Blocks the event loop for 10 ms per request: a module too costly under load."""

    name = "slow_for_test"
    priority = 5

    def before_cluster(self, exchange: Any) -> None:
        time.sleep(0.01)


class Cheap(Module):
    name = "cheap_for_test"
    priority = 50

    def before_cluster(self, exchange: Any) -> None:
        return None


app = Service("overload-test")


@app.route("/")
def answer(request: Request) -> Response:
    return Response(200, "ok")


CONFIG = """
[server]
listen = "127.0.0.1:0"
keepalive_requests = 0  # the load keeps its connections for the whole test
[overload]
lag_high = 0.03
lag_low = 0.01
recover_after = 0.6
step = 0.2
[modules.slow_for_test]
[modules.cheap_for_test]
[[routes]]
prefix = "/"
cluster = "b"
[clusters.b]
nodes = ["{node}"]
"""


async def keep_asking(port: int, until: float) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answered = 0
    try:
        while time.monotonic() < until:
            writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            await reader.readuntil(b"\r\n\r\nok")
            answered += 1
    finally:
        writer.close()
    return answered


def test_a_slow_module_is_shed_under_load_and_back_after_calm() -> None:
    register(Slow)
    register(Cheap)

    async def main() -> None:
        timeline: list[tuple[float, bool]] = []
        async with (
            serving(app) as [node],
            running_proxy(CONFIG.format(node=node)) as (proxy, port),
        ):

            async def watch(until: float) -> None:
                while time.monotonic() < until:
                    timeline.append((time.monotonic(), "slow_for_test" in proxy.shedder.shed))
                    await asyncio.sleep(0.02)

            start = time.monotonic()
            load_until = start + 2.0
            watcher = asyncio.create_task(watch(load_until + 1.5))
            answered = await asyncio.gather(*(keep_asking(port, load_until) for _ in range(16)))
            await watcher

        assert sum(answered) > 0
        shed_at = [t - start for t, shed in timeline if shed]
        assert shed_at and shed_at[0] < 0.6, "not shed within the first steps of the load"
        # Only the lowest-priority module went; the cheap one and request_id stayed.
        describe = {m["name"]: m for m in proxy.snapshot.modules.describe()}
        assert describe["cheap_for_test"]["shed"] is False
        # Hysteresis: a module comes back only recover_after (0.6 s) after it went,
        # and goes again no sooner than a step (0.2 s) after it came back.
        changes = [(t, b) for (t, a), (_, b) in itertools.pairwise(timeline) if a != b]
        for (earlier, _), (later, shed) in itertools.pairwise(changes):
            assert later - earlier >= (0.15 if shed else 0.55), changes
        # Back on after the load stopped and stayed calm for recover_after.
        after = [(t - load_until, shed) for t, shed in timeline if t > load_until]
        assert after[-1][1] is False
        back = next(t for t, shed in after if not shed)
        assert back <= 0.6 + 0.3

    try:
        asyncio.run(main())
    finally:
        unregister(Slow.name)
        unregister(Cheap.name)


def test_detect_mode_says_what_it_would_shed_and_sheds_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    register(Slow)
    register(Cheap)

    async def main() -> list[bool]:
        shed_seen: list[bool] = []
        async with serving(app) as [node]:
            text = CONFIG.format(node=node).replace("[overload]\n", '[overload]\nmode = "detect"\n')
            async with running_proxy(text) as (proxy, port):

                async def watch(until: float) -> None:
                    while time.monotonic() < until:
                        described = {m["name"]: m for m in proxy.snapshot.modules.describe()}
                        shed_seen.append(described["slow_for_test"]["shed"])
                        await asyncio.sleep(0.02)

                until = time.monotonic() + 1.0
                await asyncio.gather(watch(until), *(keep_asking(port, until) for _ in range(16)))
        return shed_seen

    try:
        with caplog.at_level(logging.WARNING, "pitcher.proxy"):
            shed_seen = asyncio.run(main())
    finally:
        unregister(Slow.name)
        unregister(Cheap.name)
    assert shed_seen and not any(shed_seen)
    assert "overload (detect mode): would shed module slow_for_test" in caplog.text


def test_a_new_mode_starts_afresh() -> None:
    shedder = Shedder(OverloadConfig(mode="detect", step=0.0))
    shedder.sample(0.0, 0.5, 0, ["log"])
    shedder.sample(1.0, 0.5, 0, ["extra"])
    assert shedder.shed == ["log", "extra"]  # what detect mode would have shed
    shedder.configure(OverloadConfig(mode="enforce", step=0.0))
    assert shedder.shed == []  # not all at once now
    shedder.sample(2.0, 0.5, 0, ["log", "extra"])
    assert shedder.shed == ["log"]
    shedder.configure(OverloadConfig(mode="enforce", step=0.0, lag_high=0.2))
    assert shedder.shed == ["log"]  # same mode, new thresholds: kept


def test_the_configuration_decides_what_is_essential() -> None:
    register(Slow)
    register(Cheap)
    try:
        text = CONFIG.format(node="tcp://127.0.0.1:1").replace(
            "[modules.slow_for_test]\n", "[modules.slow_for_test]\nessential = true\n"
        )
        config = parse_config(text)
    finally:
        unregister(Slow.name)
        unregister(Cheap.name)
    overrides = {m.name: m.essential for m in config.modules if m.essential is not None}
    assert overrides == {"slow_for_test": True}
    chains = HookChains([Slow({}), Cheap({})], essential=overrides)
    assert chains.sheddable() == ["cheap_for_test"]
    assert HookChains([Slow({}), Cheap({})]).sheddable() == ["slow_for_test", "cheap_for_test"]
