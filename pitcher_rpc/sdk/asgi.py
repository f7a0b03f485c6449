"""An ASGI 3 application served as a split service: frames in, frames out, no HTTP.

``pitcher backend app:app --listen unix:///run/app.sock`` runs a FastAPI,
Starlette, Django or Litestar application behind the proxy as it would run an
SDK :class:`~pitcher_rpc.sdk.service.Service`. Each REQUEST frame becomes an
``http`` scope; its body is one ``http.request`` event, or, when the caller
streams it, one event per piece with ``more_body`` (read as the app calls
``receive()``, so a slow app holds the sender back). An answer in one
``http.response.body`` message is one RESPONSE frame; one in several is
streamed (a RESPONSE head, then DATA per message, ``send()`` returning as the
transport takes each) to a caller that takes streamed answers, and gathered
into one frame for any other. What differs from a server speaking HTTP (the
disconnect, the scope's fields) is in docs/asgi.md.

Per request: the payload is parsed by the generated class (C), the scope is
built straight from its fields, and the app runs in one task (as under
uvicorn: frameworks need a task of their own for anyio's cancel scopes and
thread pools). The frame handler waits for the response (or its head), not
for the app: background tasks run after the answer is sent. There is no
queue for a whole body: it is handed over by the first ``receive()``, and the
answer is one future.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import os
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from time import monotonic
from typing import Any, cast
from urllib.parse import unquote

from transports.base import Server, ServerOptions
from transports.frame import DEFAULT_MAX_FRAME_SIZE
from transports.native import describe as describe_build
from transports.registry import transport_for

from ..codec import decode_request, encode_response, encode_varint, response_head
from .registration import Registration, serve_until_signal
from .service import Service, _declared_size, _served, _valid_headers, stream_answer

log = logging.getLogger("pitcher.asgi")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_ASGI = {"version": "3.0", "spec_version": "2.4"}
_DISCONNECT: dict[str, Any] = {"type": "http.disconnect"}
_CONTENT_LENGTH = b"content-length"
_REQUEST_ID = b"x-request-id"
# Response field 5 (body_size, a varint): key byte.
_BODY_SIZE_KEY = b"\x28"
# Methods whose requests carry a length even when it is 0 (clients send
# ``Content-Length: 0``); Django reads a body only as long as it says.
_BODY_METHODS = frozenset(("POST", "PUT", "PATCH"))
_SERVER_ERROR = encode_response(
    500, (b"content-type",), (b"text/plain; charset=utf-8",), b"Internal Server Error"
)


class AppError(Exception):
    """The app broke the ASGI rules or answered what the proxy would refuse; the call fails."""


class ClientDisconnected(OSError):
    """send() of a piece of a body after the call ended (ASGI 2.4: an OSError)."""


class LifespanError(Exception):
    """The app's lifespan startup (or shutdown) failed; the message is the app's."""


# ----------------------------------------------------------------------------- loading


def is_asgi_app(candidate: object) -> bool:
    """Whether ``candidate`` looks like an ASGI 3 app: an async callable of scope, receive, send.

    A Service is not one, nor an SDK handler (``async def h(request)``).
    """
    if isinstance(candidate, Service) or not callable(candidate):
        return False
    if not inspect.iscoroutinefunction(candidate):
        call = getattr(type(candidate), "__call__", None)  # noqa: B004 - the class's
        if call is None or not inspect.iscoroutinefunction(call):
            return False
    try:
        # Of an object: its class's __call__ without self.
        parameters = inspect.signature(candidate).parameters.values()
    except (TypeError, ValueError):
        return True  # no signature to read: trust the async callable
    positional = [
        p
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    variadic = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters)
    return variadic or len(positional) >= 3


def load_app(spec: str) -> Any:
    """The object ``MODULE:ATTRIBUTE`` names, imported with the current directory first."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"expected MODULE:ATTRIBUTE, got {spec!r}")
    try:
        value: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            value = getattr(value, part)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load {spec}: {exc}") from None
    return value


