"""``access_log``: one JSON line per answered request, written without blocking the proxy.

    [modules.access_log]
    path = "/var/log/pitcher/access.log"   # the file lines are appended to (required)
    buffer = 8192                          # most lines held in memory (default)
    flush_interval = 0.2                   # seconds a line may wait for a write (default)

A line, written when the response has been handed to the socket::

    {"time":"2024-05-01T12:00:03.123Z","client":"10.0.0.7","method":"GET",
     "path":"/api/users?page=2","request_id":"5f1c2a9e0b3d-2a","route":"api",
     "cluster":"users","node":"tcp://10.0.1.5:7000","transport":"tcp","status":200,
     "bytes":512,"total":0.000734,"backend":0.000512,"residence":0.000222}

``time``
    when the response was written, UTC, to the millisecond.
``client``
    the client's IP address: the connection's peer, or the client a peer in
    ``[server] trusted_proxies`` names in X-Forwarded-For (``unix`` for a
    client on a Unix socket).
``method``, ``path``
    as the client sent them; ``path`` keeps the query (``?...``) and is not
    normalised. Bytes outside ASCII are escaped (``\\u00e9``).
``request_id``
    the id the request_id module kept or made; null if it is off.
``route``, ``cluster``, ``node``, ``transport``
    the route taken, its cluster, the node of the last attempt and that
    node's URI scheme (``tcp``, ``unix``, ``zmq+tcp`` ...); null when no
    route took the request (a 404) or no node was called.
``status``, ``bytes``
    the status sent and the size of the whole response (head and body);
    499 and 0 when the client went away before the answer (as nginx).
``total``, ``backend``, ``residence``
    seconds, to the microsecond (six decimals, never an exponent): from the
    request read to the response written; from the last attempt sent to its
    answer or error (null if no backend was called); and the rest, the time
    spent in the proxy itself (earlier failed attempts of a retried request
    included).

A request refused before it makes an exchange (the HTTP parser's 400, 408,
413, 414, 431, 505, and a connection refused at ACCEPT) has a line too, with
what is known of it, written when its answer is handed to the socket::

    {"time":"2024-05-01T12:00:04.001Z","client":"10.0.0.9","method":"GET",
     "path":"/big","request_id":null,"route":null,"cluster":null,"node":null,
     "transport":null,"status":431,"bytes":153,"total":null,"backend":null,
     "residence":null,"reason":"headers_too_large","detail":"header section too large"}

``method`` and ``path`` are null when the request line was not received
whole; ``reason`` is a short fixed name (``header_timeout``,
``body_timeout``, ``body_too_large``, ``request_line_too_long``,
``headers_too_large``, ``too_many_headers``, ``bad_request``, ``bad_host``,
``bad_framing``, ``version_not_supported``, ``method_not_implemented``,
``refused_at_accept`` ...) and ``detail`` the text of the answer.

Writing never blocks the event loop: a request only appends its line to a
buffer in memory; a writer task appends the buffered lines to the file in a
thread (aiofiles), one batch at a time, once the oldest has waited
``flush_interval`` or the buffer is half full, and flushes after each batch.
Each batch is one ``write()`` to a file opened for appending, so several
workers can share one file without mixing their lines. The buffer never
holds more than ``buffer`` lines, counting the batch being written: while
the disk is slow or stuck, lines beyond that are dropped and counted (a
warning when dropping starts, at most one a minute). A file that cannot be
opened or written (a missing directory, a full disk) is reported once per
failure streak, the lines of the failed batch are dropped and counted, and
the next batch tries again.

SIGUSR1 (sent after a log rotation moved the file) makes the writer close
and reopen ``path`` before its next write: later lines go to the new file.
Lines still waiting in the buffer then go there too; none is lost or
written twice.

``stats()`` reports ``written``, ``dropped`` and ``buffered`` lines. When the
proxy stops (or a reload replaces this module's settings) what is buffered is
written out, for at most two seconds so that a stuck disk cannot hold up the
stop; lines still unwritten then, and lines arriving after that, are dropped
and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import aiofiles

from .base import AnyRecord, Module

log = logging.getLogger("pitcher.access_log")

_DEFAULTS: dict[str, Any] = {"buffer": 8192, "flush_interval": 0.2}
_KEYS = frozenset({"path", *_DEFAULTS})
# How long aclose() may spend writing out the buffer before it gives up.
_CLOSE_TIMEOUT = 2.0
# The least time between two warnings that lines are being dropped.
_WARN_EVERY = 60.0
# json.dumps() builds a new encoder on every call made with non-default
# arguments; one encoder made here is reused.
_encode = json.JSONEncoder(separators=(",", ":")).encode
# A JSON string, quoted and escaped (non-ASCII as \\u escapes), in C.
_string = json.encoder.encode_basestring_ascii
# A line's milliseconds and what follows them, by the thousandths of its second.
_MILLIS = tuple(f'.{millis:03d}Z",' for millis in range(1000))
# Route and node pairs whose fields are kept made; cleared when full.
_WHERE_CACHE = 4096
# Client addresses and methods kept as JSON strings; cleared when full.
_TEXTS_CACHE = 4096


def _seconds(micros: int) -> str:
    """Microseconds as seconds with six decimals: 734 is "0.000734"."""
    if micros <= 0:
        return "0.000000"
    if micros < 1_000_000:
        return "0." + str(micros + 1_000_000)[1:]
    return str(micros // 1_000_000) + "." + str(micros % 1_000_000 + 1_000_000)[1:]


class AccessLog(Module):
    name = "access_log"
    # Last of all: a line records what every other module did to the request.
    priority = 10

    @classmethod
    def validate(cls, settings: Mapping[str, Any]) -> Mapping[str, Any]:
        unknown = set(settings) - _KEYS
        if unknown:
            expected = ", ".join(sorted(_KEYS))
            raise ValueError(f"unknown key {sorted(unknown)[0]!r} (expected {expected})")
        path = settings.get("path")
        if path is None:
            raise ValueError("path is required: the file to write the lines to")
        if not isinstance(path, str) or not path or "\0" in path:
            raise ValueError(f"path must be a file name, got {path!r}")
        buffer = settings.get("buffer", _DEFAULTS["buffer"])
        if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
            raise ValueError(f"buffer must be a whole number of lines >= 1, got {buffer!r}")
        interval = settings.get("flush_interval", _DEFAULTS["flush_interval"])
        if (
            isinstance(interval, bool)
            or not isinstance(interval, int | float)
            or not math.isfinite(interval)
            or interval <= 0
        ):
            raise ValueError(f"flush_interval must be a number of seconds > 0, got {interval!r}")
        return {"path": path, "buffer": buffer, "flush_interval": float(interval)}

    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__(settings)
        checked = self.validate(settings)
        self.path: str = checked["path"]
        self.capacity: int = checked["buffer"]
        self.flush_interval: float = checked["flush_interval"]
        # Write at once, without waiting for the interval, once this many wait.
        self._urgent_at = max(1, self.capacity // 2)
        self.written = 0
        self.dropped = 0
        self._lines: list[str] = []
        # Lines taken by the writer and not yet written: still held in memory.
        self._in_flight = 0
        self._first_at = 0.0  # loop time the oldest buffered line came
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._file: Any = None
        self._reopen = False
        self._closed = False
        self._dropping = False  # a drop streak (buffer full) is under way
        self._warned = False  # ... and it was reported
        self._quiet_until = 0.0  # no new drop warning before this (monotonic)
        self._failing = False  # a failure streak (open/write errors) is under way
        # The route/cluster/node/transport part of a line, by (route, node).
        self._where: dict[tuple[Any, Any], str] = {}
        # Client addresses and methods made JSON strings, by their bytes.
        self._texts: dict[bytes, str] = {}
        # The start of a line up to its UTC second, made once per second.
        self._second = -1
        self._second_text = ""

    # the request path ---------------------------------------------------------------

    def request_finish(self, exchange: AnyRecord) -> None:
        if self._has_room():
            self._append(self._line(exchange))

    def request_refused(self, refusal: Any) -> None:
        """A line for a request refused without an exchange (see the module docstring)."""
        if self._has_room():
            self._append(self._refusal_line(refusal))

    def _has_room(self) -> bool:
        """Whether a line may be buffered; if not, it is counted dropped."""
        if self._closed:
            self.dropped += 1
            return False
        if len(self._lines) + self._in_flight >= self.capacity:
            self.dropped += 1
            if not self._dropping:
                self._dropping = True
                self._warn_of_drops()
            return False
        return True

    def _append(self, line: str) -> None:
        lines = self._lines
        lines.append(line)
        count = len(lines)
        if count == 1:
            self._first_line()
        elif count == self._urgent_at:
            self._wake.set()

    def _first_line(self) -> None:
        """The buffer had been empty: start the writer if need be, and note when."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
            self._writer = loop.create_task(self._write_lines(), name="pitcher-access-log")
            self._writer.add_done_callback(self._writer_done)
        self._first_at = loop.time()
        self._wake.set()

    def _refusal_line(self, refusal: Any) -> str:
        now = time.time()
        second = int(now)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        method = refusal.method
        target = refusal.target
        return (
            f'{{"time":"{stamp}{_MILLIS[int((now - second) * 1000)]}'
            f'"client":{_string(refusal.client_ip.decode("latin-1"))},'
            f'"method":{_string(method.decode("latin-1")) if method else "null"},'
            f'"path":{_string(target.decode("latin-1")) if target else "null"},'
            '"request_id":null,"route":null,"cluster":null,"node":null,"transport":null,'
            f'"status":{refusal.status},"bytes":{refusal.response_bytes},'
            '"total":null,"backend":null,"residence":null,'
            f'"reason":{_string(refusal.reason)},"detail":{_string(refusal.detail)}}}'
        )

    def _warn_of_drops(self) -> None:
        # One warning per streak, and streaks of a disk that keeps up only
        # now and then are reported once a minute at most.
        now = time.monotonic()
        self._warned = now >= self._quiet_until
        if self._warned:
            self._quiet_until = now + _WARN_EVERY
            log.warning(
                "access log %s: %d lines wait for a slow disk; dropping new lines",
                self.path,
                self.capacity,
            )

    def _line(self, exchange: AnyRecord) -> str:
        request = exchange.request
        route = exchange.route
        node = exchange.node
        total = exchange.finished - exchange.started
        backend_started = exchange.backend_started
        backend_ended = exchange.backend_ended
        # Whole microseconds written by str(), not "%.6f": a float's formatting
        # costs as much as the rest of the line.
        micros = int(total * 1e6 + 0.5)
        if backend_started and backend_ended >= backend_started:
            backend = int((backend_ended - backend_started) * 1e6 + 0.5)
            timing = (
                f'"total":{_seconds(micros)},"backend":{_seconds(backend)},'
                f'"residence":{_seconds(micros - backend)}'
            )
        else:
            timing = f'"total":{_seconds(micros)},"backend":null,"residence":{_seconds(micros)}'
        path = request.path
        if request.query:
            path = path + b"?" + request.query
        where = self._where.get((route, node))
        if where is None:
            where = self._where_of(route, node)
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._second_text = '{"time":"' + time.strftime(
                "%Y-%m-%dT%H:%M:%S", time.gmtime(second)
            )
        request_id = exchange.request_id
        client = exchange.client_ip
        method = request.method
        texts = self._texts
        client_text = texts.get(client)
        if client_text is None:
            client_text = self._text(client)
        method_text = texts.get(method)
        if method_text is None:
            method_text = self._text(method)
        return (
            f"{self._second_text}{_MILLIS[int((now - second) * 1000)]}"
            f'"client":{client_text},"method":{method_text},'
            f'"path":{_string(path.decode("latin-1"))},'
            f'"request_id":{_string(request_id.decode("latin-1")) if request_id else "null"},'
            f'{where},"status":{exchange.status},"bytes":{exchange.response_bytes},{timing}}}'
        )

    def _text(self, value: bytes) -> str:
        """A client address or a method as a JSON string, kept: they repeat."""
        if len(self._texts) >= _TEXTS_CACHE:
            self._texts.clear()
        text = self._texts[value] = _string(value.decode("latin-1"))
        return text

    def _where_of(self, route: Any, node: Any) -> str:
        """The route, cluster, node and transport fields, made once per route and node."""
        uri = node.uri if node is not None else None
        where = _encode(
            {
                "route": route.name if route is not None else None,
                "cluster": route.cluster.name if route is not None else None,
                "node": uri,
                "transport": uri.partition("://")[0] if uri is not None else None,
            }
        )[1:-1]
        if len(self._where) >= _WHERE_CACHE:
            self._where.clear()  # routes and nodes of old snapshots
        self._where[(route, node)] = where
        return where

    # the writer -----------------------------------------------------------------------

    async def _write_lines(self) -> None:
        """Write batches until closed and empty, then close the file."""
        loop = asyncio.get_running_loop()
        wake = self._wake
        while True:
            if not self._lines:
                if self._closed:
                    await self._close_file()
                    return
                wake.clear()
                await wake.wait()
                continue
            if not self._closed and len(self._lines) < self._urgent_at:
                delay = self._first_at + self.flush_interval - loop.time()
                if delay > 0:
                    # Woken early when the buffer is half full, or at close.
                    wake.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await wake.wait()
                    continue
            batch, self._lines = self._lines, []
            self._in_flight = len(batch)
            try:
                await self._write(batch)
            finally:
                self._in_flight = 0

    def _writer_done(self, writer: asyncio.Task[None]) -> None:
        if not writer.cancelled() and writer.exception() is not None:
            # Not expected (_write catches what I/O raises), but never silent:
            # from here on every line is dropped and counted.
            self._closed = True
            self.dropped += len(self._lines)
            self._lines = []
            log.error(
                "access log %s: the writer failed; no more lines are written",
                self.path,
                exc_info=writer.exception(),
            )

    async def _write(self, batch: list[str]) -> None:
        text = "\n".join(batch) + "\n"
        try:
            if self._file is None or self._reopen:
                self._reopen = False
                await self._close_file()
                self._file = await aiofiles.open(self.path, "a", encoding="utf-8")
            # One write and one flush: the batch leaves in one write() call,
            # which O_APPEND keeps whole beside other workers' batches.
            await self._file.write(text)
            await self._file.flush()
        except Exception as exc:
            self.dropped += len(batch)
            if not self._failing:
                self._failing = True
                log.error(
                    "access log %s: cannot write (%s); dropping lines until it works again",
                    self.path,
                    exc,
                    exc_info=not isinstance(exc, OSError),
                )
            # Opened again for the next batch: the fault may be gone by then.
            await self._close_file()
            return
        self.written += len(batch)
        if self._failing:
            self._failing = False
            log.info("access log %s: writing again", self.path)
        if self._dropping:
            self._dropping = False
            if self._warned:
                log.info("access log %s: writing again (%d lines dropped)", self.path, self.dropped)

    async def _close_file(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            # Lines a failed write left in the file's buffer are counted
            # dropped already; a second failure here has nothing to add.
            with contextlib.suppress(Exception):
                await file.close()

    # the module contract --------------------------------------------------------------

    def reopen(self) -> None:
        """After a log rotation: write the next batch to a freshly opened ``path``."""
        self._reopen = True
        log.info("access log %s: reopening it before the next write", self.path)

    def stats(self) -> dict[str, Any]:
        return {
            "written": self.written,
            "dropped": self.dropped,
            "buffered": len(self._lines) + self._in_flight,
        }

    async def aclose(self) -> None:
        """Write out what is buffered (for at most two seconds), close the file, stop."""
        if self._closed:
            return
        self._closed = True
        writer = self._writer
        if writer is None:
            return
        self._wake.set()
        done, _ = await asyncio.wait({writer}, timeout=_CLOSE_TIMEOUT)
        if done:
            return
        # The disk is stuck: the thread writing to it cannot be stopped, and
        # closing the file under it could block as well; both are left to it.
        lost = len(self._lines) + self._in_flight
        self.dropped += lost
        self._lines = []
        self._file = None
        writer.cancel()
        await asyncio.wait({writer}, timeout=_CLOSE_TIMEOUT)
        log.error(
            "access log %s: %d lines not written within %gs of closing; dropped",
            self.path,
            lost,
            _CLOSE_TIMEOUT,
        )
