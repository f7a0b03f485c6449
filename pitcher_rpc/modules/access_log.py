"""``access_log``: one JSON line per answered or refused request, written without blocking.

    [modules.access_log]
    path = "/var/log/pitcher/access.log"   # the file lines are appended to (required)
    buffer = 8192                          # most lines held in memory (default)
    flush_interval = 0.2                   # seconds a line may wait for a write (default)
    fields = ["time", "status", "path"]    # which fields, in this order (default: all)

A line, written when the response has been handed to the socket::

    {"time":"2024-05-01T12:00:03.123Z","client":"10.0.0.7","method":"GET",
     "path":"/api/users?page=2","request_id":"5f1c2a9e0b3d-2a","route":"api",
     "cluster":"users","node":"tcp://10.0.1.5:7000","transport":"tcp","status":200,
     "bytes":512,"total":0.000734,"backend":0.000512,"residence":0.000222,
     "reason":null,"detail":null,"host":"api.example.com","user_agent":"curl/8.5.0",
     "protocol":"HTTP/1.1","request_bytes":78,"retries":0,
     "trace_id":"4bf92f3577b34da6a3ce929d0e0e4736"}

Every field (:data:`FIELDS`, in the default order: the fourteen a line has
always had first, ``time`` to ``residence``, then the ones added since) is
described in docs/access-log.md. ``reason`` is why no backend answered (the
exchange's ``failure``: ``timeout``, ``connect`` ...) or why the request was
refused (the :class:`~pitcher_rpc.proxy.glue.Refusal`'s reason), null
otherwise; ``detail`` is a refusal's text. What a line has not is null.

A request refused before it makes an exchange (the HTTP parser's 400, 408,
413, 414, 431, 501, 505, and a connection refused at ACCEPT) has a line in
the same format, written when its answer is handed to the socket, with null
for what a refusal has not (a route, times, a parsed head)::

    {"time":"2024-05-01T12:00:04.001Z","client":"10.0.0.9","method":"GET",
     "path":"/big","request_id":null,"route":null,"cluster":null,"node":null,
     "transport":null,"status":431,"bytes":153,"total":null,"backend":null,
     "residence":null,"reason":"headers_too_large","detail":"header section too large",
     "host":null,"user_agent":null,"protocol":null,"request_bytes":null,"retries":null,
     "trace_id":null}

``method`` and ``path`` are null when the request line was not received whole.

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
import operator
import re
import time
from collections.abc import Mapping
from typing import Any, Final

import aiofiles

from ..http.request import HttpRequest
from .base import FAILURES, AnyRecord, Module

log = logging.getLogger("pitcher.access_log")

# Every field a line can have, in the default order: the fields lines have
# always had first (so a reader that takes them by position still can),
# then the ones added since.
FIELDS: Final = (
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
)
_DEFAULTS: dict[str, Any] = {"buffer": 8192, "flush_interval": 0.2, "fields": FIELDS}
_KEYS: Final = frozenset({"path", *_DEFAULTS})
# How long aclose() may spend writing out the buffer before it gives up.
_CLOSE_TIMEOUT: Final = 2.0
# The least time between two warnings that lines are being dropped.
_WARN_EVERY: Final = 60.0
# A JSON string, quoted and escaped (non-ASCII as \\u escapes), in C.
_string: Final = json.encoder.encode_basestring_ascii
# A time's milliseconds and zone, by the thousandths of its second.
_MILLIS: Final = tuple(f".{millis:03d}Z" for millis in range(1000))
_PROTOCOLS: Final = {"1.1": '"HTTP/1.1"', "1.0": '"HTTP/1.0"'}
# The reason of a failed exchange (Record.failure) as JSON; "" (none) is null.
_FAILURES: Final = {failure: _string(failure) for failure in FAILURES} | {"": "null"}
_USER_AGENT: Final = b"user-agent"
_TRACEPARENT: Final = b"traceparent"
# Where the tracing module keeps a request's trace (modules/tracing.py: _STATE).
_TRACING: Final = "tracing"
# The request line's bytes besides the method and the target: " ", " HTTP/1.1\r\n".
_REQUEST_LINE_REST: Final = 12
# A valid traceparent: version 00 with exactly its four fields, or a later
# version (not ff) that may add fields after a dash; lower-case hex, neither
# the trace id (the group) nor the parent id all zeros.
_IDS: Final = rb"-(?!0{32})([0-9a-f]{32})-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}"
_VALID_TRACEPARENT: Final = re.compile(
    rb"00" + _IDS + rb"|(?!00|ff)[0-9a-f]{2}" + _IDS + rb"(?:-.*)?", re.S
)
# Route and node pairs whose fields are kept made; cleared when full.
_WHERE_CACHE: Final = 4096
# Client addresses, methods, hosts and user agents kept as JSON strings; cleared when full.
_TEXTS_CACHE: Final = 4096


def _checked_fields(fields: Any) -> tuple[str, ...]:
    """``fields`` as a tuple of known, distinct field names; ValueError naming what is wrong."""
    if not isinstance(fields, list | tuple) or not fields:
        raise ValueError(f"fields must be a non-empty list of field names, got {fields!r}")
    seen: set[str] = set()
    for name in fields:
        if not isinstance(name, str) or name not in FIELDS:
            raise ValueError(f"fields: unknown field {name!r} (the fields are {', '.join(FIELDS)})")
        if name in seen:
            raise ValueError(f"fields: {name!r} is listed twice")
        seen.add(name)
    return tuple(fields)


def _request_size(request: HttpRequest) -> int:
    """The request's size as parsed: request line, header fields, blank line and body."""
    return (
        len(request.method)
        + len(request.target)
        + _REQUEST_LINE_REST
        + request.fields_size
        + 2
        + (len(request.body) if request.body_stream is None else request.body_stream.received)
    )


