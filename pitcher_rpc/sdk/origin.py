"""The bridge's HTTP/1.1 client: keep-alive connections to one origin, parsed by httptools.

Measured against aiohttp's client in the same process (a bridge's
``respond()`` in a loop, 8 at a time, against uvicorn on a Unix socket):
aiohttp spent 150-180 µs of CPU per request, the bridge over this 38-44
(a minimal httptools client: 33-47), so aiohttp made the bridge the slowest hop. This is the
little that a sidecar needs and no more: one request at a time per
connection (no pipelining), a pool of at most ``limit`` connections
reused newest first, an idempotent request sent once more on a fresh
connection when a kept-alive one turns out closed before any byte of the
answer (RFC 9112 9.3.1), and a connection closed whenever its request is
given up, so no late answer is read as the next one's.
"""

from __future__ import annotations

import asyncio
from collections import deque

import httptools

# May be sent again when a kept-alive connection was closed under them (RFC 9110 9.2.2).
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))


class OriginError(Exception):
    """The origin could not be asked, or answered what cannot be relayed."""


class _Stale(Exception):
    """A kept-alive connection closed before any byte of the answer: safe to try again."""


class OriginResponse:
    __slots__ = ("body", "names", "status", "values")

    def __init__(self, status: int, names: list[bytes], values: list[bytes], body: bytes) -> None:
        self.status = status
        self.names = names
        self.values = values
        self.body = body


