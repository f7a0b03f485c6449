"""The SDK: turn Python functions into a split service on any registered transport.

Per request the service pays for what the handler uses and little else: the
payload is parsed by the generated class (C), the route found (one look-up
when a single handler serves every path), and the handler gets a Request
whose headers and query parameters are decoded only when it reads them. A
coroutine handler is stepped by hand; only one that really waits goes on in
a task (see :mod:`transports.handlers`). A dict or list comes back as one
JSON encode and one Response payload written straight to bytes. Streamed
bodies (:mod:`pitcher_rpc.sdk.streams`, docs/sdk.md) add one check per
request to this path: that the call carries no body.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import re
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from transports.base import (
    WHOLE_CALL,
    WHOLE_CALL_MAY_STREAM,
    Server,
    ServerCall,
    ServerOptions,
    StreamedAnswer,
    WithStreams,
)
from transports.frame import DEFAULT_MAX_FRAME_SIZE
from transports.native import describe as describe_build
from transports.registry import transport_for
from transports.stepping import resume

from ..codec import Request as RequestMessage
from ..codec import decode_request, encode_response, response_head, with_body
from .registration import Registration, serve_until_signal
from .streams import (
    BodyReader,
    BodyTooLarge,
    Streamed,
    StreamingResponse,
    gather_body,
    ready,
    whole_body,
)

log = logging.getLogger("pitcher.sdk")


# ----------------------------------------------------------------------------- JSON

# json.dumps builds an encoder (and a closure) on every call; the C encoder
# made once does the same work for half the cost of a small document. Its
# output is json.dumps's, byte for byte.
_make_encoder = getattr(json.encoder, "c_make_encoder", None)
_c_encode: Callable[[Any, int], Iterable[str]] | None = (
    _make_encoder(
        None,  # no circular check here: json.dumps below reports a cycle
        json.JSONEncoder().default,
        json.encoder.encode_basestring_ascii,
        None,
        ": ",
        ", ",
        False,
        False,
        True,
    )
    if _make_encoder is not None
    else None
)


def json_bytes(value: Any) -> bytes:
    """``json.dumps(value).encode()``, faster."""
    if _c_encode is not None:
        try:
            return "".join(_c_encode(value, 0)).encode()
        except (ValueError, TypeError, RecursionError):
            pass  # json.dumps raises its own error (a cycle is a RecursionError here)
    return json.dumps(value).encode()


# ----------------------------------------------------------------------------- Request


class Headers(Mapping[str, str]):
    """Request headers: case-insensitive lookup, repeated names kept in order."""

    __slots__ = ("_items",)

    def __init__(
        self,
        items: Iterable[tuple[str, str]] = (),
        *,
        lowered: list[tuple[str, str]] | None = None,
    ) -> None:
        # ``lowered``: pairs whose names are lower-case already, taken as they are.
        self._items = (
            lowered if lowered is not None else [(name.lower(), value) for name, value in items]
        )

    def __getitem__(self, name: str) -> str:
        name = name.lower()
        for key, value in self._items:
            if key == name:
                return value
        raise KeyError(name)

    def get(self, name: str, default: Any = None) -> Any:
        name = name.lower()
        for key, value in self._items:
            if key == name:
                return value
        return default

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        name = name.lower()
        return any(key == name for key, _ in self._items)

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [value for key, value in self._items if key == name]

    def items_list(self) -> list[tuple[str, str]]:
        return list(self._items)

    def __iter__(self) -> Iterator[str]:
        seen: set[str] = set()
        for key, _ in self._items:
            if key not in seen:
                seen.add(key)
                yield key

    def __len__(self) -> int:
        return len({key for key, _ in self._items})

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


def _wire_headers(names: Any, values: Any) -> Headers:
    """Headers from the parallel name and value lists of a Request payload (latin-1)."""
    # A slice copies a protobuf repeated field to a list in one C call (iterating
    # it costs three times as much); decoding all names, and all values, as one
    # string split at NULs runs in C too. A NUL inside a name or value would
    # split wrong: the counts catch it, and then each is decoded on its own.
    names = names[:]
    values = values[:]
    count = len(names)
    lowered = b"\0".join(names).decode("latin-1").lower().split("\0")
    decoded = b"\0".join(values).decode("latin-1").split("\0")
    if len(lowered) != count or len(decoded) != count:
        lowered = [name.decode("latin-1").lower() for name in names]
        decoded = [value.decode("latin-1") for value in values]
    return Headers(lowered=list(zip(lowered, decoded, strict=True)))


class Request:
    """One request as the handler sees it; headers and query parameters are decoded on use."""

    __slots__ = (
        "_headers",
        "_message",
        "_params",
        "body",
        "client",
        "method",
        "path",
        "query",
        "route",
    )

    def __init__(
        self,
        method: str,
        path: str,
        query: str = "",
        headers: Headers | Iterable[tuple[str, str]] | None = None,
        body: bytes = b"",
        route: str = "",
        client: str = "",
        *,
        message: RequestMessage | None = None,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.body = body
        self.route = route
        self.client = client
        # The decoded payload whose header fields are read when headers are asked for.
        self._message = message
        self._headers: Headers | None = (
            headers if isinstance(headers, Headers) or headers is None else Headers(headers)
        )
        self._params: dict[str, str] | None = None

    @property
    def headers(self) -> Headers:
        headers = self._headers
        if headers is None:
            message = self._message
            headers = (
                Headers(lowered=[])
                if message is None
                else _wire_headers(message.header_names, message.header_values)
            )
            self._headers = headers
        return headers

    @headers.setter
    def headers(self, headers: Headers) -> None:
        self._headers = headers

    @property
    def query_params(self) -> dict[str, str]:
        params = self._params
        if params is None:
            params = self._params = dict(parse_qsl(self.query, keep_blank_values=True))
        return params

    def stream(self) -> AsyncIterator[bytes]:
        """The body's chunks as they come: ``async for chunk in request.stream()``.

        A body that came whole is one chunk (none when empty). A streamed body
        (a route made with ``stream=True``) is read once: the sender is held
        back while the handler does not read. See docs/sdk.md.
        """
        return whole_body(self.body)

    def read(self) -> Awaitable[bytes]:
        """``await request.read()``: the whole body (also in ``body`` afterwards).

        Bounded by the service's ``max_body_size``: over it, BodyTooLarge
        (which, let out of the handler, answers 413).
        """
        return ready(self.body)

    @property
    def body_size(self) -> int | None:
        """The body's length when known before it is read (Content-Length); None if not."""
        return len(self.body)

    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return (
            f"Request({self.method!r}, {self.path!r}, {self.query!r}, {self.headers!r},"
            f" {self.body!r}, route={self.route!r}, client={self.client!r})"
        )


