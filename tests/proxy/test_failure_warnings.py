"""A slow or dead node makes a few warnings a second, not one per request; the access log
still has every request, each with why it failed.

A real ``pitcher serve`` before a real backend that sleeps past the route's
timeout and a port nobody listens on; the warnings are read from the
proxy's stderr.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time

from tests.proxy.conftest import Launcher, free_port, toml_config, wait_until

SLOW_REQUESTS = 200
DEAD_REQUESTS = 20
CONNECTIONS = 20


async def statuses(port: int, target: str, count: int) -> list[int]:
    """``count`` GETs of ``target`` over CONNECTIONS keep-alive connections at once."""

    async def one_connection(requests: int) -> list[int]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        seen = []
        try:
            for _ in range(requests):
                writer.write(f"GET {target} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                assert length is not None, head
                await asyncio.wait_for(reader.readexactly(int(length[1])), 5)
                seen.append(int(head.split(b" ", 2)[1]))
        finally:
            writer.close()
        return seen

    share = count // CONNECTIONS
    results = await asyncio.gather(*(one_connection(share) for _ in range(CONNECTIONS)))
    return [status for result in results for status in result]


def told(lines: list[str], node: str) -> tuple[int, int]:
    """(warning lines about ``node``, the failures they stand for, counted ones included)."""
    mine = [line for line in lines if f"to {node} failed" in line]
    events = 0
    for line in mine:
        found = re.search(r"\(and (\d+) more like it in the last [\d.]+s\)", line)
        events += 1 + (int(found[1]) if found else 0)
    return len(mine), events


def test_a_slow_node_makes_a_few_warnings_and_the_access_log_has_every_request(
    launcher: Launcher,
) -> None:
    slow = launcher.test_backend("tcp")
    dead = f"tcp://127.0.0.1:{free_port()}"
    log_path = os.path.join(launcher.tmpdir, "access.log")
    config = toml_config(
        [
            {"name": "slow", "prefix": "/slow", "cluster": "slow", "timeout": 0.05, "retries": 0},
            {"name": "dead", "prefix": "/dead", "cluster": "dead", "retries": 0},
        ],
        {"slow": {"nodes": [slow.uri]}, "dead": {"nodes": [dead]}},
    )
    config += f"\n[modules.access_log]\npath = {json.dumps(log_path)}\nflush_interval = 0.02\n"
    proxy = launcher.proxy(config)

    async def flood() -> tuple[list[int], list[int]]:
        return await asyncio.gather(
            statuses(proxy.port, "/slow?sleep=2", SLOW_REQUESTS),
            statuses(proxy.port, "/dead", DEAD_REQUESTS),
        )

    started = time.monotonic()
    slow_statuses, dead_statuses = asyncio.run(flood())
    flood_took = time.monotonic() - started
    assert slow_statuses == [504] * SLOW_REQUESTS
    assert dead_statuses == [502] * DEAD_REQUESTS

    # Every failure is told of within a second of the last: the held ones in a summary.
    def everything_told() -> bool:
        lines = proxy.process.stderr_lines
        return told(lines, slow.uri)[1] == SLOW_REQUESTS and told(lines, dead)[1] == DEAD_REQUESTS

    wait_until(everything_told, 3.0, "the summary lines")
    slow_lines, _ = told(proxy.process.stderr_lines, slow.uri)
    dead_lines, _ = told(proxy.process.stderr_lines, dead)
    # One line at once, then at most one a second per node and kind, and a last summary.
    most = 2 + int(flood_took)
    assert 2 <= slow_lines <= most, proxy.process.output
    assert 1 <= dead_lines <= most, proxy.process.output
    assert re.search(r"\(and \d+ more like it in the last \d\.\ds\)", proxy.process.output)

    def logged() -> list[dict[str, object]]:
        with open(log_path, encoding="utf-8") as file:
            return [json.loads(line) for line in file]

    wait_until(lambda: len(logged()) == SLOW_REQUESTS + DEAD_REQUESTS, 5, "every line")
    reasons = sorted((line["route"], line["status"], line["reason"]) for line in logged())
    assert reasons == sorted(
        [("slow", 504, "timeout")] * SLOW_REQUESTS + [("dead", 502, "connect")] * DEAD_REQUESTS
    )
