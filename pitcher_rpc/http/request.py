"""What the request parser produces: requests, refusals, and the limits it enforces."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BodyStream", "HttpError", "HttpLimits", "HttpRequest"]


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """What a request may take: sizes checked as bytes arrive, times checked by the caller's clock.

    The sizes are the parser's; the body times are the connection's
    (:class:`~pitcher_rpc.http.connection.ServerConnection`), which reads them
    once when it is made.
    """

    max_request_line: int = 8192  # method + target + version -> 414
    max_header_size: int = 32768  # all header lines, name + ": " + value + CRLF each -> 431
    max_headers: int = 100  # number of header fields -> 431
    max_body_size: int = 1048576  # de-chunked body -> 413
    # Seconds: the longest wait between two reads of a body (the head's read
    # counts as the first) -> 408...
    body_timeout: float = 30.0
    # ...and the most a whole body may take after its head; 0: no limit -> 408.
    body_deadline: float = 300.0

    def __post_init__(self) -> None:
        for name in ("max_request_line", "max_header_size", "max_headers", "max_body_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        if not self.body_timeout > 0:
            raise ValueError(f"body_timeout must be positive, not {self.body_timeout!r}")
        if not self.body_deadline >= 0:
            raise ValueError(f"body_deadline must be 0 or positive, not {self.body_deadline!r}")


class HttpError(Exception):
    """A request the proxy must refuse. The connection is always closed after answering it."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason
        # Complete requests parsed earlier in the same feed() call, before the error.
        self.requests: list[HttpRequest] = []

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"


class BodyStream:
    """The body of a request handed out at its head (see ``RequestParser`` ``stream_over``).

    The parser appends what it de-frames to ``pieces`` as it arrives; the
    consumer takes them (:meth:`take`) and passes them on. ``ended``: the last
    byte has been received (``pieces`` may still hold some). ``error``: the
    body was refused midway (over ``max_body_size``, bad chunk framing, a
    deadline): the request must be answered with that status, or cut if its
    answer has begun. ``paused``: the consumer cannot take more for now,
    so reading from the client stops; ``discarding``: the answer went out
    before the body ended, what still comes is dropped.
    """

    __slots__ = (
        "buffered",
        "discarding",
        "ended",
        "error",
        "paused",
        "paused_at",
        "pieces",
        "received",
    )

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        # Bytes in ``pieces``, and bytes received in all.
        self.buffered = 0
        self.received = 0
        self.ended = False
        self.error: HttpError | None = None
        self.paused = False
        self.paused_at = 0.0
        self.discarding = False

    def take(self) -> list[bytes]:
        """The pieces received and not taken yet, in order; the stream holds none after."""
        pieces = self.pieces
        self.pieces = []
        self.buffered = 0
        return pieces

    def put_back(self, pieces: list[bytes]) -> None:
        """Pieces taken but not passed on: they come first the next time."""
        self.pieces[:0] = pieces
        self.buffered += sum(map(len, pieces))

    def __repr__(self) -> str:
        state = "ended" if self.ended else "error" if self.error is not None else "open"
        return f"BodyStream({state}, {self.received} received, {self.buffered} held)"


# The fields of a request, which equality compares (a compiled class keeps no
# __slots__ to read back).
_FIELDS = (
    "body",
    "body_stream",
    "content_length",
    "expect_continue",
    "fields_size",
    "host",
    "keep_alive",
    "method",
    "names",
    "path",
    "query",
    "target",
    "values",
    "version",
    "watched",
)


class HttpRequest:
    """One complete request. Names are lower-case; values and the target are raw bytes.

    The header fields are two parallel lists, ``names`` and ``values``, in the
    order received: that is the shape the request frame carries, so the hot
    path never builds a pair per field. ``headers`` gives the pairs.

    ``body_stream`` is None for a request handed out whole (``body`` is all
    of it); for one handed out at its head it is the :class:`BodyStream` its
    body arrives on, and ``body`` is empty.
    """

    __slots__ = _FIELDS

    def __init__(
        self,
        method: bytes,
        path: bytes,
        query: bytes,
        target: bytes,
        version: str,
        names: list[bytes],
        values: list[bytes],
        host: bytes,
        body: bytes,
        keep_alive: bool,
        expect_continue: bool,
        content_length: int | None,
        watched: bool = False,
        body_stream: BodyStream | None = None,
        fields_size: int = 0,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.target = target
        self.version = version
        self.names = names
        self.values = values
        self.host = host
        self.body = body
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        self.content_length = content_length
        # Whether any header named in the parser's ``watch`` set is present.
        self.watched = watched
        self.body_stream = body_stream
        # The header section's size as parsed: each field as its name, ": ",
        # its value without the whitespace around it, and CRLF (what the
        # parser measures for its limit; the access log's request_bytes).
        self.fields_size = fields_size

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """The header fields as (name, value) pairs, in order."""
        return list(zip(self.names, self.values, strict=True))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HttpRequest):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in _FIELDS)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"HttpRequest({self.method!r}, {self.target!r}, HTTP/{self.version}, "
            f"{len(self.names)} headers, "
            + (f"{len(self.body)} body bytes)" if self.body_stream is None else "streamed body)")
        )
