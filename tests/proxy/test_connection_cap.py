"""The connection cap (``server.max_connections``): above it the proxy stops accepting.

Clients beyond the cap wait in the kernel's backlog and are served as soon as
a place frees up; when a client waits, the connections idle longest between
two requests are closed to make room, never one with a request under way.
In one process (the whole cap is local) and with two workers sharing it
through the master.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pitcher_rpc.config import parse_config
from pitcher_rpc.process.coordination import Coordination
from pitcher_rpc.proxy.server import local_cap
from pitcher_rpc.sdk import Request, Response, Service
from tests.inprocess import running_proxy, serving
from tests.process.test_master import admin, admin_port
from tests.proxy.conftest import Launcher, toml_config, wait_until

app = Service("cap-test")


@app.route("/")
def fine(request: Request) -> Response:
    return Response(200, "fine\n")


SLOW = 0.3


@app.route("/slow")
async def slow(request: Request) -> Response:
    await asyncio.sleep(SLOW)
    return Response(200, "slow\n")


CAP = 3
CONFIG = """
[server]
listen = "127.0.0.1:0"
max_connections = {cap}
header_timeout = 10.0
keepalive_timeout = 30.0

[[routes]]
prefix = "/"
cluster = "backend"

[clusters.backend]
nodes = ["{node}"]
"""

HEAD_START = b"GET / HTTP/1.1\r\nHost: x\r\n"
REQUEST = HEAD_START + b"\r\n"

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def connect(port: int) -> Stream:
    return await asyncio.open_connection("127.0.0.1", port)


async def response(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    """One whole response (its body framed by content-length)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    return head + await asyncio.wait_for(reader.readexactly(length), timeout)


async def until(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def not_answered(reader: asyncio.StreamReader, seconds: float) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(1), seconds)


def test_local_cap_is_the_share_of_the_whole_and_never_zero() -> None:
    assert local_cap(10000, 1.0) == 10000
    assert local_cap(10000, 0.5) == 5000
    assert local_cap(4, 0.3) == 1
    assert local_cap(1, 0.01) == 1
    assert local_cap(3, 1 / 3) == 1


def test_above_the_cap_a_client_waits_until_a_busy_connection_closes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)

    async def main() -> None:
        async with (
            serving(app) as [node],
            running_proxy(CONFIG.format(cap=CAP, node=node)) as (proxy, port),
        ):
            # Three connections whose requests are on their way: none is idle.
            held = [await connect(port) for _ in range(CAP)]
            for _, writer in held:
                writer.write(HEAD_START)
            await until(lambda: len(proxy.connections) == CAP, "three connections")
            await until(lambda: proxy.accept_paused, "accepting paused")
            assert proxy.accept_pauses == 1

            # The fourth connects (the kernel's backlog takes it) and waits.
            reader, writer = await connect(port)
            writer.write(REQUEST)
            await not_answered(reader, 0.6)
            assert len(proxy.connections) == CAP
            assert proxy.idle_evicted == 0  # busy ones are never closed for room
            for held_reader, _ in held:
                assert not held_reader.at_eof()

            # One closes: the fourth is accepted and answered.
            held[0][1].close()
            assert (await response(reader)).startswith(b"HTTP/1.1 200 ")
            assert len(proxy.connections) <= CAP
            # The others finish their requests: none was lost.
            for held_reader, held_writer in held[1:]:
                held_writer.write(b"\r\n")
                assert (await response(held_reader)).startswith(b"HTTP/1.1 200 ")
            status = proxy.connection_status()
            assert status["limit"] == CAP and status["pauses"] >= 2
            assert status["paused_seconds"] > 0.5
            for _, held_writer in held[1:]:
                held_writer.close()
            writer.close()
            # Room again: a new client is served at once.
            await until(lambda: not proxy.accept_paused, "accepting again")
            late_reader, late_writer = await connect(port)
            late_writer.write(REQUEST)
            assert (await response(late_reader, 2.0)).startswith(b"HTTP/1.1 200 ")
            late_writer.close()

    asyncio.run(main())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("not accepting" in r.getMessage() for r in caplog.records)


def test_at_the_cap_the_longest_idle_keep_alive_connection_makes_room() -> None:
    async def main() -> None:
        async with (
            serving(app) as [node],
            running_proxy(CONFIG.format(cap=CAP, node=node)) as (proxy, port),
        ):
            kept: list[Stream] = []
            for _ in range(CAP):
                reader, writer = await connect(port)
                writer.write(REQUEST)
                assert (await response(reader)).startswith(b"HTTP/1.1 200 ")
                kept.append((reader, writer))
                await asyncio.sleep(0.02)  # distinct idle times, oldest first
            assert proxy.accept_paused

            # A new client waits: the oldest idle connection is closed for it.
            reader, writer = await connect(port)
            writer.write(REQUEST)
            assert (await response(reader, 3.0)).startswith(b"HTTP/1.1 200 ")
            assert await asyncio.wait_for(kept[0][0].read(), 2.0) == b""
            assert proxy.idle_evicted == 1
            # The others are still open and served.
            for kept_reader, kept_writer in kept[1:]:
                kept_writer.write(REQUEST)
                assert (await response(kept_reader)).startswith(b"HTTP/1.1 200 ")
            assert len(proxy.connections) == CAP
            for _, kept_writer in kept:
                kept_writer.close()
            writer.close()

    asyncio.run(main())


