"""The spine benchmark: transport client against its floor, proxy against nginx.

Run from the repository root (loopback only; every load is bounded in time)::

    python bench/bench_spine.py                # 3 runs of every measurement, medians
    python bench/bench_spine.py --seconds 3 --runs 1 --skip-http

(a) Transports. For TCP and Unix sockets: the Pitcher client against a
    Pitcher echo server, beside the floor for that carrier: a plain uvloop
    client against a plain uvloop echo (no framing, no ids, no pool) in the
    same run. One request in flight (round trips/s, p50) and 64 in flight.
    (`pitcher bench` does this for every transport; this script adds nginx.)

(b) HTTP. wrk (or, without it, a bounded Python load generator) against:
    the HTTP echo service alone; the proxy in front of the Pitcher echo over
    TCP and over UDS; and nginx (one worker, keep-alive upstream) in front of
    the HTTP echo, where nginx is installed. Throughput at 64 connections,
    p50 latency at 1 connection, and the proxy's CPU time per request.

Every server runs in its own process, started and stopped by pid here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pitcher_rpc.benchmark.probes import floor_probe, pitcher_probe  # noqa: E402
from pitcher_rpc.benchmark.runner import address_for, server_process  # noqa: E402

PYTHON = sys.executable
SERVERS = [PYTHON, "-m", "pitcher_rpc.benchmark.servers"]


def exit_on_sigterm() -> None:
    """SIGTERM ends a run as Ctrl-C does: every ``finally`` then stops what the run started."""
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def process(args: list[str], ready: str | None = "ready", **kwargs: object) -> Iterator[int]:
    """Run a server process until the block ends; wait for its ``ready`` line."""
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        **kwargs,  # type: ignore[call-overload]
    )
    try:
        if ready is not None:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if ready not in line:
                raise RuntimeError(f"{args} did not start: {line!r}")
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for_port(port: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on port {port}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------- (a) transports


def transport_bench(seconds: float) -> dict[str, float]:
    results: dict[str, float] = {}
    tmp = tempfile.mkdtemp(prefix="pitcher-bench-", dir="/tmp")
    try:
        for carrier in ("tcp", "unix"):
            for kind, probe in (("floor", floor_probe), ("frames", pitcher_probe)):
                with server_process(kind, address_for(carrier, tmp, kind)) as address:
                    for in_flight in (1, 64):
                        result = uvloop.run(probe(address, in_flight, seconds))
                        name = "raw" if kind == "floor" else kind
                        results[f"{carrier}.{name}.{in_flight}.rps"] = result.rate
                        results[f"{carrier}.{name}.{in_flight}.p50"] = result.p50
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


# ------------------------------------------------------------------------------ (b) HTTP


@dataclass
class HttpResult:
    rps: float
    p50_us: float
    cpu_us: float = float("nan")


def _wrk(url: str, connections: int, seconds: float) -> tuple[float, float, int]:
    out = subprocess.run(
        # wrk takes whole seconds only.
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency", url],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    value, unit = re.search(r"\s50%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    p50 = float(value) * {"us": 1, "ms": 1e3, "s": 1e6}[unit]
    return rps, p50, requests


async def _python_load(port: int, connections: int, seconds: float) -> tuple[float, float, int]:
    """A bounded keep-alive load generator for machines without wrk."""
    request = b"GET /hello HTTP/1.1\r\nHost: bench\r\n\r\n"
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while (began := time.perf_counter()) < stop:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - began)
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(connections)))
    elapsed = time.perf_counter() - start
    return len(latencies) / elapsed, statistics.median(latencies) * 1e6, len(latencies)


def http_load(port: int, connections: int, seconds: float) -> tuple[float, float, int]:
    if shutil.which("wrk"):
        return _wrk(f"http://127.0.0.1:{port}/hello", connections, seconds)
    return uvloop.run(_python_load(port, connections, seconds))


def measure_http(port: int, seconds: float, cpu_pid: int | None) -> HttpResult:
    wait_for_port(port)
    http_load(port, 8, 1.0)  # warm up: connections, pools, caches
    before = cpu_seconds(cpu_pid) if cpu_pid else 0.0
    rps, _, requests = http_load(port, 64, seconds)
    cpu = (cpu_seconds(cpu_pid) - before) / requests * 1e6 if cpu_pid else float("nan")
    _, p50, _ = http_load(port, 1, max(1.0, seconds / 2))
    return HttpResult(rps, p50, cpu)


PROXY_CONFIG = """
[server]
listen = "127.0.0.1:{port}"
backlog = 4096
keepalive_requests = 0   # as nginx's 1000000 below: no reconnections in the measure

[[routes]]
prefix = "/"
cluster = "echo"
timeout = 10.0

[clusters.echo]
nodes = ["{node}"]
"""

NGINX_CONFIG = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  upstream backend {{ server 127.0.0.1:{backend}; keepalive 128; keepalive_requests 1000000; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    keepalive_requests 1000000;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"""


