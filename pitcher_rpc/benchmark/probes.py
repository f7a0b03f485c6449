"""Measuring clients: each keeps N requests in flight for a bounded time.

All of them are driven by callbacks, the way the proxy itself uses a
transport, so what is compared is the carrier and the Pitcher layer on it,
not the cost of awaiting a future per request.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from transports.errors import TransportError
from transports.registry import parse_address, transport_for

PAYLOAD_SIZE = 100
PAYLOAD = b"x" * PAYLOAD_SIZE
_SEQUENCE = struct.Struct(">Q")
_CALL_TIMEOUT = 5.0


@dataclass
class Result:
    """Round trips of one measurement; latencies in seconds."""

    requests: int
    seconds: float
    latencies: list[float] = field(repr=False)
    errors: int = 0

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, fraction: float) -> float:
        """Latency at ``fraction`` (0.5, 0.99, 0.999) in microseconds."""
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        index = min(len(ordered) - 1, int(fraction * len(ordered)))
        return ordered[index] * 1e6

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies) * 1e6 if self.latencies else float("nan")


class _Window:
    """Bookkeeping shared by the probes: when to stop, what was measured."""

    def __init__(self, seconds: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.started = time.perf_counter()
        self.stop_at = self.started + seconds
        self.latencies: list[float] = []
        self.errors = 0
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.active = 0

    def more(self) -> bool:
        return time.perf_counter() < self.stop_at

    def retire(self) -> None:
        self.active -= 1
        if self.active <= 0 and not self.done.done():
            self.done.set_result(None)

    async def result(self) -> Result:
        try:
            await asyncio.wait_for(self.done, (self.stop_at - time.perf_counter()) + 10.0)
        except TimeoutError:
            self.errors += self.active  # answers that never came
        elapsed = time.perf_counter() - self.started
        return Result(len(self.latencies), elapsed, self.latencies, self.errors)


# ------------------------------------------------------------------------ floors


class _StreamFloor(asyncio.Protocol):
    """Echoed fixed-size messages over one stream connection, in order."""

    def __init__(self, window: _Window, in_flight: int) -> None:
        self.window = window
        self.in_flight = in_flight
        self.sent_at: deque[float] = deque()
        self.unread = 0
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.window.active = 1
        now = time.perf_counter()
        self.sent_at.extend([now] * self.in_flight)
        transport.write(PAYLOAD * self.in_flight)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.unread += len(data)
        window = self.window
        now = time.perf_counter()
        more = now < window.stop_at
        replies = 0
        while self.unread >= PAYLOAD_SIZE:
            self.unread -= PAYLOAD_SIZE
            window.latencies.append(now - self.sent_at.popleft())
            replies += 1
        if more and replies:
            self.sent_at.extend([now] * replies)
            self.transport.write(PAYLOAD * replies)
        elif not self.sent_at:
            window.retire()


class _DatagramFloor(asyncio.DatagramProtocol):
    """Echoed datagrams, matched by a sequence number (loss shows as errors)."""

    def __init__(self, window: _Window, in_flight: int) -> None:
        self.window = window
        self.in_flight = in_flight
        self.sent_at: dict[int, float] = {}
        self.sequence = 0
        self.transport: Any = None

    def _send(self, now: float) -> None:
        self.sequence += 1
        self.sent_at[self.sequence] = now
        self.transport.sendto(_SEQUENCE.pack(self.sequence) + PAYLOAD[8:])

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.window.active = 1
        now = time.perf_counter()
        for _ in range(self.in_flight):
            self._send(now)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        now = time.perf_counter()
        sent = self.sent_at.pop(_SEQUENCE.unpack_from(data)[0], None)
        if sent is None:
            return
        self.window.latencies.append(now - sent)
        if now < self.window.stop_at:
            self._send(now)
        elif not self.sent_at:
            self.window.retire()


async def _zmq_floor(address: str, window: _Window, in_flight: int) -> None:
    import zmq
    import zmq.asyncio

    context = zmq.asyncio.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    endpoint = address.removeprefix("zmq+")
    if "[" in endpoint:
        socket.setsockopt(zmq.IPV6, 1)
    socket.connect(endpoint)
    sent_at: dict[int, float] = {}
    sequence = 0
    try:
        for _ in range(in_flight):
            sequence += 1
            sent_at[sequence] = time.perf_counter()
            await socket.send(_SEQUENCE.pack(sequence) + PAYLOAD[8:])
        while sent_at:
            data = await asyncio.wait_for(socket.recv(), _CALL_TIMEOUT)
            now = time.perf_counter()
            sent = sent_at.pop(_SEQUENCE.unpack_from(data)[0], None)
            if sent is not None:
                window.latencies.append(now - sent)
            if now < window.stop_at:
                sequence += 1
                sent_at[sequence] = now
                await socket.send(_SEQUENCE.pack(sequence) + PAYLOAD[8:])
    except TimeoutError:
        window.errors += len(sent_at)
    finally:
        socket.close(0)
        context.term()
        window.active = 1
        window.retire()


async def floor_probe(address: str, in_flight: int, seconds: float) -> Result:
    """The plain echo of ``address``'s carrier, without any Pitcher layer."""
    window = _Window(seconds)
    parsed = parse_address(address)
    loop = window.loop
    transport: Any = None
    if parsed.scheme.startswith("zmq+"):
        await _zmq_floor(address, window, in_flight)
    elif parsed.scheme == "udp":
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _DatagramFloor(window, in_flight), remote_addr=(parsed.host, parsed.port)
        )
    elif parsed.scheme == "unix":
        transport, _ = await loop.create_unix_connection(
            lambda: _StreamFloor(window, in_flight), parsed.path
        )
    else:
        transport, _ = await loop.create_connection(
            lambda: _StreamFloor(window, in_flight), parsed.host, parsed.port
        )
    result = await window.result()
    if transport is not None:
        transport.close()
    return result


