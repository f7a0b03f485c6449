"""Throughput with 0 (one process), 1 and 2 workers, in one script.

    python bench/bench_workers.py [--seconds 5] [--runs 3]

A Pitcher echo service on a Unix socket; the proxy in front of it with each
worker count in turn; wrk (or the bounded Python load generator) at 64
connections. Medians of the runs. Loopback only; every process is stopped by
pid.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_spine import SERVERS, exit_on_sigterm, free_port, http_load, process, wait_for_port

CONFIG = """
[server]
listen = "127.0.0.1:{port}"
backlog = 4096
[admin]
listen = "127.0.0.1:0"
[[routes]]
prefix = "/"
cluster = "echo"
[clusters.echo]
nodes = ["{node}"]
"""


def measure(workers: int, seconds: float, directory: str, node: str) -> float:
    port = free_port()
    config = Path(directory, f"proxy-{workers}.toml")
    config.write_text(CONFIG.format(port=port, node=node))
    command = [sys.executable, "-m", "pitcher_rpc.cli", "serve", "-c", str(config)]
    with process([*command, "--workers", str(workers)], ready=None):
        wait_for_port(port)
        http_load(port, 8, 1.0)  # warm up every worker's pool
        rps, _, _ = http_load(port, 64, seconds)
    return rps


def main() -> None:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="pitcher-bench-", dir="/tmp")
    results: dict[int, list[float]] = {0: [], 1: [], 2: []}
    try:
        node = f"unix://{directory}/echo.sock"
        with process([*SERVERS, "pitcher", node]):
            for run in range(args.runs):
                print(f"run {run + 1}/{args.runs}", file=sys.stderr, flush=True)
                for workers in results:
                    results[workers].append(measure(workers, args.seconds, directory, node))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    base = statistics.median(results[0])
    print(f"requests/s at 64 connections, medians of {args.runs} runs x {args.seconds:g}s")
    for workers, values in results.items():
        name = "single process" if workers == 0 else f"{workers} worker(s)"
        runs = "/".join(f"{v:.0f}" for v in values)
        median = statistics.median(values)
        print(f"  {name:<16} {median:>9.0f}  {median / base:.2f}x   runs {runs}")


if __name__ == "__main__":
    main()
