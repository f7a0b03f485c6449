"""One HTTP request forwarded to a node and its answer written back.

An :class:`Exchange` is driven by callbacks, not by a task or a future: the
request is encoded and handed to a node's client with the exchange itself as
the receiver, and the client calls it back when the answer (or an error) is
there. Making no task, future or timer per request saves several
microseconds, a large share of the time a request spends in the proxy.

Who the client is (``client_ip``, what modules, logs and the frame's
``client`` field see) is the connection's peer, unless the peer is one of
``[server] trusted_proxies``: then the client is read from X-Forwarded-For as
nginx's ``real_ip_recursive on`` reads it (:func:`~..modules.base.real_client`),
and the frame's ``client`` is that address with port 0 (unknown).
Only a request that carries X-Forwarded-For pays for that; with no trusted
proxies nothing is parsed. The X-Forwarded-For sent on is the one received
with the peer appended (nginx's ``$proxy_add_x_forwarded_for``), trusted peer
or not: the chain stays the full record of hops for a backend that wants it,
its last element is always the address the proxy saw, and the client the
proxy believes travels apart, in the frame's ``client`` field, which no
client can forge. (Envoy and Caddy drop an untrusted chain instead; that
would lose the hops in front of a load balancer someone forgot to list.)

After a node's fault a request is retried (``retries`` extra attempts, on
another node if there is one, else on the same node) when it never reached
a handler, or when its method is idempotent for the route. A connection
closed under it (the node died, or broke the protocol, which fails every
call on the shared connection) is retried on the next loop turn, so that the
carrier has stopped using that connection and the retry takes a fresh one.
A node at its in-flight limit (``TOO_MANY_IN_FLIGHT``) did not start the
call either, but is busy rather than broken: the retry goes only to a node
not tried yet, with none the client gets 503 and ``Retry-After: 1``, and the
node's health counts nothing.

Streamed bodies (docs/streaming.md). A request handed out at its head (its
body chunked or over the connection's threshold) goes to the node as a head
with MORE and its first bytes, then the rest through the carrier's
:class:`~transports.bodies.OutgoingBody` as it arrives; reading from the
client stops while the node's credit is spent. A carrier without streamed
bodies (UDP) gets the body gathered and sent whole. Once a body byte has been
written after the head the request is never retried: the node may have
acted on it. Every call may be answered with a streamed response
(``on_response_head``): the client connection writes it as it comes and
returns credit only for what the client's socket took. The route's
``timeout`` of a streamed upload counts from the body's last DATA: before
that the call has no deadline while the client is awaited (its
``body_timeout`` bounds that) and the timeout between two pieces the node
accepts while its credit is spent (``_body_moved``). The node's health
and its in-flight count take a streamed answer's outcome at its end: a
body cut midway is the node's failure, not a success.
"""

from __future__ import annotations

import logging
import re
import time
from typing import TYPE_CHECKING, Any, Final

from transports.errors import (
    CallError,
    Closed,
    ConnectError,
    ConnectionLost,
    DeadlineExceeded,
    ErrorCode,
    Overloaded,
    Rejected,
    RemoteError,
    RequestTooLarge,
    TransportError,
)

from ..codec import (
    BadPayload,
    ResponseMessage,
    decode_response,
    decode_response_head,
    encode_request,
)
from ..http.headers import (
    InvalidHeader,
    forward_request_headers,
    response_fields,
    response_headers,
)
from ..http.parser import HttpRequest
from ..http.request import BodyStream, HttpError
from ..http.response import error_body
from ..logs import RateLimitedLog
from ..modules.base import Record, real_client, trusted_proxies
from .glue import refusal_reason
from .routing import normalize_path

if TYPE_CHECKING:
    from transports.bodies import IncomingBody, OutgoingBody

    from .server import HttpConnection
    from .snapshot import Route, Snapshot
    from .upstream import Node

log: Final = logging.getLogger("pitcher.proxy")
# This process's warnings about failed requests: at most one a second per node and kind.
WARNINGS: Final = RateLimitedLog(log, flush_at_exit=True)

