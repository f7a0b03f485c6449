"""access_log: every field of a line, a stuck disk, SIGUSR1 rotation, the stop, bad settings.

Real sockets, real files (and a real FIFO for the stuck disk), real ``pitcher
serve`` processes for the signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from pitcher_rpc.config import parse_config
from pitcher_rpc.modules.access_log import AccessLog
from pitcher_rpc.modules.base import Record
from pitcher_rpc.proxy.server import ProxyServer
from pitcher_rpc.sdk import Request, Response, Service
from tests.inprocess import (
    assert_module_refuses,
    running_proxy,
    serving,
)
from tests.proxy.conftest import Launcher, Proxy, get, toml_config, wait_until

CONFIG = """
[server]
listen = "127.0.0.1:0"
keepalive_requests = 0  # the load keeps its connections for the whole test

[modules.access_log]
path = {path}
{settings}

[[routes]]
name = "api"
prefix = "/api/"
cluster = "backend"

[[routes]]
name = "local"
prefix = "/local/"
cluster = "local"

[clusters.backend]
nodes = ["{node}"]

[clusters.local]
nodes = ["{unix_node}"]
"""

FIELDS = [
    "time",
    "client",
    "method",
    "path",
    "request_id",
    "route",
    "cluster",
    "node",
    "transport",
    "status",
    "bytes",
    "total",
    "backend",
    "residence",
    "reason",
    "detail",
    "host",
    "user_agent",
    "protocol",
    "request_bytes",
    "retries",
    "trace_id",
]
TIME_SHAPE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")

app = Service("access-log-test")


@app.route("/")
def answer(request: Request) -> Response:
    return Response(200, "x" * 100)


# ------------------------------------------------------------------------ helpers


class Client:
    """One keep-alive connection; answers are read by their Content-Length."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Client:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def get(self, target: str, request_id: str) -> tuple[int, int]:
        """The status and the number of bytes the whole response took."""
        self.writer.write(
            f"GET {target} HTTP/1.1\r\nHost: t\r\nX-Request-Id: {request_id}\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5)
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        assert length is not None, head
        body = await asyncio.wait_for(self.reader.readexactly(int(length[1])), 5)
        return int(head.split(b" ", 2)[1]), len(head) + len(body)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


Check = Callable[[ProxyServer, AccessLog, int], Awaitable[None]]


def with_proxy(
    path: str, settings: str, check: Check, before_stop: Callable[[], None] = lambda: None
) -> AccessLog:
    """Run ``check`` against an in-process proxy with a TCP and a Unix backend."""
    socket_dir = tempfile.mkdtemp(prefix="pitcher-t-", dir="/tmp")

    async def main() -> AccessLog:
        async with serving(app, (app, f"unix://{socket_dir}/b.sock")) as [node, unix_node]:
            text = CONFIG.format(
                path=json.dumps(path), settings=settings, node=node, unix_node=unix_node
            )
            async with running_proxy(text) as (proxy, port):
                module = proxy.snapshot.modules.modules["access_log"]
                assert isinstance(module, AccessLog)
                try:
                    await check(proxy, module, port)
                finally:
                    before_stop()
        return module

    try:
        return asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)


def read_lines(path: str) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as file:
            return [json.loads(line) for line in file]
    except FileNotFoundError:
        return []


# ------------------------------------------------------------ the line, in-process


