"""The yardstick of the proxy: Pitcher's design in a few hundred lines, no modules.

What the design allows in pure Python, measured beside Pitcher by
bench_pair.py: one uvloop Protocol per client connection around httptools
(keep-alive, pipelined requests answered in order), each request written
straight to the protobuf bytes of a ``pitcher.v1.Request`` and sent as a
frame (docs/wire.md) over ONE multiplexed link per backend, answers matched
by request id, each ``pitcher.v1.Response`` decoded by hand and written back
as HTTP/1.1 with date, content-length and connection handling. Like Pitcher
it drops hop-by-hop request headers (and those named in Connection) and adds
X-Forwarded-For and X-Forwarded-Proto; it checks response header names and
values before relaying them. It has no routing (one route, ``--route``), no
modules, no idle timeouts; a request not answered within ``--timeout`` gets
a 504 one to two timeouts after it was sent (a sweep per timeout, no timer
per request).

The link is written at once when the backend has nothing else in flight
(one connection: no wait for the end of the loop turn), and otherwise every
8 frames or at the end of the loop turn, whichever comes first, so that the
backend starts on the first requests of a busy turn while the proxy is still
reading the rest (flushing only once per turn made proxy and service take
turns on two cores). Request bytes written by hand with each header name's
field cached beat the generated upb class (1.35 against 2.5 µs for five
headers, 3.7 against 4.2 µs for twenty), and so did decoding the Response by
hand (2.4 against 3.0 µs), measured with timeit on this machine.

    python bench/minimal_proxy.py --listen 127.0.0.1:8080 --backend unix:///tmp/echo.sock

Prints ``ready`` once listening with every backend link up; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import struct
import time
from collections import deque
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import httptools
import uvloop

PREFACE = b"PITCHER\x01"
HEADER = struct.Struct(">BBHIQI")
_pack = HEADER.pack
_unpack_from = HEADER.unpack_from
# The client's SETTINGS: max_frame_size 4 MiB (the largest Response it takes).
_SETTINGS = b"\x08\x80\x80\x80\x02"
HELLO = PREFACE + _pack(1, 8, 0, len(_SETTINGS), 0, 0) + _SETTINGS
MAX_FRAME = 4 * 1024 * 1024
MAX_BODY = 1024 * 1024
FLUSH_FRAMES = 8
# Pipelined requests a client may have waiting before its reading is paused.
HIGH_WATER = 128
LOW_WATER = 64

REQUEST_DROP = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"content-length",
        b"x-forwarded-for",
        b"x-forwarded-proto",
    )
)
RESPONSE_DROP = (REQUEST_DROP - {b"x-forwarded-for", b"x-forwarded-proto"}) | {b"date"}
STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_VALUE = rb"(?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?"
# All names (values) checked by one regex call over them joined by a newline.
_VALID_NAMES = re.compile(rb"%s(?:\n%s)*" % (_TOKEN, _TOKEN)).fullmatch
_VALID_VALUES = re.compile(rb"%s(?:\n%s)*" % (_VALUE, _VALUE)).fullmatch
_CLOSE = b"connection: close\r\n"
_KEEP_ALIVE = b"connection: keep-alive\r\n"


def varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


# Tag and length of a length-delimited field, by field number then by length (< 128).
_PREFIX = [[bytes((number << 3 | 2, size)) for size in range(128)] for number in range(9)]


def prefix(number: int, size: int) -> bytes:
    return _PREFIX[number][size] if size < 128 else bytes((number << 3 | 2,)) + varint(size)


def field(number: int, value: bytes) -> bytes:
    return prefix(number, len(value)) + value


_VALUE_OF = _PREFIX[5]
_FORWARDED_FOR = field(4, b"x-forwarded-for")
_FORWARDED_PROTO = field(4, b"x-forwarded-proto") + field(5, b"http")


# A header name as received -> its Request field (tag, length, lower-case name), or b""
# for a name the proxy drops or rewrites. Bounded: cleared when full.
_NAME_FIELDS: dict[bytes, bytes] = {}


def name_field(name: bytes) -> bytes:
    if len(_NAME_FIELDS) >= 4096:
        _NAME_FIELDS.clear()
    lower = name.lower()
    encoded = _NAME_FIELDS[name] = b"" if lower in REQUEST_DROP else field(4, lower)
    return encoded


def decode_response(payload: bytes) -> tuple[int, list[bytes], list[bytes], bytes]:
    """status, header names, header values and body of a pitcher.v1.Response."""
    status = 0
    names: list[bytes] = []
    values: list[bytes] = []
    body = b""
    pos = 0
    end = len(payload)
    while pos < end:
        tag = payload[pos]
        pos += 1
        if tag >= 0x80:
            tag, pos = read_varint(payload, pos - 1)
        kind = tag & 7
        if kind == 0:
            value, pos = read_varint(payload, pos)
            if tag == 0x08:
                status = value
        elif kind == 2:
            size = payload[pos]
            pos += 1
            if size >= 0x80:
                size, pos = read_varint(payload, pos - 1)
            stop = pos + size
            if stop > end:
                raise ValueError("field runs past the payload")
            if tag == 0x12:
                names.append(payload[pos:stop])
            elif tag == 0x1A:
                values.append(payload[pos:stop])
            elif tag == 0x22:
                body = payload[pos:stop]
            pos = stop
        elif kind == 1:
            pos += 8
        elif kind == 5:
            pos += 4
        else:
            raise ValueError(f"wire type {kind}")
    if pos != end or len(names) != len(values):
        raise ValueError("malformed response")
    return status, names, values, body


class Clock:
    """The date header line, made once a second by a timer rather than per response."""

    __slots__ = ("line",)

    def __init__(self) -> None:
        self.line = b""

    def tick(self, loop: asyncio.AbstractEventLoop) -> None:
        now = time.time()
        self.line = b"date: %s\r\n" % formatdate(now, usegmt=True).encode()
        loop.call_at(loop.time() + 1.0 - now % 1.0, self.tick, loop)


CLOCK = Clock()


def error_response(status: int, message: str, keep_alive: bool) -> bytes:
    body = f"{status} {HTTPStatus(status).phrase}: {message}\n".encode()
    return b"%scontent-type: text/plain; charset=utf-8\r\n%scontent-length: %d\r\n%s\r\n%s" % (
        STATUS_LINES[status],
        CLOCK.line,
        len(body),
        b"" if keep_alive else _CLOSE,
        body,
    )


class Exchange:
    """One request: who asked, how to frame its answer, and the answer once there."""

    __slots__ = ("answer", "client", "head", "http10", "keep_alive")

    def __init__(self, client: ClientConnection, keep_alive: bool, head: bool, http10: bool):
        self.client = client
        self.keep_alive = keep_alive
        self.head = head
        self.http10 = http10
        self.answer: bytes | None = None

    def respond(self, payload: bytes) -> None:
        try:
            status, names, values, body = decode_response(payload)
        except (ValueError, IndexError):
            self.fail(502, "backend answered with an undecodable payload")
            return
        if not 200 <= status <= 599:
            self.fail(502, f"backend answered with status {status}")
            return
        lines: list[bytes] = []
        if names:
            # A newline inside a name or value would pass as a separator: count them.
            joined_names = b"\n".join(names)
            joined_values = b"\n".join(values)
            if not (
                _VALID_NAMES(joined_names)
                and _VALID_VALUES(joined_values)
                and joined_names.count(b"\n") == joined_values.count(b"\n") == len(names) - 1
            ):
                self.fail(502, "backend answered with an invalid header")
                return
            for name, value in zip(names, values, strict=True):
                if name.lower() not in RESPONSE_DROP:
                    lines += (name, b": ", value, b"\r\n")
        status_line = STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status
        connection = _CLOSE if not self.keep_alive else _KEEP_ALIVE if self.http10 else b""
        if status == 204 or status == 304:
            length = b""
            body = b""
        else:
            length = b"content-length: %d\r\n" % len(body)
            if self.head:
                body = b""
        self.client.answered(
            self,
            b"".join((status_line, *lines, CLOCK.line, length, connection, b"\r\n", body)),
        )

    def fail(self, status: int, message: str) -> None:
        self.client.answered(self, error_response(status, message, self.keep_alive))


class ClientConnection(asyncio.Protocol):
    """One client: httptools callbacks build each Request payload as the head is read."""

    __slots__ = (
        "body",
        "closed",
        "deep",
        "ending",
        "forwarded",
        "ip",
        "link_of",
        "parser",
        "parts",
        "paused",
        "queue",
        "suffix",
        "tail",
        "tokens",
        "transport",
        "url",
    )

    def __init__(self, proxy: Proxy) -> None:
        self.link_of = proxy.pick
        self.transport: Any = None
        self.parser: Any = httptools.HttpRequestParser(self)
        self.queue: deque[Exchange] = deque()
        self.closed = False
        # A request without keep-alive was read: nothing after it is.
        self.ending = False
        # Reading is paused while any of: the socket's buffer is full, too many
        # pipelined requests wait (deep), a request without keep-alive was read.
        self.paused = 0
        self.deep = False
        self.url = b""
        self.parts: list[bytes] = []
        self.body = b""
        self.forwarded = b""
        self.tokens: frozenset[bytes] = frozenset()
        self.ip = b""
        self.tail = b""
        self.suffix = proxy.route_field

    # the connection ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        ip, port = (peer[0], peer[1]) if isinstance(peer, tuple) else ("", 0)
        self.ip = ip.encode()
        # X-Forwarded-For and -Proto, route and client: the same for every request here.
        self.tail = _FORWARDED_FOR + field(5, self.ip) + _FORWARDED_PROTO
        self.suffix += field(8, f"{ip}:{port}".encode())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.parser = None  # breaks the parser <-> protocol cycle
        self.queue.clear()

    def data_received(self, data: bytes) -> None:
        if self.closed or self.ending:
            return
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            # llhttp refuses bytes after a request with Connection: close; they are ignored.
            if not self.ending:
                self.refuse(400, "malformed request")

    def pause_writing(self) -> None:
        self._pause()

    def resume_writing(self) -> None:
        self._resume()

    def _pause(self) -> None:
        self.paused += 1
        if self.paused == 1:
            self.transport.pause_reading()

    def _resume(self) -> None:
        self.paused -= 1
        if self.paused == 0 and not self.closed:
            self.transport.resume_reading()

    def refuse(self, status: int, message: str) -> None:
        if not self.closed:
            self.closed = True
            # Earlier pipelined answers still pending are lost with the connection.
            self.transport.write(error_response(status, message, False))
            self.transport.close()

    # httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.parts = [b""]  # [0]: method, path and query, known once the head is in
        self.body = b""
        self.forwarded = b""
        self.tokens = frozenset()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        # One dict look-up per header instead of lower(), the drop check and a prefix.
        encoded = _NAME_FIELDS.get(name)
        if encoded is None:
            encoded = name_field(name)
        if encoded:
            length = len(value)
            self.parts += (encoded, _VALUE_OF[length] if length < 128 else prefix(5, length), value)
            return
        name = name.lower()
        if name == b"x-forwarded-for":
            self.forwarded = self.forwarded + b", " + value if self.forwarded else value
        elif name == b"connection":
            tokens = {token.strip(b" \t").lower() for token in value.split(b",")}
            self.tokens |= tokens - {b"close", b"keep-alive", b""}

    def on_body(self, body: bytes) -> None:
        self.body += body
        if len(self.body) > MAX_BODY:
            self.refuse(413, "request body too large")

    def on_message_complete(self) -> None:
        if self.closed or self.ending:
            return
        parser = self.parser
        method = parser.get_method()
        keep_alive = parser.should_keep_alive()
        exchange = Exchange(self, keep_alive, method == b"HEAD", parser.get_http_version() == "1.0")
        self.queue.append(exchange)
        if len(self.queue) >= HIGH_WATER and not self.deep:
            self.deep = True
            self._pause()
        if not keep_alive:
            self.ending = True
            self._pause()
        link = self.link_of()
        if link is None:
            exchange.fail(502, "backend unreachable")
            return
        path, _, query = self.url.partition(b"?")
        parts = self.parts
        parts[0] = field(1, method) + field(2, path) + (field(3, query) if query else b"")
        if self.tokens:
            parts = [parts[0], *self._without(self.tokens)]
        if self.forwarded:
            chain = self.forwarded + b", " + self.ip
            parts += (_FORWARDED_FOR, field(5, chain), _FORWARDED_PROTO)
        else:
            parts.append(self.tail)
        body = self.body
        if body:
            parts += (prefix(6, len(body)), body)
        parts.append(self.suffix)
        link.send(exchange, b"".join(parts))

    def _without(self, tokens: frozenset[bytes]) -> list[bytes]:
        """The encoded headers minus those named in Connection (they come in threes)."""
        parts = self.parts
        kept: list[bytes] = []
        for at in range(1, len(parts), 3):
            encoded = parts[at]
            if encoded[read_varint(encoded, 1)[1] :] not in tokens:
                kept += parts[at : at + 3]
        return kept

    # answers, in request order ---------------------------------------------------------

    def answered(self, exchange: Exchange, response: bytes) -> None:
        if self.closed:
            return
        exchange.answer = response
        queue = self.queue
        if queue[0] is not exchange:
            return  # an earlier request's answer is not in yet
        write = self.transport.write
        while queue:
            answer = queue[0].answer
            if answer is None:
                break
            done = queue.popleft()
            write(answer)
            if not done.keep_alive:
                self.closed = True
                self.transport.close()
                return
            if self.deep and len(queue) <= LOW_WATER:
                self.deep = False
                self._resume()


class Link(asyncio.Protocol):
    """One multiplexed connection to a backend: request ids out, answers matched back."""

    __slots__ = (
        "backend",
        "buffer",
        "deadline_ms",
        "greeted",
        "loop",
        "mark",
        "next_id",
        "out",
        "pending",
        "ready",
        "transport",
        "usable",
    )

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.loop = backend.loop
        self.deadline_ms = backend.deadline_ms
        self.transport: Any = None
        self.pending: dict[int, Exchange] = {}
        self.next_id = 1
        self.out: list[bytes] = []
        self.buffer = b""
        self.greeted = False
        self.usable = False
        self.ready: asyncio.Future[None] = self.loop.create_future()
        # The next request id at the last sweep (see sweep()).
        self.mark = 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(HELLO)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.usable = False
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("backend closed during the handshake"))
        pending, self.pending = self.pending, {}
        for exchange in pending.values():
            exchange.fail(502, "connection to the backend lost")
        self.backend.lost(self)

    def send(self, exchange: Exchange, payload: bytes) -> None:
        request_id = self.next_id
        self.next_id = request_id + 1
        pending = self.pending
        pending[request_id] = exchange
        frame = _pack(1, 1, 0, len(payload), request_id, self.deadline_ms) + payload
        out = self.out
        if not out and len(pending) == 1:
            # The backend is idle: give it this request now, not at the end of the turn.
            self.transport.write(frame)
            return
        out.append(frame)
        if len(out) == FLUSH_FRAMES:
            self.flush()
        elif len(out) == 1:
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        out = self.out
        if out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def sweep(self) -> None:
        """Fail requests sent before the previous sweep: older than one sweep interval."""
        oldest_kept = self.mark
        self.mark = self.next_id
        expired = []
        for request_id in self.pending:  # in id order: insertion order
            if request_id >= oldest_kept:
                break
            expired.append(request_id)
        for request_id in expired:
            self.out.append(_pack(1, 5, 0, 0, request_id, 0))  # CANCEL
            self.pending.pop(request_id).fail(504, "no answer from the backend in time")
        if expired:
            self.flush()

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        pos = 0
        if not self.greeted:
            if len(buffer) < 8:
                self.buffer = buffer
                return
            if buffer[:8] != PREFACE:
                self.transport.close()
                return
            self.greeted = True
            pos = 8
        end = len(buffer)
        pending = self.pending
        while end - pos >= 20:
            version, kind, _, length, request_id, _ = _unpack_from(buffer, pos)
            if version != 1 or length > MAX_FRAME:
                self.transport.close()
                return
            stop = pos + 20 + length
            if stop > end:
                break
            if kind == 2:
                exchange = pending.pop(request_id, None)
                if exchange is not None:  # else: expired, dropped
                    exchange.respond(buffer[pos + 20 : stop])
            elif kind == 7:
                if request_id == 0:
                    self.transport.close()
                    return
                exchange = pending.pop(request_id, None)
                if exchange is not None:
                    exchange.fail(502, "backend failed the request")
            elif kind == 8:
                self.usable = True
                if not self.ready.done():
                    self.ready.set_result(None)
            elif kind == 3:
                self.transport.write(_pack(1, 4, 0, length, 0, 0) + buffer[pos + 20 : stop])
            elif kind == 6:
                # GOAWAY: no new request here; what was sent is answered or refused (ERROR).
                self.usable = False
                self.backend.replace(self)
            pos = stop
        self.buffer = buffer[pos:] if pos < end else b""
        if not self.usable and not pending and self.greeted and self.ready.done():
            self.transport.close()


class Backend:
    """A backend's address and its one link, replaced when lost or going away."""

    __slots__ = ("address", "deadline_ms", "link", "loop", "stopped")

    def __init__(self, address: str, loop: asyncio.AbstractEventLoop, deadline_ms: int) -> None:
        self.address = address
        self.loop = loop
        self.deadline_ms = deadline_ms
        self.link: Link | None = None
        self.stopped = False

    async def connect(self) -> None:
        loop = self.loop
        if self.address.startswith("unix://"):
            _, link = await loop.create_unix_connection(
                lambda: Link(self), self.address.removeprefix("unix://")
            )
        else:
            host, _, port = self.address.removeprefix("tcp://").rpartition(":")
            _, link = await loop.create_connection(lambda: Link(self), host.strip("[]"), int(port))
        await asyncio.wait_for(link.ready, 1.0)
        self.link = link

    def lost(self, link: Link) -> None:
        if self.link is link:
            self.replace(link)

    def replace(self, link: Link) -> None:
        if self.link is link:
            self.link = None
            if not self.stopped:
                self.loop.create_task(self._reconnect(), name=f"reconnect {self.address}")

    async def _reconnect(self) -> None:
        while self.link is None:
            try:
                await self.connect()
            except (TimeoutError, OSError):
                await asyncio.sleep(0.2)


