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

Streamed bodies (docs/streaming.md): a request body chunked or over
:data:`STREAM_BODY_OVER` bytes is handed to its exchange as it arrives
(reading pauses while the node's credit is spent); a streamed answer is
written piece by piece as it comes (``writelines``: the framing around a
piece, never a copy of it), and the node gets credit back only for what
the client's socket took: while the socket is paused (``pause_writing``)
the credit is owed, so a slow client slows the node, not the proxy's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import TYPE_CHECKING

from ..http.connection import ServerConnection
from ..http.parser import HttpRequest
from ..http.response import error_response
from .exchange import CUT, Exchange
from .glue import HttpGlue, Refusal, refusal_of

if TYPE_CHECKING:
    from transports.bodies import IncomingBody
    from transports.errors import TransportError

    from .server import ProxyServer
    from .snapshot import Snapshot

# A request body longer than this, or chunked, is streamed to the node as it
# arrives rather than gathered first. Below it, a body comes in one or two
# reads (a socket read takes up to 256 KiB, the kernel's receive buffer holds
# about this much at once) and the whole-frame path costs one join; above
# it, gathering would hold the body in memory per request and delay the node
# until the last byte, and the streamed path's per-DATA cost is small beside
# the bytes. The same size bounds the first bytes carried in the head frame.
STREAM_BODY_OVER = 64 * 1024


class HttpConnection(HttpGlue):
    """One client connection.

    What modules may read: ``client_ip`` (bytes; ``b"unix"`` on a Unix
    socket) and ``client_text`` ("ip:port").
    """

    __slots__ = (
        "_advancing",
        "_owed",
        "answered",
        "client_ip",
        "client_text",
        "current",
        "incoming",
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
            stream_over=STREAM_BODY_OVER,
        )
        self.http.draining = server.draining
        self.current: Exchange | None = None
        self.client_ip = b"unknown"
        self.client_text = ""
        self._advancing = False
        # A request was answered: idle now means idle between two requests.
        self.answered = False
        # A streamed answer's body being written, and the credit not yet
        # returned for it because the client's socket was paused.
        self.incoming: IncomingBody | None = None
        self._owed = 0

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
            if not http.waiting and http.stream is None:
                return  # the common case: one request, nothing queued behind it
        elif http.stream is not None and self.current is not None:
            self.current.pump_body()  # more of a streamed body
        self._advance()

    def eof_received(self) -> bool:
        keep_open = super().eof_received()
        self._body_news()
        return keep_open

    def resume_writing(self) -> None:
        owed = self._owed
        if owed:
            # The client's socket took what it was given: the node may send more.
            self._owed = 0
            incoming = self.incoming
            if incoming is not None:
                incoming.consumed(owed)
        super().resume_writing()

    def check_timeouts(self, now: float) -> None:
        super().check_timeouts(now)
        self._body_news()

    def _body_news(self) -> None:
        """A streamed body may have failed (a deadline, the client's close): tell its exchange."""
        stream = self.http.stream
        if stream is not None and stream.error is not None and self.current is not None:
            self.current.pump_body()

    def connection_lost(self, exc: Exception | None) -> None:
        current = self.current
        if current is not None and self.incoming is not None:
            self._cut_stream(current, None, False)  # the client went away mid-answer
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

    # streamed request bodies ------------------------------------------------------------

    def body_wanted(self) -> None:
        """The exchange passes the streamed body on: a ``100 Continue`` if the client waits."""
        interim = self.http.want_body()
        transport = self.transport
        if interim and transport is not None and not self.closed:
            transport.write(interim)

    def hold_body(self) -> None:
        """The node's credit is spent: stop reading the body until :meth:`release_body`."""
        self.http.pause_body(self.loop.time())
        self._sync_reading()

    def release_body(self, exchange: Exchange) -> None:
        """The node can take more: pass on what is held and read again."""
        if exchange is not self.current or self.closed:
            return
        self.http.resume_body(self.loop.time())
        exchange.pump_body()
        self._sync_reading()

    # streamed answers -------------------------------------------------------------------

    def stream_response(
        self,
        exchange: Exchange,
        status: int,
        fields: bytes,
        first: bytes,
        body_size: int | None,
        incoming: IncomingBody,
    ) -> None:
        """Write a streamed answer's head, then its body as it comes (see the module doc)."""
        if exchange is not self.current or self.closed:
            incoming.abort()
            exchange.stream_over(None, CUT, False)  # the client has gone
            return
        http = self.http
        head = http.respond_head(status, fields, body_size, self.loop.time())
        exchange.status = status
        exchange.response_bytes = len(head)
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(head)
        if not http.response_open:
            incoming.abort()  # HEAD, 204, 304: no body goes to the client
            exchange.stream_over(None, "", False)
            self._end_stream(exchange, http.response_end(self.loop.time()) or [], "")
            return
        self.incoming = incoming
        self._owed = 0
        # The head's first bytes count against no window: no credit for them.
        if first and not self._stream_piece(exchange, first):
            return
        incoming.start(self._on_stream_data, self._on_stream_end, self._on_stream_error)

    def _stream_piece(self, exchange: Exchange, data: bytes) -> bool:
        """Write one piece of a streamed answer's body; False if it broke the framing (cut)."""
        chunks = self.http.response_data(data)
        if chunks is None:
            self._cut_stream(exchange, None, True)  # longer than the length the node gave
            return False
        if chunks:
            transport = self.transport
            if transport is not None:
                transport.writelines(chunks)
        return True

    def _on_stream_data(self, data: bytes) -> None:
        exchange = self.current
        incoming = self.incoming
        if exchange is None or incoming is None:
            return
        if not self._stream_piece(exchange, data):
            return
        if self.http.write_blocked:
            self._owed += len(data)  # returned when the client's socket drains
        else:
            incoming.consumed(len(data))

    def _on_stream_end(self) -> None:
        exchange = self.current
        if exchange is None or self.incoming is None:
            return
        self.incoming = None
        tail = self.http.response_end(self.loop.time())
        if tail is None:
            self._cut_stream(exchange, None, True)  # shorter than the length the node gave
            return
        exchange.stream_over(None, "", False)
        self._end_stream(exchange, tail, "")

    def _on_stream_error(self, error: TransportError) -> None:
        exchange = self.current
        if exchange is None or self.incoming is None:
            return
        self._cut_stream(exchange, error, True)

    def _cut_stream(
        self, exchange: Exchange, error: TransportError | None, node_fault: bool
    ) -> None:
        """The answer cannot be completed: the client must not take it for a whole one.

        ``node_fault``: the node cut it (``error``) or broke its length; else
        the client went away.
        """
        incoming = self.incoming
        self.incoming = None
        if incoming is not None and error is None:
            incoming.abort()
        exchange.stream_over(error, CUT, node_fault)
        self.http.response_cut()
        self._end_stream(exchange, [], CUT)

    def _end_stream(self, exchange: Exchange, tail: list[bytes], failure: str) -> None:
        """A streamed answer is over (whole or cut): account for it, then go on or close."""
        self.current = None
        self.server.requests_served += 1
        self.answered = True
        http = self.http
        transport = self.transport
        if tail and transport is not None and not transport.is_closing():
            transport.writelines(tail)
        exchange.response_bytes += http.response_sent
        exchange.failure = failure or exchange.failure
        finished = exchange.chains.request_finish
        if finished:
            exchange.finish_now()
            exchange.snapshot.modules.run(finished, exchange)
        if http.must_close:
            self.close()
        else:
            self._advance()

    def refused(self, answer: bytes) -> None:
        self.server.report_refusal(refusal_of(answer, self.client_ip, self.http.parser))

    def close(self) -> None:
        if self.closed:
            return
        current = self.current
        if current is not None and self.incoming is not None:
            # The client went away in the middle of a streamed answer.
            self._cut_stream(current, None, False)
            return  # _cut_stream closed the connection
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
