"""The admin API's client connections: asyncio glue over the sans-IO HTTP connection.

:class:`AdminConnection` feeds what it reads to a
:class:`~pitcher_rpc.http.connection.ServerConnection`, runs the server's
handler for each request it is handed, in a task, and writes the answer.
Every HTTP rule (pipelining order, keep-alive, HTTP/1.0, HEAD,
100-continue, refusals with a lingering close, water marks, deadlines) is
the sans-IO connection's; this module only does what it is told with the
socket, and says how the admin differs (:class:`AdminHttp`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, cast

from ..http.connection import ServerConnection
from ..http.request import HttpError, HttpRequest
from ..http.response import date_line, status_line

if TYPE_CHECKING:
    from .admin import AdminServer

__all__ = ["NO_STORE", "AdminAnswer", "AdminConnection", "AdminHttp", "json_error"]

log = logging.getLogger("pitcher.admin")

# An answer as the connection writes it: status, header lines (each ending in
# CRLF, without the framing fields), body.
AdminAnswer = tuple[int, bytes, bytes]

# Admin answers describe the proxy at one instant; a cache in between must
# never replay an old /healthz or config.
NO_STORE = b"cache-control: no-store\r\n"


def json_error(status: int, message: str, fields: bytes = b"") -> AdminAnswer:
    """``{"error": message}`` as JSON, with ``fields`` (header lines) added."""
    body = json.dumps({"error": message}).encode() + b"\n"
    return status, b"content-type: application/json\r\n" + NO_STORE + fields, body


class AdminHttp(ServerConnection):
    """The sans-IO connection with the admin's two differences.

    Refusals answer JSON with ``cache-control: no-store`` like every other
    admin answer, and ``header_timeout`` bounds the whole request, body
    included (admin bodies are small), not only the gaps in a body. Both
    reach into ServerConnection's refusal path, for want of a hook there.
    """

    __slots__ = ()

    def _refuse(self, error: HttpError) -> None:
        super()._refuse(error)
        if error.status:  # 0 is the client's end of stream: nothing to answer
            status, fields, body = json_error(error.status, error.reason)
            self.outgoing[-1] = (
                status_line(status)
                + fields
                + date_line()
                + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
                + body
            )

    def check_timeouts(self, now: float) -> None:
        if (
            self.parser.in_request
            and now - self.request_started > self.header_timeout
            and self.active is None
            and not (self.waiting or self.linger_until or self.half_close or self.must_close)
        ):
            self._refuse(HttpError(408, "request not received in time"))
            return
        super().check_timeouts(now)


class AdminConnection(asyncio.Protocol):
    """One client connection.

    Each request the HTTP connection hands out runs the server's handler in
    a task the server tracks (and cancels on stop()); the next one is handed
    out once it is answered. When the client goes away during a handler the
    handler is left to finish (a half-done reload is worse than a wasted
    answer) and the answer is dropped.
    """

    __slots__ = (
        "client",
        "closed",
        "http",
        "loop",
        "read_paused",
        "server",
        "task",
        "transport",
        "write_paused",
    )

    def __init__(self, server: AdminServer, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop
        self.http = AdminHttp(
            server.limits,
            header_timeout=server.header_timeout,
            keepalive_timeout=server.keepalive_timeout,
            now=loop.time(),
        )
        self.transport: asyncio.Transport | None = None
        self.client = "unknown"
        self.task: asyncio.Task[AdminAnswer] | None = None  # the handler running
        self.closed = False  # nothing more is written or answered
        self.read_paused = False
        self.write_paused = False

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
        if server.stopping:
            # Accepted just before stop() closed the listener: stop() has
            # already swept the connections, so this one would be left open.
            self.closed = True
            self.transport.close()
            return
        server.connections.add(self)
        server.schedule_sweep()

    def data_received(self, data: bytes) -> None:
        request = self.http.receive_data(data, self.loop.time())
        if request is not None:
            self._begin(request)
        self._advance()

    def eof_received(self) -> bool:
        # True keeps the write side open: a client that half-closes after
        # sending its requests still gets the answers (RFC 9112 §9.6).
        keep_open = self.http.receive_eof()
        if keep_open:
            self._advance()
        return keep_open

    def pause_writing(self) -> None:
        self.write_paused = True
        self.http.pause_writing()
        self._sync_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.http.resume_writing()
        self._advance()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.http.abandon()
        self.server.connections.discard(self)

    # answering --------------------------------------------------------------------

    def _begin(self, request: HttpRequest) -> None:
        server = self.server
        task = self.loop.create_task(
            server.respond(request, self.client), name=f"pitcher-admin {self.client}"
        )
        self.task = task
        server.handlers.add(task)
        task.add_done_callback(self._answered)

    def _answered(self, task: asyncio.Task[AdminAnswer]) -> None:
        self.server.handlers.discard(task)
        self.task = None
        if task.cancelled():
            self.close()  # by stop(), or a handler cancelled from inside: no answer comes
            return
        error = task.exception()
        if error is not None:
            # The server's respond() answers every handler failure: this is a bug in it.
            log.error("admin connection %s failed", self.client, exc_info=error)
            self.close()
            return
        if self.closed:
            return
        http = self.http
        if self.server.stopping:
            http.draining = True
        chunks = http.respond(*task.result())
        # The deadlines count from this answer, not from bytes that waited
        # behind a slow handler: a connection that was busy was not idle.
        now = self.loop.time()
        http.last_activity = now
        if http.parser.in_request:
            http.request_started = now
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.writelines(chunks)
        self._advance()

    def _advance(self) -> None:
        """Start the next request the HTTP connection hands out, then act on its state."""
        # While the client does not read, the next request waits: the master
        # holds at most one answer per connection beyond the transport's mark.
        if self.task is None and not self.closed and not self.write_paused:
            request = self.http.next_request()
            if request is not None:
                self._begin(request)
        self._act()

    def _act(self) -> None:
        """Do what the HTTP connection asks: write, half-close and linger, close, (un)pause."""
        transport = self.transport
        if self.closed or transport is None:
            return
        http = self.http
        if http.outgoing:
            transport.writelines(http.outgoing)
            http.outgoing.clear()
        if http.must_close:
            self.close()
            return
        if http.half_close and not http.linger_until:
            if transport.is_closing() or not transport.can_write_eof():
                self.close()
                return
            transport.write_eof()
            http.lingering(self.loop.time())
        self._sync_reading()

    def _sync_reading(self) -> None:
        transport = self.transport
        if transport is None or self.closed or transport.is_closing():
            return
        if self.read_paused:
            if self.http.can_resume_read():
                self.read_paused = False
                transport.resume_reading()
        elif not self.http.wants_read:
            self.read_paused = True
            transport.pause_reading()

    def check_timeouts(self, now: float) -> None:
        http = self.http
        http.check_timeouts(now)
        if http.outgoing or http.must_close or (http.half_close and not http.linger_until):
            self._act()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