class StreamedRequest(Request):
    """A request of a ``stream=True`` route whose body goes on after its head.

    Its body is read by the handler (:meth:`stream` or :meth:`read`), from a
    :class:`~pitcher_rpc.sdk.streams.BodyReader`; ``body`` is empty until
    :meth:`read` returned.
    """

    __slots__ = ("_reader",)

    def __init__(self, method: str, path: str, message: RequestMessage, reader: BodyReader) -> None:
        super().__init__(
            method,
            path,
            message.query.decode("latin-1"),
            None,
            b"",
            message.route,
            message.client,
            message=message,
        )
        # None once read() took the whole body.
        self._reader: BodyReader | None = reader

    def stream(self) -> AsyncIterator[bytes]:
        reader = self._reader
        return whole_body(self.body) if reader is None else reader.chunks()

    def read(self) -> Awaitable[bytes]:
        reader = self._reader
        return ready(self.body) if reader is None else self._read(reader)

    async def _read(self, reader: BodyReader) -> bytes:
        body = await reader.read()
        self.body = body
        self._reader = None
        return body

    @property
    def body_size(self) -> int | None:
        reader = self._reader
        return len(self.body) if reader is None else reader.size


# ----------------------------------------------------------------------------- Response

_JSON_TYPE = ("content-type", "application/json")
_TEXT_TYPE = ("content-type", "text/plain; charset=utf-8")


