"""The master's admin HTTP server: routing and HTTP/1.1 machinery, no handlers.

The master registers a coroutine per method and path pattern; this module
parses requests with the proxy's own :class:`RequestParser`, answers them in
order on each connection (pipelining included) and turns every failure into
a JSON ``{"error": ...}`` answer. Operators send few requests, so each
connection runs one request at a time, in a task of its own; a slow handler
holds up its own connection only.

Failures and what they answer:

- no route for the path: 404; a route for the path but not the method: 405
  with ``allow``;
- :class:`AdminError` raised by a handler: its status;
- any other exception from a handler, or a response that cannot be encoded:
  500, logged with its traceback;
- a request the parser refuses (400, 413, 431, 505 ...) or one that does not
  arrive within ``header_timeout`` (408): that status, then the connection
  is closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from ..http.headers import HOP_BY_HOP, is_valid_name, is_valid_value
from ..http.parser import HttpError, HttpLimits, HttpRequest, RequestParser
from ..http.response import build_response
from .admin_routing import Router, split_path

__all__ = ["AdminError", "AdminHandler", "AdminRequest", "AdminResponse", "AdminServer"]

log = logging.getLogger("pitcher.admin")

_Headers = list[tuple[bytes, bytes]]

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_JSON = b"application/json"
_TEXT = b"text/plain; charset=utf-8"
_OCTETS = b"application/octet-stream"
# Admin answers describe the proxy at one instant; a cache in between must
# never replay an old /healthz or config.
_NO_STORE = (b"cache-control", b"no-store")
# Fields this server sets itself: a handler setting them too would send
# duplicated or contradictory fields.
_RESERVED_HEADERS = HOP_BY_HOP | {b"content-length", b"date", b"cache-control"}
# Pipelined requests queued beyond this pause reading until the queue drains,
# so a client cannot make the master buffer without bound.
_PIPELINE_HIGH = 16
# After a refusal the connection is half-closed and what the client still
# sends is read and dropped for a while, so that a reset does not destroy the
# refusal before the client has read it (RFC 9112 §9.6).
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 1 << 20


class AdminError(Exception):
    """Raised by a handler to answer ``status`` with ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        # Checked here so that a bad status fails inside the handler, as a 500
        # with its traceback, not later while the answer is written.
        if not isinstance(status, int) or not 400 <= status <= 599:
            raise ValueError(f"an admin error status must be in 400..599, not {status!r}")
        super().__init__(status, message)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return f"{self.status} {self.message}"


@dataclass(frozen=True, slots=True)
class AdminRequest:
    """One request as a handler sees it.

    ``path`` is the request path as sent, without the query and without a
    trailing slash (except for "/"); ``params`` holds the percent-decoded
    segments matched by ``{name}`` placeholders; ``query`` keeps the last value
    of a repeated key, and keys without a value ("?force" gives ""); ``client``
    is the peer's "host:port"; ``headers`` has lower-case names in the order
    received.
    """

    method: str
    path: str
    query: dict[str, str]
    params: dict[str, str]
    body: bytes
    client: str
    headers: tuple[tuple[str, str], ...] = ()

    def json(self) -> Any:
        """The body decoded as JSON; :class:`AdminError` 400 when it is not JSON."""
        try:
            return json.loads(self.body)
        except (ValueError, RecursionError):
            # ValueError also covers bytes that are not UTF-8; RecursionError
            # a document nested deeper than the decoder's stack allows.
            raise AdminError(400, "request body is not valid JSON") from None