class _Connection(asyncio.Protocol):
    """One connection to the origin; one request at a time."""

    def __init__(self, pool: OriginPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[OriginResponse] | None = None
        self.head_request = False
        self.received = False
        self.headers_done = False
        self.framed = False  # the answer says its length (Content-Length or chunked)
        self.names: list[bytes] = []
        self.values: list[bytes] = []
        self.parts: list[bytes] = []
        self.size = 0
        self.limit = 0
        self.reusable = False
        self.closed = False
        self.fresh_parser = False

    # -- asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        if self.waiter is None:
            self._close()  # nothing was asked: an origin talking out of turn
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(OriginError(f"origin sent an invalid response: {exc}"))
            self._close()
            return
        if self.fresh_parser:
            self.fresh_parser = False
            self.parser = httptools.HttpResponseParser(self)

    def eof_received(self) -> bool:
        self._ended()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        self._ended()

    def _ended(self) -> None:
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if not self.received:
            self._fail(_Stale())
        elif self.headers_done and not self.framed and not self.head_request:
            self.on_message_complete()  # a body that ends with the connection
        else:
            self._fail(
                OriginError(
                    "origin closed the connection mid-response"
                    + (f" ({self.size} bytes of body received)" if self.headers_done else "")
                )
            )
        self._close()

    # -- httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.names.append(name)
        self.values.append(value)

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # An interim answer (100 Continue, 103 Early Hints): the final one follows.
            self.names = []
            self.values = []
            return
        self.headers_done = True
        for name, value in zip(self.names, self.values, strict=True):
            lowered = name.lower()
            if lowered == b"content-length" or (
                lowered == b"transfer-encoding" and b"chunked" in value.lower()
            ):
                self.framed = True
        if self.head_request:
            # httptools cannot be told that a HEAD answer has no body: end it
            # here and read the next answer with a fresh parser.
            self.fresh_parser = True
            self.on_message_complete()

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > self.limit:
            self._fail(
                OriginError(f"origin answered more than {self.limit} bytes, over the frame limit")
            )
            self._close()
            return
        self.parts.append(body)

    def on_message_complete(self) -> None:
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            return  # the interim answer's end
        self.reusable = (
            not self.head_request or self.fresh_parser
        ) and self.parser.should_keep_alive()
        parts = self.parts
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        waiter.set_result(OriginResponse(status, self.names, self.values, body))

    # -- requests

    def start(self, request: bytes, head: bool, limit: int) -> asyncio.Future[OriginResponse]:
        waiter: asyncio.Future[OriginResponse] = asyncio.get_running_loop().create_future()
        self.waiter = waiter
        self.head_request = head
        self.received = False
        self.headers_done = False
        self.framed = False
        self.names = []
        self.values = []
        self.parts = []
        self.size = 0
        self.limit = limit
        self.reusable = False
        assert self.transport is not None
        self.transport.write(request)
        return waiter

    def _fail(self, error: Exception) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def _close(self) -> None:
        self.reusable = False
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()
            self.pool._forget(self)

    def abort(self) -> None:
        """Given up mid-request: the connection goes, so no late answer is read as another's."""
        self.reusable = False
        if self.transport is not None:
            self.closed = True
            self.transport.abort()
            self.pool._forget(self)


class OriginPool:
    """At most ``limit`` connections to one origin (TCP ``host:port`` or a Unix socket path)."""

    def __init__(
        self, host: str, port: int, unix_path: str | None, limit: int, connect_timeout: float
    ) -> None:
        self.host = host
        self.port = port
        self.unix_path = unix_path
        self.limit = limit
        self.connect_timeout = connect_timeout
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._closing = False

    async def request(
        self,
        method: bytes,
        request: bytes,
        limit: int,
        timeout: float | None,
        connect_timeout: float,
    ) -> OriginResponse:
        """Send ``request`` (the whole HTTP/1.1 message) and read the answer.

        ``timeout``: seconds for the whole exchange (None: the caller's own
        deadline cancels it). OriginError says what went wrong.
        """
        loop = asyncio.get_running_loop()
        timer = None
        task = asyncio.current_task()
        if timeout is not None and task is not None:
            timer = loop.call_later(timeout, task.cancel, _TIMEOUT)
        try:
            for attempt in (1, 2):
                connection, reused = await self._acquire(connect_timeout)
                waiter = connection.start(request, method == b"HEAD", limit)
                try:
                    response = await waiter
                except _Stale:
                    if reused and attempt == 1 and method in IDEMPOTENT:
                        continue  # closed while idle: once more, on a fresh connection
                    raise OriginError("origin closed the connection without an answer") from None
                except BaseException:
                    connection.abort()
                    raise
                finally:
                    connection.waiter = None
                self._release(connection)
                return response
            raise AssertionError("unreachable")
        except asyncio.CancelledError as exc:
            if timer is not None and exc.args == (_TIMEOUT,):
                task.uncancel()  # type: ignore[union-attr]
                raise OriginError(f"origin did not answer within {timeout:g} s") from None
            raise
        finally:
            if timer is not None:
                timer.cancel()

    async def _acquire(self, connect_timeout: float) -> tuple[_Connection, bool]:
        while True:
            while self._idle:
                connection = self._idle.pop()
                if not connection.closed:
                    return connection, True
            if len(self._open) < self.limit:
                return await self._connect(connect_timeout), False
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting.append(waiter)
            try:
                await waiter
            finally:
                if not waiter.done():
                    waiter.cancel()
                with _suppress_value_error():
                    self._waiting.remove(waiter)

    async def _connect(self, connect_timeout: float) -> _Connection:
        loop = asyncio.get_running_loop()
        connection = _Connection(self)
        self._open.add(connection)
        try:
            if self.unix_path is not None:
                connect = loop.create_unix_connection(lambda: connection, self.unix_path)
            else:
                connect = loop.create_connection(lambda: connection, self.host, self.port)
            await asyncio.wait_for(connect, connect_timeout)
        except TimeoutError:
            self._forget(connection)
            raise OriginError(
                f"origin did not accept a connection within {connect_timeout:g} s"
            ) from None
        except OSError as exc:
            self._forget(connection)
            raise OriginError(f"origin unreachable: {exc.strerror or exc}") from None
        except BaseException:
            self._forget(connection)
            raise
        return connection

    def _release(self, connection: _Connection) -> None:
        if connection.reusable and not connection.closed and not self._closing:
            self._idle.append(connection)
        else:
            connection._close()
        self._wake()

    def _forget(self, connection: _Connection) -> None:
        self._open.discard(connection)
        if connection in self._idle:
            self._idle.remove(connection)
        self._wake()

    def _wake(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        self._closing = True
        for connection in list(self._open):
            connection._close()
        self._idle.clear()


_TIMEOUT = "pitcher-origin-timeout"


class _suppress_value_error:
    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, value: object, traceback: object) -> bool:
        return kind is ValueError