@dataclass(slots=True)
class Response:
    """What a handler may return: a str body is sent as text/plain unless a content-type is set."""

    status: int = 200
    body: bytes | str = b""
    headers: list[tuple[str, str]] | dict[str, str] = field(default_factory=list)

    @classmethod
    def json(
        cls,
        value: Any,
        status: int = 200,
        headers: list[tuple[str, str]] | dict[str, str] | None = None,
    ) -> Response:
        """``value`` as JSON; ``headers`` come after the content-type (which they may set)."""
        if not headers:
            return cls(status, json_bytes(value), [_JSON_TYPE])
        pairs = list(headers.items()) if isinstance(headers, dict) else list(headers)
        if any(name.lower() == "content-type" for name, _ in pairs):
            return cls(status, json_bytes(value), pairs)
        return cls(status, json_bytes(value), [_JSON_TYPE, *pairs])

    def encode(self) -> bytes:
        """The Response payload; InvalidResponse for a status or header the proxy would refuse."""
        body = self.body
        headers = self.headers
        pairs = list(headers.items()) if isinstance(headers, dict) else headers
        if isinstance(body, str):
            body = body.encode()
            if "content-type" not in (name.lower() for name, _ in pairs):
                pairs = [*pairs, _TEXT_TYPE]
        status = self.status
        if not 200 <= status <= 599:
            # The proxy relays no 1xx (not even 101) and no number that is not HTTP.
            raise InvalidResponse(f"status {status} is not a final HTTP status (200..599)")
        if len(pairs) == 1:
            # Most responses carry one header, most often one of these two:
            # their fields before the body are made once per status.
            pair = pairs[0]
            if pair == _JSON_TYPE:
                return with_body(_JSON_HEADS[status - 100], body)
            if pair == _TEXT_TYPE:
                return with_body(_TEXT_HEADS[status - 100], body)
        try:
            names = [name.encode("latin-1") for name, _ in pairs]
            values = [value.encode("latin-1") for _, value in pairs]
        except (UnicodeEncodeError, AttributeError, ValueError, TypeError):
            raise InvalidResponse(_bad_header(pairs)) from None
        if names and not _valid_headers(names, values):
            raise InvalidResponse(_bad_header(pairs))
        return encode_response(status, names, values, body)


class InvalidResponse(ValueError):
    """A response the proxy would refuse (it answers 502): a bad status, header name or value."""


# The proxy's rules (pitcher_rpc/http/headers.py, docs/wire.md section 8): a
# name is an RFC 9110 token; a value has no leading or trailing whitespace and
# no control character but HTAB inside. All names, then all values, joined by
# a newline (which neither may contain) are checked by one match each.
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_VALUE = rb"(?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?"
_NAMES = re.compile(rb"%s(?:\n%s)*" % (_TOKEN, _TOKEN)).fullmatch
_VALUES = re.compile(rb"%s(?:\n%s)*" % (_VALUE, _VALUE)).fullmatch
_NAME = re.compile(_TOKEN).fullmatch
_VALUE_ONE = re.compile(_VALUE).fullmatch


def _valid_headers(names: list[bytes], values: list[bytes]) -> bool:
    joined_names = b"\n".join(names)
    joined_values = b"\n".join(values)
    separators = len(names) - 1
    return (
        _NAMES(joined_names) is not None
        and _VALUES(joined_values) is not None
        and joined_names.count(b"\n") == separators
        and joined_values.count(b"\n") == separators
    )


def _bad_header(pairs: Iterable[Any]) -> str:
    """Which header of ``pairs`` the proxy would refuse, and why."""
    for pair in pairs:
        try:
            name, value = pair
            raw_name = name.encode("latin-1")
            raw_value = value.encode("latin-1")
        except (UnicodeEncodeError, AttributeError, ValueError, TypeError):
            return f"header {pair!r} is not a (name, value) pair of latin-1 strings"
        if _NAME(raw_name) is None:
            return f"header name {name!r} is not an HTTP token"
        if _VALUE_ONE(raw_value) is None:
            return (
                f"value of header {name!r} has a control character or leading or"
                f" trailing whitespace: {value!r}"
            )
    return "invalid headers"


def _heads(pair: tuple[str, str]) -> tuple[bytes, ...]:
    name, value = pair[0].encode(), pair[1].encode()
    return tuple(response_head(status, (name,), (value,)) for status in range(100, 600))


_JSON_HEADS = _heads(_JSON_TYPE)
_TEXT_HEADS = _heads(_TEXT_TYPE)
_JSON_OK = _JSON_HEADS[200 - 100]
_TEXT_OK = _TEXT_HEADS[200 - 100]
_BARE_OK = response_head(200, (), ())
_NO_CONTENT = Response(204).encode()
_NOT_FOUND = Response(404, "not found\n").encode()
_NOT_ALLOWED = Response(405, "method not allowed\n").encode()
_TOO_LARGE = Response(413, "request body too large\n").encode()
# What a handler returns that is surely no awaitable: no inspection for these.
_PLAIN = frozenset((dict, list, bytes, str, Response, type(None)))


