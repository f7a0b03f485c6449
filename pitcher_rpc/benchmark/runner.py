"""Runs the measurements of `pitcher bench`, each server in its own process."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import uvloop

from .probes import Result, floor_probe, http_probe, pitcher_probe

CARRIERS = ("tcp", "unix", "udp", "zmq+tcp", "zmq+ipc")
_START_TIMEOUT = 10.0


@dataclass
class Row:
    carrier: str
    path: str  # "floor", "client" or "proxy"
    in_flight: int
    result: Result


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def address_for(carrier: str, directory: str, name: str) -> str:
    if carrier in ("unix", "zmq+ipc"):
        return f"{carrier}://{directory}/{name}.sock"
    if carrier == "udp":
        return f"udp://127.0.0.1:{free_port(socket.SOCK_DGRAM)}"
    return f"{carrier}://127.0.0.1:{free_port()}"


@contextlib.contextmanager
def server_process(kind: str, address: str) -> Iterator[str]:
    """Run one echo server; yield the address it reports once it listens."""
    process = subprocess.Popen(
        [sys.executable, "-m", "pitcher_rpc.benchmark.servers", kind, address],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("ready "):
            raise RuntimeError(f"the {kind} echo on {address} did not start")
        yield line.split(None, 1)[1].strip()
    finally:
        _stop(process)


@contextlib.contextmanager
def proxy_process(node: str, directory: str) -> Iterator[int]:
    """Run a proxy routing every path to ``node``; yield its port."""
    port = free_port()
    config = Path(directory, f"proxy-{port}.toml")
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\nbacklog = 4096\n\n'
        f'[[routes]]\nprefix = "/"\ncluster = "echo"\ntimeout = 10.0\n\n'
        f'[clusters.echo]\nnodes = ["{node}"]\n'
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "pitcher_rpc.cli", "serve", "-c", str(config), "--workers", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"the proxy in front of {node} did not start")
            time.sleep(0.02)
        yield port
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run(
    carriers: tuple[str, ...],
    seconds: float,
    in_flight: int,
    with_proxy: bool = True,
    progress: Callable[[str], None] = lambda _: None,
) -> list[Row]:
    """Every measurement for every carrier; ``seconds`` is the whole budget of load."""
    per_carrier = 6 if with_proxy else 4
    slot = max(0.2, seconds / (len(carriers) * per_carrier))
    rows: list[Row] = []
    directory = tempfile.mkdtemp(prefix="pitcher-bench-", dir="/tmp")
    try:
        for carrier in carriers:
            progress(f"{carrier}: floor")
            with server_process("floor", address_for(carrier, directory, "floor")) as address:
                for n in (1, in_flight):
                    rows.append(Row(carrier, "floor", n, uvloop.run(floor_probe(address, n, slot))))
            progress(f"{carrier}: pitcher client")
            with server_process("frames", address_for(carrier, directory, "frames")) as address:
                for n in (1, in_flight):
                    result = uvloop.run(pitcher_probe(address, n, slot))
                    rows.append(Row(carrier, "client", n, result))
            if with_proxy:
                progress(f"{carrier}: through the proxy")
                with (
                    server_process("pitcher", address_for(carrier, directory, "echo")) as node,
                    proxy_process(node, directory) as port,
                ):
                    uvloop.run(http_probe("127.0.0.1", port, 4, 0.2))  # warm the pools
                    for n in (1, in_flight):
                        result = uvloop.run(http_probe("127.0.0.1", port, n, slot))
                        rows.append(Row(carrier, "proxy", n, result))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return rows
