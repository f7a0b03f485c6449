"""The server side of the UDP carrier.

One datagram socket serves every peer. Each REQUEST runs the handler through
:class:`~transports.handlers.HandlerRunner`, keyed by (peer address, request
id), concurrently with the others. Because a client re-sends an idempotent
request it got no answer to (and the network may duplicate any datagram), a
replay cache remembers recent requests: a copy of one still running is
ignored, a copy of one answered gets the same answer datagram again, so a
request runs once however often it arrives.

The cache is bounded twice: at most ``replay_cache_size`` entries (the oldest
go first) and at most ``replay_ttl`` seconds (swept by one timer). Under a
flood of distinct ids it stays at its size; a copy that arrives after its
entry was evicted runs again, so the size sets how far back the promise
holds: ``replay_cache_size / requests per second`` seconds at most.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import Counter, deque
from collections.abc import Hashable
from typing import Any

from .base import Handler, ServerOptions, StreamedAnswer
from .control import ErrorInfo, GoAwayInfo
from .datagram import (
    CRC_SIZE,
    CRC_TABLE,
    CRC_XOR,
    DATAGRAM_HEADER_SIZE,
    MAX_UDP_PAYLOAD,
    SERVER_ACCEPTS,
    DatagramDropped,
    crc_update,
    decode_datagram,
    encode_datagram,
    warn_if_crc_is_slow,
)
from .errors import ConnectError, ErrorCode
from .frame import HEADER, VERSION, FrameType
from .handlers import HandlerRunner
from .registry import parse_address
from .udp_io import enlarge_socket_buffers

log = logging.getLogger("pitcher.transports")

_REQUEST = int(FrameType.REQUEST)
_ERROR = int(FrameType.ERROR)
_pack_crc = struct.Struct(">I").pack
_pack_header = HEADER.pack
_unpack_datagram_header = struct.Struct(">IBBHIQI").unpack_from
_SHUTTING_DOWN = "server is shutting down"
# Marks a request whose caller cancelled it before its REQUEST arrived (the
# two datagrams were reordered): a REQUEST that comes later is not run.
_NO_ANSWER = b""
# How often the replay cache is swept, as a share of its TTL: an entry lives
# between replay_ttl and 1.25 * replay_ttl.
_SWEEPS_PER_TTL = 4
_MIN_SWEEP_INTERVAL = 0.01


class _ServerProtocol(asyncio.DatagramProtocol):
    """Thin glue from the event loop to the server."""

    __slots__ = ("_server",)

    def __init__(self, server: UdpServer) -> None:
        self._server = server

    def datagram_received(self, data: bytes, addr: Any) -> None:
        # The common case, inline: a REQUEST that passes every check of
        # decode_datagram. Anything else goes there, to be read or dropped.
        server = self._server
        size = len(data)
        if DATAGRAM_HEADER_SIZE <= size <= server.max_datagram:
            crc, version, kind, _, length, request_id, deadline_ms = _unpack_datagram_header(data)
            if (
                kind == 1
                and request_id
                and version == VERSION
                and length == size - DATAGRAM_HEADER_SIZE
                and CRC_XOR ^ crc_update(data[CRC_SIZE:], CRC_XOR, CRC_TABLE) == crc
            ):
                server._request(addr, request_id, data[DATAGRAM_HEADER_SIZE:], deadline_ms)
                return
        server._datagram_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        # An ICMP error about an answer to a client that has gone: nothing to do.
        log.debug("UDP server %s: %s", self._server.address, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._connection_lost()


class UdpServer:
    """Serves a handler on a UDP address (``udp://host:port``)."""

    def __init__(self, address: str, handler: Handler, options: ServerOptions | None = None):
        self.address = address
        self._parsed = parse_address(address)
        self.handler = handler
        self.options = options = options or ServerOptions()
        self.max_datagram = min(options.max_datagram, MAX_UDP_PAYLOAD)
        warn_if_crc_is_slow()
        self._cache_size = max(0, options.replay_cache_size)
        self._ttl = options.replay_ttl
        self._max_in_flight = options.max_in_flight
        self.dropped: Counter[str] = Counter()
        # Copies of requests seen before: answered again from the cache, or
        # ignored while the first copy still runs.
        self.replayed = 0
        self.duplicates_ignored = 0
        # Requests refused unstarted because max_in_flight handlers were running.
        self.overloaded = 0
        self.closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._sendto: Any = None
        self._runner: HandlerRunner | None = None
        # (peer, request id) -> [arrival time, answer datagram; None while running].
        # A list, so the answer is filled in place; a plain dict and a deque of
        # its keys in arrival order cost less per request than an OrderedDict.
        self._replay: dict[Hashable, list[Any]] = {}
        self._replay_order: deque[Hashable] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._drained: asyncio.Future[None] | None = None
        self._socket_closed: asyncio.Future[None] | None = None

    # public ---------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return 0 if self._runner is None else len(self._runner)

    @property
    def connection_count(self) -> int:
        """Peers seen recently: those with a request in the replay cache or running."""
        return len(self._recent_peers())

    @property
    def replay_entries(self) -> int:
        return len(self._replay)

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._runner = HandlerRunner(self.handler, loop, self._answer, self._on_settled)
        self._socket_closed = loop.create_future()
        address = self._parsed
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _ServerProtocol(self), local_addr=(address.host, address.port)
            )
        except OSError as exc:
            raise ConnectError(f"cannot listen on {self.address}: {exc.strerror or exc}") from exc
        self._transport = transport
        self._sendto = transport.sendto
        enlarge_socket_buffers(transport)
        if address.port == 0:
            # Report the port the kernel picked.
            host, port = transport.get_extra_info("sockname")[:2]
            self.address = f"udp://{_format_host(host)}:{port}"

    async def close(self, grace: float = 5.0) -> None:
        """GOAWAY to recent peers, refuse new requests, finish running ones (at most ``grace``)."""
        if not self.closing:
            self.closing = True
            for peer, last_request_id in self._recent_peers().items():
                goaway = GoAwayInfo(last_request_id, _SHUTTING_DOWN).encode()
                self._send(encode_datagram(FrameType.GOAWAY, 0, goaway), peer)
        runner = self._runner
        if runner is not None and runner.tasks and self._loop is not None:
            if self._drained is None:
                self._drained = self._loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._drained), grace)
            except TimeoutError:
                log.warning(
                    "UDP server %s: %d requests still running after %ss",
                    self.address,
                    len(runner),
                    grace,
                )
        self.abort()
        if self._socket_closed is not None:
            # Once close() returns, the port is free for a successor.
            await self._socket_closed

    def abort(self) -> None:
        """Close the socket now; running handlers are cancelled, their answers not sent."""
        self.closing = True
        if self._runner is not None:
            self._runner.cancel_all()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._sendto = None
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()
        elif self._socket_closed is not None and not self._socket_closed.done():
            self._socket_closed.set_result(None)

    # receiving ----------------------------------------------------------------------------

    def _datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            frame = decode_datagram(data, SERVER_ACCEPTS, self.max_datagram)
        except DatagramDropped as exc:
            self.dropped[exc.reason] += 1
            return
        kind = frame.type
        if kind == _REQUEST:
            self._request(addr, frame.request_id, frame.payload, frame.deadline_ms)
        elif kind == FrameType.CANCEL:
            key = (addr, frame.request_id)
            runner = self._runner
            assert runner is not None
            if not runner.cancel(key) and self._cache_size and key not in self._replay:
                self._remember(key, _NO_ANSWER)
        else:  # PING, the only other type decode_datagram lets through here
            self._send(encode_datagram(FrameType.PONG, 0, frame.payload), addr)

    def _request(self, addr: Any, request_id: int, payload: bytes, deadline_ms: int) -> None:
        key = (addr, request_id)
        replay = self._replay
        entry = replay.get(key)
        if entry is not None:
            answer = entry[1]
            if answer:
                self.replayed += 1
                self._send(answer, addr)
            else:
                self.duplicates_ignored += 1
            return
        runner = self._runner
        assert runner is not None
        tasks = runner.tasks
        # runner.tasks rather than `in runner`: no Python-level call per request.
        if key in tasks:  # still running, though its entry was evicted
            self.duplicates_ignored += 1
            return
        if self.closing:
            self._refuse(request_id, addr, ErrorCode.UNAVAILABLE, _SHUTTING_DOWN)
            return
        if len(tasks) >= self._max_in_flight:
            # ZeroMQ's code too; not started, so the client may send it
            # elsewhere (Overloaded, not sent).
            self.overloaded += 1
            self._refuse(
                request_id,
                addr,
                ErrorCode.TOO_MANY_IN_FLIGHT,
                f"more than {self._max_in_flight} requests in flight",
            )
            return
        if self._cache_size:
            # Before start(): a handler that never waits answers inside it.
            self._remember(key, None)
        runner.start(key, payload, deadline_ms)

    def _remember(self, key: Hashable, answer: bytes | None) -> None:
        """A new replay-cache entry, the oldest leaving if the cache is full."""
        order = self._replay_order
        if len(order) >= self._cache_size:
            del self._replay[order.popleft()]
        self._replay[key] = [self._loop.time(), answer]  # type: ignore[union-attr]
        order.append(key)
        if self._sweeper is None:
            self._arm_sweeper()

    def _answer(
        self, key: Any, result: bytes | StreamedAnswer | None, error: ErrorInfo | None
    ) -> None:
        addr, request_id = key
        datagram = None
        if result is not None and not isinstance(result, bytes):
            # A WithStreams handler that streamed although may_stream was False.
            result = None
            error = ErrorInfo(
                ErrorCode.INTERNAL, "TypeError: a streamed answer on a whole-frame carrier"
            )
        if result is not None:
            # encode_response_datagram, inline.
            body = _pack_header(VERSION, 2, 0, len(result), request_id, 0) + result
            datagram = _pack_crc(CRC_XOR ^ crc_update(body, CRC_XOR, CRC_TABLE)) + body
            if len(datagram) > self.max_datagram:
                log.error("response to request %d is over the datagram limit", request_id)
                error = ErrorInfo(
                    ErrorCode.INTERNAL,
                    f"ValueError: response of {len(result)} bytes"
                    f" ({len(result) + DATAGRAM_HEADER_SIZE} with its header) exceeds"
                    f" the datagram limit of {self.max_datagram} bytes",
                )
                datagram = None
        if datagram is None:
            assert error is not None
            datagram = encode_datagram(_ERROR, request_id, error.encode())
        entry = self._replay.get(key)
        if entry is not None:
            entry[1] = datagram
        sendto = self._sendto
        if sendto is not None:
            sendto(datagram, addr)

    def _refuse(self, request_id: int, addr: Any, code: int, message: str) -> None:
        self._send(encode_datagram(_ERROR, request_id, ErrorInfo(code, message).encode()), addr)

    def _send(self, datagram: bytes, addr: Any) -> None:
        sendto = self._sendto
        if sendto is not None:
            sendto(datagram, addr)

    def _on_settled(self) -> None:
        drained = self._drained
        runner = self._runner
        if drained is not None and not drained.done() and runner is not None and not runner.tasks:
            drained.set_result(None)

    def _connection_lost(self) -> None:
        self._sendto = None
        self._transport = None
        if self._runner is not None:
            self._runner.cancel_all()
        if self._socket_closed is not None and not self._socket_closed.done():
            self._socket_closed.set_result(None)

    # the replay cache ------------------------------------------------------------------

    def _arm_sweeper(self) -> None:
        loop = self._loop
        assert loop is not None
        self._sweeper = loop.call_later(
            max(_MIN_SWEEP_INTERVAL, self._ttl / _SWEEPS_PER_TTL), self._sweep
        )

    def _sweep(self) -> None:
        self._sweeper = None
        replay = self._replay
        order = self._replay_order
        # Oldest first: entries are in arrival order, and all live equally long.
        oldest_kept = self._loop.time() - self._ttl  # type: ignore[union-attr]
        while order and replay[order[0]][0] <= oldest_kept:
            del replay[order.popleft()]
        if replay and self._sendto is not None:
            self._arm_sweeper()

    def _recent_peers(self) -> dict[Any, int]:
        """Each peer seen recently, with the highest request id started from it."""
        peers: dict[Any, int] = {}
        # Not the requests that were cancelled before they came: never started.
        keys: list[Any] = [key for key, entry in self._replay.items() if entry[1] != _NO_ANSWER]
        if self._runner is not None:
            keys.extend(self._runner.tasks)
        for peer, request_id in keys:
            if request_id > peers.get(peer, 0):
                peers[peer] = request_id
        return peers


def _format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
