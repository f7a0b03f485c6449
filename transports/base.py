"""What every transport offers: a client (one per node) and a server.

A transport moves opaque payloads: the proxy sends a request payload and
gets a response payload back. It knows nothing of HTTP or of what the
payload means.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from .calls import Receiver

if TYPE_CHECKING:
    from .bodies import OutgoingBody
from .frame import DEFAULT_INITIAL_WINDOW, DEFAULT_MAX_FRAME_SIZE, DEFAULT_MAX_IN_FLIGHT

# A server-side handler: request payload in, response payload out. The server
# runs one per request, concurrently, and cancels it when the caller cancels
# or the request's deadline passes. It is a coroutine function, or a plain
# function returning the response bytes when it has them at once and an
# awaitable only when it must wait (no coroutine is then made per request;
# see transports/handlers.py). A handler that wants the request's deadline
# too is passed wrapped in a WithDeadline.
PayloadHandler = Callable[[bytes], "Awaitable[bytes] | bytes"]
# The same, also given the REQUEST frame's deadline_ms (0: none).
DeadlineHandler = Callable[[bytes, int], "Awaitable[bytes] | bytes"]


class WithDeadline:
    """Marks a handler that takes ``(payload, deadline_ms)``: serve ``WithDeadline(handler)``.

    ``deadline_ms`` is the REQUEST frame's budget in milliseconds, counted
    from its arrival (0: the caller set none), so the handler can tell how
    long anyone waits for its answer. The servers look for the mark when
    they set up, not per request, and then call ``handler`` directly: per
    request it costs a branch, and a plain one-argument handler pays
    nothing. A server that does not know the mark calls this object with
    the payload alone, and the handler then sees no deadline.
    """

    __slots__ = ("handler",)

    def __init__(self, handler: DeadlineHandler) -> None:
        self.handler = handler

    def __call__(self, payload: bytes) -> Awaitable[bytes] | bytes:
        return self.handler(payload, 0)

    def __repr__(self) -> str:
        return f"WithDeadline({self.handler!r})"


class ServerCall:
    """What a :class:`WithStreams` handler learns of its call beyond the payload.

    ``body``: the rest of the request body when the REQUEST had the MORE flag
    (the payload is then its head), an async iterator of byte chunks whose
    credit goes back to the caller as the handler takes them; None for a
    whole request. ``may_stream``: the caller takes a streamed answer (its
    REQUEST had STREAM_OK and its connection announced a window), so the
    handler may return a :class:`StreamedAnswer`; when False it must answer
    bytes (gathering its body itself).
    """

    __slots__ = ("body", "may_stream")

    def __init__(self, body: AsyncIterator[bytes] | None, may_stream: bool) -> None:
        self.body = body
        self.may_stream = may_stream

    def __repr__(self) -> str:
        return f"ServerCall(body={self.body!r}, may_stream={self.may_stream})"


# Whole requests share these two: no object per request.
WHOLE_CALL = ServerCall(None, False)
WHOLE_CALL_MAY_STREAM = ServerCall(None, True)


class StreamedAnswer:
    """A response whose body follows its head: RESPONSE with MORE, then DATA.

    ``head`` is the response payload (its body field may hold the first bytes);
    ``chunks`` yields the rest, sent as the caller's credit allows (the server
    waits for WINDOW_UPDATE: a slow caller holds the iterator back, nothing
    piles up). An exception inside ``chunks`` cuts the stream: the caller gets
    a per-request ERROR (INTERNAL) after the head, never a clean end.
    """

    __slots__ = ("chunks", "head")

    def __init__(self, head: bytes, chunks: AsyncIterator[bytes]) -> None:
        self.head = head
        self.chunks = chunks


# A handler served as WithStreams: (payload, deadline_ms, call) in; bytes, a
# StreamedAnswer, or an awaitable of either out.
StreamsHandler = Callable[
    [bytes, int, ServerCall], "Awaitable[bytes | StreamedAnswer] | bytes | StreamedAnswer"
]


class WithStreams:
    """Marks a handler that takes ``(payload, deadline_ms, call)``: serve ``WithStreams(h)``.

    The server then accepts streamed request bodies (it announces a window)
    and lets the handler stream its answer (see :class:`ServerCall`,
    :class:`StreamedAnswer`). A carrier without streamed bodies (UDP) calls
    the handler with whole requests only and ``may_stream`` False.
    """

    __slots__ = ("handler",)

    def __init__(self, handler: StreamsHandler) -> None:
        self.handler = handler

    def __call__(
        self, payload: bytes
    ) -> Awaitable[bytes | StreamedAnswer] | bytes | StreamedAnswer:
        return self.handler(payload, 0, WHOLE_CALL)

    def __repr__(self) -> str:
        return f"WithStreams({self.handler!r})"


Handler = PayloadHandler | WithDeadline | WithStreams


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """Knobs of a client; the defaults suit a proxy in front of a local service."""

    connect_timeout: float = 1.0
    max_connections: int = 4
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    # First and largest pause before reconnecting to a node that refused us.
    backoff_initial: float = 0.05
    backoff_max: float = 2.0
    # Datagram carriers (UDP): the largest datagram sent, and how often an
    # idempotent call is re-sent (same request id) when no answer comes.
    max_datagram: int = 65507
    retries: int = 2
    retry_interval: float = 0.05
    # Message carriers (ZeroMQ): messages queued per socket before a send is refused.
    high_water_mark: int = 10000
    # Streamed response bodies: the DATA credit every call starts with toward this
    # client (SETTINGS initial_window; 0: whole responses only), and the idle limit
    # between two DATA frames for a receiver that names no ``timeout`` of its own.
    initial_window: int = DEFAULT_INITIAL_WINDOW
    stream_idle_timeout: float = 60.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ServerOptions:
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    backlog: int = 1024
    # Datagram carriers (UDP): the largest datagram accepted, and the replay
    # cache that answers a re-sent request without running it twice.
    max_datagram: int = 65507
    replay_cache_size: int = 10000
    replay_ttl: float = 30.0
    # Message carriers (ZeroMQ): messages queued per socket before a send is refused.
    high_water_mark: int = 10000
    # Streamed request bodies (a WithStreams handler): the DATA credit every call
    # starts with toward this server (SETTINGS initial_window; 0: whole requests
    # only), and how long a request body may pause between two DATA frames.
    initial_window: int = DEFAULT_INITIAL_WINDOW
    stream_idle_timeout: float = 60.0
    extra: dict[str, Any] = field(default_factory=dict)


class Client(Protocol):
    """A client for one node: pooled, multiplexed connections."""

    address: str

    def send(self, payload: bytes, receiver: Receiver, stream_response: bool = False) -> None:
        """Send one request; its outcome goes to ``receiver`` exactly once.

        The hot-path form: no future and no timer per call. The receiver may
        be called before this returns (an error found at once).
        ``stream_response``: the node may stream its answer (the receiver is
        then a :class:`~transports.calls.StreamReceiver`); a carrier without
        streams answers whole.
        """

    def send_stream(
        self, payload: bytes, receiver: Receiver, stream_response: bool = True
    ) -> OutgoingBody:
        """Send a request whose body follows (``payload`` is its head): docs/wire.md 6.9.

        The body goes through the returned OutgoingBody. UDP refuses
        (StreamingUnsupported to the receiver); a node that takes no streams
        gets one whole REQUEST at ``end()``.
        """

    @property
    def supports_streaming(self) -> bool:
        """Whether this carrier can stream bodies at all (False: UDP)."""

    def cancel(self, receiver: Receiver) -> None:
        """The caller gives up on a call: forget it and tell the node. No callback follows."""

    def start(
        self, payload: bytes, timeout: float, idempotent: bool = False
    ) -> asyncio.Future[bytes]:
        """Send one request; the future gets the response payload or a CallError.

        Cancelling the future gives the call up and tells the node. This is
        the form for callback-driven code; :meth:`call` is the same, awaited.
        """

    async def call(self, payload: bytes, timeout: float, idempotent: bool = False) -> bytes:
        """Send one request and wait for its response, at most ``timeout`` seconds.

        Raises a :class:`~transports.errors.CallError`; its ``sent`` flag says
        whether the node may have started the request.
        """

    @property
    def in_flight(self) -> int: ...

    async def close(self, timeout: float = 5.0) -> None:
        """Stop new calls, let in-flight ones finish (at most ``timeout``), then close."""

    def abort(self) -> None:
        """Close every connection now; in-flight calls fail with ConnectionLost."""


class Server(Protocol):
    address: str

    async def close(self, grace: float = 5.0) -> None:
        """Send GOAWAY, finish in-flight requests (at most ``grace``), then close."""

    def abort(self) -> None: ...


class Transport(Protocol):
    """A carrier, registered under one or more URI schemes."""

    schemes: ClassVar[tuple[str, ...]]

    @classmethod
    def client(cls, address: str, options: ClientOptions | None = None) -> Client: ...

    @classmethod
    async def serve(
        cls, address: str, handler: Handler, options: ServerOptions | None = None
    ) -> Server: ...


class CarrierTransport:
    """The registry's view of one carrier: check the scheme, make clients, start servers.

    Subclasses name their ``schemes`` and their ``client_class`` and
    ``server_class``.
    """

    schemes: ClassVar[tuple[str, ...]] = ()
    client_class: ClassVar[Any] = None
    server_class: ClassVar[Any] = None

    @classmethod
    def client(cls, address: str, options: ClientOptions | None = None) -> Any:
        cls.check(address)
        return cls.client_class(address, options)

    @classmethod
    async def serve(
        cls, address: str, handler: Handler, options: ServerOptions | None = None
    ) -> Any:
        cls.check(address)
        server = cls.server_class(address, handler, options)
        await server.start()
        return server

    @classmethod
    def check(cls, address: str) -> None:
        """AddressError unless ``address`` is one of this carrier's schemes."""
        from .registry import AddressError, parse_address

        scheme = parse_address(address).scheme
        if scheme not in cls.schemes:
            raise AddressError(f"{cls.__name__} does not serve {scheme!r} addresses")