def test_every_field_of_a_proxied_an_unrouted_and_a_unix_request(tmp_path: Any) -> None:
    path = str(tmp_path / "access.log")
    sizes: dict[str, int] = {}

    async def check(proxy: ProxyServer, module: AccessLog, port: int) -> None:
        client = await Client.open(port)
        try:
            status, sizes["ok"] = await client.get("/api/items?page=2&q=%C3%A9", "req-ok")
            assert status == 200
            status, sizes["local"] = await client.get("/local/x", "req-local")
            assert status == 200
            status, sizes["lost"] = await client.get("/nowhere", "req-lost")
            assert status == 404
        finally:
            await client.close()
        await eventually(lambda: module.stats()["written"] == 3, "three lines written")
        assert module.stats() == {"written": 3, "dropped": 0, "buffered": 0}

    before = datetime.now(UTC)
    module = with_proxy(path, "flush_interval = 0.02", check)
    after = datetime.now(UTC)

    with open(path, encoding="utf-8") as file:
        raw = file.read().splitlines()
    lines = [json.loads(line) for line in raw]
    # Compact JSON (no white space outside strings), the fields in their
    # documented order, times as seconds with six decimals (never 2.2e-05).
    for text in raw:
        assert not re.search(r"\s", re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)), text
        for field in ("total", "residence"):
            assert re.search(rf'"{field}":\d+\.\d{{6}}[,}}]', text), text
    assert [list(line) for line in lines] == [FIELDS] * 3
    ok, local, lost = lines

    for line in lines:
        assert TIME_SHAPE.fullmatch(line["time"])
        written = datetime.strptime(line["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        assert before.replace(microsecond=0) <= written <= after
        assert line["client"] == "127.0.0.1" and line["method"] == "GET"
        assert line["total"] >= line["residence"] >= 0
        for key in ("total", "backend", "residence"):
            if line[key] is not None:
                assert round(line[key], 6) == line[key]

    assert ok["path"] == "/api/items?page=2&q=%C3%A9"
    assert (ok["request_id"], ok["route"], ok["cluster"]) == ("req-ok", "api", "backend")
    assert ok["node"].startswith("tcp://127.0.0.1:") and ok["transport"] == "tcp"
    assert (ok["status"], ok["bytes"]) == (200, sizes["ok"])
    assert 0 < ok["backend"] <= ok["total"]
    assert abs(ok["total"] - ok["backend"] - ok["residence"]) <= 2e-6

    assert (local["path"], local["route"], local["cluster"]) == ("/local/x", "local", "local")
    assert local["node"].startswith("unix://") and local["transport"] == "unix"
    assert (local["status"], local["bytes"]) == (200, sizes["local"])

    assert lost["path"] == "/nowhere" and lost["request_id"] == "req-lost"
    assert (lost["status"], lost["bytes"]) == (404, sizes["lost"])
    for key in ("route", "cluster", "node", "transport", "backend"):
        assert lost[key] is None, key
    assert lost["residence"] == lost["total"]

    for line in lines:
        assert (line["host"], line["protocol"], line["retries"]) == ("t", "HTTP/1.1", 0)
        # Nothing failed, nothing was refused; no User-Agent, no traceparent.
        for key in ("reason", "detail", "user_agent", "trace_id"):
            assert line[key] is None, key
    # The request as sent: "GET <target> HTTP/1.1", two fields, the blank line.
    for line, request_id in zip(lines, ("req-ok", "req-local", "req-lost"), strict=True):
        sent = f"GET {line['path']} HTTP/1.1\r\nHost: t\r\nX-Request-Id: {request_id}\r\n\r\n"
        assert line["request_bytes"] == len(sent)

    # Closed: a late line is dropped and counted, not written.
    module.request_finish(Record())
    assert module.stats() == {"written": 3, "dropped": 1, "buffered": 0}
    assert len(read_lines(path)) == 3


def test_an_unwritable_file_is_reported_once_per_streak_and_retried(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "not-yet"
    path = str(folder / "access.log")

    def errors() -> int:
        return sum(
            record.name == "pitcher.access_log" and record.levelno >= logging.ERROR
            for record in caplog.records
        )

    async def check(proxy: ProxyServer, module: AccessLog, port: int) -> None:
        client = await Client.open(port)
        try:
            # Three batches (each waits for the one before), all refused.
            for number in range(3):
                assert (await client.get("/api/a", f"missing-{number}"))[0] == 200
                await eventually(lambda n=number: module.stats()["dropped"] == n + 1, "a drop")
            assert errors() == 1

            folder.mkdir()
            assert (await client.get("/api/a", "back-0"))[0] == 200
            await eventually(lambda: module.stats()["written"] == 1, "a line written")

            # Rotated away with its folder: the reopen fails, a new streak begins.
            shutil.rmtree(folder)
            module.reopen()
            assert (await client.get("/api/a", "missing-3"))[0] == 200
            await eventually(lambda: module.stats()["dropped"] == 4, "a drop after the reopen")
            assert errors() == 2

            folder.mkdir()
            assert (await client.get("/api/a", "back-1"))[0] == 200
            await eventually(lambda: module.stats()["written"] == 2, "a line in the new file")
        finally:
            await client.close()

    with caplog.at_level(logging.INFO, logger="pitcher.access_log"):
        with_proxy(path, "flush_interval = 0.01", check)
    assert [line["request_id"] for line in read_lines(path)] == ["back-1"]
    assert errors() == 2


# ---------------------------------------------------------------- a stuck disk


READ_ANYWAY_AFTER = 10.0


class FifoReader:
    """The reading end of a FIFO: opened at once, read only once :meth:`start` is called."""

    def __init__(self, path: str) -> None:
        os.mkfifo(path)
        # Non-blocking, so that opening does not wait for the writer.
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        # The smallest pipe (one page), so that it fills after a few lines.
        with contextlib.suppress(AttributeError, OSError):
            fcntl.fcntl(self.fd, fcntl.F_SETPIPE_SZ, 4096)
        self.data = bytearray()
        self._lock = threading.Lock()
        self._go = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._read, name="fifo-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        # Read anyway after a while: a writer that blocks the event loop
        # (a bug) could never tell us to start, and the test would hang.
        self._go.wait(READ_ANYWAY_AFTER)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                time.sleep(0.005)
                continue
            if chunk:
                with self._lock:
                    self.data += chunk
            elif self._done.is_set():
                return  # the writer has closed its end and everything is read
            else:
                time.sleep(0.005)  # no writer (yet, or between two opens)

    def start(self) -> None:
        self._go.set()

    def request_ids(self) -> list[str]:
        with self._lock:
            text = self.data.decode()
        return [json.loads(line)["request_id"] for line in text.splitlines()]

    def close(self) -> bool:
        """Read what is left and stop; whether the reading thread has ended."""
        self._go.set()
        self._done.set()
        self._thread.join(10)
        os.close(self.fd)
        return not self._thread.is_alive()


def test_a_stuck_disk_drops_lines_and_never_blocks_the_loop(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    buffer = 20
    path = str(tmp_path / "access.fifo")
    fifo = FifoReader(path)
    sent = 0
    most_buffered = 0
    lags: list[float] = []

    async def check(proxy: ProxyServer, module: AccessLog, port: int) -> None:
        nonlocal sent, most_buffered
        loop = asyncio.get_running_loop()
        probing = True

        async def probe() -> None:
            while probing:
                start = loop.time()
                await asyncio.sleep(0.01)
                lags.append(loop.time() - start - 0.01)

        prober = loop.create_task(probe(), name="lag-probe")
        client = await Client.open(port)
        try:
            # The pipe fills, the writer's thread blocks in write(), the buffer fills.
            while module.stats()["dropped"] < 100 and sent < 5000:
                assert (await client.get("/api/a", f"stuck-{sent}"))[0] == 200
                sent += 1
                most_buffered = max(most_buffered, module.stats()["buffered"])
            assert max(lags, default=0.0) < 0.1, f"the event loop stalled for {max(lags):.3f}s"
            # Still stuck, for long enough to take the loop's pulse many times. A
            # batch that fit in the pipe may still be finishing when drops begin:
            # let its bookkeeping land before taking the count.
            await asyncio.sleep(0.1)
            stuck_at = module.stats()["written"]
            until = loop.time() + 0.5
            while loop.time() < until:
                assert (await client.get("/api/a", f"stuck-{sent}"))[0] == 200
                sent += 1
                most_buffered = max(most_buffered, module.stats()["buffered"])
            assert module.stats()["written"] == stuck_at
            probing = False
            await prober

            # The disk wakes up: what is buffered is written, then new lines flow.
            fifo.start()
            await eventually(lambda: module.stats()["buffered"] == 0, "the buffer written out")
            for number in range(20):
                assert (await client.get("/api/a", f"after-{number}"))[0] == 200
            wanted = {f"after-{number}" for number in range(20)}
            await eventually(lambda: wanted <= set(fifo.request_ids()), "the later lines")
        finally:
            probing = False
            await client.close()

    try:
        with caplog.at_level(logging.INFO, logger="pitcher.access_log"):
            module = with_proxy(
                path,
                f"buffer = {buffer}\nflush_interval = 0.01",
                check,
                # Whatever happened, the writer's thread must not stay blocked.
                before_stop=fifo.start,
            )
    finally:
        ended = fifo.close()
    assert ended, "the FIFO reader did not see the writer close"

    stats = module.stats()
    assert stats["dropped"] >= 200
    assert most_buffered <= buffer
    assert len(lags) > 20 and max(lags) < 0.1, (len(lags), max(lags))
    # Every request made one line: written (and read, once each) or dropped.
    ids = fifo.request_ids()
    assert stats["buffered"] == 0
    assert stats["written"] + stats["dropped"] == sent + 20
    assert len(ids) == len(set(ids)) == stats["written"]
    # One warning for the whole drop streak, not one per line.
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "dropping new lines" in warnings[0].getMessage()


# --------------------------------------------------- rotation and stop, as processes


def config_with_log(echo_uri: str, path: str, settings: str = "flush_interval = 0.02") -> str:
    text = toml_config(
        [{"name": "echo", "prefix": "/", "cluster": "echo"}],
        {"echo": {"nodes": [echo_uri]}},
        server={"drain_timeout": 2.0},
    )
    return f"{text}\n[modules.access_log]\npath = {json.dumps(path)}\n{settings}\n"


def ids_in(path: str) -> list[str]:
    return sorted(line["request_id"] for line in read_lines(path))


def send(proxy: Proxy, stem: str, count: int) -> list[str]:
    ids = [f"{stem}-{number:02d}" for number in range(count)]
    for request_id in ids:
        assert get(proxy, f"/{stem}", headers=[("X-Request-Id", request_id)]).status == 200
    return ids


@pytest.mark.parametrize("workers", [0, 2])
def test_sigusr1_sends_later_lines_to_a_new_file(launcher: Launcher, workers: int) -> None:
    echo = launcher.echo_backend("tcp")
    path = os.path.join(launcher.tmpdir, "access.log")
    proxy = launcher.proxy(config_with_log(echo.uri, path), workers=workers)

    before = send(proxy, "before", 20)
    wait_until(lambda: ids_in(path) == before, 5, "the first lines in the file")
    rotated = path + ".1"
    os.rename(path, rotated)  # what logrotate does before it signals
    proxy.process.signal(signal.SIGUSR1)
    # The master passes the signal on to every worker; each says so.
    processes = max(workers, 1)
    wait_until(
        lambda: proxy.process.output.count("access log " + path + ": reopening") == processes,
        5,
        "every process to reopen the log",
    )

    after = send(proxy, "after", 20)
    wait_until(lambda: ids_in(path) == after, 5, "the later lines in a new file")
    assert ids_in(rotated) == before
    assert proxy.process.stop() == 0
    assert ids_in(rotated) == before and ids_in(path) == after


@pytest.mark.parametrize("workers", [0, 2])
def test_lines_still_buffered_are_written_when_the_proxy_stops(
    launcher: Launcher, workers: int
) -> None:
    echo = launcher.echo_backend("tcp")
    path = os.path.join(launcher.tmpdir, "access.log")
    # Nothing is written before the stop: the interval is long, the buffer large.
    settings = "flush_interval = 60\nbuffer = 1000"
    proxy = launcher.proxy(config_with_log(echo.uri, path, settings), workers=workers)

    sent = send(proxy, "drained", 30)
    assert ids_in(path) == []
    started = time.monotonic()
    proxy.process.signal(signal.SIGTERM)
    assert proxy.process.popen.wait(10) == 0
    assert time.monotonic() - started < 8
    assert ids_in(path) == sent


# ------------------------------------------------------------------- bad settings


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("buffer = 10", "path is required"),
        ("path = 1", "path must be a file name"),
        ('path = ""', "path must be a file name"),
        ('path = "a.log"\nbuffer = 0', "buffer must be a whole number of lines >= 1"),
        ('path = "a.log"\nbuffer = 1.5', "buffer must be a whole number of lines >= 1"),
        ('path = "a.log"\nbuffer = true', "buffer must be a whole number of lines >= 1"),
        ('path = "a.log"\nflush_interval = 0', "flush_interval must be a number of seconds > 0"),
        ('path = "a.log"\nflush_interval = -1', "flush_interval must be a number of seconds > 0"),
        ('path = "a.log"\nflush_interval = inf', "flush_interval must be a number of seconds > 0"),
        ('path = "a.log"\nflush_interval = "1s"', "flush_interval must be a number of seconds"),
        ('path = "a.log"\nformat = "json"', "unknown key 'format'"),
    ],
)
def test_bad_settings_are_refused_with_their_line(section: str, message: str) -> None:
    assert_module_refuses("access_log", section, message)


def test_good_settings_and_their_defaults() -> None:
    config = parse_config(
        '[[routes]]\ncluster = "a"\n[clusters.a]\nnodes = ["tcp://127.0.0.1:1"]\n'
        '[modules.access_log]\npath = "a.log"\n',
        "r.toml",
    )
    [settings] = [m.settings for m in config.modules if m.name == "access_log"]
    assert dict(settings) == {
        "path": "a.log",
        "buffer": 8192,
        "flush_interval": 0.2,
        "fields": tuple(FIELDS),
    }
    module = AccessLog(settings)
    assert (module.capacity, module.flush_interval) == (8192, 0.2)
    assert module.stats() == {"written": 0, "dropped": 0, "buffered": 0}
