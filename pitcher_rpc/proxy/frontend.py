"""The proxy's client connections: asyncio glue over the sans-IO HTTP connection.

:class:`HttpConnection` feeds what it reads to
:class:`~pitcher_rpc.http.connection.ServerConnection`, starts an
:class:`~.exchange.Exchange` for each request it is handed, and writes the
answers. Every HTTP rule (pipelining order, keep-alive, 100-continue,
refusals, deadlines) is the sans-IO connection's; this class only does what
it is told with the socket.

A refusal (by the parser, a deadline, or a module at ACCEPT) makes no
exchange; it is reported to the server as a :class:`~.glue.Refusal`, which
passes it on to the modules that count and log refusals
(``request_refused``). Each connection also counts against the connection
cap (:meth:`ProxyServer.at_connection_cap`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import TYPE_CHECKING

from ..http.connection import ServerConnection
from ..http.parser import HttpRequest
from ..http.response import error_response
from .exchange import Exchange
from .glue import HttpGlue, Refusal, refusal_of

if TYPE_CHECKING:
    from .server import ProxyServer
    from .snapshot import Snapshot


class HttpConnection(HttpGlue):
    """One client connection.

    What modules may read: ``client_ip`` (bytes; ``b"unix"`` on a Unix
    socket) and ``client_text`` ("ip:port").
    """

    __slots__ = (
        "_advancing",
        "answered",
        "client_ip",
        "client_text",
        "current",
        "server",
        "watch",
    )

    def __init__(self, server: ProxyServer) -> None:
        super().__init__()
        self.server = server
        self.loop = server.loop
        snapshot = server.snapshot
        # The watch set the parser flags requests with; see Exchange._encode.
        self.watch = snapshot.watch
        self.http = ServerConnection(
            snapshot.limits,
            self.watch,
            header_timeout=snapshot.header_timeout,
            keepalive_timeout=snapshot.keepalive_timeout,
            # Fixed for the connection's life: a reload changes it for the
            # connections accepted after it (nginx does the same).
            keepalive_requests=snapshot.config.server.keepalive_requests,
            now=self.loop.time(),
        )
        self.http.draining = server.draining
        self.current: Exchange | None = None
        self.client_ip = b"unknown"
        self.client_text = ""
        self._advancing = False
        # A request was answered: idle now means idle between two requests.
        self.answered = False

    # asyncio callbacks -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.client_ip = str(peer[0]).encode()
            self.client_text = f"{peer[0]}:{peer[1]}"
        else:
            self.client_ip = b"unix"
            self.client_text = "unix"
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        server = self.server
        connections = server.connections
        connections.add(self)
        count = len(connections)
        if count >= server.connection_limit:
            # The last place taken, or one beyond it: parked unread until one frees.
            server.at_connection_cap(self)
        if count > server.peak_connections:
            server.peak_connections = count
        modules = server.snapshot.modules
        accept = modules.default.on_accept
        if accept:
            answer = modules.run(accept, self)
            if answer is not None:
                self.http.must_close = True
                message = answer.message or "refused"
                response = error_response(answer.status, message)
                transport.write(response)  # type: ignore[attr-defined]
                self.close()
                server.report_refusal(
                    Refusal(
                        answer.status,
                        "refused_at_accept",
                        message,
                        self.client_ip,
                        response_bytes=len(response),
                    )
                )

    def data_received(self, data: bytes) -> None:
        http = self.http
        request = http.receive_data(data, self.loop.time())
        if request is not None:
            self._begin(request)
            if not http.waiting:
                return  # the common case: one request, nothing queued behind it
        self._advance()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.current is not None:
            self.current.abandon()
            self.current = None
        self.http.abandon()
        server = self.server
        server.connections.discard(self)
        if server.accept_paused:
            server.connection_gone()
        modules = server.snapshot.modules
        if modules.default.on_finish:
            modules.run(modules.default.on_finish, self)

    # request flow ----------------------------------------------------------------------

    def _begin(self, request: HttpRequest) -> None:
        exchange = Exchange(self, request, self.server.snapshot)
        self.current = exchange
        exchange.start()  # may finish at once (a 404, an early answer)

    def _advance(self) -> None:
        """Start what the HTTP connection hands out, in order, then act on its state."""
        if self._advancing:
            return  # inside the loop below: a request that finished synchronously
        self._advancing = True
        try:
            http = self.http
            while self.current is None and not self.closed:
                request = http.next_request()
                if request is None:
                    break
                self._begin(request)
            self._act()
        finally:
            self._advancing = False

    def finish(self, exchange: Exchange, status: int, fields: bytes, body: bytes) -> None:
        """Write an exchange's answer; go on to the next request or close."""
        if exchange is not self.current or self.closed:
            return
        self.current = None
        self.server.requests_served += 1
        self.answered = True
        http = self.http
        chunks = http.respond(status, fields, body, self.loop.time())
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if len(chunks) == 1:
                transport.write(chunks[0])
                exchange.response_bytes = len(chunks[0])
            else:
                transport.writelines(chunks)
                exchange.response_bytes = len(chunks[0]) + len(chunks[1])
        exchange.status = status
        finished = exchange.chains.request_finish
        if finished:
            exchange.finish_now()
            exchange.snapshot.modules.run(finished, exchange)
        if http.must_close:
            self.close()
        elif http.waiting or self.read_paused or http.parser.in_request or http.half_close:
            # half_close: the last answer, with requests behind it: linger.
            self._advance()

    def refused(self, answer: bytes) -> None:
        self.server.report_refusal(refusal_of(answer, self.client_ip, self.http.parser))

    def close(self) -> None:
        if self.closed:
            return
        current = self.current
        if current is not None:
            self.current = None
            current.abandon()
        super().close()

    # the sweep -----------------------------------------------------------------------

    def sweep(self, now: float, snapshot: Snapshot) -> None:
        """The periodic sweep: a reload's new timeouts apply to connections already open.

        Not ``keepalive_requests``: a connection keeps the limit it was accepted with.
        """
        http = self.http
        http.header_timeout = snapshot.header_timeout
        http.keepalive_timeout = snapshot.keepalive_timeout
        http.body_timeout = snapshot.limits.body_timeout
        http.body_deadline = snapshot.limits.body_deadline
        self.check_timeouts(now)

    def drain(self) -> None:
        """The proxy is draining: the next answer says ``connection: close``."""
        self.http.draining = True

    @property
    def idle_between_requests(self) -> bool:
        """Open, a request answered, nothing running, waiting or arriving: may close for room."""
        return (
            self.answered
            and self.current is None
            and not self.closed
            and not self.http.busy
            and not self.http.half_close
        )

    def close_if_idle(self, now: float, quiet_for: float) -> None:
        """Close if no request is running or arriving, and none came for ``quiet_for`` seconds."""
        if self.current is None and self.http.close_if_idle(now, quiet_for):
            self.close()