# Final: compiled, a C static rather than a look-up in the module's dict.
_perf_counter: Final = time.perf_counter
_colon_join: Final = b": ".join
_FORWARDED_NAMES: Final = [b"x-forwarded-for", b"x-forwarded-proto"]
_ERROR_TYPE: Final = b"content-type: text/plain; charset=utf-8\r\n"
_FORWARDED_FOR: Final = b"x-forwarded-for"
# A streamed call's deadline while it waits for the client's body, not the node.
_NO_DEADLINE: Final = float("inf")

# What a node sends instead of an answer over the frame limit (docs/wire.md,
# section 5: a per-request ERROR, INTERNAL, "response of N bytes exceeds the
# frame limit of M"; UDP says "datagram limit"), and what a carrier says when
# a node sent such a frame anyway (the connection is closed: every call on it fails).
_ANSWER_TOO_LARGE = re.compile(r"response of (\d+) bytes.* exceeds the (\w+) limit of (\d+)")
_FRAME_TOO_LARGE = re.compile(r"frame of (\d+) bytes exceeds the limit of (\d+)")
_SETTING = " ([upstream] max_frame_size)"

# The status of a request whose client went away before the answer (nginx's).
CLIENT_CLOSED: Final = 499
# The most of a streamed request body's first bytes sent in its head frame
# (docs/wire.md: they count against no window, only against the node's frame
# limit). The same as the threshold below which a body is not streamed at
# all (frontend.STREAM_BODY_OVER): any node takes a whole request that large.
HEAD_BODY_MAX: Final = 64 * 1024
# Record.failure of an answer whose streamed body was cut midway (by the node,
# a length that did not hold, or the client going away).
CUT: Final = "cut"


def _failure_kind(error: TransportError) -> str | None:
    """How a transport error counts for the node's health; None: not the node's doing."""
    if isinstance(error, ConnectError):
        return "connect"
    if isinstance(error, DeadlineExceeded):
        return "timeout"
    if isinstance(error, Overloaded):
        # At its in-flight limit: counted, but busy is not broken (Node.record
        # keeps it out of health: ejecting it would only load the others more).
        return "overloaded"
    if isinstance(error, Rejected | Closed | RequestTooLarge):
        # A draining node, our own shutdown, a request too large: no fault of the node.
        return None
    if isinstance(error, RemoteError):
        return "error"
    return "reset"


def _failure_of(error: TransportError) -> str:
    """The Record.failure a transport error ends a request with (see FAILURES)."""
    if isinstance(error, DeadlineExceeded):
        return "timeout"
    if isinstance(error, ConnectError):
        return "connect"
    if isinstance(error, Overloaded):
        return "overloaded"
    if isinstance(error, Rejected):
        return "rejected"
    if isinstance(error, RequestTooLarge):
        return "too_large"
    if isinstance(error, Closed):
        return "shutdown"
    if isinstance(error, RemoteError):
        return "too_large" if answer_too_large(error, 0) else "error"
    # A lost connection; one a node closed by sending a frame over the limit is its answer's size.
    return "too_large" if _FRAME_TOO_LARGE.search(str(error)) else "reset"


def answer_too_large(error: RemoteError, configured: int) -> str:
    """What the client is told when a node's answer was over the frame limit; "" if not that.

    ``configured`` is ``[upstream] max_frame_size``: named when it is the limit met.
    """
    if error.code == ErrorCode.FRAME_TOO_LARGE:
        return f"the backend's answer is over the frame limit of {configured} bytes{_SETTING}"
    if error.code != ErrorCode.INTERNAL:
        return ""
    found = _ANSWER_TOO_LARGE.search(error.remote_message)
    if found is None:
        return ""
    size, kind, limit = found.groups()
    setting = _SETTING if int(limit) == configured else ""
    return (
        f"the backend's answer of {size} bytes is over the {kind} limit of {limit} bytes{setting}"
    )