def as_service(candidate: object, interface: str = "auto", name: str = "") -> Service | AsgiService:
    """What ``pitcher backend`` runs for ``candidate``: an SDK Service, or an ASGI app wrapped.

    ``interface`` is ``auto`` (a Service as it is, an async callable as ASGI),
    ``sdk`` or ``asgi``; ValueError names what does not fit.
    """
    if interface not in ("auto", "sdk", "asgi"):
        raise ValueError(f"unknown interface {interface!r} (auto, sdk or asgi)")
    if isinstance(candidate, Service):
        if interface == "asgi":
            raise ValueError("is a pitcher_rpc.sdk.Service, not an ASGI app")
        return candidate
    if interface == "sdk":
        raise ValueError("is not a pitcher_rpc.sdk.Service")
    if (interface == "asgi" and callable(candidate)) or is_asgi_app(candidate):
        return AsgiService(cast(AsgiApp, candidate), name=name)
    raise ValueError(
        "is not a pitcher_rpc.sdk.Service, nor an ASGI 3 app (an async callable"
        " taking scope, receive and send; an ASGI 2 class is not served)"
    )


# ----------------------------------------------------------------------------- one request


class _Cycle:
    """One request's receive() and send(), and the future of its RESPONSE payload.

    The answer is the whole payload, or (for a caller that takes streamed
    answers, when the app sends its body in several messages) the
    transport's StreamedAnswer, whose chunks come through ``stream``.
    """

    __slots__ = (
        "answer",
        "body",
        "complete",
        "disconnected",
        "limit",
        "may_stream",
        "name",
        "names",
        "parts",
        "reading",
        "rest",
        "size",
        "started",
        "status",
        "stream",
        "values",
        "waiter",
    )

    def __init__(
        self,
        body: bytes,
        answer: asyncio.Future[Any],
        limit: int,
        name: str,
        rest: AsyncIterator[bytes] | None = None,
        may_stream: bool = False,
    ) -> None:
        self.body: bytes | None = body
        # The rest of a streamed request body (the transport's iterator), None once read.
        self.rest = rest
        self.reading: asyncio.Future[bytes | None] | None = None
        self.may_stream = may_stream
        self.answer = answer
        self.limit = limit
        self.name = name
        self.started = False
        self.complete = False
        self.disconnected = False
        self.status = 0
        self.names: list[bytes] = []
        self.values: list[bytes] = []
        self.parts: list[bytes] = []
        self.size = 0
        self.stream: _Outgoing | None = None
        self.waiter: asyncio.Future[None] | None = None

    async def receive(self) -> Message:
        body = self.body
        if body is not None:
            self.body = None
            return {"type": "http.request", "body": body, "more_body": self.rest is not None}
        if self.rest is not None and not self.disconnected:
            return await self._next_piece()
        if not (self.disconnected or self.complete):
            # The app listens for the end of the call: the proxy's CANCEL, the
            # deadline, the server stopping. Nothing else can come.
            await self._wait_disconnect()
        return {"type": "http.disconnect"}

    async def _wait_disconnect(self) -> None:
        waiter = self.waiter
        if waiter is None or waiter.cancelled():  # the app's own cancel scope ended a wait
            waiter = self.waiter = self.answer.get_loop().create_future()
        await waiter

    async def _next_piece(self) -> Message:
        """The next piece of a streamed request body, or http.disconnect if the call ended."""
        rest = self.rest
        assert rest is not None
        reading = self.reading
        if reading is None:
            # A task of its own: the wait for the sender can end with the call
            # (disconnect) without cancelling the transport's iterator.
            reading = self.reading = asyncio.ensure_future(_next_chunk(rest))
            reading.add_done_callback(self._read_done)
        waiter = self.waiter
        if waiter is None or waiter.cancelled():
            waiter = self.waiter = self.answer.get_loop().create_future()
        await asyncio.wait((reading, waiter), return_when=asyncio.FIRST_COMPLETED)
        if not reading.done() or self.disconnected:
            return {"type": "http.disconnect"}
        self.reading = None
        if reading.cancelled() or reading.exception() is not None:
            # The sender's body was cut (its client went away, or it stalled
            # past the idle limit): the call is over, and fails with that.
            self.rest = None
            error = None if reading.cancelled() else reading.exception()
            answer = self.answer
            if not answer.done():
                answer.set_exception(error or AppError("the request body was cut"))
            self.disconnect()
            return {"type": "http.disconnect"}
        chunk = reading.result()
        if chunk is None:
            self.rest = None
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.request", "body": chunk, "more_body": True}

    @staticmethod
    def _read_done(reading: asyncio.Future[bytes | None]) -> None:
        if not reading.cancelled():
            reading.exception()  # retrieved: a cut body is an outcome, not a bug to log

    def disconnect(self) -> None:
        """Nobody waits for the answer any more: a waiting receive() gets http.disconnect."""
        self.disconnected = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        reading = self.reading
        if reading is not None and not reading.done():
            reading.cancel()
        stream = self.stream
        if stream is not None:
            stream.close()

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            if not self.started:
                raise RuntimeError("http.response.body sent before http.response.start")
            if self.complete:
                raise RuntimeError("http.response.body sent after the response was complete")
            more = message.get("more_body", False)
            if self.disconnected:
                if more:
                    # ASGI 2.4: a producer (Starlette's StreamingResponse) learns
                    # of the end here, and stops rather than making pieces for nobody.
                    raise ClientDisconnected("the caller went away")
                return  # the last piece: as uvicorn, nobody reads it
            body = message.get("body", b"")
            stream = self.stream
            if stream is not None:
                if not more:
                    self.complete = True
                await stream.put(bytes(body), not more)
                return
            if more and self.may_stream:
                self._start_stream()
                stream = self.stream
                if stream is not None:
                    await stream.put(bytes(body), False)
                return
            if body:
                self.size += len(body)
                if self.size <= self.limit:
                    self.parts.append(body)
            if not more:
                self.complete = True
                self._finish()
        elif kind == "http.response.start":
            if self.started:
                raise RuntimeError("http.response.start sent twice")
            self.started = True
            self.status = message["status"]
            for name, value in message.get("headers", ()):
                self.names.append(bytes(name))
                self.values.append(bytes(value))
        elif kind == "http.response.trailers":
            pass  # trailers are not relayed (docs/asgi.md)
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} in an http scope")

    def _head_checked(self) -> bool:
        """Whether the status and headers may be sent; if not, the call failed (logged)."""
        status = self.status
        if type(status) is not int or not 200 <= status <= 599:
            self.fail(f"status {status!r} is not a final HTTP status (200..599)")
            return False
        names = self.names
        if names and not _valid_headers(names, self.values):
            pairs = list(zip(names, self.values, strict=True))
            self.fail(f"answered a header the proxy would refuse: {pairs!r}")
            return False
        return True

    def _start_stream(self) -> None:
        """The app sends its body in pieces and the caller takes them: answer the head now."""
        answer = self.answer
        if answer.done() or not self._head_checked():
            return
        head = response_head(self.status, self.names, self.values)
        size = _content_length(self.names, self.values)
        if size is not None:
            head += _BODY_SIZE_KEY + encode_varint(size)
        stream = self.stream = _Outgoing(self)
        answer.set_result(stream_answer(head, stream.chunks()))
        parts = self.parts
        if parts:  # none so far: a body begins streamed or not at all
            stream.items.append(b"".join(parts))
            parts.clear()

    def _finish(self) -> None:
        answer = self.answer
        if answer.done():
            return
        if self.size > self.limit:
            self.fail(
                f"answered {self.size} bytes, over the frame limit of {self.limit} bytes"
                " (to a caller that takes no streamed answer)"
            )
            return
        if not self._head_checked():
            return
        parts = self.parts
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        payload = encode_response(self.status, self.names, self.values, body)
        if len(payload) > self.limit:
            self.fail(
                f"answered {len(payload)} bytes, over the frame limit of {self.limit} bytes"
                " (to a caller that takes no streamed answer)"
            )
            return
        answer.set_result(payload)

    def fail(self, reason: str) -> None:
        """The call fails (the proxy answers 502, or cuts a streamed body); the log says why."""
        log.error("ASGI app %s %s: not sent", self.name, reason)
        stream = self.stream
        if stream is not None:
            stream.fail(AppError(reason))
        elif not self.answer.done():
            self.answer.set_exception(AppError(reason))

    def app_ended(self, error: BaseException | None) -> None:
        """The app's call returned (or raised): answer whatever is still owed."""
        if self.complete or self.disconnected:
            return
        if self.stream is None and self.answer.done():
            return
        if not self.started:
            # uvicorn's answer when nothing was sent: 500, and the log says why.
            if error is None:
                log.error("ASGI app %s returned without starting a response", self.name)
            self.answer.set_result(_SERVER_ERROR)
            return
        self.fail("returned without completing its response" if error is None else "failed")