class Proxy:
    __slots__ = ("backends", "next", "route_field")

    def __init__(self, backends: list[Backend], route: str) -> None:
        self.backends = backends
        self.next = 0
        self.route_field = field(7, route.encode())

    def pick(self) -> Link | None:
        backends = self.backends
        if len(backends) == 1:
            link = backends[0].link
        else:
            self.next = (self.next + 1) % len(backends)
            link = backends[self.next].link
        return link if link is not None and link.usable else None

    def sweep(self, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        for backend in self.backends:
            if backend.link is not None:
                backend.link.sweep()
        loop.call_later(interval, self.sweep, loop, interval)


async def serve(listen: str, addresses: list[str], route: str, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    CLOCK.tick(loop)
    backends = [Backend(address, loop, int(timeout * 1000)) for address in addresses]
    for backend in backends:
        await backend.connect()
    proxy = Proxy(backends, route)
    proxy.sweep(loop, timeout)
    host, _, port = listen.rpartition(":")
    server = await loop.create_server(
        lambda: ClientConnection(proxy), host.strip("[]"), int(port), backlog=4096
    )
    print("ready", listen, flush=True)
    await stop.wait()
    server.close()
    for backend in backends:
        backend.stopped = True
        if backend.link is not None and backend.link.transport is not None:
            backend.link.transport.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, metavar="HOST:PORT")
    parser.add_argument(
        "--backend", action="append", required=True, help="unix:///path or tcp://host:port"
    )
    parser.add_argument("--route", default="echo", help="the route name sent in each Request")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds for an answer")
    args = parser.parse_args()
    uvloop.run(serve(args.listen, args.backend, args.route, args.timeout))


if __name__ == "__main__":
    main()