@dataclass(frozen=True, slots=True)
class AdminResponse:
    """What a handler answers.

    A dict or list body is sent as JSON, a str as UTF-8 text, bytes as they
    are; a ``content-type`` in ``headers`` replaces the one chosen from the
    body's type. Fields the server sets itself (content-length, date,
    cache-control, connection and the other hop-by-hop ones) are refused.
    """

    status: int = 200
    body: bytes | str | dict[str, Any] | list[Any] = b""
    headers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        # Checked where the handler builds the response, so that the
        # traceback of the resulting 500 points at the handler.
        if not isinstance(self.status, int) or not 200 <= self.status <= 599:
            raise ValueError(f"status must be an int in 200..599, not {self.status!r}")
        if not isinstance(self.body, bytes | str | dict | list):
            raise TypeError(f"body must be bytes, str, dict or list, not {type(self.body)}")
        for name, value in self.headers:
            try:
                encoded_name = name.lower().encode("ascii")
                encoded_value = value.encode("latin-1")
            except UnicodeEncodeError:
                raise ValueError(f"header {name!r}: {value!r} is not encodable") from None
            if not is_valid_name(encoded_name) or encoded_name in _RESERVED_HEADERS:
                raise ValueError(f"header name {name!r} is invalid or set by the server")
            if not is_valid_value(encoded_value):
                raise ValueError(f"header value {value!r} of {name!r} is invalid")


AdminHandler = Callable[[AdminRequest], Awaitable[AdminResponse]]


# -- encoding answers -----------------------------------------------------------


def _render(response: AdminResponse) -> tuple[int, _Headers, bytes]:
    body = response.body
    content_type: bytes | None
    if isinstance(body, bytes):
        payload, content_type = body, (_OCTETS if body else None)
    elif isinstance(body, str):
        payload, content_type = body.encode(), _TEXT
    else:
        # allow_nan=False: NaN and Infinity are not JSON, and a client's parser
        # would refuse the whole document.
        payload, content_type = json.dumps(body, allow_nan=False).encode() + b"\n", _JSON
    headers = [(name.lower().encode(), value.encode("latin-1")) for name, value in response.headers]
    if content_type is not None and all(name != b"content-type" for name, _ in headers):
        headers.append((b"content-type", content_type))
    headers.append(_NO_STORE)
    return response.status, headers, payload


def _error(status: int, message: str) -> tuple[int, _Headers, bytes]:
    body = json.dumps({"error": message}).encode() + b"\n"
    return status, [(b"content-type", _JSON), _NO_STORE], body


# -- connections ----------------------------------------------------------------


