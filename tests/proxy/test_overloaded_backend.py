"""A node at its in-flight limit is busy, not broken: Envoy's overflow, through a running proxy.

A server running ``max_in_flight`` handlers refuses the next REQUEST with a
per-request ERROR ``TOO_MANY_IN_FLIGHT`` without starting it: over UDP
(counted over all peers) and ZeroMQ (per identity); a stream client never
sends past the limit its server announced. The proxy sends such a call to a
node it has not tried yet, whatever the method; when none is left the client
gets 503 with ``Retry-After: 1``. The node's health counts nothing: a health
table that ejects at the first failure keeps it in service. The proxy runs in
the test's event loop so that the node's counters can be read.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

import pytest

from pitcher_rpc.sdk import Request, Service
from tests.inprocess import running_proxy
from tests.proxy.conftest import SERVE_APP, Backend, Launcher, build_request
from transports.base import ServerOptions

CARRIERS = ["udp", "zmq+tcp", "zmq+ipc"]

# One handler at a time. ?hold=NAME creates MARK_DIR/NAME when it starts and
# holds the handler until MARK_DIR/NAME.release exists (3 s at most).
# Answers which backend served it.
CAPPED_APP = """
import asyncio, os, sys
from pitcher_rpc.sdk import Service
from transports.base import ServerOptions

NAME = os.environ["TEST_BACKEND_NAME"]
MARK_DIR = os.environ["TEST_MARK_DIR"]
OPTIONS = ServerOptions(max_in_flight=1)
app = Service("capped")


@app.route("/")
async def handle(request):
    params = request.query_params
    if "hold" in params:
        mark = os.path.join(MARK_DIR, params["hold"])
        open(mark, "w").close()
        for _ in range(300):
            if os.path.exists(mark + ".release"):
                break
            await asyncio.sleep(0.01)
    return {"backend": NAME, "path": request.path}
"""

CONFIG = """
[server]
listen = "127.0.0.1:0"
[[routes]]
name = "main"
prefix = "/"
cluster = "main"
timeout = 3.0
retries = {retries}
[clusters.main]
nodes = [{nodes}]
[clusters.main.health]
consecutive_failures = 1
window_requests = 0
slow_start = 0
"""


def capped(launcher: Launcher, carrier: str, name: str) -> Backend:
    return launcher.script_backend(CAPPED_APP + SERVE_APP, carrier, env={"TEST_BACKEND_NAME": name})


def config(backends: list[Backend], retries: int = 1) -> str:
    nodes = ", ".join(f'"{backend.uri}"' for backend in backends)
    return CONFIG.format(nodes=nodes, retries=retries)


async def http_request(port: int, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(build_request(method, path, body=b"x" if method == "POST" else b""))
        await writer.drain()
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        lines = head.split("\r\n")
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.lower()] = value.strip()
        body = await reader.readexactly(int(headers["content-length"]))
        return int(lines[0].split()[1]), headers, body
    finally:
        writer.close()


async def hold(launcher: Launcher, port: int, mark: str) -> asyncio.Task:
    """A request that keeps a node's one handler busy, once it has started, until released."""
    held = asyncio.create_task(http_request(port, "GET", f"/held?hold={mark}"))
    await asyncio.to_thread(launcher.wait_for_mark, mark)
    return held


def release(launcher: Launcher, mark: str) -> None:
    open(os.path.join(launcher.mark_dir, mark + ".release"), "w").close()


@pytest.mark.parametrize("carrier", CARRIERS)
def test_a_lone_node_at_its_limit_gives_503_with_retry_after_and_stays_healthy(
    launcher: Launcher, carrier: str
) -> None:
    backend = capped(launcher, carrier, "lone")

    async def scenario() -> None:
        async with running_proxy(config([backend])) as (proxy, port):
            node = proxy.snapshot.clusters["main"].nodes[0]
            assert node.stats is not None
            async with asyncio.timeout(5.0):
                mark = f"lone-{carrier.replace('+', '-')}"
                held = await hold(launcher, port, mark)
                for method in ("POST", "GET"):
                    started = time.monotonic()
                    status, headers, body = await http_request(port, method, "/busy")
                    # Refused at once, not left to the route's 3 s timeout.
                    assert time.monotonic() - started < 0.5
                    assert status == 503, body
                    assert headers.get("retry-after") == "1"
                    assert b"in-flight limit" in body
                release(launcher, mark)
                assert (await held)[0] == 200
                # Still in service: with one failure ejecting, a counted refusal
                # would have left the cluster without a node.
                status, _, body = await http_request(port, "POST", "/after")
                assert status == 200, body
            assert node.stats.failures == 0
            assert node.stats.in_flight == 0

    asyncio.run(scenario())


