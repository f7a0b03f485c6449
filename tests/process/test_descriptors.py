"""Every process gets exactly the descriptors it needs, however many restarts it follows.

A process started by the proxy once inherited every inheritable descriptor
of its parent (uvloop's spawn ignores ``close_fds``), and a restarted
master passed them on: five more descriptors in the master and in every
worker at each restart. Here /proc/PID/fd of the master and its workers is
read after one restart and after twenty more, under load, and compared
kind by kind (listening sockets by port; connections, which come and go
with the load, are only bounded).
"""

from __future__ import annotations

import collections
import os
import re
import time

from tests.process.test_master import admin, admin_port, config_text
from tests.process.test_restart import Load, _alive, _stop
from tests.proxy.conftest import Launcher, wait_until

RESTARTS = 20
TIME_LIMIT = 150.0  # for all the restarts; the load outlasts it


def _socket_table() -> dict[str, str]:
    """Socket inode -> what it is: "listen:PORT", "tcp" or "unix"."""
    table: dict[str, str] = {}
    for name in ("tcp", "tcp6"):
        with open(f"/proc/net/{name}") as file:
            next(file)
            for line in file:
                fields = line.split()
                port = int(fields[1].rpartition(":")[2], 16)
                table[fields[9]] = f"listen:{port}" if fields[3] == "0A" else "tcp"
    with open("/proc/net/unix") as file:
        next(file)
        for line in file:
            fields = line.split()
            table.setdefault(fields[6], "unix")
    return table


def descriptors(pid: int) -> collections.Counter[str]:
    """The kinds of the descriptors ``pid`` holds, counted."""
    sockets = _socket_table()
    kinds: collections.Counter[str] = collections.Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed while we looked
            continue
        if target.startswith("socket:["):
            kinds[sockets.get(target[8:-1], "socket")] += 1
        elif target.startswith("pipe:["):
            kinds["pipe"] += 1
        else:
            kinds[target.split("[")[0]] += 1
    return kinds


# Connections come and go with the load (clients, backend pools, one being
# set up): bounded, not compared.
_CONNECTIONS = ("tcp", "socket")


def _fixed(kinds: collections.Counter[str]) -> collections.Counter[str]:
    connections = sum(kinds.pop(kind, 0) for kind in _CONNECTIONS)
    assert connections <= 12, kinds  # 5 clients and a few backend connections
    return kinds


def processes(port: int, master: int) -> tuple[collections.Counter[str], list[str]]:
    """The master's descriptors and each worker's (as sorted text, workers in any order)."""
    status, body = admin(port, "/admin/workers")
    assert status == 200, body
    workers = sorted(str(sorted(_fixed(descriptors(w["pid"])).items())) for w in body["workers"])
    assert len(workers) == 2, body
    return _fixed(descriptors(master)), workers


def test_twenty_restarts_under_load_leave_every_process_s_descriptors_as_they_were(
    launcher: Launcher,
) -> None:
    echo = launcher.echo_backend("tcp")
    proxy = launcher.proxy(config_text(echo.uri), workers=2)
    port = admin_port(proxy)
    masters = [proxy.process.pid]
    started = time.monotonic()
    try:
        with Load(proxy.host, proxy.port, seconds=TIME_LIMIT + 30) as load:
            for restart in range(RESTARTS + 1):
                served_before = load.served
                status, answer = admin(port, "/admin/restart", "POST")
                assert status == 200, answer
                masters.append(answer["new_master_pid"])
                # A new generation serving; generous, as the suite runs in parallel on 2 cores.
                wait_until(lambda before=served_before: load.served > before + 20, 30.0, "traffic")
                # The old generation answers on the shared admin socket until it is gone.
                wait_until(lambda: not _alive(masters[-2]), 10.0, "the old master to exit")
                if restart == 0:  # the shape every later generation must keep
                    first = processes(port, masters[-1])
                assert time.monotonic() - started < TIME_LIMIT, f"{restart} restarts took too long"
            last = processes(port, masters[-1])
    finally:
        for pid in masters[1:]:
            _stop(pid)

    master, workers = last
    print(f"\nafter 1 restart: master {sorted(first[0].items())}, workers {first[1]}")
    print(f"after {RESTARTS + 1}: master {sorted(master.items())}, workers {workers}")
    assert master == first[0], (first[0], master)
    assert workers == first[1], (first[1], workers)
    # Kinds, not only counts: the master holds the proxy's listener and the
    # admin listener once each; a worker the proxy's listener only.
    admin_listen, proxy_listen = f"listen:{port}", f"listen:{proxy.port}"
    assert master[proxy_listen] == 1 and master[admin_listen] == 1, master
    for worker in workers:
        # The proxy's listener and no other (uvloop's server keeps a dup of
        # the socket it is given: two descriptors, one socket).
        listeners = re.findall(r"'listen:(\d+)', (\d+)", worker)
        assert listeners == [(str(proxy.port), "2")], worker
    assert sum(master.values()) < 40, master
    # A keep-alive request racing a draining worker's close of its idle
    # connection is the only loss allowed (an HTTP client resends it): the
    # close comes first (nothing read), or the request does and the kernel
    # answers the close of a socket with unread bytes by a reset.
    raced = ("connection closed before a response; got b''", "ConnectionResetError")
    assert all(any(r in failure for r in raced) for failure in load.failures), load.failures[:5]
    assert len(load.failures) <= RESTARTS // 4, load.failures
