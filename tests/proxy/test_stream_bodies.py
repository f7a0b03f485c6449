"""Streamed bodies through a real proxy process: answers as they come, uploads as they arrive.

The service is the transports' own server with a ``WithStreams`` handler
(:data:`STREAM_SERVICE`), so what is tested is the proxy against the wire of
docs/wire.md. Memory is read from the proxy process's /proc/PID/status
(VmRSS now, VmHWM its peak) and printed (``pytest -s`` shows it).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import time
from collections.abc import Iterator

import pytest

from tests.proxy.conftest import SERVE_HANDLER, Launcher, Proxy, toml_config, wait_until

MIB = 1 << 20
# The proxy's memory may grow by this much while 100 MiB pass through it: the
# per-call window (256 KiB), socket buffers and the allocator's slack.
RSS_BUDGET = 8 * MIB

# The service: see the module docstring of each path below.
STREAM_SERVICE = """
import asyncio, hashlib, json, os, sys
from urllib.parse import parse_qsl

from pitcher_rpc.pb import pitcher_pb2
from transports.base import StreamedAnswer, WithStreams

MARK_DIR = os.environ.get("TEST_MARK_DIR", "")
BLOCK = bytes(range(256)) * 256


def head(status, body, size, headers=()):
    message = pitcher_pb2.Response(status=status, body=body)
    for name, value in headers:
        message.header_names.append(name)
        message.header_values.append(value)
    if size is not None:
        message.body_size = size
    return message.SerializeToString()


async def pieces(data, chunk, fail_after=-1):
    # The pattern, chunk by chunk; a failure after fail_after bytes cuts the stream.
    sent = 0
    while sent < len(data):
        if 0 <= fail_after <= sent:
            raise RuntimeError("the stream breaks on purpose")
        end = min(sent + chunk, len(data))
        if fail_after >= 0:
            end = min(end, max(fail_after, sent + 1))
        yield data[sent:end]
        sent = end