@pytest.mark.parametrize("carrier", CARRIERS)
def test_a_refused_call_goes_to_a_node_not_tried_yet_whatever_its_method(
    launcher: Launcher, carrier: str
) -> None:
    busy = capped(launcher, carrier, "busy")
    free = capped(launcher, carrier, "free")

    async def scenario() -> None:
        async with running_proxy(config([busy, free])) as (proxy, port):
            nodes = proxy.snapshot.clusters["main"].nodes
            async with asyncio.timeout(5.0):
                # Round robin: the first request lands on the first node.
                mark = f"busy-{carrier.replace('+', '-')}"
                held = await hold(launcher, port, mark)
                answers = [await http_request(port, "POST", f"/moved/{i}") for i in range(4)]
                release(launcher, mark)
                for status, _, body in answers:
                    assert status == 200, body
                    assert b'"backend": "free"' in body
                assert (await held)[0] == 200
            assert [node.stats.failures for node in nodes] == [0, 0]

    asyncio.run(scenario())


def test_every_node_at_its_limit_gives_503_after_trying_each_once(launcher: Launcher) -> None:
    first = capped(launcher, "udp", "first")
    second = capped(launcher, "udp", "second")

    async def scenario() -> None:
        async with running_proxy(config([first, second], retries=3)) as (proxy, port):
            async with asyncio.timeout(5.0):
                one = await hold(launcher, port, "both-1")
                two = await hold(launcher, port, "both-2")
                started = time.monotonic()
                status, headers, body = await http_request(port, "POST", "/nowhere")
                assert time.monotonic() - started < 0.5
                release(launcher, "both-1")
                release(launcher, "both-2")
                assert (status, headers.get("retry-after")) == (503, "1"), body
                assert b"in-flight limit" in body
                assert [(await one)[0], (await two)[0]] == [200, 200]
            nodes = proxy.snapshot.clusters["main"].nodes
            assert [node.stats.failures for node in nodes] == [0, 0]

    asyncio.run(scenario())


@pytest.mark.parametrize("carrier", ["udp", "zmq+tcp"])
def test_no_node_is_asked_twice_for_a_call_it_refused(carrier: str) -> None:
    """Counted at the servers, run in the test's loop: each node refuses a call at most once."""
    app = Service("capped-here")
    released = asyncio.Event()

    @app.route("/")
    async def handle(request: Request) -> dict[str, str]:
        if request.path == "/held":
            await released.wait()
        return {"path": request.path}

    async def until(predicate: Callable[[], bool]) -> None:
        while not predicate():
            await asyncio.sleep(0.005)

    async def scenario() -> None:
        options = ServerOptions(max_in_flight=1)
        servers = [await app.serve(f"{carrier}://127.0.0.1:0", options) for _ in range(2)]
        try:
            for count in (1, 2):
                nodes = [server.address for server in servers[:count]]
                text = CONFIG.format(nodes=", ".join(f'"{n}"' for n in nodes), retries=3)
                async with running_proxy(text) as (_, port), asyncio.timeout(5.0):
                    released.clear()
                    held = []
                    for server in servers[:count]:
                        held.append(asyncio.create_task(http_request(port, "GET", "/held")))
                        await until(lambda server=server: server.in_flight == 1)
                    before = [server.overloaded for server in servers]
                    status, headers, _ = await http_request(port, "POST", "/refused")
                    assert (status, headers.get("retry-after")) == (503, "1")
                    refused = [s.overloaded - b for s, b in zip(servers, before, strict=True)]
                    # Retries were allowed (3): every node was asked once, none twice.
                    assert refused == [1] * count + [0] * (2 - count)
                    released.set()
                    assert [(await call)[0] for call in held] == [200] * count
        finally:
            for server in servers:
                server.abort()

    asyncio.run(scenario())
