"""GC tuning and tail latency: the proxy started normally against the proxy tuned.

Run from the repository root (loopback only; every load is bounded in time)::

    python bench/bench_gc.py                    # 3 runs x 5 s per mode, medians
    python bench/bench_gc.py --seconds 3 --runs 1 --load python

Both proxies are the same launcher in a subprocess (this script with
``--serve-proxy``): :class:`ProxyServer` on uvloop with a generated config in
front of the Pitcher echo over TCP. The tuned one calls
``apply(GcSettings(freeze=True, thresholds=(50000, 50, 100)))`` once it
listens, as a worker will after start-up. Each records its collections with
:class:`GcPauses` and prints the snapshot as JSON when stopped with SIGTERM.

Per run and mode: a warm-up load, then a SIGUSR1 that starts the pause count
afresh, then the measured load: 32 keep-alive connections with one request in
flight each (wrk with a latency script where installed, else the callback
driven ``http_probe``). The two modes alternate which goes first. Reported are
the medians over runs of p50, p99 and p99.9 latency (with p99.99 and the
maximum, where rare pauses show), throughput, the proxy's CPU time per request
and its GC pauses during the measured load.

Closed-loop load understates tails (a stalled proxy also stalls its clients),
so compare the two columns with each other, not with an open-loop figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pitcher_rpc.benchmark.probes import http_probe  # noqa: E402
from pitcher_rpc.benchmark.runner import free_port, server_process  # noqa: E402
from pitcher_rpc.process.gc_tuning import (  # noqa: E402
    GcPauses,
    GcSettings,
    PauseSnapshot,
    apply,
)

PYTHON = sys.executable
DEFAULT_THRESHOLDS = (50_000, 50, 100)
# Generous: they only keep a broken proxy from hanging the benchmark.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0

PROXY_CONFIG = """
[server]
listen = "127.0.0.1:{port}"
backlog = 4096

[[routes]]
prefix = "/"
cluster = "echo"
timeout = 10.0

[clusters.echo]
nodes = ["{node}"]
"""


# ----------------------------------------------------------------- the proxy under test


async def serve_proxy(port: int, node: str, settings: GcSettings | None) -> None:
    """The child: a proxy, optionally tuned, reporting its GC pauses on SIGTERM."""
    from pitcher_rpc.config import parse_config
    from pitcher_rpc.proxy.server import ProxyServer

    proxy = ProxyServer(parse_config(PROXY_CONFIG.format(port=port, node=node), "bench_gc"))
    await proxy.start()
    # Start-up is over: modules imported, config loaded, the socket open.
    if settings is not None:
        apply(settings)
    pauses = GcPauses()
    pauses.install()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def restart_count() -> None:
        nonlocal pauses
        pauses.uninstall()
        pauses = GcPauses()
        pauses.install()
        print("reset", flush=True)

    loop.add_signal_handler(signal.SIGUSR1, restart_count)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print("ready", proxy.address, flush=True)
    await stop.wait()
    # Taken before draining, whose clean-up is not what is measured.
    snapshot = pauses.snapshot()
    pauses.uninstall()
    print(json.dumps(snapshot), flush=True)
    await proxy.stop(grace=1.0)


class ProxyProcess:
    """The parent's handle on one child proxy: start, reset its count, stop, read pauses."""

    def __init__(self, node: str, settings: GcSettings | None) -> None:
        self.port = free_port()
        args = [PYTHON, str(Path(__file__).resolve()), "--serve-proxy", str(self.port), node]
        if settings is not None and settings.thresholds is not None:
            args += ["--tuned", ",".join(map(str, settings.thresholds))]
        elif settings is not None:
            args += ["--tuned", "default"]
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.pid = self.process.pid
        # A reader thread, so that every wait for a line below has a timeout.
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"proxy {self.pid} stdout")
        self._reader.daemon = True
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put("")  # end of output

    def _expect(self, prefix: str, timeout: float) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"proxy {self.pid}: no {prefix!r} within {timeout}s") from None
        if not line.startswith(prefix):
            raise RuntimeError(f"proxy {self.pid}: expected {prefix!r}, got {line!r}")
        return line

    def wait_ready(self) -> None:
        self._expect("ready ", START_TIMEOUT)

    def restart_count(self) -> None:
        self.process.send_signal(signal.SIGUSR1)
        self._expect("reset", START_TIMEOUT)

    def finish(self) -> PauseSnapshot:
        self.process.send_signal(signal.SIGTERM)
        snapshot: PauseSnapshot = json.loads(self._expect("{", STOP_TIMEOUT))
        self.stop()
        return snapshot

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(1.0)