class Exchange(Record["Route", "Node", "HttpConnection"]):
    """One request's way through the proxy.

    What modules may read and write is its :class:`Record` part. The
    exchange answers; the client connection decides what the answer's
    framing is and when the request is over.
    """

    __slots__ = (
        "calling",
        "chains",
        "deadline",
        "gathered",
        "idempotent",
        "incoming",
        "outgoing",
        "path",
        "payload",
        "snapshot",
        "timed",
        "timeout",
        "tried",
    )

    def __init__(self, connection: HttpConnection, request: HttpRequest, snapshot: Snapshot):
        self.connection = connection
        self.client_ip = connection.client_ip
        self.request = request
        self.snapshot = snapshot
        modules = snapshot.modules
        self.timed = timed = modules.timed
        self.started = _perf_counter() if timed else 0.0
        # The module chains this request runs: the default ones until routed.
        self.chains = modules.default
        # Header changes a module asks for (see HeaderEdits); None for none.
        self.edits = None
        self.status = 0
        self.idempotent = False
        self.node = None
        # The nodes tried before the current one, for a retry to avoid them.
        self.tried: tuple[Node, ...] = ()
        self.attempts = 0
        # A call to a node whose health is watched is outstanding.
        self.calling = False
        self.route = None
        self.payload = b""
        self.path = b""
        # Set by the request_id module: the id, the header that carries it to
        # the backend, and whether the client gets it back.
        self.request_id = b""
        self.id_header = b""
        self.echo_id = False
        self.deadline = 0.0
        self.backend_started = 0.0
        self.backend_ended = 0.0
        self.finished = 0.0
        self.response_bytes = 0
        # Per-request state modules keep, by module name; None until one does.
        self.module_state = None
        # Why no backend answered (Record.failure); "" while none failed.
        self.failure = ""
        # A streamed request body's way to the node, or its pieces gathered
        # for a carrier that takes whole requests only; a streamed answer's body.
        self.outgoing: OutgoingBody | None = None
        self.gathered: list[bytes] | None = None
        self.incoming: IncomingBody | None = None
        # The route's timeout: the idle limit between two DATA of a streamed answer.
        self.timeout = 0.0

    # start -----------------------------------------------------------------------------

    def start(self) -> None:
        request = self.request
        self.path = path = normalize_path(request.path)
        if request.watched:
            # Only a request with a header worth a look can carry X-Forwarded-For.
            self._find_client()
        modules = self.snapshot.modules
        if self.chains.before_cluster and self._answered(self.chains.before_cluster):
            return
        route = self.snapshot.router.match(request.host, path)
        if route is None:
            self.fail(404, "no route for this host and path")
            return
        self.route = route
        self.chains = chains = modules.for_route(route.name)
        if chains.after_cluster and self._answered(chains.after_cluster):
            return
        self.idempotent = request.method in route.idempotent_methods
        if not route.cluster.nodes:
            self.fail(503, f"cluster {route.cluster.name!r} has no nodes", 0, "overloaded")
            return
        self.timeout = route.timeout
        self.deadline = self.connection.loop.time() + route.timeout
        stream = request.body_stream
        if stream is None:
            self.payload = self._encode(route, request.body, -1)
            self._send()
            return
        if stream.error is not None:
            self._body_refused(stream.error)
            return
        if not all(getattr(n.client, "supports_streaming", False) for n in route.cluster.nodes):
            # A carrier of whole frames (UDP) may take it: the body is gathered, then sent.
            self.gathered = []
            self.connection.body_wanted()
            self.pump_body()
            return
        size = request.content_length
        self.payload = self._encode(route, _first_bytes(stream), -1 if size is None else size)
        self._send()

    def _find_client(self) -> None:
        """If the peer is a trusted proxy, the client it forwards for becomes ``client_ip``."""
        request = self.request
        names = request.names
        if _FORWARDED_FOR not in names:
            return
        trusted = trusted_proxies(self.snapshot.config.server.trusted_proxies)
        if trusted is None:
            return
        peer = self.connection.client_ip
        if not trusted.holds(peer):
            return
        values = request.values
        chain = b",".join(
            [values[index] for index, name in enumerate(names) if name == _FORWARDED_FOR]
        )
        self.client_ip = real_client(peer, chain, trusted)

    def _encode(self, route: Route, body: bytes, body_size: int) -> bytes:
        request = self.request
        connection = self.connection
        client_ip = connection.client_ip
        if not request.watched and connection.watch is self.snapshot.watch:
            # No header to drop, rewrite or read: the common case, two list copies in C.
            names = request.names + _FORWARDED_NAMES
            values = [*request.values, client_ip, connection.server.forwarded_proto]
        else:
            names, values, forwarded_for = forward_request_headers(
                request.names, request.values, self.id_header if self.request_id else None
            )
            names += _FORWARDED_NAMES
            values += (
                forwarded_for + b", " + client_ip if forwarded_for else client_ip,
                connection.server.forwarded_proto,
            )
        edits = self.edits
        if edits is not None and edits.request:
            names, values = edits.request.apply(names, values)
        if self.request_id:
            names.append(self.id_header)
            values.append(self.request_id)
        path = self.path
        if route.strip_prefix:
            path = b"/" + path[len(route.prefix_bytes) :].lstrip(b"/")
        # The peer's "ip:port", or the client a trusted proxy named, with port 0:
        # its port is not known, and the field's form stays (docs/wire.md, 8).
        client = (
            connection.client_text
            if self.client_ip is client_ip
            else self.client_ip.decode("latin-1") + ":0"
        )
        return encode_request(
            request.method, path, request.query, names, values, body, route.name, client, body_size
        )

    # the call -----------------------------------------------------------------------

    def _send(self) -> None:
        route = self.route
        assert route is not None
        cluster = route.cluster
        if self.attempts:
            # A retry: every node tried so far is avoided if another can take it.
            self.tried += (self.node,)  # type: ignore[operator]
            node = cluster.pick(self.tried)
        else:
            node = cluster.pick()
        if node is None and self.tried:
            # Every node has been tried: a lone node takes the retry itself (a
            # GOAWAY race; a connection that broke: the retry takes a new one).
            node = cluster.pick()
        if node is None:
            # Every node ejected or at its in-flight cap while ramping: come back soon.
            self.fail(
                503, f"cluster {cluster.name!r} has no node to take the request", 1, "overloaded"
            )
            return
        self.attempts += 1
        self.node = node
        if node.stats is not None:
            node.stats.in_flight += 1
            self.calling = True
        if self.timed:
            self.backend_started = _perf_counter()
        client: Any = node.client
        if self.request.body_stream is None or self.gathered is not None:
            # The answer may come back before send() returns (an error found at once).
            # True: a streamed answer is welcome (every carrier's send() takes the
            # flag; one without streams answers whole).
            client.send(self.payload, self, True)
            return
        attempt = self.attempts
        # The head's deadline_ms is the whole timeout: the node counts it from the
        # body's end (docs/wire.md), and a retry's head must not carry "none".
        self.deadline = self.connection.loop.time() + self.timeout
        outgoing = client.send_stream(self.payload, self, True)
        if self.attempts != attempt or self.status:
            return  # failed inside send_stream (and retried, or answered)
        self.outgoing = outgoing
        outgoing.on_writable = self._body_writable
        outgoing.on_credit = self._body_moved
        self.connection.body_wanted()
        self.pump_body()

    # a streamed request body ----------------------------------------------------------

    def pump_body(self) -> None:
        """Pass on what the client sent of a streamed body, as far as the node's credit goes.

        Called when the call starts, after every read from the client and
        when the node's credit returns. A refusal of the body (over
        ``max_body_size``, bad framing, a deadline) ends the call.
        """
        stream = self.request.body_stream
        if stream is None or self.status:
            return
        if stream.error is not None:
            self._body_refused(stream.error)
            return
        gathered = self.gathered
        if gathered is not None:
            gathered += stream.take()
            if stream.ended and not self.attempts:
                route = self.route
                assert route is not None
                body = b"".join(gathered)
                self.gathered = []
                self.payload = self._encode(route, body, -1)
                # The answer's timeout counts from the body's end, as for a stream.
                self.deadline = self.connection.loop.time() + self.timeout
                self._send()
            return
        outgoing = self.outgoing
        if outgoing is None or outgoing.done or stream.paused:
            return
        pieces = stream.take()
        if len(pieces) > 1:
            # Held back while the node's credit was spent, or cut small by a
            # slow trickle: one DATA frame rather than many (a copy of at most
            # STREAM_BUFFER_HIGH and one read).
            pieces = [b"".join(pieces)]
        for index, piece in enumerate(pieces):
            if not outgoing.write(piece):
                # The node's credit is spent: hold the rest, stop reading.
                stream.put_back(pieces[index + 1 :])
                self.connection.hold_body()
                self._body_moved()
                return
        if stream.ended and not outgoing.ended:
            # Before end(): a node without a window is sent the whole request by it.
            outgoing.move_deadline(self.connection.loop.time() + self.timeout)
            outgoing.end()
        self._body_moved()

    def _body_writable(self) -> None:
        self._body_moved()
        self.connection.release_body(self)

    def _body_moved(self) -> None:
        """The call's deadline while its body is sent: what is waited for now bounds it.

        Waiting for the node's credit: the route's timeout from now (each piece the
        node accepts moves it, as nginx's proxy_send_timeout runs between two
        writes). Waiting for the client: no call deadline, the client's
        ``body_timeout`` bounds that (408). The body's last DATA written: the
        timeout for the answer starts (nginx's proxy_read_timeout).
        """
        outgoing = self.outgoing
        if outgoing is None or self.status:
            return
        if outgoing.done:
            if outgoing.ended:
                outgoing.move_deadline(self.connection.loop.time() + self.timeout)
        elif outgoing.ended or outgoing.queued:
            outgoing.move_deadline(self.connection.loop.time() + self.timeout)
        else:
            outgoing.move_deadline(_NO_DEADLINE)

    def _body_refused(self, error: HttpError) -> None:
        """The client's streamed body was refused midway: the call is given up, the
        client answered with the refusal (the connection closes after it)."""
        self._give_up_call()
        self.failure = refusal_reason(error.status, error.reason, True)
        self._finish_error(error.status, error.reason, b"")

    def _give_up_call(self) -> None:
        outgoing = self.outgoing
        if outgoing is not None:
            self.outgoing = None
            outgoing.abort()
        elif self.node is not None:
            self.node.client.cancel(self)
        if self.calling:
            self._call_over()

    # the receiver interface (transports.calls.Receiver) ------------------------------

    def on_response(self, payload: bytes) -> None:
        if self.timed:
            self.backend_ended = _perf_counter()
        if self.calling:
            self._call_over()
            if self.connection.closed:
                # The client is gone; the node did answer.
                self.node.record(None)  # type: ignore[union-attr]
        if self.connection.closed:
            return
        if self.chains.backend_response and self._answered(self.chains.backend_response):
            return
        self._respond(payload)

    def _answered(self, handlers: tuple[Any, ...]) -> bool:
        """Run one hook's handlers; True if a module answered the request itself."""
        answer = self.snapshot.modules.run(handlers, self)
        if answer is None:
            return False
        extra = b"".join(name + b": " + value + b"\r\n" for name, value in answer.headers)
        self._finish_error(answer.status, answer.message or "answered by a module", extra)
        return True

    def on_error(self, error: TransportError) -> None:
        if self.timed:
            self.backend_ended = _perf_counter()
        if self.calling:
            self._call_over()
            kind = _failure_kind(error)
            if kind is not None:
                self.node.record(kind)  # type: ignore[union-attr]
        if self.connection.closed:
            return
        route = self.route
        node = self.node
        assert route is not None and node is not None
        if isinstance(error, CallError) and self._may_retry(error):
            if isinstance(error, ConnectionLost):
                # The carrier is failing every call of that connection and may
                # not have stopped sending on it yet: retry once it has.
                self.connection.loop.call_soon(self._retry)
            else:
                self._send()
            return
        failure = _failure_of(error)
        # The client is told which kind of failure it was; where and why is
        # for the log (node addresses are internal: nginx does not show them
        # either). A slow or dead node fails every request sent to it: one
        # line per node and kind of failure a second says so, not one per request.
        WARNINGS.warning(
            (node.uri, failure),
            "request %s (route %s) to %s failed: %s",
            self.request_id.decode() or "-",
            route.name,
            node.uri,
            error,
        )
        if isinstance(error, DeadlineExceeded):
            self.fail(504, f"no answer from the backend within {route.timeout:g}s", 0, failure)
        elif isinstance(error, RequestTooLarge):
            self.fail(413, "request larger than the backend accepts", 0, failure)
        elif isinstance(error, ConnectError):
            self.fail(502, "backend unreachable", 0, failure)
        elif isinstance(error, Overloaded):
            # Envoy's overflow: not started, and no other node took it; come back soon.
            self.fail(503, "backend is at its in-flight limit", 1, failure)
        elif isinstance(error, Rejected):
            self.fail(503, "backend is shutting down", 0, failure)
        elif isinstance(error, RemoteError):
            too_large = answer_too_large(error, self.snapshot.config.upstream.max_frame_size)
            self.fail(502, too_large or "backend failed the request", 0, failure)
        elif isinstance(error, Closed):
            self.fail(503, "proxy is shutting down", 0, failure)
        else:
            self.fail(502, self._lost(error), 0, failure)

    def _lost(self, error: TransportError) -> str:
        found = _FRAME_TOO_LARGE.search(str(error))
        if found is None:
            return "connection to the backend lost"
        # A node that ignored the limit this proxy announced: which call the
        # frame was for is unknown, so every call on the connection hears it.
        size, limit = found.groups()
        setting = _SETTING if int(limit) == self.snapshot.config.upstream.max_frame_size else ""
        return (
            f"connection to the backend lost: it sent a frame of {size} bytes,"
            f" over the limit of {limit} bytes{setting}"
        )

    def _retry(self) -> None:
        if self.status or self.connection.closed:
            return  # the client went away meanwhile
        self._send()

    def _call_over(self) -> None:
        self.calling = False
        self.node.stats.in_flight -= 1  # type: ignore[union-attr]

    def _may_retry(self, error: CallError) -> bool:
        route = self.route
        assert route is not None
        if self.attempts > route.retries or isinstance(error, DeadlineExceeded | RequestTooLarge):
            return False
        if isinstance(error, RemoteError) and answer_too_large(error, 0):
            return False  # it would be as large again
        outgoing = self.outgoing
        if outgoing is not None:
            if outgoing.started:
                return False  # body bytes went after the head: the node may have acted
            self.outgoing = None
        if not error.sent:
            # Never reached a handler: safe whatever the method. A refused
            # connect is not retried on the same lone node (it is backing off),
            # nor an overload on a node that refused it already (it is busy):
            # while a node is left untried, the retry goes there.
            if isinstance(error, Overloaded):
                return self.attempts < len(route.cluster.nodes)
            return not (isinstance(error, ConnectError) and len(route.cluster.nodes) <= 1)
        return self.idempotent

    # the answer -----------------------------------------------------------------------

    def _respond(self, payload: bytes) -> None:
        try:
            response = decode_response(payload)
        except BadPayload as exc:
            self._bad_answer(exc)
            return
        fields = self._answer_fields(response)
        if fields is not None:
            self.connection.finish(self, response.status, fields, response.body)

    def _bad_answer(self, exc: BadPayload) -> None:
        if self.node is not None and self.node.stats is not None:
            self.node.record("error")
        uri = self.node.uri  # type: ignore[union-attr]
        WARNINGS.warning(
            (uri, "bad_answer"),
            "request %s: bad answer from %s: %s",
            self.request_id.decode() or "-",
            uri,
            exc,
        )
        self.fail(502, "backend answered with an undecodable payload", 0, "bad_answer")

    def _answer_fields(self, response: ResponseMessage, record: bool = True) -> bytes | None:
        """The header lines of the node's answer, or None when it was answered with a 502."""
        status = response.status
        node = self.node
        if node is not None and node.stats is not None and (record or not 200 <= status <= 599):
            if not 200 <= status <= 599:
                node.record("error")  # not HTTP: the backend is broken
            else:
                node.record("5xx" if status >= 500 else "4xx" if status >= 400 else None)
        if not 200 <= status <= 599:
            # 1xx cannot be relayed as a final answer (and 101 would need an upgrade).
            self.fail(502, f"backend answered with status {status}", 0, "bad_answer")
            return None
        add_name = self.id_header if self.echo_id else None
        edits = self.edits
        try:
            if edits is None or not edits.response:
                fields = response_fields(
                    response.header_names, response.header_values, add_name, self.request_id
                )
            else:
                names, values = response_headers(
                    list(response.header_names),
                    list(response.header_values),
                    add_name,
                    self.request_id,
                )
                names, values = edits.response.apply(names, values)
                fields = b"".join(
                    [_colon_join(pair) + b"\r\n" for pair in zip(names, values, strict=True)]
                )
        except InvalidHeader:
            self.fail(502, "backend answered with an invalid header", 0, "bad_answer")
            return None
        return fields

    # a streamed answer ----------------------------------------------------------------

    def on_response_head(self, payload: bytes, body: IncomingBody) -> None:
        """The head of a streamed answer; its body follows on ``body``.

        The call stays in flight for the node until the body's outcome
        (:meth:`stream_over`); the node's health counts that outcome.
        """
        if self.timed:
            self.backend_ended = _perf_counter()
        if self.connection.closed or self.status:
            body.abort()
            if self.calling:
                self._call_over()
            return
        self.incoming = body
        if self.chains.backend_response and self._answered(self.chains.backend_response):
            self._stop_incoming()
            return
        try:
            response = decode_response_head(payload)
        except BadPayload as exc:
            self._stop_incoming()
            self._bad_answer(exc)
            return
        fields = self._answer_fields(response, False)
        if fields is None:
            self._stop_incoming()
            return
        self.connection.stream_response(
            self, response.status, fields, response.body, response.body_size, body
        )

    def _stop_incoming(self) -> None:
        incoming = self.incoming
        if incoming is not None:
            self.incoming = None
            incoming.abort()
        if self.calling:
            self._call_over()

    def stream_over(self, error: TransportError | None, failure: str, node_fault: bool) -> None:
        """A streamed answer's body ended (``failure`` ""), or was cut (``failure`` CUT): by
        the node (``node_fault``, with its ``error`` if it sent one) or by the client going
        away. The node's health and in-flight count take the outcome."""
        self.incoming = None
        self.failure = failure
        if self.timed:
            self.backend_ended = _perf_counter()
        if not self.calling:
            return
        self._call_over()
        node = self.node
        if node is None or node.stats is None:
            return
        if error is not None:
            kind = _failure_kind(error)
            node.record(kind if kind is not None else "reset")
        elif node_fault:
            node.record("error")  # a length the node gave and did not keep
        elif not failure:
            status = self.status
            node.record("5xx" if status >= 500 else "4xx" if status >= 400 else None)

    def fail(self, status: int, message: str, retry_after: int = 0, failure: str = "") -> None:
        """Answer an error; ``failure`` is why no backend answered (Record.failure), if so."""
        self.failure = failure
        self._finish_error(
            status, message, b"retry-after: %d\r\n" % retry_after if retry_after else b""
        )

    def _finish_error(self, status: int, message: str, fields: bytes) -> None:
        if self.echo_id:
            fields = self.id_header + b": " + self.request_id + b"\r\n" + fields
        self.connection.finish(self, status, _ERROR_TYPE + fields, error_body(status, message))

    def finish_now(self) -> None:
        """The answer has been handed to the socket (a time for modules that asked for times)."""
        if self.timed:
            self.finished = _perf_counter()

    def abandon(self) -> None:
        """The client went away: stop waiting and let the node know (CANCEL).

        The request still finishes for the modules, with nginx's status 499
        (client closed request): a log line is written, a held slot released.
        """
        if self.incoming is not None:
            self._stop_incoming()
        elif self.node is not None:
            self._give_up_call()
        if not self.status:
            self.status = CLIENT_CLOSED
            self.finish_now()
            finished = self.chains.request_finish
            if finished:
                self.snapshot.modules.run(finished, self)


def _first_bytes(stream: BodyStream) -> bytes:
    """What a streamed body's head frame carries: what came with the head, up to HEAD_BODY_MAX."""
    pieces = stream.take()
    if not pieces:
        return b""
    first = pieces[0] if len(pieces) == 1 else b"".join(pieces)
    if len(first) > HEAD_BODY_MAX:
        stream.put_back([first[HEAD_BODY_MAX:]])
        first = first[:HEAD_BODY_MAX]
    return first