# ------------------------------------------------------------------------ Pitcher


class _Caller:
    """One of the N callers of a Pitcher probe; a transports Receiver.

    Its own work per call is kept to what the floor's protocols do (a clock
    read, a comparison, an append): one deadline serves all its calls, set
    past the end of the window, so no loop clock is read per call.
    """

    __slots__ = ("client", "deadline", "idempotent", "started", "window")

    def __init__(self, window: _Window, client: Any) -> None:
        self.window = window
        self.client = client
        self.idempotent = True
        self.started = 0.0
        self.deadline = window.loop.time() + (window.stop_at - time.perf_counter()) + _CALL_TIMEOUT

    def go(self) -> None:
        now = time.perf_counter()
        if now >= self.window.stop_at:
            self.window.retire()
            return
        self.started = now
        self.client.send(PAYLOAD, self)

    def on_response(self, payload: bytes) -> None:
        now = time.perf_counter()
        window = self.window
        window.latencies.append(now - self.started)
        if now < window.stop_at:
            self.started = now
            self.client.send(PAYLOAD, self)
        else:
            window.retire()

    def on_error(self, error: TransportError) -> None:
        self.window.errors += 1
        # Not at once: an error found inside send() would recurse.
        self.window.loop.call_soon(self.go)


async def pitcher_probe(address: str, in_flight: int, seconds: float) -> Result:
    """The Pitcher client of ``address``'s transport against a ``frames`` echo server."""
    client = transport_for(address).client(address)
    try:
        await client.call(PAYLOAD, _CALL_TIMEOUT, True)  # connect and warm up
        window = _Window(seconds)
        window.active = in_flight
        for _ in range(in_flight):
            _Caller(window, client).go()
        return await window.result()
    finally:
        await client.close(1.0)


# ------------------------------------------------------------------------ HTTP

_REQUEST = b"GET /bench HTTP/1.1\r\nHost: bench\r\n\r\n"
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)
_CLOSE = re.compile(rb"\r\nconnection: *close\r\n", re.IGNORECASE)


class _HttpCaller(asyncio.Protocol):
    """One keep-alive connection with one request at a time.

    A response with ``Connection: close`` (the proxy's keepalive_requests)
    ends the connection; the caller opens a new one and goes on, as wrk
    does, and the reconnection is part of the measure.
    """

    def __init__(self, window: _Window, address: tuple[str, int], transports: list[Any]) -> None:
        self.window = window
        self.address = address
        self.transports = transports
        self.buffer = b""
        self.started = 0.0
        self.closing = False
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.transports.append(transport)
        self.go()

    def go(self) -> None:
        if not self.window.more():
            self.window.retire()
            return
        self.started = time.perf_counter()
        self.transport.write(_REQUEST)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            self.buffer = buffer
            return
        match = _CONTENT_LENGTH.search(buffer, 0, end + 2)
        total = end + 4 + (int(match.group(1)) if match else 0)
        if len(buffer) < total:
            self.buffer = buffer
            return
        if not buffer.startswith(b"HTTP/1.1 200"):
            self.window.errors += 1
        self.window.latencies.append(time.perf_counter() - self.started)
        if _CLOSE.search(buffer, 0, end + 2):
            self.closing = True
            self.transport.close()
            self.window.loop.create_task(self.reconnect())
            return
        self.buffer = buffer[total:]
        self.go()

    async def reconnect(self) -> None:
        if not self.window.more():
            self.window.retire()
            return
        try:
            await self.window.loop.create_connection(
                lambda: _HttpCaller(self.window, self.address, self.transports), *self.address
            )
        except OSError:
            self.window.errors += 1
            self.window.retire()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closing:
            return
        if not self.window.done.done() and self.window.more():
            self.window.errors += 1
            self.window.retire()


async def http_probe(host: str, port: int, connections: int, seconds: float) -> Result:
    """HTTP/1.1 keep-alive load: ``connections`` clients, one request in flight each."""
    window = _Window(seconds)
    window.active = connections
    transports: list[Any] = []
    for _ in range(connections):
        await window.loop.create_connection(
            lambda: _HttpCaller(window, (host, port), transports), host, port
        )
    result = await window.result()
    for transport in transports:
        transport.close()
    return result