def _encode_result(result: Any) -> bytes:
    """The Response payload for what a handler returned."""
    kind = type(result)
    if kind is dict or kind is list:
        return with_body(_JSON_OK, json_bytes(result))
    if kind is bytes:
        return with_body(_BARE_OK, result)
    if kind is str:
        return with_body(_TEXT_OK, result.encode())
    if isinstance(result, Response):
        return result.encode()
    if isinstance(result, bytes | str):
        return Response(200, result).encode()
    if result is None:
        return _NO_CONTENT
    return with_body(_JSON_OK, json_bytes(result))


# ----------------------------------------------------------------------------- Context


class Context:
    """What a handler may know about its call besides the request.

    A handler gets one when it takes a second parameter (``def h(request,
    context)``); one that takes only the request pays nothing for it.

    - ``request_id``: the proxy's request id (the ``X-Request-Id`` header it
      sends, also in its access log), "" if the request came without one.
    - ``deadline``: the :func:`time.monotonic` time after which nobody waits
      for the answer, or None when the request has no deadline (the
      caller set none); :meth:`remaining` is the seconds left. It is the
      REQUEST frame's ``deadline_ms`` counted from the frame's arrival: for a
      request from the proxy, what is left of the route's ``timeout``. On a
      ``stream=True`` route whose body streams, it counts from the body's
      end (docs/wire.md 6.3): None while the body is still coming.
    - ``cancelled``: True once the answer is no longer wanted: the caller
      sent CANCEL (the HTTP client went away), the deadline passed, or the
      server is stopping. An async handler learns it first, as
      ``asyncio.CancelledError`` where it awaits; the flag turns true as that
      error leaves the handler. It is for work that does not await, such as
      a loop in a thread started with ``run_in_executor``, which may read it
      from that thread.
    - ``trace``: the W3C trace context the request came with (a
      :class:`pitcher_rpc.sdk.tracing.TraceContext`: ``trace_id``,
      ``parent_id``, ``sampled``), read from its ``traceparent`` header when
      asked; None if it has no valid one. See docs/tracing.md.
    """

    __slots__ = ("_body", "_cancelled", "_request", "deadline")

    def __init__(self, request: Request, deadline: float | None = None, body: Any = None) -> None:
        self._request = request
        self.deadline = deadline
        self._cancelled = False
        # A streamed request body whose ``deadline`` is set when its last piece arrives.
        self._body = body

    def _deadline(self) -> float | None:
        deadline = self.deadline
        if deadline is None and self._body is not None:
            deadline = self.deadline = self._body.deadline
        return deadline

    @property
    def request_id(self) -> str:
        value: str = self._request.headers.get("x-request-id", "")
        return value

    @property
    def trace(self) -> Any:
        # Imported here: a service whose handlers never ask loads none of it.
        from .tracing import trace_of

        return trace_of(self._request)

    def remaining(self) -> float | None:
        """Seconds until the deadline (0.0 once it passed); None without a deadline."""
        deadline = self._deadline()
        if deadline is None:
            return None
        return max(0.0, deadline - time.monotonic())

    @property
    def cancelled(self) -> bool:
        if self._cancelled:
            return True
        deadline = self._deadline()
        return deadline is not None and time.monotonic() >= deadline

    def __repr__(self) -> str:
        return (
            f"Context(request_id={self.request_id!r}, remaining={self.remaining()!r},"
            f" cancelled={self.cancelled!r})"
        )


# ----------------------------------------------------------------------------- Service

Handler = Callable[..., Any]


def _takes_context(handler: Handler) -> bool:
    """Whether ``handler`` requires a second positional argument: the Context.

    Only a parameter without a default counts: a handler that could be
    called with the request alone before is still called so.
    """
    try:
        parameters = inspect.signature(handler).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [
        p for p in parameters if p.kind in positional and p.default is inspect.Parameter.empty
    ]
    return len(required) >= 2


def _handler_name(handler: Handler) -> str:
    module = getattr(handler, "__module__", None) or "?"
    name = getattr(handler, "__qualname__", None) or repr(handler)
    return f"{module}.{name}"


