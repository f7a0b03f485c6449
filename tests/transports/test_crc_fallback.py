"""crcmod without its C extension: the CRC stays right, and the slowness is said once.

crcmod falls back to pure Python by itself when ``crcmod._crcfunext`` was
not built. That fault cannot be produced on a machine where it was, so each
case runs a fresh interpreter whose import system refuses that one module
(a meta path finder placed first); the same cases without the finder are the
control. Real UDP sockets on loopback.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_BLOCK_EXTENSION = """
import importlib.abc, sys

class _NoCrcExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "crcmod._crcfunext":
            raise ImportError("crcmod's C extension is not built (simulated)")
        return None

sys.meta_path.insert(0, _NoCrcExtension())
"""

_UDP_CALLS = """
import asyncio, logging, sys
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(message)s")
from transports.datagram import CRC_IN_C, crc32c
from transports.registry import transport_for

async def echo(payload):
    return payload

async def main():
    server = await transport_for("udp://127.0.0.1:0").serve("udp://127.0.0.1:0", echo)
    clients = [transport_for(server.address).client(server.address) for _ in range(2)]
    for client in clients:
        assert await client.call(b"x" * 1000, 2.0) == b"x" * 1000
        client.abort()
    server.abort()
    print("in C:", CRC_IN_C, "check:", hex(crc32c(b"123456789")))

asyncio.run(main())
"""

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def python(code: str, *, blocked: bool, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    source = (_BLOCK_EXTENSION if blocked else "") + code
    return subprocess.run(
        [sys.executable, "-c", source],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=_ROOT,
        check=False,
    )


@pytest.mark.parametrize("blocked", [True, False], ids=["no-extension", "extension"])
def test_a_pure_python_crc_is_logged_once_and_still_right(blocked: bool) -> None:
    result = python(_UDP_CALLS, blocked=blocked)
    assert result.returncode == 0, result.stderr
    # Both ends compute the same CRC-32C, in C or not: the calls went through.
    assert f"in C: {not blocked} check: 0xe3069283" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if "CRC-32C runs in pure" in line]
    if blocked:
        # A server and two clients made, one line said.
        assert len(warnings) == 1, result.stderr
        assert warnings[0].startswith("WARNING ")
        assert "crcmod._crcfunext" in warnings[0]
    else:
        assert warnings == []


_BENCH = """
import sys
from pitcher_rpc.cli import main
sys.argv = ["pitcher", "bench", "--seconds", "1", "--transports", "%s", "--no-proxy"]
main()
"""


@pytest.mark.parametrize(
    ("carriers", "blocked", "noted"),
    [("udp", True, True), ("tcp", True, False), ("udp", False, False)],
)
def test_pitcher_bench_names_a_pure_python_crc_beside_the_udp_figures(
    carriers: str, blocked: bool, noted: bool
) -> None:
    result = python(_BENCH % carriers, blocked=blocked, timeout=120.0)
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stdout.splitlines() if line.startswith("note: ")]
    if noted:
        assert len(notes) == 1, result.stdout
        assert notes[0].startswith("note: udp: CRC-32C runs in pure Python")
    else:
        assert notes == [], result.stdout
