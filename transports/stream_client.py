"""The client side of the stream carriers (TCP, Unix sockets).

One connection carries many calls at once, matched by request id; answers may
come back in any order. :class:`StreamClient` keeps a small pool of
connections to one node and opens another only when the ones it has are
saturated (one connection per node beat four in the proxy's benchmarks).

A call's outcome goes to a receiver (see :mod:`transports.calls`), called
straight from ``data_received``. Each connection's calls are a
:class:`~transports.calls.CallTable`: ids, one deadline timer per connection,
the request header, cancel and fail-all; this module is the socket's part.

The per-call path is written flat: ``StreamClient.send`` encodes and queues
the frame itself, and ``data_received`` reads whole RESPONSE frames straight
from the bytes received, without a Frame object or a call per frame. Anything
else (a control frame, a frame cut across two reads, a header that fails a
check) goes through the sans-IO :class:`~transports.decoder.FrameDecoder`.
Each layer removed is ~0.1 µs of a few µs the client spends per call.

Streamed bodies (docs/wire.md 6.9) take the decoder's path: a RESPONSE with
MORE becomes an :class:`~transports.bodies.IncomingBody` that stands in
``pending`` for its call until the last DATA, and :meth:`StreamClient.send_stream`
sends a request body through an :class:`~transports.bodies.OutgoingBody`. A
whole call pays two flag tests for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import ssl
import time
from collections import deque
from typing import Any, Final, cast

from .base import ClientOptions
from .bodies import IncomingBody, OutgoingBody
from .calls import (
    AwaitableCalls,
    CallTable,
    Receiver,
    deliver_error,
    deliver_response,
    error_for,
)
from .control import ErrorInfo, GoAwayInfo, Settings, decode_window_update
from .decoder import FrameDecoder
from .errors import (
    CallError,
    Closed,
    ConnectError,
    ConnectionLost,
    DeadlineExceeded,
    ErrorCode,
    ProtocolError,
    Rejected,
    RequestTooLarge,
    TransportError,
)
from .frame import (
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_MAX_IN_FLIGHT,
    FLAG_MORE,
    FLAG_STREAM_OK,
    HEADER,
    HEADER_SIZE,
    PREFACE,
    VERSION,
    FrameType,
    encode_data,
    encode_frame,
    encode_window_update,
)
from .registry import Address, parse_address
from .stream_io import Batcher, set_nodelay

log = logging.getLogger("pitcher.transports")

_RESPONSE: Final = FrameType.RESPONSE
_ERROR: Final = FrameType.ERROR
_unpack_header: Final = HEADER.unpack_from


class _ClientConnection(asyncio.Protocol):
    """One multiplexed connection from a client to a node."""

    __slots__ = (
        "_batcher",
        "_decoder",
        "_direct",
        "_loop",
        "_max_frame_size",
        "_pool",
        "accepting",
        "calls",
        "closed",
        "draining",
        "late_responses",
        "max_in_flight",
        "outgoing",
        "peer_max_frame_size",
        "peer_window",
        "pending",
        "ready",
        "transport",
        "write_paused",
    )

    def __init__(self, pool: StreamClient, loop: asyncio.AbstractEventLoop) -> None:
        self._pool = pool
        self._loop = loop
        self._max_frame_size = pool.options.max_frame_size
        self._decoder = FrameDecoder(self._max_frame_size)
        # True once the handshake is done and while the decoder holds no bytes:
        # data_received may then read RESPONSE frames itself.
        self._direct = False
        self._batcher = Batcher(loop)
        self.calls = CallTable(self, loop)
        # The table's own dict (it stays the same object): the read path pops from it.
        self.pending: dict[int, Receiver] = self.calls.pending
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = loop.create_future()
        self.max_in_flight = DEFAULT_MAX_IN_FLIGHT
        self.peer_max_frame_size = DEFAULT_MAX_FRAME_SIZE
        # The node's SETTINGS initial_window: 0, it takes whole requests only.
        self.peer_window = 0
        # Request bodies still being sent, by request id (their calls are in pending).
        self.outgoing: dict[int, OutgoingBody] = {}
        self.draining = False
        self.closed = False
        self.write_paused = False
        # Takes new calls: not closed, draining or paused (one flag for send()).
        self.accepting = True
        self.late_responses = 0

    # asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport = transport
        self._batcher.transport = transport
        set_nodelay(transport)
        # Our own limit, so the node never sends a response we would refuse; our
        # window, so it may stream a response to a call that allows it.
        options = self._pool.options
        settings = Settings(options.max_frame_size, 0, options.initial_window).encode()
        transport.write(PREFACE + encode_frame(FrameType.SETTINGS, 0, settings))

    def data_received(self, data: bytes) -> None:
        # Calls that receivers send from inside on_response leave together once
        # this read is handled (the first at once), with no end-of-turn callback.
        batcher = self._batcher
        batcher.hold()
        try:
            if self._direct:
                self._read_answers(data)
            else:
                self._feed(data)
        finally:
            batcher.release()

    def _read_answers(self, data: bytes) -> None:
        """The common case, inline: whole RESPONSE frames, one after the other."""
        pending = self.pending
        max_frame_size = self._max_frame_size
        pos = 0
        end = len(data)
        while end - pos >= HEADER_SIZE:
            version, kind, flags, length, request_id, _ = _unpack_header(data, pos)
            start = pos + HEADER_SIZE
            stop = start + length
            if (
                kind != 2  # FrameType.RESPONSE
                or flags  # MORE: a streamed response's head
                or stop > end
                or version != VERSION
                or not request_id
                or length > max_frame_size
            ):
                break  # the decoder checks it, reads it or keeps it
            pos = stop
            receiver = pending.pop(request_id, None)
            if receiver is None:
                # Its caller gave up (deadline, cancel): drop it, never reuse.
                self.late_responses += 1
                continue
            if self.outgoing:
                self._answered_early(request_id)
            try:
                receiver.on_response(data[start:stop])
            except Exception:
                log.exception("a receiver failed on a response from %s", self._pool.address)
            if self.closed:
                return
        if pos < end:
            self._feed(data[pos:] if pos else data)
            return
        if self.draining and not pending:
            self._close_transport()
        if self._pool._waiters:
            self._pool.wake_waiters()

    def _feed(self, data: bytes) -> None:
        """Bytes through the decoder: the handshake, control frames, frames cut in two."""
        decoder = self._decoder
        try:
            frames = decoder.feed(data)
        except ProtocolError as exc:
            self._direct = False
            with contextlib.suppress(ProtocolError):
                for frame in exc.frames:  # type: ignore[attr-defined]
                    self._on_frame(frame)
            self._fail(exc.code, str(exc))
            return
        for frame in frames:
            try:
                self._on_frame(frame)
            except ProtocolError as exc:  # a control payload that does not decode
                self._direct = False
                self._fail(exc.code, str(exc))
                return
            if self.closed:
                return
        # SETTINGS completes the handshake; no bytes kept means no frame cut in two.
        self._direct = self.ready.done() and not self.closed and not decoder.buffered
        if self.draining and not self.pending:
            self._close_transport()
        if self._pool._waiters:
            self._pool.wake_waiters()

    def _on_frame(self, frame: Any) -> None:
        kind = frame.type
        if kind == FrameType.DATA:
            self._on_data(frame.request_id, frame.payload, frame.flags)
        elif kind == FrameType.WINDOW_UPDATE:
            body = self.outgoing.get(frame.request_id)
            if body is not None:
                # FlowControlError past the largest window: the connection fails.
                body.credit(decode_window_update(frame.payload))
        elif kind == _RESPONSE:
            request_id = frame.request_id
            receiver = self.pending.pop(request_id, None)
            if self.outgoing:
                self._answered_early(request_id)
            if receiver is None:
                self.late_responses += 1
            elif frame.flags & FLAG_MORE:
                self._on_response_head(request_id, receiver, frame.payload)
            else:
                deliver_response(receiver, frame.payload)
        elif kind == _ERROR:
            error = ErrorInfo.decode(frame.payload)
            if frame.request_id == 0:
                self._fail_all(ConnectionLost(f"node closed the connection: {error.describe()}"))
                self._close_transport()
                return
            receiver = self.pending.pop(frame.request_id, None)
            if self.outgoing:
                self._answered_early(frame.request_id)
            if receiver is not None:
                if isinstance(receiver, IncomingBody):
                    # After the head: the body was cut, never a clean end.
                    deliver_error(
                        receiver,
                        ConnectionLost(f"the node cut the response body: {error.describe()}"),
                    )
                else:
                    deliver_error(receiver, error_for(error))
        elif kind == FrameType.SETTINGS:
            settings = Settings.decode(frame.payload)
            if settings.max_in_flight:
                self.max_in_flight = settings.max_in_flight
            if settings.max_frame_size:
                self.peer_max_frame_size = settings.max_frame_size
            self.peer_window = settings.initial_window
            if not self.ready.done():
                self.ready.set_result(None)
        elif kind == FrameType.GOAWAY:
            info = GoAwayInfo.decode(frame.payload)
            self.draining = True
            self.accepting = False
            reason = info.reason or "no reason given"
            for request_id in [rid for rid in self.pending if rid > info.last_request_id]:
                if self.outgoing:
                    self._answered_early(request_id)
                deliver_error(
                    self.pending.pop(request_id), Rejected(f"node is going away ({reason})")
                )
            if not self.pending:
                self._close_transport()
        elif kind == FrameType.PING:
            self._batcher.write(encode_frame(FrameType.PONG, 0, frame.payload))
        elif kind == FrameType.PONG:
            pass
        else:
            self._fail(ErrorCode.PROTOCOL_ERROR, f"a client does not accept {kind} frames")

    def _on_response_head(self, request_id: int, receiver: Receiver, payload: bytes) -> None:
        """A RESPONSE with MORE: the body follows in DATA; its IncomingBody takes the call's
        place in ``pending`` until it ends."""
        on_head = getattr(receiver, "on_response_head", None)
        if on_head is None or not self._pool.options.initial_window:
            # Never asked for (no STREAM_OK, or no window announced): the node is wrong.
            self.call_expired(request_id)
            deliver_error(receiver, CallError("the node streamed a response nobody asked for"))
            return
        idle = getattr(receiver, "timeout", 0.0) or self._pool.options.stream_idle_timeout
        body = IncomingBody(self, request_id, self._pool.options.initial_window, idle)
        self.pending[request_id] = body
        if body.deadline < self.calls.timer_at:
            self.calls.wake_at(body.deadline)
        try:
            on_head(payload, body)
        except Exception:
            log.exception("a receiver failed on a response head from %s", self._pool.address)
            body.abort()

    def _on_data(self, request_id: int, data: bytes, flags: int) -> None:
        entry = self.pending.get(request_id)
        if entry is None:
            if request_id >= self.calls.next_id:
                raise ProtocolError(f"DATA for request id {request_id}, never sent")
            return  # it crossed our CANCEL, or the call failed: dropped
        if not isinstance(entry, IncomingBody):
            raise ProtocolError(f"DATA for request {request_id} before its RESPONSE head")
        if entry.receive(data, flags & FLAG_MORE != 0) and self.pending.get(request_id) is entry:
            del self.pending[request_id]

    def _answered_early(self, request_id: int) -> None:
        """The call's outcome came while its request body was still being sent: stop it."""
        body = self.outgoing.pop(request_id, None)
        if body is not None:
            body.stop()

    # the bodies' BodyLink ----------------------------------------------------------------

    def send_data(self, request_id: int, data: bytes, more: bool) -> None:
        if not more:
            self.outgoing.pop(request_id, None)
        self._batcher.write(encode_data(request_id, data, more))

    def send_credit(self, request_id: int, increment: int) -> None:
        self._batcher.write(encode_window_update(request_id, increment))

    def drop_call(self, request_id: int) -> None:
        if self.pending.pop(request_id, None) is not None:
            self.call_expired(request_id)

    def watch(self, when: float) -> None:
        self.calls.wake_at(when)

    def time(self) -> float:
        return self._loop.time()

    def pause_writing(self) -> None:
        self.write_paused = True
        self.accepting = False

    def resume_writing(self) -> None:
        self.write_paused = False
        self.accepting = not (self.closed or self.draining)
        self._pool.wake_waiters()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.accepting = False
        self._direct = False
        reason = f": {exc}" if exc else ""
        if not self.ready.done():
            self.ready.set_exception(ConnectError(f"connection closed during handshake{reason}"))
            # Nobody may be waiting if the connect itself timed out.
            self.ready.exception()
        self.calls.close()
        self._fail_all(ConnectionLost(f"connection to {self._pool.address} lost{reason}"))
        self._stop_outgoing()
        self._pool.connection_closed(self)

    # used by the pool --------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return self.accepting and len(self.pending) < self.max_in_flight

    def refuse(self, payload: bytes, receiver: Receiver) -> None:
        """Fail a call that send() found too large or already late; nothing is sent."""
        if len(payload) > self.peer_max_frame_size:
            receiver.on_error(
                RequestTooLarge(
                    f"request of {len(payload)} bytes exceeds the node's frame limit"
                    f" of {self.peer_max_frame_size} bytes"
                )
            )
        else:
            receiver.on_error(DeadlineExceeded("deadline passed before sending", sent=False))

    def cancel(self, receiver: Receiver) -> bool:
        request_id = self.calls.cancel(receiver)
        if not request_id:
            return False
        self.call_expired(request_id)
        return True

    # the CallTable's questions ---------------------------------------------------------

    def call_expired(self, request_id: int) -> bool:
        """A call its caller stopped waiting for: tell the node (it may have it)."""
        if self.outgoing:
            self._answered_early(request_id)
        self._batcher.write(encode_frame(FrameType.CANCEL, request_id))
        if self.draining and not self.pending:
            self._close_transport()
        self._pool.wake_waiters()
        return True

    def timer_due(self, now: float) -> float:
        return math.inf

    def _fail(self, code: int, message: str) -> None:
        log.warning("closing connection to %s: %s", self._pool.address, message)
        if self.transport is not None and not self.transport.is_closing():
            self._batcher.flush()
            self.transport.write(encode_frame(_ERROR, 0, ErrorInfo(code, message).encode()))
        self._fail_all(ConnectionLost(f"protocol error from {self._pool.address}: {message}"))
        self._stop_outgoing()
        self._close_transport()

    def _stop_outgoing(self) -> None:
        # Emptied in place: the read path may hold the dict.
        bodies = list(self.outgoing.values())
        self.outgoing.clear()
        for body in bodies:
            body.stop()

    def _fail_all(self, error: CallError) -> None:
        self.calls.fail_all(error)
        if not self.ready.done():
            self.ready.set_exception(ConnectError(str(error)))

    def _close_transport(self) -> None:
        self.draining = True
        self.accepting = False
        if self.transport is not None and not self.transport.is_closing():
            self._batcher.flush()
            self.transport.close()