class _AdminConnection(asyncio.Protocol):
    """One client connection: the parser feeds a queue, a task answers it in order.

    The task lives as long as the connection and is tracked by the server,
    which cancels it on stop(). When the client goes away during a handler
    the handler is left to finish (a half-done reload is worse than a wasted
    answer) and the answer is dropped.
    """

    __slots__ = (
        "busy",
        "client",
        "closed",
        "continue_sent",
        "eof",
        "lingered",
        "loop",
        "parser",
        "queue",
        "read_paused",
        "refused",
        "server",
        "timer",
        "transport",
        "wakeup",
        "writable",
    )

    def __init__(self, server: AdminServer, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop
        self.parser = RequestParser(server._limits)
        self.queue: deque[HttpRequest | HttpError] = deque()
        self.transport: asyncio.Transport | None = None
        self.client = "unknown"
        self.busy = False  # a handler is running
        self.closed = False  # nothing more is written or answered
        self.eof = False
        self.refused = False  # the parser has failed: later bytes are dropped
        self.continue_sent = False
        self.read_paused = False
        self.lingered = 0
        self.timer: asyncio.TimerHandle | None = None
        self.wakeup = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()

    # asyncio callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports do not derive
        # from asyncio.Transport, though they implement it.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            host = str(peer[0])
            self.client = f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
        server = self.server
        if server._stopping:
            # Accepted just before stop() closed the listener: stop() has
            # already swept the connections, so this one would be left open.
            self.closed = True
            self.transport.close()
            return
        server._connections.add(self)
        worker = self.loop.create_task(self._serve(), name=f"pitcher-admin {self.client}")
        server._workers.add(worker)
        worker.add_done_callback(server._workers.discard)
        self._arm(server._keepalive_timeout, self._close)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            self.lingered += len(data)
            if self.lingered > _LINGER_BYTES:
                self._close()
            return
        parser = self.parser
        was_in_request = parser.in_request
        queue = self.queue
        try:
            requests = parser.feed(data)
        except HttpError as error:
            self.refused = True
            self._cancel_timer()
            queue.extend(error.requests)
            queue.append(error)
            self.wakeup.set()
            return
        if requests:
            self.continue_sent = False
            queue.extend(requests)
            self.wakeup.set()
            if len(queue) >= _PIPELINE_HIGH:
                self._pause_reading()
        if queue or self.busy:
            self._cancel_timer()  # the worker re-arms when it runs out of work
        elif parser.in_request:
            if not was_in_request:
                self._arm(self.server._header_timeout, self._header_timed_out)
            self._send_continue()
        else:
            self._arm(self.server._keepalive_timeout, self._close)

    def eof_received(self) -> bool:
        self.eof = True
        # True keeps the write side open: a client that half-closes after
        # sending its requests still gets the answers (RFC 9112 §9.6).
        return bool(self.busy or self.queue)

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.queue.clear()
        self._cancel_timer()
        self.wakeup.set()
        self.writable.set()
        self.server._connections.discard(self)

    # answering --------------------------------------------------------------------

    async def _serve(self) -> None:
        try:
            await self._answer_in_order()
        except Exception:
            log.exception("admin connection %s failed", self.client)
            self._close()

    async def _answer_in_order(self) -> None:
        queue = self.queue
        server = self.server
        while True:
            while not queue:
                if self.closed:
                    return
                if self.eof:
                    self._close()
                    return
                self.wakeup.clear()
                await self.wakeup.wait()
            item = queue.popleft()
            if isinstance(item, HttpError):
                self._refuse(item)
                return
            self.busy = True
            try:
                status, headers, body = await server._respond(item, self.client)
            finally:
                self.busy = False
            if self.closed:
                return
            keep_alive = item.keep_alive and not server._stopping and not (self.eof and not queue)
            self._write(
                build_response(
                    status,
                    headers,
                    body,
                    keep_alive=keep_alive,
                    head=item.method == b"HEAD",
                    http10=item.version == "1.0",
                )
            )
            if not keep_alive:
                self._close()
                return
            await self.writable.wait()
            if not queue and not self.closed:
                self._went_idle()

    def _went_idle(self) -> None:
        self._resume_reading()
        if self.eof:
            return
        if self.parser.in_request:
            # The clock starts now, not at the request's first byte: those
            # bytes may have waited behind a slow answer to an earlier one.
            self._arm(self.server._header_timeout, self._header_timed_out)
            self._send_continue()
        else:
            self._arm(self.server._keepalive_timeout, self._close)

    def _header_timed_out(self) -> None:
        self.timer = None
        if self.closed or self.refused or self.busy or self.queue:
            return
        self.refused = True
        self.queue.append(HttpError(408, "request not received in time"))
        self.wakeup.set()

    def _refuse(self, error: HttpError) -> None:
        transport = self.transport
        assert transport is not None
        self._cancel_timer()
        self._write(build_response(*_error(error.status, error.reason), keep_alive=False))
        if self.eof or transport.is_closing() or not transport.can_write_eof():
            self._close()
            return
        transport.write_eof()
        self._resume_reading()  # to read and drop what the client still sends
        self._arm(_LINGER_SECONDS, self._close)

    def _send_continue(self) -> None:
        if self.parser.pending_expect_continue and not self.continue_sent:
            self.continue_sent = True
            self._write(_CONTINUE)

    # transport helpers --------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _close(self) -> None:
        self._cancel_timer()
        if not self.closed:
            self.closed = True
            self.wakeup.set()
            if self.transport is not None:
                self.transport.close()

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(delay, callback)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _pause_reading(self) -> None:
        transport = self.transport
        if not self.read_paused and transport is not None and not transport.is_closing():
            self.read_paused = True
            transport.pause_reading()

    def _resume_reading(self) -> None:
        transport = self.transport
        if self.read_paused and transport is not None and not transport.is_closing():
            self.read_paused = False
            transport.resume_reading()


# -- the server -----------------------------------------------------------------


class AdminServer:
    """The admin listener: routes registered with :meth:`route`, served from :meth:`start`.

    ``header_timeout`` bounds the time from a request's first byte to its last
    (body included: admin bodies are small); ``keepalive_timeout`` closes a
    connection that has been idle between requests that long.
    """

    def __init__(
        self,
        *,
        max_body_size: int = 65536,
        header_timeout: float = 5.0,
        keepalive_timeout: float = 60.0,
    ) -> None:
        if not header_timeout > 0 or not keepalive_timeout > 0:
            raise ValueError("header_timeout and keepalive_timeout must be positive")
        self._limits = HttpLimits(max_body_size=max_body_size)
        self._header_timeout = header_timeout
        self._keepalive_timeout = keepalive_timeout
        self._router = Router()
        self._server: asyncio.Server | None = None
        self._connections: set[_AdminConnection] = set()
        self._workers: set[asyncio.Task[None]] = set()
        self._stopping = False

    def route(self, method: str, pattern: str, handler: AdminHandler) -> None:
        """Serve ``method`` on ``pattern``; ``{name}`` matches one segment into ``params``.

        A GET route also answers HEAD (the handler sees ``method`` "HEAD"; the
        body it returns is measured, not sent). Raises ValueError for a
        malformed pattern or one already registered for ``method``.
        """
        self._router.add(method, pattern, handler)

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, *, sock: socket.socket | None = None
    ) -> None:
        """Listen on host:port, or on ``sock``, a listening socket handed over by a predecessor."""
        if self._server is not None:
            raise RuntimeError("the admin server is already started")
        loop = asyncio.get_running_loop()
        self._stopping = False
        if sock is not None:
            self._server = await loop.create_server(lambda: _AdminConnection(self, loop), sock=sock)
            return
        self._server = await loop.create_server(
            lambda: _AdminConnection(self, loop), host, port, reuse_address=True
        )

    @property
    def address(self) -> tuple[str, int]:
        """The first listening socket's host and port (the real one when 0 was asked)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the admin server is not listening")
        name = self._server.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    async def stop(self) -> None:
        """Stop listening, close every connection and cancel the handlers still running."""
        server = self._server
        if server is None:
            return
        self._server = None
        self._stopping = True
        server.close()
        for connection in list(self._connections):
            connection._close()
        # A handler may be what called stop(); it must not wait for itself.
        current = asyncio.current_task()
        workers = [worker for worker in self._workers if worker is not current]
        for worker in workers:
            worker.cancel()
        if workers:
            _, pending = await asyncio.wait(workers, timeout=1.0)
            if pending:
                log.warning("%d admin handlers ignored cancellation", len(pending))
        try:
            await asyncio.wait_for(server.wait_closed(), 1.0)
        except TimeoutError:
            log.warning("admin listener did not close within 1 s")

    async def _respond(self, request: HttpRequest, client: str) -> tuple[int, _Headers, bytes]:
        """Route one request and run its handler; never raises but for cancellation."""
        method = request.method.decode("ascii")
        path, segments = split_path(request.path)
        if segments is None:
            return _error(404, f"no such path: {path}")
        route, params, allowed = self._router.resolve(method, segments)
        if route is None:
            if not allowed:
                return _error(404, f"no such path: {path}")
            status, headers, body = _error(405, f"{method} is not allowed on {path}")
            headers.append((b"allow", ", ".join(allowed).encode()))
            return status, headers, body
        admin_request = AdminRequest(
            method,
            path,
            # Blank values kept: "?force" is a flag a handler must be able to see.
            dict(
                urllib.parse.parse_qsl(
                    request.query.decode("utf-8", "replace"), keep_blank_values=True
                )
            ),
            params,
            request.body,
            client,
            tuple(
                (name.decode("latin-1"), value.decode("latin-1")) for name, value in request.headers
            ),
        )
        try:
            response = await route.handler(admin_request)
            if not isinstance(response, AdminResponse):
                raise TypeError(f"handler returned {type(response).__name__}, not AdminResponse")
            return _render(response)
        except AdminError as error:
            return _error(error.status, error.message)
        except Exception:
            log.exception("admin handler for %s %s failed", method, path)
            return _error(500, "internal error")