class _Route:
    __slots__ = (
        "handler",
        "is_coroutine",
        "methods",
        "name",
        "prefix",
        "stream",
        "wants_context",
    )

    def __init__(
        self,
        prefix: str,
        methods: frozenset[str] | None,
        handler: Handler,
        stream: bool = False,
    ) -> None:
        self.prefix = prefix
        self.methods = methods
        self.handler = handler
        # The handler reads a streamed request body itself (request.stream()).
        self.stream = stream
        # Decided once: no inspection per request.
        self.is_coroutine = inspect.iscoroutinefunction(handler)
        self.wants_context = _takes_context(handler)
        # For the log when what the handler returned cannot be sent.
        self.name = _handler_name(handler)


class Service:
    """A split service: handlers matched by path prefix (longest first), optionally by method.

    ``tracing=True`` runs each handler inside an OpenTelemetry span, a child
    of the proxy's (the ``tracing`` extra; see :mod:`pitcher_rpc.sdk.tracing`);
    left at None, ``PITCHER_TRACING=true`` in the environment turns it on.

    ``max_body_size`` bounds a request body read whole: the body a handler
    gets in ``request.body`` when the caller streamed it (413 past it), and
    ``await request.read()``. None (the default): the server's frame limit,
    the most a whole REQUEST may carry. A route made with ``stream=True``
    reads its body with ``request.stream()``, unbounded. See docs/sdk.md.
    """

    def __init__(
        self,
        name: str = "service",
        handler: Handler | None = None,
        *,
        tracing: bool | None = None,
        max_body_size: int | None = None,
    ) -> None:
        if max_body_size is not None and max_body_size < 0:
            raise ValueError(f"max_body_size must be >= 0, not {max_body_size}")
        self.name = name
        self.max_body_size = max_body_size
        # The span maker when tracing is on; respond() reads it once per request.
        self._tracing: Any = None
        if tracing is None:
            tracing = _tracing_wanted()
        if tracing:
            from .tracing import ServiceTracing

            self._tracing = ServiceTracing(name)
        self._routes: list[_Route] = []
        # The route of every request when one handler serves all paths and methods.
        self._only: _Route | None = None
        # The largest payload this service's server sends (set by serve()): a
        # handler's answer over it is logged with the handler's name.
        self._frame_limit = DEFAULT_MAX_FRAME_SIZE
        if handler is not None:
            self._add("/", None, handler)

    def route(
        self, prefix: str = "/", methods: Iterable[str] | None = None, *, stream: bool = False
    ) -> Callable[[Handler], Handler]:
        """Register a handler for paths starting with ``prefix`` (sync or async).

        ``stream=True``: the handler reads a streamed request body itself, as
        it comes (``request.stream()``, or ``await request.read()``), and
        ``request.body`` is empty until it did. Without it the service reads a
        streamed body whole (up to ``max_body_size``) before the handler runs.
        """
        allowed = frozenset(m.upper() for m in methods) if methods is not None else None

        def register(handler: Handler) -> Handler:
            self._add(prefix, allowed, handler, stream)
            return handler

        return register

    def _add(
        self, prefix: str, methods: frozenset[str] | None, handler: Handler, stream: bool = False
    ) -> None:
        self._routes.append(_Route(prefix, methods, handler, stream))
        self._routes.sort(key=lambda r: len(r.prefix), reverse=True)
        first = self._routes[0]
        alone = len(self._routes) == 1 and first.prefix == "/" and first.methods is None
        self._only = first if alone else None

    def _match(self, method: str, path: str) -> _Route | bytes:
        """The route for a request, or the 404 or 405 payload."""
        path_matched = False
        for route in self._routes:
            if path.startswith(route.prefix):
                if route.methods is None or method in route.methods:
                    return route
                path_matched = True
        return _NOT_ALLOWED if path_matched else _NOT_FOUND

    async def handle(self, request: Request) -> Response | StreamingResponse:
        """Run the handler for ``request`` and return its answer as a Response.

        A handler's StreamingResponse comes back as it is (nothing iterated).
        """
        found = self._only or self._match(request.method, request.path)
        if isinstance(found, bytes):
            return (
                Response(405, "method not allowed\n")
                if found is _NOT_ALLOWED
                else Response(404, "not found\n")
            )
        result = (
            found.handler(request, Context(request))
            if found.wants_context
            else found.handler(request)
        )
        if type(result) not in _PLAIN and _awaitable(result):
            result = await result
        if isinstance(result, Response | StreamingResponse):
            return result
        if isinstance(result, bytes | str):
            return Response(200, result)
        if result is None:
            return Response(204)
        return Response(200, json_bytes(result), [_JSON_TYPE])

    def respond(self, payload: bytes, deadline_ms: int = 0, call: Any = WHOLE_CALL) -> Any:
        """The transport handler: a Request payload in, the Response payload out.

        The payload comes back at once when the handler does not wait, else an
        awaitable of it (:class:`transports.handlers.HandlerRunner` takes both).
        ``deadline_ms`` is the REQUEST frame's budget (0: none), for the
        handlers that take a :class:`Context`. ``call`` is the transport's
        ServerCall: the rest of a streamed request body (``call.body``), and
        whether the caller takes a streamed answer (``call.may_stream``);
        then a StreamingResponse comes back as the transport's
        StreamedAnswer. Without it (a whole request from a caller that takes
        no stream) a streamed answer is collected whole.
        """
        message = decode_request(payload)
        if self._tracing is not None:
            return self._tracing.respond(self, message, deadline_ms, call)
        if call.body is not None:
            return self._respond_streamed(message, deadline_ms, call)
        # What follows is _dispatch inlined: most requests come this way.
        method = message.method.decode("latin-1")
        path = message.path.decode("latin-1")
        route = self._only or self._match(method, path)
        if isinstance(route, bytes):
            return route
        request = Request(
            method,
            path,
            message.query.decode("latin-1"),
            None,
            message.body,
            message.route,
            message.client,
            message=message,
        )
        if route.wants_context:
            return self._respond_with_context(route, request, deadline_ms, call)
        result = route.handler(request)
        if route.is_coroutine and type(result) is _CoroutineType:
            try:
                waiting_on = result.send(None)
            except StopIteration as done:
                return self._answer(route, done.value, call)
            return self._carry_on(route, result, waiting_on, call)
        if type(result) not in _PLAIN:
            if _awaitable(result):
                return self._finish_later(route, result, call)
            return self._answer(route, result, call)
        # _answer inlined: most requests end here.
        try:
            answer = _encode_result(result)
        except Exception as exc:
            _log_unsendable(route, exc)
            raise
        if len(answer) > self._frame_limit:
            self._log_too_large(route, len(answer))
        return answer

    def _dispatch(self, message: Any, route: _Route, deadline_ms: int, call: Any) -> Any:
        """What :meth:`respond` answers for ``message`` once its route is known.

        The tracing wrapper runs this inside its span (the request, the
        Context, a streamed body and a streamed answer are what they are
        without tracing); :meth:`respond` inlines the whole-body part.
        """
        method = message.method.decode("latin-1")
        path = message.path.decode("latin-1")
        if call.body is not None:
            return self._streamed_body(message, route, method, path, deadline_ms, call)
        request = Request(
            method,
            path,
            message.query.decode("latin-1"),
            None,
            message.body,
            message.route,
            message.client,
            message=message,
        )
        if route.wants_context:
            return self._respond_with_context(route, request, deadline_ms, call)
        result = route.handler(request)
        if route.is_coroutine and type(result) is _CoroutineType:
            try:
                waiting_on = result.send(None)
            except StopIteration as done:
                return self._answer(route, done.value, call)
            return self._carry_on(route, result, waiting_on, call)
        if type(result) not in _PLAIN and _awaitable(result):
            return self._finish_later(route, result, call)
        return self._answer(route, result, call)

    def _respond_with_context(
        self, route: _Route, request: Request, deadline_ms: int, call: Any
    ) -> Any:
        context = Context(request, time.monotonic() + deadline_ms / 1000 if deadline_ms else None)
        result = route.handler(request, context)
        if type(result) is _CoroutineType:
            try:
                waiting_on = result.send(None)
            except StopIteration as done:
                return self._answer(route, done.value, call)
            return self._carry_on_with_context(route, result, waiting_on, context, call)
        if type(result) not in _PLAIN and _awaitable(result):
            return self._finish_later(route, result, call)
        return self._answer(route, result, call)

    def _answer(self, route: _Route, result: Any, call: Any = None) -> Any:
        """The Response payload for what ``route``'s handler returned; the log names it if bad.

        A StreamingResponse is sent as ``call``'s caller can take it (see
        :meth:`_deliver`); without ``call`` it comes back as a
        :class:`~pitcher_rpc.sdk.streams.Streamed` (its head checked) for
        the caller of this to deliver.
        """
        answer: bytes | None
        try:
            answer = _encode_result(result)
        except Exception as exc:
            # A StreamingResponse is recognised here, where encoding it as JSON
            # failed, so that a dict, bytes or Response answer pays no check.
            if not isinstance(result, StreamingResponse):
                _log_unsendable(route, exc)
                raise
            answer = None
        if answer is None:
            try:
                streamed = self._streamed(route, result)
            except Exception as exc:
                _log_unsendable(route, exc)
                raise
            return streamed if call is None else self._deliver(streamed, call)
        if len(answer) > self._frame_limit:
            self._log_too_large(route, len(answer))
        return answer

    def _streamed(self, route: _Route, response: StreamingResponse) -> Streamed:
        head = Response(response.status, b"", response.header_pairs()).encode()
        return Streamed(head, response.chunks(), response.size, route.name, self._frame_limit)

    def _deliver(self, answer: Streamed, call: Any) -> Any:
        """What the transport gets for a streamed answer: a StreamedAnswer, or one collected."""
        if call.may_stream:
            return _streamed_answer(answer)
        return answer.collect()

    def _log_too_large(self, route: _Route, size: int) -> None:
        # The transport refuses to send it (the caller gets an INTERNAL error,
        # the HTTP client a 502) and logs the request id; this says whose it is.
        log.error(
            "handler %s answered %d bytes, over the frame limit of %d bytes: not sent",
            route.name,
            size,
            self._frame_limit,
        )

    async def _carry_on(self, route: _Route, coroutine: Any, waiting_on: Any, call: Any) -> Any:
        """The rest of a handler's coroutine that was stepped by hand and had to wait."""
        answer = self._answer(route, await resume(coroutine, waiting_on), call)
        return answer if type(answer) is bytes else await _settled(answer)

    async def _carry_on_with_context(
        self, route: _Route, coroutine: Any, waiting_on: Any, context: Context, call: Any
    ) -> Any:
        # The server cancels the task this runs in (CANCEL, deadline, shutdown),
        # and the error comes through here on its way out of the handler.
        try:
            result = await resume(coroutine, waiting_on)
        except asyncio.CancelledError:
            context._cancelled = True
            raise
        answer = self._answer(route, result, call)
        return answer if type(answer) is bytes else await _settled(answer)

    async def _finish_later(self, route: _Route, awaitable: Awaitable[Any], call: Any) -> Any:
        answer = self._answer(route, await awaitable, call)
        return answer if type(answer) is bytes else await _settled(answer)

    # -- streamed request bodies

    def _respond_streamed(self, message: Any, deadline_ms: int, call: Any) -> Any:
        """A request whose body goes on in DATA frames (``call.body``)."""
        method = message.method.decode("latin-1")
        path = message.path.decode("latin-1")
        route = self._only or self._match(method, path)
        if isinstance(route, bytes):
            return route  # the transport stops the sender: nobody reads the rest
        return self._streamed_body(message, route, method, path, deadline_ms, call)

    def _streamed_body(
        self, message: Any, route: _Route, method: str, path: str, deadline_ms: int, call: Any
    ) -> Any:
        size = _declared_size(message)
        limit = self._body_limit()
        if route.stream:
            request = StreamedRequest(
                method, path, message, BodyReader(message.body, call.body, limit, size)
            )
            return self._run_streaming_route(route, request, deadline_ms, call)
        return self._gather_then_respond(message, route, deadline_ms, call, limit, size)

    async def _gather_then_respond(
        self,
        message: Any,
        route: _Route,
        deadline_ms: int,
        call: Any,
        limit: int,
        size: int | None,
    ) -> Any:
        # As nginx's proxy_request_buffering: the handler gets the whole body in
        # request.body, as from a whole REQUEST, read here up to max_body_size.
        try:
            message.body = await gather_body(message.body, call.body, limit, size)
        except BodyTooLarge:
            return _TOO_LARGE
        whole: ServerCall = WHOLE_CALL_MAY_STREAM if call.may_stream else WHOLE_CALL
        return await _settled(self._dispatch(message, route, deadline_ms, whole))

    async def _run_streaming_route(
        self, route: _Route, request: Request, deadline_ms: int, call: Any
    ) -> Any:
        context: Context | None = None
        try:
            if route.wants_context:
                body = call.body
                if body is not None:
                    # Its deadline counts from the body's end (None until then).
                    context = Context(request, None, body)
                else:
                    context = Context(
                        request, time.monotonic() + deadline_ms / 1000 if deadline_ms else None
                    )
                result = route.handler(request, context)
            else:
                result = route.handler(request)
            if type(result) not in _PLAIN and _awaitable(result):
                result = await result
        except BodyTooLarge:
            return _TOO_LARGE
        except asyncio.CancelledError:
            if context is not None:
                context._cancelled = True
            raise
        return await _settled(self._answer(route, result, call))

    def _body_limit(self) -> int:
        limit = self.max_body_size
        return self._frame_limit if limit is None else limit

    async def handle_payload(self, payload: bytes, deadline_ms: int = 0) -> bytes:
        """:meth:`respond`, always awaited (a streamed answer collected whole)."""
        answer = self.respond(payload, deadline_ms)
        result: bytes = answer if isinstance(answer, bytes) else await answer
        return result

    async def serve(self, address: str, options: ServerOptions | None = None) -> Server:
        """Start serving on ``address`` (any registered transport URI); returns the server."""
        settings = options if options is not None else ServerOptions()
        limit = settings.max_frame_size
        if address.startswith("udp"):
            limit = min(limit, settings.max_datagram - 24)  # CRC and frame header
        self._frame_limit = limit
        # Every route's handler may take a Context, added even after this:
        # each request's deadline goes to respond(), which a route without a
        # Context ignores. A carrier that streams bodies also passes the call.
        handler = _served(self.respond)
        server: Server = await transport_for(address).serve(address, handler, options)
        log.info("%s serving on %s (%s)", self.name, server.address, describe_build())
        return server

    def run(
        self, address: str, *, grace: float = 5.0, register: Registration | None = None
    ) -> None:
        """Serve until SIGINT or SIGTERM, then drain for at most ``grace`` seconds.

        With ``register``, the service adds itself to a proxy's cluster once
        it serves, and at SIGTERM is drained there before it stops and then
        removed (see :mod:`pitcher_rpc.sdk.registration`).
        """
        import uvloop

        uvloop.run(self._run_until_signal(address, grace, register))

    async def _run_until_signal(
        self, address: str, grace: float, register: Registration | None = None
    ) -> None:
        async def close(server: Server) -> None:
            await server.close(grace)

        await serve_until_signal(lambda: self.serve(address), close, register)