# "000" to "999": six decimals are two look-ups, not a number's formatting.
_DIGITS: Final = tuple(f"{n:03d}" for n in range(1000))


def _seconds(micros: int) -> str:
    """Microseconds as seconds with six decimals: 734 is "0.000734"."""
    if micros <= 0:
        return "0.000000"
    if micros < 1_000_000:
        return f"0.{_DIGITS[micros // 1000]}{_DIGITS[micros % 1000]}"
    fraction = micros % 1_000_000
    return f"{micros // 1_000_000}.{_DIGITS[fraction // 1000]}{_DIGITS[fraction % 1000]}"


def trace_id(traceparent: bytes) -> str | None:
    """The trace id of a W3C ``traceparent`` value, as its 32 hex digits; None if malformed.

    ``VERSION-TRACEID-PARENTID-FLAGS``, lower-case hex, neither id all zeros
    (W3C Trace Context, level 1). A version after ``00`` may append fields
    after a dash; ``ff`` is no version.
    """
    # One match in C does every check; the id is the group of the version matched.
    found = _VALID_TRACEPARENT.fullmatch(traceparent)
    if found is None:
        return None
    trace = found[1] or found[2]
    return trace.decode("ascii")


def _line_template(fields: tuple[str, ...]) -> tuple[str, Any]:
    """A line of the fields given, a ``%s`` for each value, and what picks those values.

    The picker takes a list of every value in :data:`FIELDS` order (the time
    is two: its second and its milliseconds) and returns the ones of
    ``fields`` in their order.
    """
    parts = []
    picked: list[int] = []
    for name in fields:
        index = FIELDS.index(name)
        if name == "time":
            parts.append('"time":"%s%s"')
            picked += (0, 1)
        else:
            parts.append(f'"{name}":%s')
            picked.append(index + 1)
    # itemgetter picks the values into a tuple in C; one value comes alone.
    return "{" + ",".join(parts) + "}", operator.itemgetter(*picked)


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
        return {
            "path": path,
            "buffer": buffer,
            "flush_interval": float(interval),
            "fields": _checked_fields(settings.get("fields", FIELDS)),
        }

    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__(settings)
        checked = self.validate(settings)
        self.path: str = checked["path"]
        self.capacity: int = checked["buffer"]
        self.flush_interval: float = checked["flush_interval"]
        self.fields: tuple[str, ...] = checked["fields"]
        # The default list has a line written out below (an f-string, four times
        # faster than a template); any other is a template filled by position.
        self._default = self.fields == FIELDS
        self._template, self._pick = _line_template(self.fields)
        # Fields that cost a look through the headers are made only when logged.
        self._log_user_agent = "user_agent" in self.fields
        self._log_trace_id = "trace_id" in self.fields
        self._log_request_bytes = "request_bytes" in self.fields
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
        self._where: dict[tuple[Any, Any], tuple[str, str, str, str]] = {}
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
        method = refusal.method
        target = refusal.target
        # What a refusal has not (a route, times, a parsed head) is null.
        values = [
            self._second_of(second),
            _MILLIS[int((now - second) * 1000)],
            self._text(refusal.client_ip),
            self._text(method) if method else "null",
            _string(target.decode("latin-1")) if target else "null",
            "null",  # request_id
            "null",  # route
            "null",  # cluster
            "null",  # node
            "null",  # transport
            str(refusal.status),
            str(refusal.response_bytes),
            "null",  # total
            "null",  # backend
            "null",  # residence
            _string(refusal.reason),
            _string(refusal.detail),
            "null",  # host
            "null",  # user_agent
            "null",  # protocol
            "null",  # request_bytes
            "null",  # retries
            "null",  # trace_id
        ]
        return self._template % self._pick(values)

    def _second_of(self, second: int) -> str:
        """The UTC time of ``second`` (epoch), made once per second."""
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return self._second_text

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
            backend_text = _seconds(backend)
            residence_text = _seconds(micros - backend)
        else:
            backend_text = "null"
            residence_text = _seconds(micros)
        total_text = _seconds(micros)
        path = request.path
        if request.query:
            path = path + b"?" + request.query
        where = self._where.get((route, node))
        if where is None:
            where = self._where_of(route, node)
        now = time.time()
        second = int(now)
        second_text = self._second_text if second == self._second else self._second_of(second)
        request_id = exchange.request_id
        texts = self._texts
        client = exchange.client_ip
        client_text = texts.get(client)
        if client_text is None:
            client_text = self._text(client)
        method = request.method
        method_text = texts.get(method)
        if method_text is None:
            method_text = self._text(method)
        host = request.host
        if host:
            host_text = texts.get(host)
            if host_text is None:
                host_text = self._text(host)
        else:
            host_text = "null"
        names = request.names
        user_agent = "null"
        if self._log_user_agent and _USER_AGENT in names:
            agent = request.values[names.index(_USER_AGENT)]
            user_agent = texts.get(agent) or self._text(agent)
        trace = "null"
        if self._log_trace_id:
            state = exchange.module_state
            traced = state.get(_TRACING) if state is not None else None
            if traced is not None:
                # The tracing module's trace, continued or started: its span's id.
                trace = '"' + format(traced.trace_id, "032x") + '"'
            elif _TRACEPARENT in names:
                trace = self._trace_text(request)
        request_bytes = "null"
        if self._log_request_bytes:
            request_bytes = str(_request_size(request))
        version = request.version
        # Compared, not looked up: a dict's get costs more than these.
        if version == "1.1":
            protocol = '"HTTP/1.1"'
        else:
            protocol = _PROTOCOLS.get(version) or _string("HTTP/" + version)
        attempts = exchange.attempts
        failure = exchange.failure
        reason = (_FAILURES.get(failure) or _string(failure)) if failure else "null"
        millis = _MILLIS[int((now - second) * 1000)]
        path_text = _string(path.decode("latin-1"))
        id_text = _string(request_id.decode("latin-1")) if request_id else "null"
        retries = str(attempts - 1) if attempts > 1 else "0"
        if self._default:
            return (
                f'{{"time":"{second_text}{millis}","client":{client_text},'
                f'"method":{method_text},"path":{path_text},"request_id":{id_text},'
                f'"route":{where[0]},"cluster":{where[1]},"node":{where[2]},'
                f'"transport":{where[3]},"status":{exchange.status},'
                f'"bytes":{exchange.response_bytes},"total":{total_text},'
                f'"backend":{backend_text},"residence":{residence_text},'
                f'"reason":{reason},"detail":null,"host":{host_text},'
                f'"user_agent":{user_agent},"protocol":{protocol},'
                f'"request_bytes":{request_bytes},"retries":{retries},"trace_id":{trace}}}'
            )
        values = [
            second_text,
            millis,
            client_text,
            method_text,
            path_text,
            id_text,
            where[0],
            where[1],
            where[2],
            where[3],
            str(exchange.status),
            str(exchange.response_bytes),
            total_text,
            backend_text,
            residence_text,
            reason,
            "null",  # detail: a refusal's
            host_text,
            user_agent,
            protocol,
            request_bytes,
            retries,
            trace,
        ]
        return self._template % self._pick(values)

    def _trace_text(self, request: HttpRequest) -> str:
        """The trace id of the request's one ``traceparent`` field as JSON; null if none."""
        names = request.names
        if names.count(_TRACEPARENT) != 1:
            return "null"  # two are malformed: which one holds is not known
        found = trace_id(request.values[names.index(_TRACEPARENT)])
        return '"' + found + '"' if found is not None else "null"

    def _text(self, value: bytes) -> str:
        """A client address, method, host or user agent as a JSON string, kept: they repeat."""
        if len(self._texts) >= _TEXTS_CACHE:
            self._texts.clear()
        text = self._texts[value] = _string(value.decode("latin-1"))
        return text

    def _where_of(self, route: Any, node: Any) -> tuple[str, str, str, str]:
        """The route, cluster, node and transport fields, made once per route and node."""
        uri = node.uri if node is not None else None
        where = (
            _string(route.name) if route is not None else "null",
            _string(route.cluster.name) if route is not None else "null",
            _string(uri) if uri is not None else "null",
            _string(uri.partition("://")[0]) if uri is not None else "null",
        )
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
