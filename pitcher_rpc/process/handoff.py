"""Handing the listening sockets from one master to its successor (SCM_RIGHTS).

A graceful restart starts a new master (new code, new config) beside the old
one. The old master offers its listening sockets on a Unix socket; the new
one takes them, starts its workers on them and says ``ready``; only then does
the old generation stop accepting and drain. The sockets never close in
between, so no connection waiting in the accept queue is lost. If the new
master fails or is not ready in time, the old one keeps serving.

These functions block; masters run them in an executor.

The listening sockets are never inheritable, here or in the predecessor:
only ``pass_fds`` makes one reach a child, and every process the proxy starts
is started by :func:`pitcher_rpc.degrade.scale.spawn` with exactly the
descriptors it needs.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import TypeVar

_T = TypeVar("_T")
# How often a blocked offer looks at its abort flag.
_STEP = 0.05

_GREETING = b"pitcher-handoff 1"
_READY = b"ready"


class HandoffError(Exception):
    """The successor did not take the sockets or did not get ready."""


def offer(path: str, sockets: list[socket.socket], timeout: float, abort: threading.Event) -> None:
    """Wait for the successor on ``path``, hand it ``sockets``, wait for its ``ready``.

    Blocking, in short steps, so that ``abort`` (set when the successor is
    known to have died) ends it at once rather than at the timeout.
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    deadline = time.monotonic() + timeout
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(path)
        server.listen(1)
        connection = _step(server.accept, server, deadline, abort, "take the sockets")[0]
        with connection:
            socket.send_fds(connection, [_GREETING], [s.fileno() for s in sockets])
            answer = _step(
                lambda: connection.recv(len(_READY)), connection, deadline, abort, "get ready"
            )
            if answer != _READY:
                raise HandoffError("the successor failed to start")
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _step(
    action: Callable[[], _T],
    sock: socket.socket,
    deadline: float,
    abort: threading.Event,
    what: str,
) -> _T:
    sock.settimeout(_STEP)
    while True:
        if abort.is_set():
            raise HandoffError(f"the successor died before it could {what}")
        if time.monotonic() > deadline:
            raise HandoffError(f"the successor did not {what} in time")
        try:
            return action()
        except TimeoutError:
            continue


def take(path: str, count: int, timeout: float = 10.0) -> tuple[socket.socket, list[socket.socket]]:
    """The predecessor's ``count`` listening sockets, and the line to say ``ready`` on."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.settimeout(timeout)
    try:
        connection.connect(path)
        # Close-on-exec from the start: no process started meanwhile may inherit them.
        message, ancillary, _, _ = connection.recvmsg(
            len(_GREETING), socket.CMSG_SPACE(count * 4), socket.MSG_CMSG_CLOEXEC
        )
        fds = _received_fds(ancillary)
    except OSError as exc:
        connection.close()
        raise HandoffError(f"cannot take the sockets from {path}: {exc}") from None
    if message != _GREETING or len(fds) != count:
        for fd in fds:
            os.close(fd)
        connection.close()
        raise HandoffError("the predecessor handed over something unexpected")
    sockets = [socket.socket(fileno=fd) for fd in fds]
    for sock in sockets:
        sock.setblocking(False)
        sock.set_inheritable(False)  # workers get the listener through pass_fds only
    return connection, sockets


def _received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(
                int.from_bytes(data[i : i + 4], "little", signed=True) for i in range(0, usable, 4)
            )
    return fds


def ready(connection: socket.socket) -> None:
    with connection:
        connection.sendall(_READY)