# Set to "true" (or "1"): every Service made without tracing=... traces.
TRACING_ENV = "PITCHER_TRACING"


def _tracing_wanted() -> bool:
    """PITCHER_TRACING=true (or 1), unless OTEL_SDK_DISABLED=true: OpenTelemetry's style."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return os.environ.get(TRACING_ENV, "").strip().lower() in ("true", "1")


_CoroutineType = types.CoroutineType
_awaitable = inspect.isawaitable


def _declared_size(message: Any) -> int | None:
    """The Request's ``body_size`` (field 9) when the sender knew it, else None."""
    if message.HasField("body_size"):
        size: int = message.body_size
        return size
    return None


def _served(respond: Callable[..., Any]) -> WithStreams:
    """``respond`` marked for the transports: it takes the call, and may stream."""
    return WithStreams(respond)


def stream_answer(head: bytes, chunks: AsyncIterator[bytes]) -> StreamedAnswer:
    """The transport's StreamedAnswer: a RESPONSE head with MORE, then ``chunks`` as DATA."""
    return StreamedAnswer(head, chunks)


async def _settled(answer: Any) -> Any:
    """A delivered answer that may still be an awaitable (a stream being collected)."""
    return await answer if _awaitable(answer) else answer


def _streamed_answer(answer: Streamed) -> StreamedAnswer:
    return stream_answer(answer.streamed_head(), answer.body())


def _log_unsendable(route: _Route, error: Exception) -> None:
    log.error(
        "handler %s returned an answer that cannot be sent (%s: %s)",
        route.name,
        type(error).__name__,
        error,
    )