class _Outgoing:
    """The pieces of a streamed response between the app's send() and the transport.

    send() returns once the transport took its piece (at most one waits
    here), so an app is held back by the caller's credit as under an HTTP
    server by the socket's buffer.
    """

    __slots__ = ("closed", "cycle", "ended", "error", "items", "reader", "space")

    def __init__(self, cycle: _Cycle) -> None:
        self.cycle = cycle
        self.items: deque[bytes] = deque()
        self.ended = False
        self.closed = False
        self.error: BaseException | None = None
        self.reader: asyncio.Future[None] | None = None
        self.space: asyncio.Future[None] | None = None

    async def put(self, chunk: bytes, last: bool) -> None:
        if self.closed:
            return
        if chunk:
            self.items.append(chunk)
        if last:
            self.ended = True
        self._wake_reader()
        while self.items and not self.closed:
            space = self.space
            if space is None or space.done():
                space = self.space = self.cycle.answer.get_loop().create_future()
            await space

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._wake_reader()

    def close(self) -> None:
        """The transport reads no more (the call was cancelled or is over)."""
        self.closed = True
        self.items.clear()
        self._wake(self.space)
        self._wake_reader()

    def _wake_reader(self) -> None:
        self._wake(self.reader)

    @staticmethod
    def _wake(waiter: asyncio.Future[None] | None) -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            while True:
                items = self.items
                if items:
                    chunk = items.popleft()
                    if not items:
                        self._wake(self.space)
                    yield chunk
                    continue
                if self.error is not None:
                    raise self.error
                if self.ended:
                    return
                if self.closed:
                    # The call ended on this side (its request body was cut, the
                    # server stops): the answer must not end as if it were whole.
                    raise AppError("the call ended before the app's response did")
                reader = self.reader = self.cycle.answer.get_loop().create_future()
                await reader
        finally:
            if not self.ended:
                # Cut short (CANCEL, the deadline) or failed: the app hears http.disconnect.
                self.cycle.disconnect()
            self.close()