async def handler(payload, deadline_ms, call):
    request = pitcher_pb2.Request.FromString(payload)
    path = request.path.decode()
    params = dict(parse_qsl(request.query.decode()))
    size = int(params.get("size", "0"))
    if path in ("/big", "/cut", "/lie"):
        # /big?size=N[&chunk=K][&nolength=1][&first=F]: N bytes of the pattern;
        # /cut: the same, failing after `after` bytes; /lie: body_size says `say`.
        if not call.may_stream:
            return head(500, b"may not stream", None)
        data = (BLOCK * (size // len(BLOCK) + 1))[:size]
        first = int(params.get("first", "0"))
        stated = int(params.get("say", size)) if path == "/lie" else size
        if "nolength" in params:
            stated = None
        fail_after = int(params.get("after", "-1")) - first if path == "/cut" else -1
        return StreamedAnswer(
            head(200, data[:first], stated, [(b"content-type", b"application/octet-stream")]),
            pieces(data[first:], int(params.get("chunk", "65536")), fail_after),
        )
    if path == "/headers":
        async def three():
            yield b"abc"
        return StreamedAnswer(head(200, b"", 3, [(b"x-service", b"streams")]), three())
    if path == "/upload":
        # Reads the streamed body (delay=S seconds per 64 KiB) and says what came.
        digest = hashlib.sha256(request.body)
        received = len(request.body)
        count = 0
        delay = float(params.get("delay", "0"))
        if call.body is not None:
            async for piece in call.body:
                digest.update(piece)
                received += len(piece)
                count += 1
                if delay:
                    await asyncio.sleep(delay * len(piece) / 65536)
        answer = {
            "size": received,
            "sha256": digest.hexdigest(),
            "streamed": call.body is not None,
            "pieces": count,
            "body_size": request.body_size if request.HasField("body_size") else None,
        }
        return head(200, json.dumps(answer).encode(), None)
    if path == "/drain":
        # Takes the whole body as it comes, then waits; says so if the call is cancelled.
        open(os.path.join(MARK_DIR, "drain.started"), "w").close()
        try:
            if call.body is not None:
                async for _ in call.body:
                    pass
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            open(os.path.join(MARK_DIR, "drain.cancelled"), "w").close()
            raise
        return head(200, b"drained", None)
    if path == "/early":
        # Answers at once, reading none of the body.
        return head(200, b"early", None)
    if path == "/flaky":
        # Node "a" reads the whole body, then fails the call; any other answers with its size.
        received = len(request.body)
        if call.body is not None:
            async for piece in call.body:
                received += len(piece)
        name = os.environ.get("NODE_NAME", "")
        open(os.path.join(MARK_DIR, f"flaky.{name}.{received}"), "a").close()
        if name == "a":
            raise RuntimeError("node a fails on purpose")
        return head(200, json.dumps({"node": name, "size": received}).encode(), None)
    return head(404, b"no such path", None)

handler = WithStreams(handler)
"""

_BLOCK = bytes(range(256)) * 256


def pattern(size: int) -> bytes:
    return (_BLOCK * (size // len(_BLOCK) + 1))[:size]


def memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in bytes."""
    values = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


class StreamSite:
    def __init__(self, launcher: Launcher, proxy: Proxy, server: dict[str, object]) -> None:
        self.launcher = launcher
        self.proxy = proxy
        self.server = server

    def http(self, timeout: float = 10.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.proxy.host, self.proxy.port, timeout=timeout)

    def raw(self) -> socket.socket:
        sock = socket.create_connection((self.proxy.host, self.proxy.port), timeout=10.0)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    @property
    def pid(self) -> int:
        return self.proxy.process.pid


def _site(launcher: Launcher, server: dict[str, object] | None = None) -> StreamSite:
    backend = launcher.script_backend(STREAM_SERVICE + SERVE_HANDLER, "tcp")
    server = {"max_body_size": 200 * MIB, **(server or {})}
    config = toml_config(
        [{"name": "s", "prefix": "/", "cluster": "s", "timeout": 20.0}],
        {"s": {"nodes": [backend.uri]}},
        server=server,
    )
    return StreamSite(launcher, launcher.proxy(config), server)


@pytest.fixture(scope="module")
def site(module_launcher: Launcher) -> Iterator[StreamSite]:
    yield _site(module_launcher)


def _warm(site: StreamSite) -> None:
    """A first request of each kind, so that imports and first-use buffers are not counted."""
    connection = site.http()
    connection.request("GET", "/big?size=2000000")
    assert len(connection.getresponse().read()) == 2000000
    connection.request("POST", "/upload", body=iter([b"x" * 300000]), encode_chunked=True)
    assert json.loads(connection.getresponse().read())["size"] == 300000
    connection.close()


def _report(what: str, before: tuple[int, int], after: tuple[int, int]) -> int:
    growth = after[1] - before[0]
    print(
        f"\n{what}: proxy VmRSS {before[0] / MIB:.1f} -> {after[0] / MIB:.1f} MiB,"
        f" VmHWM {after[1] / MIB:.1f} MiB, peak growth {growth / MIB:.2f} MiB"
    )
    return growth


# Streamed answers ------------------------------------------------------------------------


def test_a_100_mib_answer_streams_through_in_bounded_memory(site: StreamSite) -> None:
    _warm(site)
    size = 100 * MIB
    before = memory(site.pid)
    sock = site.raw()
    sock.sendall(b"GET /big?size=%d&chunk=262144 HTTP/1.1\r\nHost: x\r\n\r\n" % size)
    received = bytearray()
    head = b""
    digest = hashlib.sha256()
    body_bytes = 0
    started = time.monotonic()
    while True:
        data = sock.recv(1 << 20)
        if not data:
            break
        if not head:
            received += data
            if b"\r\n\r\n" not in received:
                continue
            head, _, rest = bytes(received).partition(b"\r\n\r\n")
            data = rest
        digest.update(data)
        body_bytes += len(data)
        if body_bytes >= size:
            break
        assert time.monotonic() - started < 30, "too slow"
    sock.close()
    after = memory(site.pid)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"\r\ncontent-length: %d" % size in head.lower()
    assert b"transfer-encoding" not in head.lower()
    assert body_bytes == size
    assert digest.hexdigest() == hashlib.sha256(pattern(size)).hexdigest()
    assert _report("100 MiB answer", before, after) < RSS_BUDGET


def test_an_answer_of_unknown_length_is_chunked_and_keeps_the_connection(site: StreamSite) -> None:
    connection = site.http()
    connection.request("GET", "/big?size=1000000&nolength=1&first=1000&chunk=10000")
    response = connection.getresponse()
    assert response.getheader("transfer-encoding") == "chunked"
    assert response.getheader("content-length") is None
    assert response.read() == pattern(1000000)
    connection.request("GET", "/big?size=5")
    response = connection.getresponse()
    assert response.getheader("content-length") == "5" and response.read() == pattern(5)
    connection.close()


def test_a_slow_client_holds_the_service_back_not_the_proxys_memory(site: StreamSite) -> None:
    _warm(site)
    size = 64 * MIB
    before = memory(site.pid)
    sock = site.raw()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.sendall(b"GET /big?size=%d HTTP/1.1\r\nHost: x\r\n\r\n" % size)
    # The client reads nothing for a while: the service is fast, the proxy must not
    # take its answer in.
    time.sleep(1.5)
    stalled = memory(site.pid)
    total = 0
    while total < size:
        data = sock.recv(1 << 20)
        assert data, "the answer ended early"
        total += len(data)
    sock.close()
    growth = _report("64 MiB answer to a stalled client, while stalled", before, stalled)
    assert growth < RSS_BUDGET
    assert total > size  # the head's bytes too


@pytest.mark.parametrize("length", ["known", "unknown"])
def test_a_stream_cut_midway_never_looks_complete(site: StreamSite, length: str) -> None:
    query = "size=3000000&after=1000000" + ("&nolength=1" if length == "unknown" else "")
    connection = site.http()
    connection.request("GET", "/cut?" + query)
    response = connection.getresponse()
    assert response.status == 200
    with pytest.raises(http.client.IncompleteRead) as caught:
        response.read()
    assert len(caught.value.partial) <= 1000000
    connection.close()


@pytest.mark.parametrize("stated", [2000000, 999999], ids=["short", "long"])
def test_a_body_that_breaks_its_stated_length_is_cut(site: StreamSite, stated: int) -> None:
    connection = site.http()
    connection.request("GET", f"/lie?size=1000000&say={stated}")
    response = connection.getresponse()
    assert response.getheader("content-length") == str(stated)
    with pytest.raises(http.client.IncompleteRead):
        response.read()
    connection.close()


def test_head_of_a_streamed_answer_sends_no_body_and_keeps_the_connection(
    site: StreamSite,
) -> None:
    sock = site.raw()
    sock.sendall(
        b"HEAD /big?size=100000 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /big?size=7 HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    data = b""
    while data.count(b"\r\n\r\n") < 2 or not data.endswith(pattern(7)):
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    first, _, second = data.partition(b"\r\n\r\n")
    assert b"content-length: 100000" in first.lower()
    assert second.startswith(b"HTTP/1.1 200 "), "no body bytes between the two answers"
    sock.close()


def test_http10_gets_a_close_delimited_answer_when_the_length_is_unknown(
    site: StreamSite,
) -> None:
    sock = site.raw()
    sock.sendall(b"GET /big?size=300000&nolength=1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower()
    assert b"transfer-encoding" not in head.lower() and b"content-length" not in head.lower()
    assert body == pattern(300000)
    sock.close()


# Streamed uploads ------------------------------------------------------------------------


def _chunked(total: int, piece: int) -> Iterator[bytes]:
    block = pattern(piece)
    sent = 0
    while sent < total:
        size = min(piece, total - sent)
        yield block[:size]
        sent += size


def test_a_100_mib_chunked_upload_streams_through_in_bounded_memory(site: StreamSite) -> None:
    _warm(site)
    size = 100 * MIB
    before = memory(site.pid)
    connection = site.http(timeout=30)
    connection.request("POST", "/upload", body=_chunked(size, 65536), encode_chunked=True)
    response = connection.getresponse()
    answer = json.loads(response.read())
    after = memory(site.pid)
    connection.close()
    digest = hashlib.sha256()
    for piece in _chunked(size, 65536):
        digest.update(piece)
    assert answer["size"] == size and answer["streamed"] and answer["body_size"] is None
    assert answer["sha256"] == digest.hexdigest()
    assert _report("100 MiB chunked upload", before, after) < RSS_BUDGET


def test_a_large_upload_with_a_length_says_its_size_and_waits_for_100_continue(
    site: StreamSite,
) -> None:
    size = 3 * MIB
    sock = site.raw()
    sock.sendall(
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
        b"Expect: 100-continue\r\n\r\n" % size
    )
    interim = sock.recv(65536)
    assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    sock.sendall(pattern(size))
    data = b""
    while b"}" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    answer = json.loads(data.partition(b"\r\n\r\n")[2])
    assert answer["size"] == size and answer["body_size"] == size and answer["streamed"]
    assert answer["sha256"] == hashlib.sha256(pattern(size)).hexdigest()
    sock.close()


def test_a_slow_service_slows_the_upload_not_the_proxys_memory(site: StreamSite) -> None:
    _warm(site)
    size = 16 * MIB
    before = memory(site.pid)
    connection = site.http(timeout=30)
    # The service takes 64 KiB per 4 ms: about 1 s for the whole body.
    connection.request(
        "POST", "/upload?delay=0.004", body=_chunked(size, 65536), encode_chunked=True
    )
    answer = json.loads(connection.getresponse().read())
    after = memory(site.pid)
    connection.close()
    assert answer["size"] == size
    assert _report("16 MiB upload to a slow service", before, after) < RSS_BUDGET


def test_an_upload_over_max_body_size_is_413_and_the_call_cancelled(
    launcher: Launcher,
) -> None:
    site = _site(launcher, {"max_body_size": 1 * MIB})
    sock = site.raw()
    sock.sendall(b"POST /drain HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    piece = b"%x\r\n%s\r\n" % (65536, pattern(65536))
    sock.sendall(piece)
    launcher.wait_for_mark("drain.started")
    data = b""
    try:
        for _ in range(40):
            sock.sendall(piece)
    except (BrokenPipeError, ConnectionResetError):
        pass
    sock.settimeout(5)
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    assert data.startswith(b"HTTP/1.1 413 "), data[:200]
    assert b"connection: close" in data.lower()
    launcher.wait_for_mark("drain.cancelled")
    sock.close()


# Modules ---------------------------------------------------------------------------------


def test_response_hooks_edit_a_streamed_head_and_the_access_log_counts_what_was_sent(
    launcher: Launcher,
) -> None:
    backend = launcher.script_backend(STREAM_SERVICE + SERVE_HANDLER, "tcp")
    log_path = os.path.join(launcher.tmpdir, "access.log")
    config = toml_config(
        [{"name": "s", "prefix": "/", "cluster": "s", "timeout": 20.0}],
        {"s": {"nodes": [backend.uri]}},
    )
    config += (
        '\n[modules.headers]\nresponse_set = { "x-edited" = "yes" }\n'
        f'\n[modules.access_log]\npath = "{log_path}"\n'
        'fields = ["path", "status", "bytes", "reason"]\n'
    )
    proxy = launcher.proxy(config)
    connection = http.client.HTTPConnection(proxy.host, proxy.port, timeout=10)
    connection.request("GET", "/headers")
    response = connection.getresponse()
    assert response.read() == b"abc"
    assert response.getheader("x-edited") == "yes"
    assert response.getheader("x-service") == "streams"
    connection.request("GET", "/cut?size=500000&after=200000")
    response = connection.getresponse()
    with pytest.raises(http.client.IncompleteRead):
        response.read()
    connection.close()

    def lines() -> list[dict[str, object]]:
        if not os.path.exists(log_path):
            return []
        with open(log_path, encoding="utf-8") as file:
            return [json.loads(line) for line in file if line.strip()]

    wait_until(lambda: len(lines()) >= 2, 5.0, "two access log lines")
    whole, cut = lines()[:2]
    assert whole["status"] == 200 and whole["reason"] is None
    assert isinstance(whole["bytes"], int) and whole["bytes"] > 3
    assert cut["path"] == "/cut?size=500000&after=200000" and cut["reason"] == "cut"
    assert isinstance(cut["bytes"], int) and cut["bytes"] < 200000 + 1000


def test_an_answer_before_the_upload_ended_closes_the_connection_after_it(
    site: StreamSite,
) -> None:
    sock = site.raw()
    sock.sendall(b"POST /early HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n")
    sock.sendall(pattern(200000))
    data = b""
    while b"early" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head = data.partition(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 200 ") and b"connection: close" in head
    # The rest of the body is read and dropped for a while, then the connection ends.
    sock.settimeout(5)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    sock.close()


def test_an_upload_that_started_streaming_is_never_retried(launcher: Launcher) -> None:
    nodes = [
        launcher.script_backend(STREAM_SERVICE + SERVE_HANDLER, "tcp", env={"NODE_NAME": name})
        for name in ("a", "b")
    ]
    config = toml_config(
        [
            {
                "name": "s",
                "prefix": "/",
                "cluster": "s",
                "retries": 1,
                "idempotent_methods": ["POST"],  # a whole POST may be re-sent
            }
        ],
        {"s": {"nodes": [node.uri for node in nodes], "balance": "round_robin"}},
    )
    proxy = launcher.proxy(config)
    statuses = {}
    for kind, size in (
        ("whole", 1000),
        ("whole", 1001),
        ("streamed", 500000),
        ("streamed", 500001),
    ):
        connection = http.client.HTTPConnection(proxy.host, proxy.port, timeout=10)
        body = _chunked(size, 10000)
        if kind == "whole":
            connection.request("POST", "/flaky", body=pattern(size))
        else:
            connection.request("POST", "/flaky", body=body, encode_chunked=True)
        response = connection.getresponse()
        response.read()
        statuses[size] = response.status
        connection.close()
    marks = set(os.listdir(launcher.mark_dir))
    # Round robin: requests of each kind reached node a first. A whole one is
    # retried on b; a streamed one is not (its body left the proxy as it came).
    assert statuses[1000] == statuses[1001] == 200
    retried = [size for size in (1000, 1001) if f"flaky.a.{size}" in marks]
    assert retried and all(f"flaky.b.{size}" in marks for size in retried)
    assert sorted(statuses[size] for size in (500000, 500001)) == [200, 502]
    failed = 500000 if statuses[500000] == 502 else 500001
    assert f"flaky.a.{failed}" in marks and f"flaky.b.{failed}" not in marks


@pytest.mark.parametrize("fault", ["client_closes", "client_stalls"])
def test_an_upload_cut_short_is_refused_and_never_passed_on_as_whole(
    launcher: Launcher, fault: str
) -> None:
    site = _site(launcher, {"body_timeout": 0.5})
    sock = site.raw()
    sock.sendall(b"POST /drain HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
    sock.sendall(pattern(200000))
    launcher.wait_for_mark("drain.started")
    if fault == "client_closes":
        sock.shutdown(socket.SHUT_WR)
    data = b""
    sock.settimeout(5)
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    expected = b"HTTP/1.1 400 " if fault == "client_closes" else b"HTTP/1.1 408 "
    assert data.startswith(expected), data[:200]
    assert b"connection: close" in data.lower()
    launcher.wait_for_mark("drain.cancelled")
    sock.close()
