"""`pitcher bench` runs end to end, bounded, and reports every measurement."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def pitcher(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    script = os.path.join(os.path.dirname(sys.executable), "pitcher")
    return subprocess.run(
        [script, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_bench_measures_each_transport_beside_its_floor(tmp_path: object) -> None:
    chart = os.path.join(str(tmp_path), "latency.png")
    result = pitcher("bench", "--seconds", "3", "--transports", "tcp,udp,zmq+ipc", "--chart", chart)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    rows = [line.split() for line in lines if line.split()[:1] in (["tcp"], ["udp"], ["zmq+ipc"])]
    # floor, client and proxy, each at 1 and at 32 in flight, for three carriers
    assert len(rows) == 18
    for row in rows:
        assert float(row[-2 if row[-1].endswith("x") else -1]) == 0, f"errors in {row}"
    clients = [row for row in rows if row[1] == "pitcher"]
    assert all(row[-1].endswith("x") for row in clients)
    assert os.path.getsize(chart) > 10_000
    with open(chart, "rb") as image:
        assert image.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bench_refuses_an_unknown_transport() -> None:
    result = pitcher("bench", "--transports", "tcp,carrier-pigeon")
    assert result.returncode == 2
    assert "carrier-pigeon" in result.stderr


@pytest.mark.parametrize("seconds", ["0", "5000"])
def test_bench_time_is_bounded(seconds: str) -> None:
    result = pitcher("bench", "--seconds", seconds)
    assert result.returncode == 2
