"""Keep-alive load of bounded count and time, and where it goes after a worker is killed.

:func:`run_load` keeps ``connections`` keep-alive clients sending one request
after another, each reconnecting when an answer says ``connection: close``
(as wrk and every HTTP client do) or its connection breaks; it stops at
``seconds``, at ``max_requests`` answers, or when ``stop`` is set, whichever
comes first. ``tests/process/test_worker_balance.py`` uses it.

Run as a module it measures what docs/process.md quotes (under the bench
lock; about two minutes)::

    flock /tmp/pitcher-bench.lock .venv/bin/python -m tests.process.keepalive_load

1. With two workers under 64 keep-alive connections, one worker is killed
   with SIGKILL; each second for ten seconds after its replacement starts,
   the replacement's share of the requests served (from ``GET
   /admin/workers``), with ``keepalive_requests`` at 1000 and at 0.
2. The setting's cost: wrk (64 connections, 2 s) against the same proxy
   with ``keepalive_requests`` at 0, 1000, 100 and 10, one run of each per
   round; medians, and the medians of each one's ratios to 0 in its round
   (requests per second, and the workers' CPU time per request).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import statistics
import subprocess
import threading
import time
from typing import Any

# keepalive_requests values whose throughput is compared with wrk; the base first.
THROUGHPUT_LIMITS = (0, 1000, 100, 10)
REQUEST = b"GET /balance HTTP/1.1\r\nHost: load\r\n\r\n"
# After a failed connect or a broken connection: not a tight loop of retries.
RETRY_PAUSE = 0.01


class LoadResult:
    """What the clients saw: answers, reconnections the proxy asked for, failures."""

    __slots__ = ("closed_by_proxy", "failures", "served")

    def __init__(self) -> None:
        self.served = 0
        self.closed_by_proxy = 0
        self.failures: list[str] = []


async def _client(
    host: str,
    port: int,
    result: LoadResult,
    deadline: float,
    max_requests: int,
    stop: threading.Event,
) -> None:
    loop = asyncio.get_running_loop()
    writer: asyncio.StreamWriter | None = None
    reader: asyncio.StreamReader | None = None
    while loop.time() < deadline and result.served < max_requests and not stop.is_set():
        try:
            if writer is None or reader is None:
                reader, writer = await asyncio.open_connection(host, port)
            writer.write(REQUEST)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            lowered = head.lower()
            match = re.search(rb"\r\ncontent-length: *(\d+)", lowered)
            await asyncio.wait_for(reader.readexactly(int(match.group(1)) if match else 0), 5.0)
            result.served += 1
            if b"\r\nconnection: close\r\n" in lowered:
                result.closed_by_proxy += 1
                writer.close()
                writer = reader = None
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            result.failures.append(repr(exc))
            if writer is not None:
                writer.close()
            writer = reader = None
            await asyncio.sleep(RETRY_PAUSE)
    if writer is not None:
        writer.close()


def run_load(
    host: str,
    port: int,
    connections: int,
    seconds: float,
    max_requests: int,
    stop: threading.Event | None = None,
    result: LoadResult | None = None,
) -> LoadResult:
    """Load the proxy from this thread until the time, the count or ``stop`` ends it."""
    result = result if result is not None else LoadResult()
    stop = stop if stop is not None else threading.Event()

    async def main() -> None:
        deadline = asyncio.get_running_loop().time() + seconds
        await asyncio.gather(
            *(_client(host, port, result, deadline, max_requests, stop) for _ in range(connections))
        )

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
    return result


def start_load(
    host: str, port: int, connections: int, seconds: float, max_requests: int
) -> tuple[threading.Thread, threading.Event, LoadResult]:
    """:func:`run_load` in a thread; set the event to stop it, then join the thread."""
    stop = threading.Event()
    result = LoadResult()
    thread = threading.Thread(
        target=run_load,
        args=(host, port, connections, seconds, max_requests, stop, result),
        name="keepalive-load",
        daemon=True,
    )
    thread.start()
    return thread, stop, result


def requests_by_pid(admin_port: int) -> dict[int, int]:
    from tests.process.test_master import admin

    status, body = admin(admin_port, "/admin/workers")
    assert status == 200, body
    return {w["pid"]: w["requests"] for w in body["workers"] if "pid" in w}


def shares_after_kill(
    proxy_host: str,
    proxy_port: int,
    admin_port: int,
    connections: int,
    warm: float,
    windows: int,
    window: float = 1.0,
) -> tuple[list[float], float, LoadResult]:
    """Kill a worker under load; the replacement's share in each window after it starts.

    Also returns the seconds from the kill to the replacement's first report.
    """
    from tests.proxy.conftest import wait_until

    budget = warm + 10.0 + windows * window
    thread, stop, result = start_load(proxy_host, proxy_port, connections, budget, 10**9)
    shares: list[float] = []
    try:
        time.sleep(warm)
        before = requests_by_pid(admin_port)
        os.kill(min(before), signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(
            lambda: len(set(requests_by_pid(admin_port)) - set(before)) == 1, 10.0, "a new worker"
        )
        started = time.monotonic() - killed_at
        last = requests_by_pid(admin_port)
        replacement = (set(last) - set(before)).pop()
        for _ in range(windows):
            time.sleep(window)
            now = requests_by_pid(admin_port)
            total = sum(now[pid] - last.get(pid, 0) for pid in now)
            shares.append((now[replacement] - last.get(replacement, 0)) / total if total else 0.0)
            last = now
    finally:
        stop.set()
        thread.join(10)
    return shares, started, result


# measuring ---------------------------------------------------------------------------


def _wrk(host: str, port: int, seconds: int, connections: int) -> tuple[float, int]:
    """wrk's requests per second and its count of requests answered."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", f"http://{host}:{port}/balance"],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
    ).stdout
    rate = re.search(r"Requests/sec:\s*([\d.]+)", out)
    count = re.search(r"(\d+) requests in", out)
    assert rate and count, out
    return float(rate.group(1)), int(count.group(1))


