"""A backend that breaks the wire protocol with several requests in flight on its connection.

The proxy closes the shared connection and every call on it fails (by
design: after a violation nothing more on that connection can be trusted).
The requests that are idempotent for their route are retried on a fresh
connection to the same node (the cluster has no other), within their
deadline; the others get 502; a route with ``retries = 0`` retries nothing.
The backend is a small asyncio server speaking docs/wire.md, run as a
process; the proxy runs in the test's event loop so that the node's health
counters can be read afterwards.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.inprocess import running_proxy
from tests.proxy.conftest import SERVE_PEER, Launcher, build_request

# Speaks the protocol. On the first connection it holds every request whose
# query is "hold" (on any connection: "hold-always"), and prints how many it
# holds on which connection, until a request whose
# query says "poison=KIND" comes: that one is answered with a malformed frame
# of that kind. Every other request, and every request on a later connection,
# is answered at once: JSON naming the connection (1, 2, ...) and the path.
MISBEHAVING_BACKEND = """
import asyncio, json, sys
from pitcher_rpc.codec import encode_response as response_payload
from pitcher_rpc.pb import pitcher_pb2
from transports.control import Settings
from transports.frame import HEADER, PREFACE, FrameType, encode_frame, encode_response

connections = 0

def malformed(kind, request_id):
    if kind == "unknown-type":
        return HEADER.pack(1, 42, 0, 0, request_id, 0)
    if kind == "bad-version":
        return HEADER.pack(9, FrameType.RESPONSE, 0, 0, request_id, 0)
    if kind == "response-id-0":
        return HEADER.pack(1, FrameType.RESPONSE, 0, 0, 0, 0)
    if kind == "over-the-limit":
        # What the proxy announced in its SETTINGS is ignored.
        return HEADER.pack(1, FrameType.RESPONSE, 0, 1 << 30, request_id, 0)
    raise ValueError(kind)

async def peer(reader, writer):
    global connections
    try:
        await reader.readexactly(len(PREFACE))
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()  # a probe that only connects
        return
    connections += 1
    number = connections
    writer.write(PREFACE + encode_frame(FrameType.SETTINGS, 0, Settings(1 << 20, 64).encode()))
    held = 0
    try:
        while True:
            header = await reader.readexactly(HEADER.size)
            _, kind, _, length, request_id, _ = HEADER.unpack(header)
            payload = await reader.readexactly(length)
            if kind != FrameType.REQUEST:
                continue
            request = pitcher_pb2.Request.FromString(payload)
            query = request.query.decode()
            if number == 1 and query.startswith("poison="):
                writer.write(malformed(query.partition("=")[2], request_id))
            elif (number == 1 and query == "hold") or query == "hold-always":
                held += 1
                print(f"held {held} on {number}", flush=True)
            else:
                body = json.dumps({"connection": number, "path": request.path.decode()})
                answer = response_payload(200, [b"content-type"], [b"application/json"],
                                          body.encode())
                writer.write(encode_response(request_id, answer))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()
"""

CONFIG = """
[server]
listen = "127.0.0.1:0"
[upstream]
max_frame_size = 1048576
[[routes]]
name = "main"
prefix = "/"
cluster = "main"
timeout = {timeout}
retries = 1
[[routes]]
name = "once"
prefix = "/once/"
cluster = "main"
timeout = {timeout}
retries = 0
[clusters.main]
nodes = ["{node}"]
[clusters.main.health]
slow_start = 0
"""


async def http_request(port: int, method: str, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(build_request(method, path, body=b"x" if method == "POST" else b""))
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if method == "HEAD":
            return status, b""
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        return status, await reader.readexactly(length)
    finally:
        writer.close()


@pytest.mark.parametrize("kind", ["unknown-type", "bad-version", "response-id-0", "over-the-limit"])
def test_idempotent_requests_in_flight_are_retried_on_a_fresh_connection(
    launcher: Launcher, kind: str
) -> None:
    backend = launcher.script_backend(MISBEHAVING_BACKEND + SERVE_PEER)
    timeout = 4.0
    held = {
        # path: (method, expected status)
        **{f"/get/{i}?hold": ("GET", 200) for i in range(4)},
        **{f"/head/{i}?hold": ("HEAD", 200) for i in range(2)},
        **{f"/post/{i}?hold": ("POST", 502) for i in range(3)},
        # retries = 0: not even an idempotent request is sent twice.
        **{f"/once/get/{i}?hold": ("GET", 502) for i in range(2)},
    }

    async def scenario() -> None:
        async with running_proxy(
            CONFIG.format(node=backend.uri, timeout=timeout), local_health=False
        ) as (proxy, port):
            stats = proxy.snapshot.clusters["main"].nodes[0].stats
            assert stats is not None
            async with asyncio.timeout(timeout + 2):
                calls = {
                    path: asyncio.create_task(http_request(port, method, path))
                    for path, (method, _) in held.items()
                }
                await asyncio.to_thread(
                    backend.process.wait_for_line, f"held {len(held)} on 1", stream="stdout"
                )
                assert stats.in_flight == len(held)
                started = time.monotonic()
                poison_status, poison_body = await http_request(port, "POST", f"/?poison={kind}")
                results = {path: await call for path, call in calls.items()}
                elapsed = time.monotonic() - started

            assert poison_status == 502, poison_body
            for path, (method, expected) in held.items():
                status, body = results[path]
                assert status == expected, (path, status, body)
                if status == 200 and method == "GET":
                    # Answered by the retry, on a new connection to the same node.
                    assert body == b'{"connection": 2, "path": "%s"}' % path.split("?")[0].encode()
                if status == 502 and kind == "over-the-limit":
                    assert b"over the limit of 1048576 bytes ([upstream] max_frame_size)" in body
            # Retried at once, not after waiting for their route's timeout.
            assert elapsed < 1.0
            # Health: nothing left in flight; each request that was on the broken
            # connection failed once there, each retry succeeded once.
            retried = sum(1 for _, status in held.values() if status == 200)
            assert stats.in_flight == 0
            assert stats.failures == len(held) + 1
            assert stats.successes == retried
            # The node serves on: a new request goes through on the new connection.
            status, body = await http_request(port, "POST", "/after")
            assert (status, body) == (200, b'{"connection": 2, "path": "/after"}')

    asyncio.run(scenario())


def test_a_retry_keeps_the_request_deadline(launcher: Launcher) -> None:
    """The retry on the fresh connection hangs too: 504 at the first attempt's deadline."""
    backend = launcher.script_backend(MISBEHAVING_BACKEND + SERVE_PEER)
    timeout = 1.0

    async def scenario() -> None:
        async with running_proxy(
            CONFIG.format(node=backend.uri, timeout=timeout), local_health=False
        ) as (proxy, port):
            stats = proxy.snapshot.clusters["main"].nodes[0].stats
            assert stats is not None
            async with asyncio.timeout(timeout + 2):
                started = time.monotonic()
                hanging = asyncio.create_task(http_request(port, "GET", "/hang?hold-always"))
                await asyncio.to_thread(
                    backend.process.wait_for_line, "held 1 on 1", stream="stdout"
                )
                poison = await http_request(port, "POST", "/?poison=unknown-type")
                await asyncio.to_thread(
                    backend.process.wait_for_line, "held 1 on 2", stream="stdout"
                )
                status, body = await hanging
                elapsed = time.monotonic() - started
            assert poison[0] == 502
            assert status == 504, body
            assert timeout - 0.05 <= elapsed < timeout + 0.3
            assert stats.in_flight == 0

    asyncio.run(scenario())