@contextlib.contextmanager
def proxy_process(node: str, settings: GcSettings | None) -> Iterator[ProxyProcess]:
    proxy = ProxyProcess(node, settings)
    try:
        proxy.wait_ready()
        yield proxy
    finally:
        proxy.stop()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------- load


@dataclass
class Load:
    """One bounded load; latencies in microseconds."""

    requests: int
    seconds: float
    errors: int
    p50: float
    p99: float
    p999: float
    p9999: float
    max: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


# wrk's --latency table stops at p99; its Lua hook reaches any percentile.
WRK_SCRIPT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("gc-bench %d %d %d %d %d %d %d %d\\n",
    summary.requests, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
    latency:percentile(99.99), latency.max))
end
"""
_WRK_LINE = re.compile(r"^gc-bench" + r" (\d+)" * 8 + "$", re.MULTILINE)


def wrk_load(port: int, connections: int, seconds: float, script: Path) -> Load:
    duration = max(1, round(seconds))  # wrk takes whole seconds only
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration}s",
            "--timeout",
            "5s",
            "--latency",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}/bench",
        ],
        capture_output=True,
        text=True,
        timeout=duration + 30,
        check=True,
    ).stdout
    match = _WRK_LINE.search(out)
    if match is None:
        raise RuntimeError(f"wrk printed no summary:\n{out}")
    requests, micros, errors, p50, p99, p999, p9999, longest = map(int, match.groups())
    return Load(requests, micros / 1e6, errors, p50, p99, p999, p9999, longest)


def python_load(port: int, connections: int, seconds: float) -> Load:
    result = uvloop.run(http_probe("127.0.0.1", port, connections, seconds))
    return Load(
        result.requests,
        result.seconds,
        result.errors,
        result.percentile(0.5),
        result.percentile(0.99),
        result.percentile(0.999),
        result.percentile(0.9999),
        max(result.latencies, default=0.0) * 1e6,
    )


# ------------------------------------------------------------------------ measurement


@dataclass
class Measurement:
    load: Load
    cpu_us: float
    pauses: PauseSnapshot


@dataclass
class Bench:
    seconds: float
    warmup: float
    connections: int
    use_wrk: bool
    script: Path

    def load(self, port: int, seconds: float) -> Load:
        if self.use_wrk:
            return wrk_load(port, self.connections, seconds, self.script)
        return python_load(port, self.connections, seconds)

    def measure(self, node: str, settings: GcSettings | None) -> Measurement:
        with proxy_process(node, settings) as proxy:
            self.load(proxy.port, self.warmup)  # connections, pools, caches, code paths
            proxy.restart_count()
            before = cpu_seconds(proxy.pid)
            load = self.load(proxy.port, self.seconds)
            cpu = cpu_seconds(proxy.pid) - before
            pauses = proxy.finish()
        return Measurement(load, cpu / max(1, load.requests) * 1e6, pauses)


@dataclass
class Runs:
    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.values.setdefault(key, []).append(value)

    def median(self, key: str) -> float:
        return statistics.median(self.values[key]) if key in self.values else float("nan")

    def spread(self, key: str, form: str = ".0f") -> str:
        return "/".join(f"{value:{form}}" for value in self.values.get(key, []))

    def record(self, mode: str, measurement: Measurement) -> None:
        load, pauses = measurement.load, measurement.pauses
        generations = pauses["generations"]
        self.add(f"{mode}.rps", load.rps)
        self.add(f"{mode}.p50", load.p50)
        self.add(f"{mode}.p99", load.p99)
        self.add(f"{mode}.p999", load.p999)
        self.add(f"{mode}.p9999", load.p9999)
        self.add(f"{mode}.max", load.max)
        self.add(f"{mode}.errors", load.errors)
        self.add(f"{mode}.requests", load.requests)
        self.add(f"{mode}.cpu", measurement.cpu_us)
        for generation, entry in enumerate(generations):
            self.add(f"{mode}.gen{generation}", entry["count"])
        self.add(f"{mode}.collections", sum(entry["count"] for entry in generations))
        self.add(f"{mode}.gc_ms", sum(entry["sum"] for entry in generations) * 1e3)
        self.add(f"{mode}.gc_max_us", max(entry["max"] for entry in generations) * 1e6)


MODES = ("normal", "tuned")


def report(runs: Runs, settings: GcSettings, connections: int) -> None:
    m = runs.median
    rows = [
        ("p50 latency µs", "p50", ".0f"),
        ("p99 latency µs", "p99", ".0f"),
        ("p99.9 latency µs", "p999", ".0f"),
        ("p99.99 latency µs", "p9999", ".0f"),
        ("max latency µs", "max", ".0f"),
        ("requests/s", "rps", ".0f"),
        ("proxy CPU µs/request", "cpu", ".1f"),
        ("load errors", "errors", ".0f"),
        ("GC collections gen 0", "gen0", ".0f"),
        ("GC collections gen 1", "gen1", ".0f"),
        ("GC collections gen 2", "gen2", ".0f"),
        ("GC pause total ms", "gc_ms", ".2f"),
        ("GC longest pause µs", "gc_max_us", ".0f"),
    ]
    print(f"  {'':<22}{'normal':>12}{'tuned':>12}{'tuned/normal':>14}   runs normal | tuned")
    for label, key, form in rows:
        normal, tuned = m(f"normal.{key}"), m(f"tuned.{key}")
        ratio = f"{tuned / normal:.2f}" if normal else "-"
        spread = f"{runs.spread(f'normal.{key}', form)} | {runs.spread(f'tuned.{key}', form)}"
        print(f"  {label:<22}{normal:>12{form}}{tuned:>12{form}}{ratio:>14}   {spread}")
    print(f"  tuned = apply({settings})")
    # A pause stalls the one event loop, so it delays at most the requests in
    # flight: one per connection under this closed-loop load.
    for mode in MODES:
        delayed = m(f"{mode}.collections") * connections / m(f"{mode}.requests")
        if not delayed:
            print(f"  {mode}: no GC pause during the measured load")
            continue
        print(
            f"  {mode}: GC pauses could delay at most {delayed:.4%} of requests;"
            f" percentiles below p{100 * (1 - delayed):.4g} cannot move because of them"
        )


def parse_thresholds(text: str) -> tuple[int, int, int] | None:
    if text == "default":
        return None
    first, second, third = (int(part) for part in text.split(","))
    return first, second, third


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured load per mode")
    parser.add_argument("--warmup", type=float, default=1.0, help="load before measuring")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--load", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument(
        "--thresholds",
        default=",".join(map(str, DEFAULT_THRESHOLDS)),
        help='of the tuned proxy, "A,B,C" or "default" (freeze only)',
    )
    parser.add_argument("--serve-proxy", nargs=2, metavar=("PORT", "NODE"), help=argparse.SUPPRESS)
    parser.add_argument("--tuned", metavar="THRESHOLDS", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve_proxy:
        port, node = args.serve_proxy
        settings = None
        if args.tuned:
            settings = GcSettings(freeze=True, thresholds=parse_thresholds(args.tuned))
        uvloop.run(serve_proxy(int(port), node, settings))
        return

    tuned = GcSettings(freeze=True, thresholds=parse_thresholds(args.thresholds))
    use_wrk = args.load == "wrk" or (args.load == "auto" and shutil.which("wrk") is not None)
    runs = Runs()
    directory = Path(tempfile.mkdtemp(prefix="pitcher-bench-gc-", dir="/tmp"))
    try:
        script = directory / "latency.lua"
        script.write_text(WRK_SCRIPT)
        bench = Bench(args.seconds, args.warmup, args.connections, use_wrk, script)
        for run in range(args.runs):
            # Alternate who goes first, so drift over a run does not favour one mode.
            order = MODES if run % 2 == 0 else MODES[::-1]
            with server_process("pitcher", f"tcp://127.0.0.1:{free_port()}") as node:
                for mode in order:
                    print(f"run {run + 1}/{args.runs}: {mode}", file=sys.stderr, flush=True)
                    measurement = bench.measure(node, tuned if mode == "tuned" else None)
                    runs.record(mode, measurement)
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    print(
        f"Pitcher RPC GC benchmark: {args.runs} run(s) x {args.seconds:g}s per mode,"
        f" {args.connections} connections, {os.cpu_count()} CPUs,"
        f" load by {'wrk' if use_wrk else 'the Python probe'}; medians"
    )
    report(runs, tuned, args.connections)


if __name__ == "__main__":
    main()
