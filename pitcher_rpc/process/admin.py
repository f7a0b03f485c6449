"""The master's admin HTTP server: the door, routing and answers; no handlers.

The master registers a coroutine per method and path pattern; this module
routes each request and turns every failure into a JSON ``{"error": ...}``
answer. The connections are glue over the proxy's own sans-IO HTTP/1.1
connection (:mod:`.admin_http`), which keeps pipelined answers in order.
Operators send few requests, so each connection runs one handler at a time,
in a task of its own; a slow handler holds up its own connection only.

Failures and what they answer:

- no route for the path: 404; a route for the path but not the method: 405
  with ``allow``;
- :class:`AdminError` raised by a handler: its status;
- any other exception from a handler, or a response that cannot be encoded:
  500, logged with its traceback;
- a request the parser refuses (400, 413, 431, 505 ...) or one that does not
  arrive within ``header_timeout`` (408): that status, then the connection
  is half-closed, lingers a moment and is closed.

The door: once a token is set (:meth:`AdminServer.set_token_source`), every
request but ``GET /healthz``, ``GET /metrics`` and ``GET /`` (the status
page's shell) must carry ``Authorization: Bearer TOKEN``; without it, or with
another token, the answer is 401 with ``WWW-Authenticate: Bearer`` before any
routing, so nothing runs and an unknown path says no more than a known one. A
listener reachable from other machines with no token set refuses the same
requests with 403: a configuration reloaded without its token, or a new
generation taking over a socket its file no longer names, fails closed.
Every call that may change something (any method but GET and HEAD) is logged
at INFO with the caller, the method, the target and the status; every refusal
at the door at WARNING, up to a budget (:class:`.admin_routing.RefusalBudget`)
past which they are counted and the count logged: a flood of refused calls
must not bury the calls that matter.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ..config.model import AdminConfig
from ..http.headers import HOP_BY_HOP, is_valid_name, is_valid_value
from ..http.request import HttpLimits, HttpRequest
from .admin_http import NO_STORE, AdminAnswer, AdminConnection, json_error
from .admin_routing import READS, Door, RefusalBudget, Router, TokenSource, is_open, split_path

__all__ = ["AdminError", "AdminHandler", "AdminRequest", "AdminResponse", "AdminServer"]

log = logging.getLogger("pitcher.admin")

_JSON = b"application/json"
_TEXT = b"text/plain; charset=utf-8"
_OCTETS = b"application/octet-stream"
# Fields this server sets itself: a handler setting them too would send
# duplicated or contradictory fields.
_RESERVED_HEADERS = HOP_BY_HOP | {b"content-length", b"date", b"cache-control"}

# A target longer than this is cut in the log: a line per call, not a dump.
_LOGGED_TARGET = 200


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


def _render(response: AdminResponse) -> AdminAnswer:
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
    fields = b""
    for name, value in response.headers:
        encoded = name.lower().encode()
        if encoded == b"content-type":
            content_type = None
        fields += encoded + b": " + value.encode("latin-1") + b"\r\n"
    if content_type is not None:
        fields += b"content-type: " + content_type + b"\r\n"
    return response.status, fields + NO_STORE, payload


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
        # What the connections read.
        self.limits = HttpLimits(max_body_size=max_body_size)
        self.header_timeout = header_timeout
        self.keepalive_timeout = keepalive_timeout
        self.connections: set[AdminConnection] = set()
        self.handlers: set[asyncio.Task[AdminAnswer]] = set()  # running, one per request
        self.stopping = False
        self._router = Router()
        self.door = Door()
        self.refusals = RefusalBudget()
        self._refusals_report: asyncio.TimerHandle | None = None
        self._router.add("GET", "/admin", self._list_routes, "this list of the admin endpoints")
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Deadlines are checked by one sweep over the connections, while there are any.
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_interval = min(1.0, max(0.05, min(header_timeout, keepalive_timeout) / 4))

    def route(
        self, method: str, pattern: str, handler: AdminHandler, description: str = ""
    ) -> None:
        """Serve ``method`` on ``pattern``; ``{name}`` matches one segment into ``params``.

        A GET route also answers HEAD (the handler sees ``method`` "HEAD"; the
        body it returns is measured, not sent). ``description`` is the one
        line ``GET /admin`` shows for it. A GET route must change nothing: the
        log records only the other methods' calls. Raises ValueError for a
        malformed pattern or one already registered for ``method``.
        """
        self._router.add(method, pattern, handler, description)

    def set_token_source(self, token: TokenSource) -> None:
        """Where the door reads the bearer token, on every request (None: no token).

        A callable rather than a value, so that a reload that changes the
        configuration changes the token at the same moment, with nothing to keep in step.
        """
        self.door.token = token

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, *, sock: socket.socket | None = None
    ) -> None:
        """Listen on host:port, or on ``sock``, a listening socket handed over by a predecessor."""
        if self._server is not None:
            raise RuntimeError("the admin server is already started")
        loop = self._loop = asyncio.get_running_loop()
        self.stopping = False
        if sock is not None:
            self._server = await loop.create_server(lambda: AdminConnection(self, loop), sock=sock)
        else:
            self._server = await loop.create_server(
                lambda: AdminConnection(self, loop), host, port, reuse_address=True
            )
        # Judged by the sockets really bound, not by a configuration: a new
        # generation takes over its predecessor's sockets whatever its file says.
        self.door.exposed = any(
            not AdminConfig.is_loopback_host(str(listener.getsockname()[0]))
            for listener in self._server.sockets
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
        self.stopping = True
        server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._refusals_report is not None:
            self._refusals_report.cancel()
            self._report_refusals()
        for connection in list(self.connections):
            connection.close()
        # A handler may be what called stop(); it must not wait for itself.
        current = asyncio.current_task()
        handlers = [handler for handler in self.handlers if handler is not current]
        for handler in handlers:
            handler.cancel()
        if handlers:
            _, pending = await asyncio.wait(handlers, timeout=1.0)
            if pending:
                log.warning("%d admin handlers ignored cancellation", len(pending))
        try:
            await asyncio.wait_for(server.wait_closed(), 1.0)
        except TimeoutError:
            log.warning("admin listener did not close within 1 s")

    def schedule_sweep(self) -> None:
        """Check the connections' deadlines soon, if not already planned."""
        if self._sweeper is None and self.connections and self._loop is not None:
            self._sweeper = self._loop.call_later(self._sweep_interval, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        if self._loop is None or self.stopping:
            return
        now = self._loop.time()
        for connection in list(self.connections):
            connection.check_timeouts(now)
        self.schedule_sweep()

    async def respond(self, request: HttpRequest, client: str) -> AdminAnswer:
        """Check the token, route one request and run its handler; logs what may change things.

        Never raises but for cancellation.
        """
        method = request.method.decode("ascii")
        path, segments = split_path(request.path)
        if not is_open(method, segments):
            refusal = self.door.check(
                [value for name, value in request.headers if name == b"authorization"]
            )
            if refusal is not None:
                self._log_refusal(method, request.target, client, refusal.status, refusal.reason)
                return json_error(refusal.status, refusal.message, refusal.fields)
        if method in READS:
            return await self._dispatch(request, method, path, segments, client)
        try:
            answer = await self._dispatch(request, method, path, segments, client)
        except asyncio.CancelledError:
            log.info(
                "%s %s from %s: no answer, the server stopped",
                method,
                _shown(request.target),
                client,
            )
            raise
        log.info("%s %s from %s: %d", method, _shown(request.target), client, answer[0])
        return answer

    def _log_refusal(
        self, method: str, target: bytes, client: str, status: int, reason: str
    ) -> None:
        loop = self._loop
        now = loop.time() if loop is not None else 0.0
        if self.refusals.spend(now):
            log.warning(
                "%s %s from %s: %d refused (%s)", method, _shown(target), client, status, reason
            )
        elif self._refusals_report is None and loop is not None:
            delay = max(0.0, self.refusals.window_end() - now)
            self._refusals_report = loop.call_later(delay, self._report_refusals)

    def _report_refusals(self) -> None:
        self._refusals_report = None
        count, self.refusals.suppressed = self.refusals.suppressed, 0
        if count:
            log.warning(
                "%d more calls refused at the door, not logged one by one"
                " (at most %d lines in %g s)",
                count,
                self.refusals.burst,
                self.refusals.window,
            )

    async def _dispatch(
        self,
        request: HttpRequest,
        method: str,
        path: str,
        segments: tuple[str, ...] | None,
        client: str,
    ) -> AdminAnswer:
        if segments is None:
            return json_error(404, f"no such path: {path}")
        route, params, allowed = self._router.resolve(method, segments)
        if route is None:
            if not allowed:
                return json_error(404, f"no such path: {path}")
            allow = b"allow: " + ", ".join(allowed).encode() + b"\r\n"
            return json_error(405, f"{method} is not allowed on {path}", allow)
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
            return json_error(error.status, error.message)
        except Exception:
            log.exception("admin handler for %s %s failed", method, path)
            return json_error(500, "internal error")

    async def _list_routes(self, request: AdminRequest) -> AdminResponse:
        guarded = self.door.guarded
        return AdminResponse(
            200,
            {
                "token_required": guarded,
                "endpoints": [
                    {
                        "method": route.method,
                        "path": route.pattern,
                        "description": route.description,
                        "needs_token": guarded
                        and not is_open(route.method, split_path(route.pattern.encode())[1]),
                    }
                    for route in self._router.routes
                ],
            },
        )


def _shown(target: bytes) -> str:
    """A request target as a log line may hold it: printable ASCII, bounded."""
    text = target[:_LOGGED_TARGET].decode("ascii", "backslashreplace")
    text = "".join(char if " " < char <= "~" else repr(char)[1:-1] for char in text)
    return text + "..." if len(target) > _LOGGED_TARGET else text
