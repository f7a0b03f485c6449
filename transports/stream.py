"""Stream carriers: TCP and Unix domain sockets.

One connection carries many calls at once, matched by request id; answers may
come back in any order. The client keeps a small pool of connections per node
and opens another only when the ones it has are saturated.

Writes are batched per event-loop turn: the first frame of a turn is written
at once (so a lone request pays no extra latency), later frames of the same
turn are joined and written together when the turn ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import time
from collections import deque
from typing import Any, ClassVar, cast

from .base import ClientOptions, Handler, ServerOptions
from .control import ErrorInfo, GoAwayInfo, Settings
from .decoder import FrameDecoder
from .errors import (
    Closed,
    ConnectError,
    ConnectionLost,
    DeadlineExceeded,
    ErrorCode,
    ProtocolError,
    Rejected,
    RemoteError,
    RequestTooLarge,
)
from .frame import (
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_MAX_IN_FLIGHT,
    PREFACE,
    FrameType,
    encode_frame,
    encode_request,
    encode_response,
)
from .registry import Address, AddressError, parse_address

log = logging.getLogger("pitcher.transports")

_REQUEST = FrameType.REQUEST
_RESPONSE = FrameType.RESPONSE
_ERROR = FrameType.ERROR


def _set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Batcher:
    """Per-connection write batching shared by both ends (see module docstring)."""

    __slots__ = ("_loop", "_pending_writes", "_transport", "_turn_open")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._pending_writes: list[bytes] = []
        self._turn_open = False

    def write(self, data: bytes) -> None:
        if self._turn_open:
            self._pending_writes.append(data)
            return
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(data)
        self._turn_open = True
        self._loop.call_soon(self._end_turn)

    def _end_turn(self) -> None:
        self._turn_open = False
        pending = self._pending_writes
        if pending:
            self._pending_writes = []
            transport = self._transport
            if transport is not None and not transport.is_closing():
                transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def flush(self) -> None:
        pending = self._pending_writes
        if pending and self._transport is not None and not self._transport.is_closing():
            self._pending_writes = []
            self._transport.write(b"".join(pending))


# --------------------------------------------------------------------------- client


class _ClientConnection(asyncio.Protocol):
    """One multiplexed connection from a client to a node."""

    __slots__ = (
        "_batcher",
        "_decoder",
        "_loop",
        "_next_id",
        "_pool",
        "closed",
        "draining",
        "goaway_last_id",
        "late_responses",
        "max_in_flight",
        "peer_max_frame_size",
        "pending",
        "ready",
        "transport",
        "write_paused",
    )

    def __init__(self, pool: StreamClient, loop: asyncio.AbstractEventLoop) -> None:
        self._pool = pool
        self._loop = loop
        self._decoder = FrameDecoder(pool.options.max_frame_size)
        self._batcher = _Batcher(loop)
        self._next_id = 1
        self.pending: dict[int, asyncio.Future[bytes]] = {}
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = loop.create_future()
        self.max_in_flight = DEFAULT_MAX_IN_FLIGHT
        self.peer_max_frame_size = DEFAULT_MAX_FRAME_SIZE
        self.draining = False
        self.closed = False
        self.write_paused = False
        self.goaway_last_id: int | None = None
        self.late_responses = 0

    # asyncio callbacks ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport = transport
        self._batcher._transport = transport
        _set_nodelay(transport)
        # Our own limit, so the node never sends a response we would refuse.
        transport.write(
            PREFACE
            + encode_frame(
                FrameType.SETTINGS, 0, Settings(self._pool.options.max_frame_size, 0).encode()
            )
        )

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except ProtocolError as exc:
            with contextlib.suppress(ProtocolError):
                for frame in exc.frames:  # type: ignore[attr-defined]
                    self._on_frame(frame)
            self._fail(exc.code, str(exc))
            return
        pending = self.pending
        for frame in frames:
            if frame.type == _RESPONSE:
                future = pending.pop(frame.request_id, None)
                if future is None:
                    # Its caller gave up (deadline, cancel): drop it, never reuse.
                    self.late_responses += 1
                elif not future.done():
                    future.set_result(frame.payload)
            else:
                try:
                    self._on_frame(frame)
                except ProtocolError as exc:
                    self._fail(exc.code, str(exc))
                    return
            if self.closed:
                return
        pending = self.pending
        if self.draining and not pending:
            self._close_transport()
        self._pool._wake_waiters()

    def _on_frame(self, frame: Any) -> None:
        kind = frame.type
        if kind == _RESPONSE:
            future = self.pending.pop(frame.request_id, None)
            if future is None:
                self.late_responses += 1
            elif not future.done():
                future.set_result(frame.payload)
        elif kind == _ERROR:
            error = ErrorInfo.decode(frame.payload)
            if frame.request_id == 0:
                self._fail_all(ConnectionLost(f"node closed the connection: {error.describe()}"))
                self._close_transport()
                return
            future = self.pending.pop(frame.request_id, None)
            if future is not None and not future.done():
                if error.code == ErrorCode.UNAVAILABLE:
                    future.set_exception(Rejected(f"node refused the call: {error.describe()}"))
                else:
                    future.set_exception(RemoteError(error.code, error.message))
        elif kind == FrameType.SETTINGS:
            settings = Settings.decode(frame.payload)
            if settings.max_in_flight:
                self.max_in_flight = settings.max_in_flight
            if settings.max_frame_size:
                self.peer_max_frame_size = settings.max_frame_size
            if not self.ready.done():
                self.ready.set_result(None)
        elif kind == FrameType.GOAWAY:
            info = GoAwayInfo.decode(frame.payload)
            self.draining = True
            self.goaway_last_id = info.last_request_id
            for request_id in [rid for rid in self.pending if rid > info.last_request_id]:
                future = self.pending.pop(request_id)
                if not future.done():
                    future.set_exception(
                        Rejected(f"node is going away ({info.reason or 'no reason given'})")
                    )
            if not self.pending:
                self._close_transport()
        elif kind == FrameType.PING:
            self._batcher.write(encode_frame(FrameType.PONG, 0, frame.payload))
        elif kind == FrameType.PONG:
            pass
        else:
            self._fail(ErrorCode.PROTOCOL_ERROR, f"a client does not accept {kind} frames")

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._pool._wake_waiters()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        reason = f": {exc}" if exc else ""
        if not self.ready.done():
            self.ready.set_exception(ConnectError(f"connection closed during handshake{reason}"))
            # Nobody may be waiting if the connect itself timed out.
            self.ready.exception()
        self._fail_all(ConnectionLost(f"connection to {self._pool.address} lost{reason}"))
        self._pool._connection_closed(self)

    # used by the pool -------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return not (self.closed or self.draining or self.write_paused) and (
            len(self.pending) < self.max_in_flight
        )

    def start_call(self, payload: bytes, timeout: float) -> asyncio.Future[bytes]:
        loop = self._loop
        future: asyncio.Future[bytes] = loop.create_future()
        if len(payload) > self.peer_max_frame_size:
            future.set_exception(
                RequestTooLarge(
                    f"request of {len(payload)} bytes exceeds the node's frame limit"
                    f" of {self.peer_max_frame_size} bytes"
                )
            )
            return future
        request_id = self._next_id
        self._next_id = request_id + 1
        self.pending[request_id] = future
        self._batcher.write(encode_request(request_id, payload, max(1, int(timeout * 1000))))
        timer = loop.call_later(timeout, _expire, self, request_id, future, timeout)
        future.add_done_callback(_CallDone(self, request_id, timer))
        return future

    def give_up(self, request_id: int) -> bool:
        """Forget a call whose caller stopped waiting and tell the node; True if it was pending."""
        if self.pending.pop(request_id, None) is None:
            return False
        self._batcher.write(encode_frame(FrameType.CANCEL, request_id))
        if self.draining and not self.pending:
            self._close_transport()
        self._pool._wake_waiters()
        return True

    def _fail(self, code: int, message: str) -> None:
        log.warning("closing connection to %s: %s", self._pool.address, message)
        if self.transport is not None and not self.transport.is_closing():
            self._batcher.flush()
            self.transport.write(
                encode_frame(FrameType.ERROR, 0, ErrorInfo(code, message).encode())
            )
        self._fail_all(ConnectionLost(f"protocol error from {self._pool.address}: {message}"))
        self._close_transport()

    def _fail_all(self, error: Exception) -> None:
        pending, self.pending = self.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)
        if not self.ready.done():
            self.ready.set_exception(ConnectError(str(error)))

    def _close_transport(self) -> None:
        self.draining = True
        if self.transport is not None and not self.transport.is_closing():
            self._batcher.flush()
            self.transport.close()


class StreamClient:
    """Pooled, multiplexed client for one node over TCP or a Unix socket."""

    def __init__(self, address: str, options: ClientOptions | None = None) -> None:
        self.address = address
        self._parsed: Address = parse_address(address)
        self.options = options or ClientOptions()
        self._connections: list[_ClientConnection] = []
        self._connecting: asyncio.Task[_ClientConnection] | None = None
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._backoff = 0.0
        self._retry_at = 0.0
        self._last_connect_error = ""
        self._closed = False
        self._starting: set[asyncio.Task[None]] = set()
        self.late_responses_closed = 0

    # public ---------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return sum(len(c.pending) for c in self._connections)

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    @property
    def late_responses(self) -> int:
        return self.late_responses_closed + sum(c.late_responses for c in self._connections)

    def start(self, payload: bytes, timeout: float) -> asyncio.Future[bytes]:
        """Send one request; the future gets the response payload or a CallError.

        Cancelling the future gives the call up and tells the node (CANCEL).
        This is the callback-friendly form of :meth:`call`: no task is made
        when a connection is ready, which is nearly always.
        """
        connection = self._pick()
        if connection is not None:
            return connection.start_call(payload, timeout)
        loop = asyncio.get_running_loop()
        outer: asyncio.Future[bytes] = loop.create_future()
        task = loop.create_task(
            self._start_after_connect(payload, timeout, loop.time() + timeout, outer),
            name=f"pitcher-call {self.address}",
        )
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)
        # A caller that gives up while we connect cancels the task too.
        outer.add_done_callback(lambda f: task.cancel() if f.cancelled() else None)
        return outer

    async def call(self, payload: bytes, timeout: float) -> bytes:
        return await self.start(payload, timeout)

    async def _start_after_connect(
        self, payload: bytes, timeout: float, give_up_at: float, outer: asyncio.Future[bytes]
    ) -> None:
        try:
            connection = await self._acquire(give_up_at)
            remaining = give_up_at - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise DeadlineExceeded("deadline passed before the request was sent", sent=False)
            inner = connection.start_call(payload, remaining)
        except asyncio.CancelledError:
            if not outer.done():
                outer.set_exception(Closed(f"client for {self.address} closed"))
            raise
        except Exception as exc:
            if not outer.done():
                outer.set_exception(exc)
            return
        _chain(inner, outer)

    async def ping(self, timeout: float = 1.0) -> None:
        """Open a connection if none is open; ConnectError if the node is not there."""
        loop = asyncio.get_running_loop()
        if self._pick() is None:
            await self._acquire(loop.time() + timeout)

    async def close(self, timeout: float = 5.0) -> None:
        self._closed = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(Closed(f"client for {self.address} closed"))
        if self._connecting is not None:
            self._connecting.cancel()
        for task in list(self._starting):
            task.cancel()
        deadline = time.monotonic() + timeout
        while any(c.pending for c in self._connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self.abort()

    def abort(self) -> None:
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
                connecting = self._connecting
                try:
                    await asyncio.wait_for(asyncio.shield(connecting), remaining)
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
                        await loop.create_connection(lambda: connection, address.host, address.port)
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
        self._wake_waiters()
        return connection

    def _connection_closed(self, connection: _ClientConnection) -> None:
        if connection in self._connections:
            self._connections.remove(connection)
            self.late_responses_closed += connection.late_responses
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        # Every waiter re-checks for a free slot, and waits again if it finds none.
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)


class _CallDone:
    """Done-callback of one call: stop its timer; if the caller cancelled, tell the node."""

    __slots__ = ("connection", "request_id", "timer")

    def __init__(
        self, connection: _ClientConnection, request_id: int, timer: asyncio.TimerHandle
    ) -> None:
        self.connection = connection
        self.request_id = request_id
        self.timer = timer

    def __call__(self, future: asyncio.Future[bytes]) -> None:
        self.timer.cancel()
        if future.cancelled():
            self.connection.give_up(self.request_id)


def _chain(inner: asyncio.Future[bytes], outer: asyncio.Future[bytes]) -> None:
    """Pass inner's outcome to outer, and outer's cancellation back to inner."""

    def forward(done: asyncio.Future[bytes]) -> None:
        if outer.done():
            return
        if done.cancelled():
            outer.cancel()
        elif (exc := done.exception()) is not None:
            outer.set_exception(exc)
        else:
            outer.set_result(done.result())

    def back(done: asyncio.Future[bytes]) -> None:
        if done.cancelled() and not inner.done():
            inner.cancel()

    inner.add_done_callback(forward)
    outer.add_done_callback(back)


def _expire(
    connection: _ClientConnection, request_id: int, future: asyncio.Future[bytes], timeout: float
) -> None:
    if future.done():
        return
    connection.give_up(request_id)
    future.set_exception(DeadlineExceeded(f"no answer within {timeout:g}s"))


# --------------------------------------------------------------------------- server


class _ServerConnection(asyncio.Protocol):
    __slots__ = (
        "_batcher",
        "_decoder",
        "_loop",
        "_server",
        "closed",
        "goaway_sent",
        "last_request_id",
        "peer_done",
        "peer_max_frame_size",
        "tasks",
        "transport",
    )

    def __init__(self, server: StreamServer, loop: asyncio.AbstractEventLoop) -> None:
        self._server = server
        self._loop = loop
        self._decoder = FrameDecoder(server.options.max_frame_size)
        self._batcher = _Batcher(loop)
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.transport: asyncio.Transport | None = None
        self.last_request_id = 0
        self.goaway_sent = False
        self.peer_done = False
        self.peer_max_frame_size = DEFAULT_MAX_FRAME_SIZE
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport = transport
        self._batcher._transport = transport
        _set_nodelay(transport)
        options = self._server.options
        transport.write(
            PREFACE
            + encode_frame(
                FrameType.SETTINGS,
                0,
                Settings(options.max_frame_size, options.max_in_flight).encode(),
            )
        )
        self._server._connections.add(self)
        if self._server.closing:
            self.send_goaway("server is shutting down")

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except ProtocolError as exc:
            with contextlib.suppress(ProtocolError):
                for frame in exc.frames:  # type: ignore[attr-defined]
                    self._on_frame(frame)
            self.fail(exc.code, str(exc))
            return
        try:
            for frame in frames:
                self._on_frame(frame)
        except ProtocolError as exc:  # a control payload that does not decode
            self.fail(exc.code, str(exc))

    def _on_frame(self, frame: Any) -> None:
        if self.closed:
            return
        kind = frame.type
        if kind == _REQUEST:
            request_id = frame.request_id
            if self.goaway_sent and request_id > self.last_request_id:
                self._batcher.write(
                    encode_frame(
                        _ERROR,
                        request_id,
                        ErrorInfo(ErrorCode.UNAVAILABLE, "server is shutting down").encode(),
                    )
                )
                return
            if request_id <= self.last_request_id or request_id in self.tasks:
                self.fail(ErrorCode.PROTOCOL_ERROR, f"request id {request_id} reused")
                return
            if len(self.tasks) >= self._server.options.max_in_flight:
                self.fail(
                    ErrorCode.TOO_MANY_IN_FLIGHT,
                    f"more than {self._server.options.max_in_flight} requests in flight",
                )
                return
            self.last_request_id = request_id
            self.tasks[request_id] = self._loop.create_task(
                self._run(request_id, frame.payload, frame.deadline_ms)
            )
        elif kind == FrameType.CANCEL:
            task = self.tasks.pop(frame.request_id, None)
            if task is not None:
                task.cancel()
                self._maybe_finish()
        elif kind == FrameType.PING:
            self._batcher.write(encode_frame(FrameType.PONG, 0, frame.payload))
        elif kind == FrameType.GOAWAY:
            self.peer_done = True
            self._maybe_finish()
        elif kind == _ERROR:
            if frame.request_id == 0:
                log.warning(
                    "peer closed the connection: %s", ErrorInfo.decode(frame.payload).describe()
                )
                self.close()
        elif kind == FrameType.SETTINGS:
            settings = Settings.decode(frame.payload)
            if settings.max_frame_size:
                self.peer_max_frame_size = settings.max_frame_size
        elif kind == FrameType.PONG:
            pass
        else:
            self.fail(ErrorCode.PROTOCOL_ERROR, f"a server does not accept {kind} frames")

    async def _run(self, request_id: int, payload: bytes, deadline_ms: int) -> None:
        error: ErrorInfo | None = None
        deadline: asyncio.Timeout | None = None
        try:
            if deadline_ms:
                async with asyncio.timeout(deadline_ms / 1000) as deadline:
                    result = await self._server.handler(payload)
            else:
                result = await self._server.handler(payload)
            if not isinstance(result, bytes):
                raise TypeError(f"handler returned {type(result).__name__}, not bytes")
            limit = min(self._server.options.max_frame_size, self.peer_max_frame_size)
            if len(result) > limit:
                raise ValueError(
                    f"response of {len(result)} bytes exceeds the frame limit of {limit}"
                )
        except asyncio.CancelledError:
            self.tasks.pop(request_id, None)
            self._maybe_finish()
            raise
        except Exception as exc:
            if isinstance(exc, TimeoutError) and deadline is not None and deadline.expired():
                # The caller has given up by now; say so anyway, it drops the answer.
                error = ErrorInfo(ErrorCode.DEADLINE_EXCEEDED, "deadline passed")
            else:
                log.exception("handler failed on request %d", request_id)
                error = ErrorInfo(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        if self.tasks.pop(request_id, None) is not None:
            if error is None:
                self._batcher.write(encode_response(request_id, result))
            else:
                self._batcher.write(encode_frame(_ERROR, request_id, error.encode()))
        self._maybe_finish()

    def send_goaway(self, reason: str) -> None:
        if self.goaway_sent or self.closed:
            return
        self.goaway_sent = True
        self._batcher.write(
            encode_frame(FrameType.GOAWAY, 0, GoAwayInfo(self.last_request_id, reason).encode())
        )
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        # After a GOAWAY the connection lives until its calls are done and the
        # client has hung up (or said GOAWAY itself), so a request that crossed
        # our GOAWAY on the wire still gets its UNAVAILABLE answer.
        if self.peer_done and not self.tasks:
            self.close()

    def fail(self, code: int, message: str) -> None:
        log.warning("closing connection from a client: %s", message)
        if self.transport is not None and not self.transport.is_closing():
            self._batcher.flush()
            self.transport.write(encode_frame(_ERROR, 0, ErrorInfo(code, message).encode()))
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for task in self.tasks.values():
            task.cancel()
        self.tasks.clear()
        if self.transport is not None:
            self._batcher.flush()
            self.transport.close()

    def eof_received(self) -> bool:
        self.peer_done = True
        if not self.tasks:
            self.close()
        return True  # keep our write side open to answer what is still running

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()
        self._server._connections.discard(self)


class StreamServer:
    """Serves a handler on a TCP or Unix-socket address."""

    def __init__(self, address: str, handler: Handler, options: ServerOptions | None = None):
        self.address = address
        self._parsed = parse_address(address)
        self.handler = handler
        self.options = options or ServerOptions()
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_ServerConnection] = set()
        # Identity of the socket file we bound, so we never unlink a successor's.
        self._socket_file: tuple[int, int] | None = None
        self.closing = False

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    @property
    def in_flight(self) -> int:
        return sum(len(c.tasks) for c in self._connections)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        address = self._parsed

        def factory() -> _ServerConnection:
            return _ServerConnection(self, loop)

        try:
            if address.scheme == "unix":
                _remove_stale_socket(address.path)
                self._server = await loop.create_unix_server(
                    factory, address.path, backlog=self.options.backlog
                )
                info = os.stat(address.path)
                self._socket_file = (info.st_dev, info.st_ino)
            else:
                self._server = await loop.create_server(
                    factory,
                    address.host,
                    address.port,
                    backlog=self.options.backlog,
                    reuse_address=True,
                )
        except OSError as exc:
            raise ConnectError(f"cannot listen on {self.address}: {exc.strerror or exc}") from exc
        if address.scheme != "unix" and address.port == 0:
            # Report the port the kernel picked.
            host, port = self._server.sockets[0].getsockname()[:2]
            self.address = f"{address.scheme}://{_format_host(host)}:{port}"

    async def close(self, grace: float = 5.0) -> None:
        self.closing = True
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.send_goaway("server is shutting down")
        # Clients close a connection once it has no calls left after GOAWAY.
        deadline = time.monotonic() + grace
        while self._connections and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        self.abort()

    def abort(self) -> None:
        self.closing = True
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.close()
        if self._socket_file is not None:
            path, self._socket_file, bound = self._parsed.path, None, self._socket_file
            with contextlib.suppress(OSError):
                info = os.stat(path)
                if (info.st_dev, info.st_ino) == bound:
                    os.unlink(path)


def _format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead server, but nothing else."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConnectError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
    except OSError:
        pass
    else:
        raise ConnectError(f"{path} is in use by a running server")
    finally:
        probe.close()


class _StreamTransport:
    schemes: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def client(cls, address: str, options: ClientOptions | None = None) -> StreamClient:
        cls._check(address)
        return StreamClient(address, options)

    @classmethod
    async def serve(
        cls, address: str, handler: Handler, options: ServerOptions | None = None
    ) -> StreamServer:
        cls._check(address)
        server = StreamServer(address, handler, options)
        await server.start()
        return server

    @classmethod
    def _check(cls, address: str) -> None:
        scheme = parse_address(address).scheme
        if scheme not in cls.schemes:
            raise AddressError(f"{cls.__name__} does not serve {scheme!r} addresses")


class TcpTransport(_StreamTransport):
    schemes = ("tcp",)


class UnixTransport(_StreamTransport):
    schemes = ("unix",)
