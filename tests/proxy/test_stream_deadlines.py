"""A streamed upload's deadlines, through ``pitcher serve`` and ``pitcher backend``.

The route's ``timeout`` is for the answer: it counts from the end of the
request body (as nginx's proxy_read_timeout starts once the request is
sent). While the body is sent the call lives as long as the body moves: the
client's pauses are bounded by ``body_timeout`` (408), the node's by the
route's timeout between two pieces it accepts (as proxy_send_timeout). The
service is an SDK app with ``stream=True`` routes; what the handlers saw is
left as marks in the launcher's mark directory.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.proxy.conftest import (
    Launcher,
    Proxy,
    can_connect,
    pitcher_command,
    toml_config,
    wait_until,
)

TIMEOUT = 1.0
PIECE = 32 * 1024

APP = """\
import asyncio, hashlib, os
from urllib.parse import parse_qsl
from pitcher_rpc.sdk import Service

MARK_DIR = os.environ["TEST_MARK_DIR"]
app = Service("deadlines")


def mark(name):
    open(os.path.join(MARK_DIR, name), "w").close()


@app.route("/upload", methods=["POST"], stream=True)
async def upload(request):
    # Reads all of the body (?pace= seconds per 64 KiB), then thinks for ?think= seconds.
    params = dict(parse_qsl(request.query))
    pace = float(params.get("pace", "0"))
    digest, size = hashlib.sha256(), 0
    async for chunk in request.stream():
        digest.update(chunk)
        size += len(chunk)
        if pace:
            await asyncio.sleep(pace * len(chunk) / 65536)
    name = params.get("name", "upload")
    mark(f"{name}.read.{size}")
    try:
        await asyncio.sleep(float(params.get("think", "0")))
    except asyncio.CancelledError:
        mark(f"{name}.cancelled")
        raise
    return {"size": size, "sha256": digest.hexdigest()}


@app.route("/stall", methods=["POST"], stream=True)
async def stall(request):
    # Takes the first piece, then stops reading: the caller's credit runs out.
    try:
        async for _ in request.stream():
            mark("stall.reading")
            await asyncio.sleep(30)
    except asyncio.CancelledError:
        mark("stall.cancelled")
        raise
    return {"read": "all"}