def _cpu_seconds(pids: list[int]) -> float:
    """User and system CPU time of these processes so far."""
    ticks = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat", encoding="ascii") as file:
            fields = file.read().rpartition(")")[2].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def _run_once(proxy: Any, pids: list[int]) -> tuple[float, float]:
    """One wrk run: requests per second, and the workers' CPU microseconds per request."""
    cpu = _cpu_seconds(pids)
    rate, count = _wrk(proxy.host, proxy.port, 2, 64)
    return rate, (_cpu_seconds(pids) - cpu) / max(1, count) * 1e6


def _config(echo_uri: str, limit: int) -> str:
    from tests.proxy.conftest import toml_config

    return toml_config(
        [{"name": "echo", "prefix": "/", "cluster": "echo"}],
        {"echo": {"nodes": [echo_uri]}},
        server={"keepalive_requests": limit, "drain_timeout": 2.0},
    )


def measure(
    runs: int, throughput_runs: int, limits: tuple[int, ...] = THROUGHPUT_LIMITS
) -> dict[str, Any]:
    """Both measurements; ``runs`` or ``throughput_runs`` at 0 skips one.

    ``limits`` are the settings whose throughput is compared; the first is the base.
    """
    from tests.process.test_master import admin_port
    from tests.proxy.conftest import Launcher

    report: dict[str, Any] = {"shares": {}, "rps": {}, "ratios": {}, "cpu": {}}
    launcher = Launcher()
    try:
        echo = launcher.echo_backend("tcp")
        for run in range(runs):
            for limit in (1000, 0):
                proxy = launcher.proxy(_config(echo.uri, limit), workers=2)
                shares, started, result = shares_after_kill(
                    proxy.host, proxy.port, admin_port(proxy), 64, warm=2.0, windows=10
                )
                proxy.process.stop()
                report["shares"].setdefault(limit, []).append(shares)
                print(
                    f"run {run} keepalive_requests={limit}: replacement up {started:.2f} s after"
                    f" the kill; its share per second: {[round(s, 3) for s in shares]};"
                    f" {result.served} answers, {result.closed_by_proxy} closes asked,"
                    f" {len(result.failures)} failures",
                    flush=True,
                )
        proxies = {
            limit: launcher.proxy(_config(echo.uri, limit), workers=2)
            for limit in (limits if throughput_runs else ())
        }
        pids = {limit: list(requests_by_pid(admin_port(p))) for limit, p in proxies.items()}
        for proxy in proxies.values():
            _wrk(proxy.host, proxy.port, 1, 64)  # warm up each once
        for run in range(throughput_runs):
            # Every limit once per round, in an order that alternates: the
            # ratios to 0 are taken within a round, so that a neighbour's load
            # on the machine moves both sides of them. CPU per request moves
            # less with that load than requests per second do.
            order = list(proxies) if run % 2 == 0 else list(reversed(proxies))
            runs_now = {limit: _run_once(proxies[limit], pids[limit]) for limit in order}
            base_rate, base_cpu = runs_now[limits[0]]
            for limit, (rate, cpu) in runs_now.items():
                report["rps"].setdefault(limit, []).append(rate)
                report["ratios"].setdefault(limit, []).append(rate / base_rate)
                report["cpu"].setdefault(limit, []).append(cpu / base_cpu)
            print(
                f"round {run}: "
                + ", ".join(
                    f"{limit}: {runs_now[limit][0]:.0f}/s {runs_now[limit][1]:.0f} us/request"
                    for limit in limits
                ),
                flush=True,
            )
    finally:
        launcher.close()
    for limit, values in report["rps"].items():
        ratio = statistics.median(report["ratios"][limit])
        cpu = statistics.median(report["cpu"][limit])
        print(
            f"keepalive_requests={limit}: median {statistics.median(values):.0f} requests/s;"
            f" medians of the ratios to 0 in each round: requests/s {ratio:.3f},"
            f" workers' CPU per request {cpu:.3f}"
        )
    for limit, runs_shares in report["shares"].items():
        per_second = [statistics.median(run[i] for run in runs_shares) for i in range(10)]
        print(
            f"keepalive_requests={limit}: median share of the replacement per second"
            f" {[round(s, 3) for s in per_second]}"
        )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--throughput-runs", type=int, default=7)
    parser.add_argument(
        "--limits",
        default=",".join(map(str, THROUGHPUT_LIMITS)),
        help="keepalive_requests values to compare, the base first",
    )
    args = parser.parse_args()
    limits = tuple(int(value) for value in args.limits.split(","))
    with contextlib.suppress(KeyboardInterrupt):
        measure(args.runs, args.throughput_runs, limits)


if __name__ == "__main__":
    main()