def test_a_burst_accepted_at_once_is_parked_beyond_the_cap_and_served_in_turn() -> None:
    async def main() -> None:
        async with (
            serving(app) as [node],
            running_proxy(CONFIG.format(cap=2, node=node)) as (proxy, port),
        ):
            # Five clients connect and send while the proxy's loop is not
            # running: it finds all five waiting and accepts them in one go.
            socks = []
            for _ in range(5):
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                sock.setblocking(False)
                socks.append(sock)
            streams = [await asyncio.open_connection(sock=sock) for sock in socks]
            await until(lambda: len(proxy.connections) == 5, "five accepted")
            status = proxy.connection_status()
            assert status["waiting"] == 3 and proxy.accept_paused
            started = time.monotonic()
            answers = await asyncio.gather(*(response(reader) for reader, _ in streams))
            assert all(answer.startswith(b"HTTP/1.1 200 ") for answer in answers)
            # Two at a time: three rounds of the slow answer.
            assert time.monotonic() - started >= 2 * SLOW
            await until(lambda: not proxy.connections, "all closed")
            assert not proxy.accept_paused
            for _, writer in streams:
                writer.close()

    asyncio.run(main())


def test_a_reload_that_raises_the_cap_resumes_accepting() -> None:
    async def main() -> None:
        async with (
            serving(app) as [node],
            running_proxy(CONFIG.format(cap=1, node=node)) as (proxy, port),
        ):
            first = await connect(port)
            first[1].write(HEAD_START)
            await until(lambda: proxy.accept_paused, "accepting paused")
            reader, writer = await connect(port)
            writer.write(REQUEST)
            await not_answered(reader, 0.3)
            proxy.reload(parse_config(CONFIG.format(cap=5, node=node)))
            assert proxy.connection_limit == 5
            assert (await response(reader)).startswith(b"HTTP/1.1 200 ")
            first[1].close()
            writer.close()

    asyncio.run(main())


def test_two_workers_share_the_cap_and_serve_everyone_in_turn(launcher: Launcher) -> None:
    cap = 4
    echo = launcher.echo_backend("tcp")
    text = toml_config(
        [{"name": "echo", "prefix": "/", "cluster": "echo"}],
        {"echo": {"nodes": [echo.uri]}},
        server={"max_connections": cap, "header_timeout": 10.0, "keepalive_timeout": 30.0},
    )
    proxy = launcher.proxy(text, workers=2)
    port = admin_port(proxy)
    clients = []
    try:
        # Six clients, each with a request head on its way: at most four get in.
        for _ in range(6):
            sock = socket.create_connection((proxy.host, proxy.port), timeout=5)
            sock.sendall(HEAD_START)
            clients.append(sock)

        def caps() -> list[dict[str, Any]]:
            return [w["connection_cap"] for w in admin(port, "/admin/workers")[1]["workers"]]

        wait_until(lambda: sum(c["open"] for c in caps()) == cap, 5.0, "four connections in")
        time.sleep(0.5)  # several ticks: the shares move, the cap holds
        now = caps()
        assert sum(c["open"] for c in now) == cap
        assert sum(c["limit"] for c in now) <= cap
        assert all(c["limit"] >= 1 for c in now)
        assert sum(c["pauses"] for c in now) >= 1

        # Every head completes: those inside are answered and then idle, and
        # the idle ones are closed to let the two waiting clients in.
        for sock in clients:
            sock.sendall(b"\r\n")
        answers = [_read_response(sock) for sock in clients]
        assert all(a.startswith(b"HTTP/1.1 200 ") for a in answers), answers
        assert sum(c["idle_closed"] for c in caps()) >= 2

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        opened = [s.value for s in families["pitcher_connections"].samples]
        assert len(opened) == 2 and sum(opened) <= cap
        limits = [s.value for s in families["pitcher_connection_limit"].samples]
        assert len(limits) == 2 and sum(limits) <= cap
        pauses = [
            s.value
            for s in families["pitcher_accept_pauses"].samples
            if s.name == "pitcher_accept_pauses_total"
        ]
        assert sum(pauses) >= 1
        closed = [
            s.value
            for s in families["pitcher_idle_connections_closed"].samples
            if s.name == "pitcher_idle_connections_closed_total"
        ]
        assert sum(closed) >= 2
        assert "pitcher_accept_paused" in families
        assert proxy.process.popen.poll() is None
    finally:
        for sock in clients:
            sock.close()


def _read_response(sock: socket.socket) -> bytes:
    sock.settimeout(5.0)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return head + b"\r\n\r\n" + body


class _Worker:
    """A worker's end of the control link: reports connection demand, keeps its share."""

    def __init__(self, open_connections: int) -> None:
        self.open = open_connections
        self.share: float | None = None

    async def command(self, op: str, **arguments: Any) -> dict[str, Any]:
        assert op == "tick"
        if "connections" in arguments:
            self.share = arguments["connections"]
        return {"demand": {}, "outcomes": {}, "connections": [float(self.open), 100.0]}


def test_the_master_splits_the_cap_by_open_connections() -> None:
    busy, quiet = _Worker(80), _Worker(0)
    coordination = Coordination(lambda: [(0, busy), (1, quiet)])

    async def main() -> None:
        for _ in range(8):
            await coordination.tick()

    asyncio.run(main())
    assert busy.share is not None and quiet.share is not None
    assert busy.share + quiet.share <= 1.0 + 1e-9
    # Room is left over: the busy worker keeps its 80 and half of the rest.
    assert local_cap(100, busy.share) >= 85
    assert local_cap(100, quiet.share) >= 5
    # The modules' shares are not mixed up with it.
    assert coordination.shares == {0: {}, 1: {}}
