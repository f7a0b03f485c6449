"""The client side of the UDP carrier.

One connected datagram socket per node carries every call; answers come back
in any order and are matched by request id. There is no connection to set up,
so the socket is made on the first send (the only send that waits) and kept
for the client's life: a restarted server is reachable again at once.

Loss is handled by the caller's deadline and, for idempotent calls only, by
re-sending the very same datagram (same request id) a bounded number of times
before that deadline; the server's replay cache makes sure it runs once.
As on the stream carriers, a call's outcome goes to a receiver and the
calls are a :class:`~transports.calls.CallTable`, whose one timer, armed for
the earliest deadline or re-send, serves every call.

The per-call path is flat: ``send`` encodes the datagram itself and the
protocol's ``datagram_received`` checks a RESPONSE and hands it over itself;
anything else goes through :func:`~transports.datagram.decode_datagram`,
which names the reason a datagram is dropped.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import random
import struct
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from .base import ClientOptions
from .bodies import OutgoingBody
from .calls import AwaitableCalls, CallTable, Receiver, deliver_error, error_for
from .control import ErrorInfo, GoAwayInfo
from .datagram import (
    CLIENT_ACCEPTS,
    CRC_SIZE,
    CRC_TABLE,
    CRC_XOR,
    DATAGRAM_HEADER_SIZE,
    MAX_UDP_PAYLOAD,
    DatagramDropped,
    DropReason,
    crc32c,
    crc_update,
    decode_datagram,
    encode_datagram,
    warn_if_crc_is_slow,
)
from .errors import (
    Closed,
    ConnectError,
    ConnectionLost,
    DeadlineExceeded,
    ProtocolError,
    Rejected,
    RequestTooLarge,
    StreamingUnsupported,
    TransportError,
)
from .frame import VERSION, FrameType
from .registry import Address, parse_address
from .udp_io import enlarge_socket_buffers

log = logging.getLogger("pitcher.transports")

_RESPONSE = int(FrameType.RESPONSE)
_pack_crc = struct.Struct(">I").pack
_unpack_datagram_header = struct.Struct(">IBBHIQI").unpack_from
_PING_TOKEN = struct.Struct(">Q")
_MIN_RETRY_INTERVAL = 0.001
# Above every request id (they are 64-bit): "no GOAWAY", in one int comparison.
_NO_GOAWAY = 1 << 64
# ICMP errors that a connected datagram socket reports besides "port unreachable".
_UNREACHABLE = frozenset((errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN))


# What an idempotent call needs to be sent again: when next, the pause after
# that (doubled each time), the copies left, its deadline and the datagram. A
# tuple, replaced at each copy: cheaper to make than an object, once per call.
_Resend = tuple[float, float, int, float, bytes]


class _ClientProtocol(asyncio.DatagramProtocol):
    """Thin glue from the event loop to the client."""

    __slots__ = ("_client",)

    def __init__(self, client: UdpClient) -> None:
        self._client = client

    def datagram_received(self, data: bytes, addr: Any) -> None:
        # The common case, inline: a RESPONSE that passes every check of
        # decode_datagram. Anything else goes there, to be read or dropped.
        size = len(data)
        if DATAGRAM_HEADER_SIZE <= size <= MAX_UDP_PAYLOAD:
            crc, version, kind, _, length, request_id, _ = _unpack_datagram_header(data)
            if (
                kind == 2
                and request_id
                and version == VERSION
                and length == size - DATAGRAM_HEADER_SIZE
                and CRC_XOR ^ crc_update(data[CRC_SIZE:], CRC_XOR, CRC_TABLE) == crc
            ):
                client = self._client
                client._heard = True
                client._deliver(request_id, data[DATAGRAM_HEADER_SIZE:])
                return
        self._client._datagram_received(data)

    def error_received(self, exc: Exception) -> None:
        self._client._error_received(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._client._connection_lost(self, exc)


class UdpClient(AwaitableCalls):
    """Multiplexed client for one node over UDP (``udp://host:port``)."""

    def __init__(self, address: str, options: ClientOptions | None = None) -> None:
        self.address = address
        self._parsed: Address = parse_address(address)
        self.options = options = options or ClientOptions()
        # Larger than the carrier allows would fail inside sendto, where no
        # call can be told; the ceiling keeps the error at the caller.
        self.max_datagram = min(options.max_datagram, MAX_UDP_PAYLOAD)
        self._max_payload = self.max_datagram - DATAGRAM_HEADER_SIZE
        self._retries = max(0, options.retries)
        # A floor, so that a zero interval cannot spin the timer.
        self._retry_interval = max(_MIN_RETRY_INTERVAL, options.retry_interval)
        warn_if_crc_is_slow()
        self.dropped: Counter[str] = Counter()
        self.late_responses = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._time: Callable[[], float] = time.monotonic  # the loop's clock once bound
        self._transport: asyncio.DatagramTransport | None = None
        self._protocol: _ClientProtocol | None = None
        # transport.sendto while the socket is open, else None: one check per send.
        self._sendto: Any = None
        self._opening: asyncio.Task[None] | None = None
        # Datagrams of calls made while the socket was being opened.
        self._unsent: list[tuple[int, bytes]] = []
        self._retry_open_at = 0.0
        self._backoff = 0.0
        self._last_open_error = ""
        # A random first id: a client that comes back on the same port does not
        # meet the replay-cache entries of its previous life on the server.
        self._calls = CallTable(self, None, random.randrange(1, 1 << 62))
        # The table's own dict (it stays the same object): the read path pops from it.
        self._pending: dict[int, Receiver] = self._calls.pending
        self._resends: dict[int, _Resend] = {}
        self._pings: dict[bytes, asyncio.Future[None]] = {}
        self._ping_count = 0
        # What a refusal (ICMP) means for a pending call: whether the node has
        # answered since the socket opened or since it last refused, and the
        # last_request_id of its GOAWAY while it drains (ids above it never run).
        self._heard = False
        self._goaway_last = _NO_GOAWAY
        self._closed = False

    # public ---------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def connection_count(self) -> int:
        return 0 if self._transport is None else 1

    def send(self, payload: bytes, receiver: Receiver, stream_response: bool = False) -> None:
        """Send one request; its outcome goes to ``receiver`` (possibly before this returns).

        ``stream_response`` changes nothing: over UDP every answer is whole.
        """
        sendto = self._sendto
        if sendto is None or self._closed or len(payload) > self._max_payload:
            self._send_slow(payload, receiver)
            return
        # The common case in one function: the socket is open and the call fits.
        now = self._time()
        remaining = receiver.deadline - now
        if remaining <= 0:
            self._send_slow(payload, receiver)
            return
        calls = self._calls
        body = calls.request_header(receiver, len(payload), remaining) + payload
        datagram = _pack_crc(CRC_XOR ^ crc_update(body, CRC_XOR, CRC_TABLE)) + body
        if receiver.idempotent and self._retries:
            self._plan_resend(calls.last_id(), datagram, now, receiver.deadline)
        sendto(datagram)

    @property
    def supports_streaming(self) -> bool:
        """UDP carries whole frames only (one datagram per frame)."""
        return False

    def send_stream(
        self, payload: bytes, receiver: Receiver, stream_response: bool = True
    ) -> OutgoingBody:
        """Refused: the receiver gets StreamingUnsupported (nothing sent); the body is done."""
        body = OutgoingBody(self, receiver, payload, 0)
        body.stop()
        receiver.on_error(
            StreamingUnsupported(
                f"{self.address}: UDP carries whole requests only (one datagram per frame);"
                " send the body whole"
            )
        )
        return body

    def send_whole(self, payload: bytes, receiver: Receiver, flags: int) -> None:
        self.send(payload, receiver)

    def give_up(self, receiver: Receiver) -> None:
        self.cancel(receiver)

    def cancel(self, receiver: Receiver) -> None:
        """The caller gives up: forget the call and tell the node (CANCEL). No callback follows."""
        request_id = self._calls.cancel(receiver)
        if not request_id:
            return
        self._resends.pop(request_id, None)
        if self._sendto is not None:
            self._sendto(encode_datagram(FrameType.CANCEL, request_id))

    def _is_open(self) -> bool:
        return self._sendto is not None

    async def ping(self, timeout: float = 1.0) -> None:
        """PING the node until it answers PONG; ConnectError if it does not in ``timeout``."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + timeout
        if self._closed:
            raise Closed(f"client for {self.address} is closed")
        # Asked through a method: a test of the attribute would stay narrowed
        # to None across the awaits below, which the compiled build enforces.
        while not self._is_open():
            self._open_soon(loop)
            opening = self._opening
            if opening is None:  # could not open, and backing off
                raise ConnectError(f"{self.address} unreachable ({self._last_open_error})")
            try:
                await asyncio.wait_for(asyncio.shield(opening), give_up_at - loop.time())
            except TimeoutError:
                raise ConnectError(f"{self.address}: no socket within {timeout}s") from None
            if self._closed:
                raise Closed(f"client for {self.address} is closed")
            if not self._is_open():
                raise ConnectError(f"{self.address} unreachable ({self._last_open_error})")
        self._ping_count += 1
        token = _PING_TOKEN.pack(self._ping_count)
        future: asyncio.Future[None] = loop.create_future()
        self._pings[token] = future
        datagram = encode_datagram(FrameType.PING, 0, token)
        interval = self._retry_interval
        try:
            # PING is harmless to repeat, so a lost one is simply sent again.
            while True:
                remaining = give_up_at - loop.time()
                if remaining <= 0:
                    raise ConnectError(f"{self.address}: no answer to PING within {timeout}s")
                self._sendto(datagram)
                done, _ = await asyncio.wait((future,), timeout=min(interval, remaining))
                if done:
                    future.result()
                    return
                if self._sendto is None:
                    raise ConnectionLost(f"socket to {self.address} closed during PING")
                interval *= 2
        finally:
            self._pings.pop(token, None)

    async def close(self, timeout: float = 5.0) -> None:
        """Stop new calls, let in-flight ones finish (at most ``timeout``), then close."""
        self._closed = True
        deadline = time.monotonic() + timeout
        while (self._pending or self._opening is not None) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        self.abort()

    def abort(self) -> None:
        """Close the socket now; in-flight calls fail with ConnectionLost."""
        self._closed = True
        opening, self._opening = self._opening, None
        if opening is not None:
            opening.cancel()
        transport = self._transport
        sendto = self._sendto
        was_open = sendto is not None
        if sendto is not None:
            # A stream server cancels the handlers of a connection that ends;
            # without a connection, the node learns it from these (best effort).
            for request_id in self._pending:
                sendto(encode_datagram(FrameType.CANCEL, request_id))
        self._forget_socket()
        if transport is not None:
            transport.close()
        if was_open:
            error: TransportError = ConnectionLost(f"client for {self.address} closed")
        else:
            error = Closed(f"client for {self.address} closed before its socket opened")
        self._fail_all(error)
        self._calls.close()

    # sending ----------------------------------------------------------------------------

    def _register(self, payload: bytes, receiver: Receiver, now: float) -> bytes | None:
        """Give a call its id and its place in the timer; its datagram, or None if it failed."""
        if self._closed:
            receiver.on_error(Closed(f"client for {self.address} is closed"))
            return None
        size = len(payload) + DATAGRAM_HEADER_SIZE
        if size > self.max_datagram:
            receiver.on_error(
                RequestTooLarge(
                    f"request of {len(payload)} bytes makes a datagram of {size} bytes, over"
                    f" the limit of {self.max_datagram} bytes (max_datagram); not sent"
                )
            )
            return None
        deadline = receiver.deadline
        remaining = deadline - now
        if remaining <= 0:
            receiver.on_error(DeadlineExceeded("deadline passed before sending", sent=False))
            return None
        calls = self._calls
        body = calls.request_header(receiver, len(payload), remaining) + payload
        datagram = _pack_crc(crc32c(body)) + body
        if receiver.idempotent and self._retries:
            self._plan_resend(calls.last_id(), datagram, now, deadline)
        return datagram

    def _plan_resend(self, request_id: int, datagram: bytes, now: float, deadline: float) -> None:
        resend_at = now + self._retry_interval
        if resend_at < deadline:
            self._resends[request_id] = (
                resend_at,
                self._retry_interval,
                self._retries,
                deadline,
                datagram,
            )
            self._calls.wake_at(resend_at)

    def _send_slow(self, payload: bytes, receiver: Receiver) -> None:
        """send() for every case but the common one: checks, failures, no socket yet."""
        loop = self._loop or self._bind(asyncio.get_running_loop())
        sendto = self._sendto
        if sendto is not None:
            datagram = self._register(payload, receiver, loop.time())
            if datagram is not None:
                sendto(datagram)
            return
        if not self._closed and self._opening is None:
            now = loop.time()
            if now < self._retry_open_at:
                receiver.on_error(
                    ConnectError(
                        f"{self.address} unreachable, next try in {self._retry_open_at - now:.2f}s"
                        f" (last error: {self._last_open_error})"
                    )
                )
                return
        datagram = self._register(payload, receiver, loop.time())
        if datagram is None:
            return
        self._unsent.append((self._calls.last_id(), datagram))
        self._open_soon(loop)

    def _bind(self, loop: asyncio.AbstractEventLoop) -> asyncio.AbstractEventLoop:
        self._loop = loop
        self._time = loop.time
        self._calls.bind(loop)
        return loop

    def _open_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is None:
            self._bind(loop)
        if self._opening is None and self._sendto is None and not self._closed:
            if loop.time() < self._retry_open_at:
                return
            self._opening = loop.create_task(self._open(), name=f"pitcher-udp-open {self.address}")

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        address = self._parsed
        try:
            transport, protocol = await loop.create_datagram_endpoint(
                lambda: _ClientProtocol(self), remote_addr=(address.host, address.port)
            )
        except OSError as exc:
            self._opening = None
            self._backoff = min(
                self.options.backoff_max, max(self.options.backoff_initial, self._backoff * 2)
            )
            self._retry_open_at = loop.time() + self._backoff
            self._last_open_error = exc.strerror or str(exc)
            self._unsent.clear()
            self._fail_all(ConnectError(f"{self.address}: {self._last_open_error}"))
            return
        self._opening = None
        # Even if close() began meanwhile: it waits for the calls queued here.
        self._backoff = 0.0
        self._transport = transport
        self._protocol = protocol
        enlarge_socket_buffers(transport)
        self._sendto = sendto = transport.sendto
        unsent, self._unsent = self._unsent, []
        pending = self._pending
        for request_id, datagram in unsent:
            if request_id in pending:
                sendto(datagram)

    # the CallTable's questions ---------------------------------------------------------

    def call_expired(self, request_id: int) -> bool:
        """A call dropped at its deadline: no more copies; CANCEL if the socket is open."""
        self._resends.pop(request_id, None)
        sendto = self._sendto
        if sendto is None:
            return False  # its datagram is still queued behind the socket's opening
        # Best effort: the server stops the handler instead of finishing work
        # nobody waits for. Lost, it costs only that work.
        sendto(encode_datagram(FrameType.CANCEL, request_id))
        return True

    def timer_due(self, now: float) -> float:
        """Send the copies of idempotent calls that are due; the next one's time."""
        resends = self._resends
        earliest = math.inf
        if not resends:
            return earliest
        sendto = self._sendto
        finished: list[int] = []
        later: list[tuple[int, _Resend]] = []
        for request_id, resend in resends.items():
            at, interval, left, resend_deadline, datagram = resend
            if at <= now:
                if sendto is None:  # not open yet: its first copy is still queued
                    at = now + interval
                else:
                    sendto(datagram)
                    left -= 1
                    interval *= 2
                    at = now + interval
                if not left or at >= resend_deadline:
                    finished.append(request_id)
                    continue
                later.append((request_id, (at, interval, left, resend_deadline, datagram)))
            if at < earliest:
                earliest = at
        for request_id in finished:
            del resends[request_id]
        for request_id, resend in later:
            resends[request_id] = resend
        return earliest

    # receiving ---------------------------------------------------------------------------

    def _deliver(self, request_id: int, payload: bytes) -> None:
        """A RESPONSE datagram that passed every check: to its caller, once."""
        receiver = self._pending.pop(request_id, None)
        if receiver is None:
            # Its caller gave up, or this is a second copy: never anyone else's.
            self.late_responses += 1
            return
        if self._resends:
            self._resends.pop(request_id, None)
        if request_id > self._goaway_last:
            # A draining node runs nothing above its GOAWAY: this is its successor.
            self._goaway_last = _NO_GOAWAY
        try:
            receiver.on_response(payload)
        except Exception:
            log.exception("a receiver failed on a response from %s", self.address)

    def _datagram_received(self, data: bytes) -> None:
        try:
            frame = decode_datagram(data, CLIENT_ACCEPTS)
        except DatagramDropped as exc:
            self.dropped[exc.reason] += 1
            return
        self._heard = True
        if frame.type == _RESPONSE:
            self._deliver(frame.request_id, frame.payload)
            return
        try:
            self._on_control(frame.type, frame.request_id, frame.payload)
        except ProtocolError:
            self.dropped[DropReason.BAD_PAYLOAD] += 1

    def _on_control(self, kind: int, request_id: int, payload: bytes) -> None:
        if kind == FrameType.ERROR:
            error = ErrorInfo.decode(payload)
            receiver = self._pending.pop(request_id, None)
            if receiver is None:
                self.late_responses += 1
                return
            self._resends.pop(request_id, None)
            deliver_error(receiver, error_for(error))
        elif kind == FrameType.GOAWAY:
            info = GoAwayInfo.decode(payload)
            self._goaway_last = info.last_request_id
            reason = info.reason or "no reason given"
            refused = [rid for rid in self._pending if rid > info.last_request_id]
            failed = []
            for request_id in refused:
                failed.append(self._pending.pop(request_id))
                self._resends.pop(request_id, None)
            for receiver in failed:
                deliver_error(receiver, Rejected(f"node is going away ({reason})"))
        elif kind == FrameType.PING:
            if self._sendto is not None:
                self._sendto(encode_datagram(FrameType.PONG, 0, payload))
        elif kind == FrameType.PONG:
            future = self._pings.get(payload)
            if future is not None and not future.done():
                future.set_result(None)

    def _error_received(self, exc: Exception) -> None:
        if isinstance(exc, ConnectionRefusedError):
            what = "nothing listens there (port unreachable)"
        elif getattr(exc, "errno", None) in _UNREACHABLE:
            what = f"unreachable ({exc})"
        else:
            log.warning("UDP socket to %s: %s", self.address, exc)
            return
        # An ICMP error on the connected socket: the node's port (or host) takes
        # nothing now, so no answer will come for any call; fail them at once,
        # not at their deadline. A call never reached a handler if the node has
        # not answered since we last knew it absent, or if its id is above the
        # GOAWAY of a draining node. Otherwise the node went away with the call
        # pending, and may have started it.
        heard, self._heard = self._heard, False
        goaway_last = self._goaway_last
        refused = ConnectError(f"{self.address}: {what}")
        lost = ConnectionLost(f"{self.address} stopped answering: {what}; the call may have run")
        pending = list(self._pending.items())
        self._pending.clear()
        self._resends.clear()
        for request_id, receiver in pending:
            deliver_error(receiver, lost if heard and request_id <= goaway_last else refused)
        for future in self._pings.values():
            if not future.done():
                future.set_exception(refused)

    def _connection_lost(self, protocol: _ClientProtocol, exc: Exception | None) -> None:
        if protocol is not self._protocol:
            return
        self._forget_socket()
        self._fail_all(ConnectionLost(f"socket to {self.address} closed: {exc or 'closed'}"))

    # shared -----------------------------------------------------------------------------

    def _forget_socket(self) -> None:
        self._transport = None
        self._protocol = None
        self._sendto = None

    def _fail_all(self, error: TransportError) -> None:
        self._resends.clear()
        self._calls.fail_all(error)
        for future in self._pings.values():
            if not future.done():
                future.set_exception(error)