"""


class Site:
    def __init__(self, launcher: Launcher, proxy: Proxy) -> None:
        self.launcher = launcher
        self.proxy = proxy

    def http(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.proxy.host, self.proxy.port, timeout=15.0)

    def marked(self, name: str) -> bool:
        return os.path.exists(os.path.join(self.launcher.mark_dir, name))


def _site(launcher: Launcher, transport: str) -> Site:
    if not os.path.exists(os.path.join(launcher.tmpdir, "deadline_app.py")):
        launcher.write("deadline_app.py", APP)
    uri = launcher.uri(transport)
    env = {
        "TEST_MARK_DIR": launcher.mark_dir,
        "PYTHONPATH": launcher.tmpdir + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    launcher.spawn([*pitcher_command(), "backend", "deadline_app:app", "--listen", uri], env=env)
    wait_until(lambda: can_connect(uri), 20.0, "pitcher backend listening")
    config = toml_config(
        [{"name": "s", "prefix": "/", "cluster": "s", "timeout": TIMEOUT}],
        {"s": {"nodes": [uri]}},
        server={"max_body_size": 64 << 20, "body_timeout": 5.0},
    )
    return Site(launcher, launcher.proxy(config))


@pytest.fixture(scope="module")
def site(module_launcher: Launcher) -> Iterator[Site]:
    yield _site(module_launcher, "tcp")


def _paced(
    count: int, pause: float, gap_at: int = -1, gap: float = 0.0, piece: int = PIECE
) -> Iterator[bytes]:
    """``count`` pieces of PIECE bytes, ``pause`` s apart (one longer ``gap`` before ``gap_at``)."""
    for index in range(count):
        if index:
            time.sleep(gap if index == gap_at else pause)
        yield bytes([index % 251]) * piece


def _digest(count: int, piece: int = PIECE) -> str:
    digest = hashlib.sha256()
    for index in range(count):
        digest.update(bytes([index % 251]) * piece)
    return digest.hexdigest()


def test_an_upload_longer_than_the_timeout_is_answered(site: Site) -> None:
    # 2.5 s of upload at a steady pace with a 1.3 s pause of the client's in it
    # (under body_timeout), then 0.5 s of work: all longer than the 1 s timeout,
    # whose count starts at the body's end.
    count = 21
    connection = site.http()
    started = time.monotonic()
    connection.request(
        "POST",
        "/upload?think=0.5&name=steady",
        body=_paced(count, 0.06, gap_at=10, gap=1.3),
        encode_chunked=True,
    )
    response = connection.getresponse()
    took = time.monotonic() - started
    body = response.read()
    assert response.status == 200, body
    assert json.loads(body) == {"size": count * PIECE, "sha256": _digest(count)}
    assert took > 2 * TIMEOUT
    assert site.marked(f"steady.read.{count * PIECE}") and not site.marked("steady.cancelled")
    # The connection serves the next request as usual.
    connection.request("POST", "/upload", body=b"abc")
    assert json.loads(connection.getresponse().read())["size"] == 3
    connection.close()


def test_a_service_that_reads_slowly_but_steadily_is_not_cut(site: Site) -> None:
    # The service takes 64 KiB per 0.15 s: the proxy waits on its credit for about
    # 2.4 s in all, between two pieces the service accepts (its window, 256 KiB, at
    # most) 0.6 s.
    count = 32
    connection = site.http()
    started = time.monotonic()
    connection.request(
        "POST", "/upload?pace=0.15&name=paced", body=_paced(count, 0.0), encode_chunked=True
    )
    response = connection.getresponse()
    took = time.monotonic() - started
    body = response.read()
    assert response.status == 200, body
    assert json.loads(body) == {"size": count * PIECE, "sha256": _digest(count)}
    assert took > 2 * TIMEOUT
    connection.close()


def test_a_handler_slower_than_the_timeout_after_the_body_gets_504(site: Site) -> None:
    connection = site.http()
    count = 8
    connection.request(
        "POST", "/upload?think=5&name=slow", body=_paced(count, 0.1), encode_chunked=True
    )
    ended = time.monotonic()  # request() returns once the last chunk is written
    response = connection.getresponse()
    waited = time.monotonic() - ended
    response.read()
    assert response.status == 504
    # Counted from the body's end: not before the timeout, and long before the handler is done.
    assert TIMEOUT * 0.9 <= waited < TIMEOUT + 1.5, waited
    assert site.marked(f"slow.read.{count * PIECE}")
    wait_until(lambda: site.marked("slow.cancelled"), 5.0, "the handler cancelled")
    connection.close()


def test_a_node_that_stops_taking_the_body_ends_the_call_with_504(site: Site) -> None:
    # Far more than the node's window and the proxy's buffer: once the handler stops
    # reading, the proxy waits for credit the route's timeout, then gives up.
    size = 8 << 20
    sock = socket.create_connection((site.proxy.host, site.proxy.port), timeout=15.0)
    sock.sendall(b"POST /stall HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
    failures: list[BaseException] = []

    def send() -> None:
        try:
            sock.sendall(b"s" * size)
        except OSError as exc:
            failures.append(exc)  # the proxy stopped reading and closed: expected

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    wait_until(lambda: site.marked("stall.reading"), 10.0, "the handler reading")
    stalled = time.monotonic()
    answer = b""
    while b"\r\n\r\n" not in answer:
        data = sock.recv(65536)
        assert data, answer
        answer += data
    waited = time.monotonic() - stalled
    assert answer.startswith(b"HTTP/1.1 504 "), answer
    assert TIMEOUT * 0.5 <= waited < TIMEOUT + 2.0, waited
    wait_until(lambda: site.marked("stall.cancelled"), 5.0, "the handler cancelled")
    sock.close()
    sender.join(5.0)
    assert not sender.is_alive()


def test_a_body_gathered_for_a_udp_node_has_the_whole_timeout_after_it(
    module_launcher: Launcher,
) -> None:
    # UDP takes whole frames: the proxy gathers the 1.5 s upload, then sends it
    # with the route's whole timeout (counted from there, as for a stream).
    site = _site(module_launcher, "udp")
    count, piece = 6, 4096  # within a datagram
    connection = site.http()
    connection.request(
        "POST",
        "/upload?think=0.3&name=udp",
        body=_paced(count, 0.3, piece=piece),
        encode_chunked=True,
    )
    response = connection.getresponse()
    body = response.read()
    assert response.status == 200, body
    assert json.loads(body) == {"size": count * piece, "sha256": _digest(count, piece)}
    connection.close()