class StreamClient(AwaitableCalls):
    """Pooled, multiplexed client for one node over TCP or a Unix socket."""

    def __init__(self, address: str, options: ClientOptions | None = None) -> None:
        self.address = address
        self._parsed: Address = parse_address(address)
        self.options = options or ClientOptions()
        self._connections: list[_ClientConnection] = []
        self._connecting: asyncio.Task[_ClientConnection] | None = None
        self._waiters: deque[asyncio.Future[None]] = deque()
        # Calls waiting for a connection, so close() and cancel() can reach them.
        self._starting: dict[Receiver, asyncio.Task[None]] = {}
        self._backoff = 0.0
        self._retry_at = 0.0
        self._last_connect_error = ""
        self._closed = False
        # close() has begun: no new call waits for a connection, but the calls
        # already waiting for one are sent once it is there, like the calls in flight.
        self._draining = False
        self.late_responses_closed = 0
        # TLS to the node (transports/tls.py sets these); None: plain TCP.
        self.ssl: ssl.SSLContext | None = None
        self.server_hostname: str | None = None

    # public ---------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return sum(len(c.pending) for c in self._connections) + len(self._starting)

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    @property
    def late_responses(self) -> int:
        return self.late_responses_closed + sum(c.late_responses for c in self._connections)

    def send(self, payload: bytes, receiver: Receiver, stream_response: bool = False) -> None:
        """Send one request; its outcome goes to ``receiver`` (possibly before this returns).

        ``stream_response``: the node may stream its answer (REQUEST flag STREAM_OK);
        ``receiver`` is then a :class:`~transports.calls.StreamReceiver`.
        """
        for connection in self._connections:
            if connection.accepting and len(connection.pending) < connection.max_in_flight:
                break
        else:
            self._send_later(payload, receiver, FLAG_STREAM_OK if stream_response else 0, None)
            return
        size = len(payload)
        remaining = receiver.deadline - connection._loop.time()
        if remaining <= 0 or size > connection.peer_max_frame_size:
            connection.refuse(payload, receiver)
            return
        connection._batcher.write(
            connection.calls.request_header(
                receiver, size, remaining, FLAG_STREAM_OK if stream_response else 0
            )
            + payload
        )

    def send_stream(
        self, payload: bytes, receiver: Receiver, stream_response: bool = True
    ) -> OutgoingBody:
        """Send a request whose body follows: ``payload`` is its head (REQUEST with MORE).

        The rest of the body goes through the returned
        :class:`~transports.bodies.OutgoingBody`; the outcome goes to
        ``receiver`` as for :meth:`send`. A node that announced no window
        gets one whole REQUEST at ``end()`` instead.
        """
        flags = FLAG_STREAM_OK if stream_response else 0
        body = OutgoingBody(self, receiver, payload, flags)
        connection = self._pick()
        if connection is None:
            self._send_later(payload, receiver, flags, body)
        else:
            self._start_stream(connection, payload, receiver, flags, body)
        return body

    @property
    def supports_streaming(self) -> bool:
        """Streamed bodies are possible on this carrier (the node may still take none)."""
        return True

    def _start_stream(
        self,
        connection: _ClientConnection,
        payload: bytes,
        receiver: Receiver,
        flags: int,
        body: OutgoingBody,
    ) -> None:
        if not connection.peer_window:
            body.bind_whole(connection.peer_max_frame_size)
            return
        size = len(payload)
        remaining = receiver.deadline - connection._loop.time()
        if remaining <= 0 or size > connection.peer_max_frame_size:
            body.stop()
            connection.refuse(payload, receiver)
            return
        calls = connection.calls
        header = calls.request_header(receiver, size, remaining, flags | FLAG_MORE)
        request_id = calls.last_id()
        connection.outgoing[request_id] = body
        connection._batcher.write(header + payload)
        body.bind_stream(
            connection, request_id, connection.peer_window, connection.peer_max_frame_size
        )

    def send_whole(self, payload: bytes, receiver: Receiver, flags: int) -> None:
        """An OutgoingBody's whole REQUEST, for a node that takes no streamed body."""
        self.send(payload, receiver, flags & FLAG_STREAM_OK != 0)

    def give_up(self, receiver: Receiver) -> None:
        self.cancel(receiver)

    def _send_later(
        self, payload: bytes, receiver: Receiver, flags: int, body: OutgoingBody | None
    ) -> None:
        """send() with no connection free: wait for one (or fail at once if closing)."""
        if self._closed or self._draining:
            if body is not None:
                body.stop()
            receiver.on_error(Closed(f"client for {self.address} is closed"))
            return
        task = asyncio.get_running_loop().create_task(
            self._send_when_connected(payload, receiver, flags, body),
            name=f"pitcher-call {self.address}",
        )
        self._starting[receiver] = task

    def cancel(self, receiver: Receiver) -> None:
        """The caller gives up: forget the call and tell the node (CANCEL). No callback follows."""
        task = self._starting.pop(receiver, None)
        if task is not None:
            task.cancel()
            return
        for connection in self._connections:
            if connection.cancel(receiver):
                return

    async def ping(self, timeout: float = 1.0) -> None:
        """Open a connection if none is open; ConnectError if the node is not there."""
        loop = asyncio.get_running_loop()
        if self._pick() is None:
            await self._acquire(loop.time() + timeout)

    async def close(self, timeout: float = 5.0) -> None:
        """Stop new calls, let in-flight ones finish (at most ``timeout``), then close.

        In flight are also the calls still waiting for a connection: a node
        dropped by a reload must not fail requests that were routed to it
        just before, only because its connection was still being made.
        """
        self._draining = True
        deadline = time.monotonic() + timeout
        while (self._starting or any(c.pending for c in self._connections)) and (
            time.monotonic() < deadline
        ):
            await asyncio.sleep(0.01)
        self._closed = True
        closed = Closed(f"client for {self.address} closed")
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(closed)
        if self._connecting is not None:
            self._connecting.cancel()
        starting, self._starting = self._starting, {}
        for receiver, task in starting.items():
            task.cancel()
            deliver_error(receiver, closed)
        self.abort()

    def abort(self) -> None:
        """Close every connection now; in-flight calls fail with ConnectionLost."""
        self._closed = True
        for connection in list(self._connections):
            connection._close_transport()
            if connection.transport is not None:
                connection.transport.abort()

    # pool internals ------------------------------------------------------------------

    def _pick(self) -> _ClientConnection | None:
        for connection in self._connections:
            if connection.usable:
                return connection
        return None

    async def _send_when_connected(
        self, payload: bytes, receiver: Receiver, flags: int, body: OutgoingBody | None
    ) -> None:
        try:
            connection = await self._acquire(receiver.deadline)
        except asyncio.CancelledError:
            if body is not None:
                body.stop()
            raise  # cancel() or close(): they answer the receiver themselves
        except TransportError as exc:
            if body is not None:
                body.stop()
            if self._starting.pop(receiver, None) is not None:
                deliver_error(receiver, exc)
            return
        if self._starting.pop(receiver, None) is not None:
            # _acquire returned with a connection free, and nothing ran since.
            if body is None:
                self.send(payload, receiver, flags & FLAG_STREAM_OK != 0)
            else:
                self._start_stream(connection, payload, receiver, flags, body)

    async def _acquire(self, give_up_at: float) -> _ClientConnection:
        loop = asyncio.get_running_loop()
        while True:
            if self._closed:
                raise Closed(f"client for {self.address} is closed")
            connection = self._pick()
            if connection is not None:
                return connection
            if self._connecting is None and len(self._connections) < self.options.max_connections:
                now = loop.time()
                if now < self._retry_at:
                    raise ConnectError(
                        f"{self.address} unreachable, next try in {self._retry_at - now:.2f}s"
                        f" (last error: {self._last_connect_error})"
                    )
                self._connecting = loop.create_task(
                    self._connect(), name=f"pitcher-connect {self.address}"
                )
            remaining = give_up_at - loop.time()
            if remaining <= 0:
                raise DeadlineExceeded(f"no connection to {self.address} in time", sent=False)
            if self._connecting is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(self._connecting), remaining)
                except TimeoutError:
                    raise DeadlineExceeded(
                        f"no connection to {self.address} in time", sent=False
                    ) from None
                continue
            # Every connection is saturated and the pool is full: wait for a slot.
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                raise DeadlineExceeded(
                    f"every connection to {self.address} is saturated", sent=False
                ) from None
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    async def _connect(self) -> _ClientConnection:
        loop = asyncio.get_running_loop()
        address = self._parsed
        connection = _ClientConnection(self, loop)
        try:
            try:
                async with asyncio.timeout(self.options.connect_timeout):
                    if address.scheme == "unix":
                        await loop.create_unix_connection(lambda: connection, address.path)
                    else:
                        await loop.create_connection(
                            lambda: connection,
                            address.host,
                            address.port,
                            ssl=self.ssl,
                            server_hostname=self.server_hostname if self.ssl else None,
                        )
                    await connection.ready
            except TimeoutError:
                connection._close_transport()
                raise ConnectError(
                    f"{self.address}: no handshake within {self.options.connect_timeout}s"
                ) from None
            except OSError as exc:
                raise ConnectError(f"{self.address}: {exc.strerror or exc}") from exc
        except ConnectError as exc:
            self._backoff = min(
                self.options.backoff_max, max(self.options.backoff_initial, self._backoff * 2)
            )
            self._retry_at = loop.time() + self._backoff
            self._last_connect_error = str(exc)
            raise
        finally:
            self._connecting = None
        self._backoff = 0.0
        self._retry_at = 0.0
        self._connections.append(connection)
        if self._closed:
            connection._close_transport()
        self.wake_waiters()
        return connection

    def connection_closed(self, connection: _ClientConnection) -> None:
        if connection in self._connections:
            self._connections.remove(connection)
            self.late_responses_closed += connection.late_responses
        self.wake_waiters()

    def wake_waiters(self) -> None:
        # Every waiter re-checks for a free slot, and waits again if it finds none.
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
