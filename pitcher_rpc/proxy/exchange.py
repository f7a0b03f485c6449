"""One HTTP request forwarded to a node and its answer written back.

An :class:`Exchange` is driven by callbacks, not by a task or a future: the
request is encoded and handed to a node's client with the exchange itself as
the receiver, and the client calls it back when the answer (or an error) is
there. Making no task, future or timer per request saves several
microseconds, a large share of the time a request spends in the proxy.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from typing import TYPE_CHECKING

from transports.errors import (
    CallError,
    Closed,
    ConnectError,
    DeadlineExceeded,
    Rejected,
    RemoteError,
    RequestTooLarge,
    TransportError,
)

from ..codec import BadPayload, decode_response, encode_request
from ..http.parser import HttpRequest
from ..http.response import (
    HOP_BY_HOP,
    build_response,
    connection_tokens,
    error_response,
    is_valid_name,
    is_valid_value,
)

if TYPE_CHECKING:
    from .server import HttpConnection
    from .snapshot import Route, Snapshot
    from .upstream import Node

log = logging.getLogger("pitcher.proxy")

# A request id we accept from a client: short and plainly printable, so it is
# safe in logs and in the response header we echo it in.
_VALID_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:+/=-]{1,128}").fullmatch
_REQUEST_ID_PREFIX = os.urandom(6).hex()
_request_counter = itertools.count(1)

# Response headers the proxy itself owns: the HTTP framing is ours to write.
_RESPONSE_DROP = HOP_BY_HOP | {b"content-length"}
_REQUEST_DROP = HOP_BY_HOP | {b"content-length", b"x-forwarded-for", b"x-forwarded-proto"}


def new_request_id() -> bytes:
    return f"{_REQUEST_ID_PREFIX}-{next(_request_counter):x}".encode()


class Exchange:
    __slots__ = (
        "attempts",
        "connection",
        "deadline",
        "head",
        "keep_alive",
        "last_error",
        "node",
        "payload",
        "request",
        "request_id",
        "route",
        "snapshot",
        "tried",
    )

    def __init__(self, connection: HttpConnection, request: HttpRequest, snapshot: Snapshot):
        self.connection = connection
        self.request = request
        self.snapshot = snapshot
        self.head = request.method == b"HEAD"
        self.keep_alive = request.keep_alive
        self.node: Node | None = None
        self.tried: list[Node] = []
        self.attempts = 0
        self.last_error: CallError | None = None
        self.route: Route | None = None
        self.payload = b""
        self.request_id = b""
        self.deadline = 0.0

    # start -----------------------------------------------------------------------------

    def start(self) -> None:
        request = self.request
        snapshot = self.snapshot
        route = snapshot.router.match(request.host, request.path)
        if route is None:
            self.fail(404, "no route for this host and path")
            return
        self.route = route
        if not route.cluster.nodes:
            self.fail(503, f"cluster {route.cluster.name!r} has no nodes")
            return
        self.request_id = self._forwarded_request_id()
        self.payload = self._encode(route)
        self.deadline = self.connection.loop.time() + route.timeout
        self._send()

    def _forwarded_request_id(self) -> bytes:
        wanted = self.snapshot.request_id_header
        for name, value in self.request.headers:
            if name == wanted:
                if _VALID_REQUEST_ID(value):
                    return value
                break
        return new_request_id()

    def _encode(self, route: Route) -> bytes:
        request = self.request
        headers = request.headers
        drop = _REQUEST_DROP
        # Headers the client named in Connection are hop-by-hop too.
        tokens = connection_tokens(headers)
        if tokens:
            drop = drop | tokens
        id_header = self.snapshot.request_id_header
        names: list[bytes] = []
        values: list[bytes] = []
        forwarded_for = b""
        for name, value in headers:
            if name in drop or name == id_header:
                if name == b"x-forwarded-for":
                    forwarded_for = value
                continue
            names.append(name)
            values.append(value)
        client_ip = self.connection.client_ip
        names += (b"x-forwarded-for", b"x-forwarded-proto", id_header)
        values += (
            forwarded_for + b", " + client_ip if forwarded_for else client_ip,
            b"http",
            self.request_id,
        )
        path = request.path
        if route.strip_prefix:
            path = b"/" + path[len(route.prefix_bytes) :].lstrip(b"/")
        return encode_request(
            request.method,
            path,
            request.query,
            names,
            values,
            request.body,
            route.name,
            self.connection.client_text,
        )

    # the call -----------------------------------------------------------------------

    def _send(self) -> None:
        route = self.route
        assert route is not None
        cluster = route.cluster
        node = cluster.pick(self.tried)
        if node is None:
            # Every node has been tried; a single-node cluster may retry its node
            # once more for a request that never reached it (e.g. a GOAWAY race).
            node = cluster.pick()
        if node is None:
            self.fail(503, f"cluster {cluster.name!r} has no node to take the request")
            return
        self.tried.append(node)
        self.attempts += 1
        self.node = node
        # The answer may come back before send() returns (an error found at once).
        node.client.send(self.payload, self)

    # the receiver interface (transports.calls.Receiver) ------------------------------

    def on_response(self, payload: bytes) -> None:
        if not self.connection.closed:
            self._respond(payload)

    def on_error(self, error: TransportError) -> None:
        if self.connection.closed:
            return
        route = self.route
        node = self.node
        assert route is not None and node is not None
        if isinstance(error, CallError):
            self.last_error = error
            if self._may_retry(error):
                self._send()
                return
        if isinstance(error, DeadlineExceeded):
            self.fail(504, f"no answer from {node.uri} within {route.timeout:g}s")
        elif isinstance(error, RequestTooLarge):
            self.fail(413, f"request too large for {node.uri}: {error}")
        elif isinstance(error, ConnectError):
            self.fail(502, f"cannot reach {node.uri}: {error}")
        elif isinstance(error, Rejected):
            self.fail(503, f"{node.uri} refused the request: {error}")
        elif isinstance(error, RemoteError):
            self.fail(502, f"{node.uri} failed the request: {error}")
        elif isinstance(error, Closed):
            self.fail(503, "proxy is shutting down")
        else:
            self.fail(502, f"connection to {node.uri} lost: {error}")

    def _may_retry(self, error: CallError) -> bool:
        route = self.route
        assert route is not None
        if self.attempts > route.retries or isinstance(error, DeadlineExceeded | RequestTooLarge):
            return False
        if not error.sent:
            # Never reached a handler: safe whatever the method. A refused
            # connect is not retried on the same lone node (it is backing off).
            return not (isinstance(error, ConnectError) and len(route.cluster.nodes) <= 1)
        return self.request.method in route.idempotent_methods

    # the answer -----------------------------------------------------------------------

    def _respond(self, payload: bytes) -> None:
        try:
            response = decode_response(payload)
        except BadPayload as exc:
            self.fail(502, f"bad answer from {self.tried[-1].uri}: {exc}")
            return
        status = response.status
        if not 200 <= status <= 599:
            # 1xx cannot be relayed as a final answer (and 101 would need an upgrade).
            self.fail(502, f"backend answered with status {status}")
            return
        names = response.header_names
        values = response.header_values
        drop = _RESPONSE_DROP
        lowered = [name.lower() for name in names]
        if b"connection" in lowered:
            tokens = connection_tokens(list(zip(lowered, values, strict=True)))
            drop = drop | tokens
        headers: list[tuple[bytes, bytes]] = []
        for name, lower, value in zip(names, lowered, values, strict=True):
            if lower in drop:
                continue
            if not (is_valid_name(name) and is_valid_value(value)):
                self.fail(502, "backend answered with an invalid header")
                return
            headers.append((name, value))
        id_header = self.snapshot.request_id_header
        if id_header not in lowered:
            headers.append((id_header, self.request_id))
        self.connection.finish(
            self,
            build_response(
                status, headers, response.body, keep_alive=self.keep_alive, head=self.head
            ),
            status,
        )

    def fail(self, status: int, message: str) -> None:
        self.connection.finish(
            self,
            error_response(status, message, keep_alive=self.keep_alive, head=self.head),
            status,
        )

    def abandon(self) -> None:
        """The client went away: stop waiting and let the node know (CANCEL)."""
        if self.node is not None:
            self.node.client.cancel(self)