async def _next_chunk(rest: AsyncIterator[bytes]) -> bytes | None:
    """The next non-empty piece of a streamed request body; None at its end."""
    async for chunk in rest:
        if chunk:
            return chunk
    return None


def _content_length(names: list[bytes], values: list[bytes]) -> int | None:
    """The app's Content-Length, when it gave one: the body_size of a streamed answer."""
    if _CONTENT_LENGTH not in names:
        return None
    value = values[names.index(_CONTENT_LENGTH)].strip()
    return int(value) if value.isdigit() else None


# ----------------------------------------------------------------------------- the service


class AsgiService:
    """Serves an ASGI 3 app over any registered transport, like an SDK Service.

    ``lifespan``: ``auto`` runs the lifespan protocol and goes on without it
    if the app does not support it; ``on`` requires it; ``off`` skips it.
    ``root_path`` is the scope's ``root_path`` (where the proxy's route
    mounts the app, when it strips a prefix).
    """

    def __init__(
        self, app: AsgiApp, name: str = "", *, root_path: str = "", lifespan: str = "auto"
    ) -> None:
        if lifespan not in ("auto", "on", "off"):
            raise ValueError(f"lifespan must be auto, on or off, not {lifespan!r}")
        self.app = app
        self.name = name or getattr(app, "__qualname__", None) or type(app).__name__
        self.root_path = root_path
        self.lifespan = lifespan
        # The lifespan's state: each request's scope gets a shallow copy.
        self.state: dict[str, Any] | None = None
        self._server_address: tuple[str, int | None] | None = None
        self._frame_limit = DEFAULT_MAX_FRAME_SIZE
        self._tasks: set[asyncio.Task[None]] = set()
        self._lifespan: _Lifespan | None = None

    # -- per request

    def respond(self, payload: bytes, deadline_ms: int = 0, call: Any = None) -> Awaitable[Any]:
        """The transport handler: a Request payload in, an awaitable of the Response payload.

        ``call`` (a carrier that streams bodies passes it): the rest of a
        streamed request body, which the app receives piece by piece, and
        whether the caller takes a streamed answer (then an app sending its
        body in several messages answers a StreamedAnswer).
        """
        message = decode_request(payload)
        rest: AsyncIterator[bytes] | None = None
        may_stream = False
        if call is not None:
            rest = call.body
            may_stream = call.may_stream
        method = message.method.decode("latin-1")
        raw_path = message.path
        path = raw_path.decode("latin-1")
        if "%" in path:
            path = unquote(path)
        root_path = self.root_path
        if root_path:
            # As uvicorn (and ASGI 2.4): path and raw_path include the root path.
            path = root_path + path
            raw_path = root_path.encode("latin-1") + raw_path
        names = message.header_names[:]
        values = message.header_values[:]
        headers = list(zip(names, values, strict=True))
        body = message.body
        if rest is not None:
            # Known only when the sender declared it (a chunked body has none,
            # as under an HTTP server that passes Transfer-Encoding on).
            size = _declared_size(message)
            if size is not None:
                headers.append((_CONTENT_LENGTH, b"%d" % size))
        elif body or method in _BODY_METHODS:
            headers.append((_CONTENT_LENGTH, b"%d" % len(body)))
        client_text = message.client
        client: tuple[str, int] | None = None
        if client_text and client_text != "unix":
            host, _, port = client_text.rpartition(":")
            client = (host, int(port)) if port.isdigit() else None
        request_id = (
            values[names.index(_REQUEST_ID)].decode("latin-1") if _REQUEST_ID in names else ""
        )
        loop = asyncio.get_running_loop()
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": raw_path,
            "query_string": message.query,
            "root_path": root_path,
            "headers": headers,
            "client": client,
            "server": self._server_address,
            "extensions": {
                "pitcher": {
                    "request_id": request_id,
                    "route": message.route,
                    # time.monotonic(), as the SDK's Context.deadline; None: no deadline.
                    "deadline": monotonic() + deadline_ms / 1000 if deadline_ms else None,
                }
            },
        }
        state = self.state
        if state is not None:
            scope["state"] = state.copy()
        answer: asyncio.Future[Any] = loop.create_future()
        cycle = _Cycle(body, answer, self._frame_limit, self.name, rest, may_stream)
        task = loop.create_task(self._run_app(scope, cycle), name="pitcher-asgi-request")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return _wait(cycle)

    async def _run_app(self, scope: Scope, cycle: _Cycle) -> None:
        try:
            await self.app(scope, cycle.receive, cycle.send)
        except asyncio.CancelledError:
            # Stopped at shutdown after the grace (or by itself): nothing more will come.
            if not cycle.answer.done():
                cycle.answer.set_exception(AppError("the app was cancelled before it answered"))
            cycle.disconnect()
            raise
        except Exception as exc:
            if cycle.disconnected:
                # Most often ClientDisconnected out of send(): the caller went away.
                log.debug("ASGI app %s ended after its call did: %r", self.name, exc)
            else:
                log.error("Exception in ASGI application %s", self.name, exc_info=exc)
            cycle.app_ended(exc)
        else:
            cycle.app_ended(None)

    # -- lifespan

    async def startup(self) -> None:
        """Run the lifespan startup; LifespanError with the app's message if it failed."""
        if self.lifespan == "off":
            return
        lifespan = _Lifespan(self.app, self.lifespan == "on")
        self._lifespan = lifespan
        await lifespan.startup()
        if lifespan.supported:
            self.state = lifespan.state

    async def shutdown(self) -> None:
        lifespan, self._lifespan = self._lifespan, None
        if lifespan is not None:
            await lifespan.shutdown()

    # -- serving

    async def serve(self, address: str, options: ServerOptions | None = None) -> Server:
        """Start serving on ``address`` (run :meth:`startup` first); returns the server."""
        settings = options if options is not None else ServerOptions()
        limit = settings.max_frame_size
        if address.startswith("udp"):
            limit = min(limit, settings.max_datagram - 24)  # CRC and frame header
        self._frame_limit = limit
        server: Server = await transport_for(address).serve(address, _served(self.respond), options)
        self._server_address = _server_tuple(server.address)
        log.info("ASGI app %s serving on %s (%s)", self.name, server.address, describe_build())
        return server

    async def close(self, server: Server, grace: float) -> None:
        """Drain ``server``, then let the apps' calls (background tasks) end, then cancel them."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        await server.close(grace)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=max(0.0, deadline - loop.time()))
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=1.0)

    def run(
        self, address: str, *, grace: float = 5.0, register: Registration | None = None
    ) -> None:
        """Lifespan startup, serve until SIGINT or SIGTERM, drain, lifespan shutdown.

        A failed startup raises LifespanError (``pitcher backend`` exits 1 with
        its message) before anything listens.
        """
        import uvloop

        uvloop.run(self._run_until_signal(address, grace, register))

    async def _run_until_signal(
        self, address: str, grace: float, register: Registration | None
    ) -> None:
        async def close(server: Server) -> None:
            await self.close(server, grace)

        await self.startup()
        try:
            await serve_until_signal(lambda: self.serve(address), close, register)
        finally:
            await self.shutdown()


async def _wait(cycle: _Cycle) -> Any:
    # What the frame's handler awaits: the answer, not the end of the app.
    try:
        return await cycle.answer
    except asyncio.CancelledError:
        # The proxy's CANCEL, the deadline or the server stopping: the app
        # hears http.disconnect (it is not cancelled, as under an HTTP server).
        cycle.disconnect()
        raise


def _server_tuple(address: str) -> tuple[str, int | None] | None:
    scheme, _, rest = address.partition("://")
    if scheme in ("unix", "zmq+ipc"):
        return (rest, None)
    host, _, port = rest.rpartition(":")
    if not port.isdigit():
        return None
    return (host.strip("[]"), int(port))


# ----------------------------------------------------------------------------- lifespan


class _Lifespan:
    """The ASGI lifespan protocol: one call of the app for the process's life."""

    def __init__(self, app: AsgiApp, required: bool) -> None:
        self.app = app
        self.required = required
        self.state: dict[str, Any] = {}
        self.supported = True
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._outbox: asyncio.Queue[Message | BaseException | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def _main(self) -> None:
        scope = {"type": "lifespan", "asgi": _ASGI, "state": self.state}
        try:
            await self.app(scope, self._inbox.get, self._send)
        except Exception as exc:
            await self._outbox.put(exc)
        else:
            await self._outbox.put(None)

    async def _send(self, message: Message) -> None:
        await self._outbox.put(message)

    async def startup(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._main(), name="pitcher-lifespan")
        await self._inbox.put({"type": "lifespan.startup"})
        outcome = await self._outbox.get()
        if outcome is not None and not isinstance(outcome, BaseException):
            kind = outcome.get("type")
            if kind == "lifespan.startup.complete":
                return
            if kind == "lifespan.startup.failed":
                raise LifespanError(outcome.get("message", "") or "lifespan startup failed")
            raise LifespanError(f"unexpected lifespan message {kind!r} at startup")
        # The app returned or raised before answering: no lifespan support.
        self.supported = False
        if self.required:
            raise LifespanError(f"the app does not support the lifespan protocol: {outcome!r}")
        if isinstance(outcome, BaseException):
            log.info("ASGI 'lifespan' protocol appears unsupported (%r)", outcome)

    async def shutdown(self) -> None:
        task = self._task
        if task is None or not self.supported or task.done():
            return
        await self._inbox.put({"type": "lifespan.shutdown"})
        outcome = await self._outbox.get()
        try:
            if isinstance(outcome, BaseException):
                log.error("ASGI lifespan shutdown failed", exc_info=outcome)
                return
            if outcome is not None and outcome.get("type") == "lifespan.shutdown.failed":
                log.error("ASGI lifespan shutdown failed: %s", outcome.get("message", ""))
        finally:
            try:
                await asyncio.wait_for(task, 5.0)
            except (TimeoutError, asyncio.CancelledError, Exception):
                task.cancel()


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from .commands import backend_command

    backend_command()