def http_bench(seconds: float, with_nginx: bool) -> dict[str, HttpResult]:
    results: dict[str, HttpResult] = {}
    tmp = tempfile.mkdtemp(prefix="pitcher-bench-", dir="/tmp")
    try:
        backend_port = free_port()
        with process([*SERVERS, "http", f"127.0.0.1:{backend_port}"]):
            results["backend alone"] = measure_http(backend_port, seconds, None)
            nginx = shutil.which("nginx") or (
                "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None
            )
            if with_nginx and nginx:
                port = free_port()
                conf = Path(tmp, "nginx.conf")
                conf.write_text(NGINX_CONFIG.format(dir=tmp, backend=backend_port, port=port))
                with process([nginx, "-c", str(conf), "-p", tmp], ready=None):
                    wait_for_port(port)
                    workers = subprocess.run(
                        ["pgrep", "-f", "nginx: worker"], capture_output=True, text=True
                    ).stdout.split()
                    worker = int(workers[-1]) if workers else None
                    results["nginx -> http"] = measure_http(port, seconds, worker)
        for carrier in ("tcp", "unix"):
            node = (
                f"tcp://127.0.0.1:{free_port()}" if carrier == "tcp" else f"unix://{tmp}/echo.sock"
            )
            port = free_port()
            conf = Path(tmp, f"proxy-{carrier}.toml")
            conf.write_text(PROXY_CONFIG.format(port=port, node=node))
            with (
                process([*SERVERS, "pitcher", node]),
                process(
                    [PYTHON, "-m", "pitcher_rpc.cli", "serve", "-c", str(conf), "--workers", "0"],
                    ready=None,
                ) as proxy_pid,
            ):
                results[f"pitcher -> {carrier}"] = measure_http(port, seconds, proxy_pid)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results


# ------------------------------------------------------------------------------ reporting


@dataclass
class Runs:
    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.values.setdefault(key, []).append(value)

    def median(self, key: str) -> float:
        return statistics.median(self.values[key]) if key in self.values else float("nan")

    def spread(self, key: str) -> str:
        values = self.values.get(key, [])
        return "/".join(f"{v:.0f}" for v in values)


def report(runs: Runs, line: Callable[[str], None]) -> None:
    m = runs.median
    if any(k.startswith("tcp.") for k in runs.values):
        line("(a) transports: round trips/s (p50 µs), medians; ratio = pitcher / raw floor")
        for carrier in ("tcp", "unix"):
            for n in (1, 64):
                raw, pit = m(f"{carrier}.raw.{n}.rps"), m(f"{carrier}.frames.{n}.rps")
                raw_p50, pit_p50 = m(f"{carrier}.raw.{n}.p50"), m(f"{carrier}.frames.{n}.p50")
                line(
                    f"  {carrier:<5} {n:>2} in flight: raw {raw:>9.0f} ({raw_p50:5.1f})"
                    f"   pitcher {pit:>9.0f} ({pit_p50:5.1f})"
                    f"   ratio {pit / raw:.2f}   runs {runs.spread(f'{carrier}.frames.{n}.rps')}"
                )
    names = sorted({k.split(".")[0] for k in runs.values if k.startswith("http:")})
    if names:
        line("(b) HTTP: rps at 64 connections, p50 µs at 1 connection, proxy CPU µs/request")
        for name in names:
            line(
                f"  {name[5:]:<15} {m(name + '.rps'):>9.0f} rps  p50 {m(name + '.p50'):6.1f}"
                f"  cpu {m(name + '.cpu'):5.1f}   runs {runs.spread(name + '.rps')}"
            )
        base = m("http:backend alone.p50")
        nginx_rps = m("http:nginx -> http.rps")
        nginx_added = m("http:nginx -> http.p50") - base
        for carrier in ("tcp", "unix"):
            name = f"http:pitcher -> {carrier}"
            added = m(name + ".p50") - base
            line(
                f"  pitcher over {carrier:<4}: {m(name + '.rps') / nginx_rps:.2f}x nginx rps;"
                f" adds {added:.0f} µs p50 (nginx adds {nginx_added:.0f} µs)"
            )


def main() -> None:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-transports", action="store_true")
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--skip-nginx", action="store_true")
    args = parser.parse_args()
    runs = Runs()
    for run in range(1, args.runs + 1):
        print(f"run {run}/{args.runs}", file=sys.stderr, flush=True)
        if not args.skip_transports:
            for key, value in transport_bench(args.seconds).items():
                runs.add(key, value)
        if not args.skip_http:
            for name, result in http_bench(args.seconds, not args.skip_nginx).items():
                runs.add(f"http:{name}.rps", result.rps)
                runs.add(f"http:{name}.p50", result.p50_us)
                runs.add(f"http:{name}.cpu", result.cpu_us)
    print(
        textwrap.dedent(f"""\
        Pitcher RPC spine benchmark: {args.runs} runs x {args.seconds:g}s,
        {os.cpu_count()} CPUs, load by {"wrk" if shutil.which("wrk") else "the Python generator"}
    """).rstrip()
    )
    report(runs, print)


if __name__ == "__main__":
    main()
