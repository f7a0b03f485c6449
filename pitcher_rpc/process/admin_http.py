"""The admin API's client connections: asyncio glue over the sans-IO HTTP connection.

:class:`AdminConnection` feeds what it reads to a
:class:`~pitcher_rpc.http.connection.ServerConnection`, runs the server's
handler for each request it is handed, in a task, and writes the answer.
Every HTTP rule (pipelining order, keep-alive, HTTP/1.0, HEAD,
100-continue, refusals with a lingering close, water marks, deadlines) is
the sans-IO connection's; this module only does what it is told with the
socket (the glue itself is :class:`~pitcher_rpc.proxy.glue.HttpGlue`, shared with
the proxy), and says how the admin differs: JSON refusals, a whole-request
deadline, and fixed body deadlines.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, cast

from ..http.connection import ServerConnection
from ..http.request import HttpRequest
from ..proxy.glue import HttpGlue

if TYPE_CHECKING:
    from .admin import AdminServer

__all__ = ["NO_STORE", "AdminAnswer", "AdminConnection", "json_error"]

log = logging.getLogger("pitcher.admin")

# An answer as the connection writes it: status, header lines (each ending in
# CRLF, without the framing fields), body.
AdminAnswer = tuple[int, bytes, bytes]

# Admin answers describe the proxy at one instant; a cache in between must
# never replay an old /healthz or config.
NO_STORE = b"cache-control: no-store\r\n"
# An admin body is a few hundred bytes of JSON from a tool on the same
# machine: a pause of seconds in one means a stuck or hostile client, and the
# master has better things to hold a connection for.
BODY_TIMEOUT = 2.0
BODY_DEADLINE = 10.0


def json_error(status: int, message: str, fields: bytes = b"") -> AdminAnswer:
    """``{"error": message}`` as JSON, with ``fields`` (header lines) added."""
    body = json.dumps({"error": message}).encode() + b"\n"
    return status, b"content-type: application/json\r\n" + NO_STORE + fields, body


def _json_refusal(status: int, reason: str) -> tuple[bytes, bytes]:
    # Refusals answer JSON with ``cache-control: no-store`` like every other admin answer.
    _, fields, body = json_error(status, reason)
    return fields, body


class AdminConnection(HttpGlue):
    """One client connection.

    Each request the HTTP connection hands out runs the server's handler in
    a task the server tracks (and cancels on stop()); the next one is handed
    out once it is answered. When the client goes away during a handler the
    handler is left to finish (a half-done reload is worse than a wasted
    answer) and the answer is dropped.
    """

    __slots__ = ("client", "server", "task")

    def __init__(self, server: AdminServer, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.server = server
        self.loop = loop
        # header_timeout bounds the whole request, body included (admin
        # bodies are small); within it a body may not pause for BODY_TIMEOUT,
        # and BODY_DEADLINE holds even with a long header_timeout.
        self.http = ServerConnection(
            server.limits,
            header_timeout=server.header_timeout,
            keepalive_timeout=server.keepalive_timeout,
            request_timeout=server.header_timeout,
            # No request limit: the limit exists to spread a client's load over
            # the proxy's workers, and the admin API has one process.
            keepalive_requests=0,
            error_answer=_json_refusal,
            now=loop.time(),
        )
        self.http.body_timeout = BODY_TIMEOUT
        self.http.body_deadline = BODY_DEADLINE
        self.client = "unknown"
        self.task: asyncio.Task[AdminAnswer] | None = None  # the handler running

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
        status, fields, body = task.result()
        # The deadlines count from this answer, not from bytes that waited
        # behind a slow handler: a connection that was busy was not idle.
        chunks = http.respond(status, fields, body, self.loop.time())
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.writelines(chunks)
        self._advance()

    def _advance(self) -> None:
        """Start the next request the HTTP connection hands out, then act on its state."""
        # While the client does not read, the next request waits: the master
        # holds at most one answer per connection beyond the transport's mark.
        if self.task is None and not self.closed and not self.http.write_blocked:
            request = self.http.next_request()
            if request is not None:
                self._begin(request)
        self._act()
