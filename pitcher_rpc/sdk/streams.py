"""Streamed bodies in the SDK: request bodies read as they come, answers sent as they are made.

A handler reads the request body with ``async for chunk in request.stream()``
or ``await request.read()`` (see :class:`BodyReader`), and answers with a
:class:`StreamingResponse` (any iterator of bytes) or an
:class:`EventSourceResponse` (server-sent events). Nothing here runs for a
handler that answers a dict or bytes: the whole-body path stays in
:mod:`pitcher_rpc.sdk.service`.

What the caller can take decides how an answer travels (:class:`Streamed`):
a caller that announced streamed answers gets the head at once and the body
in DATA frames as the handler makes it, paced by the caller's credit; any
other (a proxy that knows no streams, a direct ``client.call``) gets one
whole RESPONSE, collected here up to the frame limit, with the error a
too-large whole answer gets.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Iterable,
    Iterator,
    Mapping,
)
from typing import Any

from ..codec import encode_varint, with_body

log = logging.getLogger("pitcher.sdk")

# What a streamed body may be made of: str is sent as UTF-8.
Chunk = bytes | bytearray | memoryview | str
ChunkSource = AsyncIterable[Chunk] | Iterable[Chunk]

# Response field 5 (body_size, a varint): key byte.
_BODY_SIZE_KEY = b"\x28"


class BodyTooLarge(Exception):
    """A request body over the service's ``max_body_size`` was to be read whole.

    Raised by ``await request.read()``; a handler that lets it out gets its
    caller a 413 answer, as one that never reads such a body.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body over the limit of {limit} bytes")
        self.limit = limit


# ----------------------------------------------------------------------------- request bodies


class BodyReader:
    """The body of a request whose REQUEST frame said more follows.

    ``first`` is the head's part of the body, ``rest`` the transport's iterator
    of the rest (credit goes back to the sender as it is iterated, so a handler
    that reads slowly holds the sender back: nothing is read ahead here).
    ``size`` is the total the sender declared (Content-Length), None if it is
    unknown (chunked). ``limit`` bounds :meth:`read`.
    """

    __slots__ = ("first", "limit", "rest", "size", "started")

    def __init__(
        self, first: bytes, rest: AsyncIterator[bytes], limit: int, size: int | None
    ) -> None:
        self.first = first
        self.rest = rest
        self.limit = limit
        self.size = size
        self.started = False

    def chunks(self) -> AsyncIterator[bytes]:
        if self.started:
            raise RuntimeError("the request body was read already (it is a stream, read once)")
        self.started = True
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        if self.first:
            yield self.first
        async for chunk in self.rest:
            if chunk:
                yield chunk

    async def read(self) -> bytes:
        """The whole body; BodyTooLarge past ``limit`` (read no further then)."""
        limit = self.limit
        if self.size is not None and self.size > limit:
            raise BodyTooLarge(limit)
        parts: list[bytes] = []
        total = 0
        async for chunk in self.chunks():
            total += len(chunk)
            if total > limit:
                await self.close()
                raise BodyTooLarge(limit)
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def close(self) -> None:
        """Read no more of it (the transport tells the sender to stop)."""
        self.started = True
        closing = getattr(self.rest, "aclose", None)
        if closing is not None:
            await closing()


async def whole_body(body: bytes) -> AsyncIterator[bytes]:
    """``request.stream()`` of a body that came whole: one chunk (none when empty)."""
    if body:
        yield body


async def ready(body: bytes) -> bytes:
    """``await request.read()`` of a body that is all there."""
    return body


async def gather_body(
    first: bytes, rest: AsyncIterator[bytes], limit: int, size: int | None
) -> bytes:
    """A streamed request body read whole, for a handler that did not ask for a stream."""
    return await BodyReader(first, rest, limit, size).read()


# ----------------------------------------------------------------------------- responses


class StreamingResponse:
    """An answer whose body is made while it is sent: an iterator of bytes (or str, as UTF-8).

    ``content`` is an async iterable (an ``async def`` generator), or a plain
    iterable: a list or tuple is iterated on the event loop, any other iterator
    (a generator that may block, a file) in a thread, one item at a time, as
    Starlette does. ``size``, when the total is known, is sent as the body's
    length (the proxy writes Content-Length); a body that ends up another size
    is cut (the caller sees an error, never a wrong length). ``media_type``
    sets the content-type unless ``headers`` set one.

    An exception while the body is being made cuts the answer: the caller
    sees a failed call (the proxy ends the HTTP response without its last
    chunk, or closes the connection), never a body that looks complete.
    """

    __slots__ = ("content", "headers", "media_type", "size", "status")

    def __init__(
        self,
        content: ChunkSource,
        status: int = 200,
        headers: list[tuple[str, str]] | Mapping[str, str] | None = None,
        media_type: str | None = None,
        size: int | None = None,
    ) -> None:
        if size is not None and (type(size) is not int or size < 0):
            raise ValueError(f"size must be a byte count (an int >= 0), not {size!r}")
        self.content = content
        self.status = status
        self.headers = headers
        self.media_type = media_type
        self.size = size

    def header_pairs(self) -> list[tuple[str, str]]:
        headers = self.headers
        pairs = (
            []
            if headers is None
            else list(headers.items())
            if isinstance(headers, Mapping)
            else list(headers)
        )
        media_type = self.media_type
        if media_type is not None and not any(
            isinstance(name, str) and name.lower() == "content-type" for name, _ in pairs
        ):
            pairs.insert(0, ("content-type", media_type))
        return pairs

    def chunks(self) -> AsyncIterator[Chunk]:
        return _iterate(self.content)


def _iterate(source: ChunkSource | Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if isinstance(source, AsyncIterable):
        return aiter(source)
    if isinstance(source, list | tuple):
        return _from_sequence(source)
    if isinstance(source, bytes | str | bytearray | memoryview):
        return _from_sequence((source,))
    return _in_thread(iter(source))


async def _from_sequence(items: list[Any] | tuple[Any, ...]) -> AsyncIterator[Any]:
    for item in items:
        yield item


_DONE = object()


async def _in_thread(iterator: Iterator[Any]) -> AsyncIterator[Any]:
    loop = asyncio.get_running_loop()
    try:
        while True:
            item = await loop.run_in_executor(None, next, iterator, _DONE)
            if item is _DONE:
                return
            yield item
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


# ----------------------------------------------------------------------------- server-sent events


class ServerSentEvent:
    """One event of a ``text/event-stream`` (the HTML standard's server-sent events).

    ``data`` is the message: a str is sent as it is (each of its lines a
    ``data:`` line, so a browser's ``event.data`` is that string again), any
    other value as JSON. ``event`` names the type (``addEventListener(name)``;
    without it, ``message``), ``id`` is what the browser sends back as
    ``Last-Event-ID`` when it reconnects, ``retry`` its reconnection delay in
    milliseconds, ``comment`` lines every client ignores. ValueError for an
    ``event`` or ``id`` with a line break (or an ``id`` with NUL), which the
    format cannot carry, or a ``retry`` that is not an int >= 0.
    """

    __slots__ = ("comment", "data", "event", "id", "retry")

    def __init__(
        self,
        data: Any = None,
        *,
        event: str | None = None,
        id: str | None = None,  # the field's name in the standard
        retry: int | None = None,
        comment: str | None = None,
    ) -> None:
        if event is not None and ("\r" in event or "\n" in event):
            raise ValueError(f"an event type must be one line: {event!r}")
        if id is not None and ("\r" in id or "\n" in id or "\0" in id):
            raise ValueError(f"an event id must be one line without NUL: {id!r}")
        if retry is not None and (type(retry) is not int or retry < 0):
            raise ValueError(f"retry must be milliseconds (an int >= 0), not {retry!r}")
        self.data = data
        self.event = event
        self.id = id
        self.retry = retry
        self.comment = comment

    def encode(self) -> bytes:
        """The event on the wire, ending with the blank line that dispatches it."""
        lines: list[str] = []
        if self.comment is not None:
            lines.extend(": " + line for line in _lines(self.comment))
        if self.event is not None:
            lines.append("event: " + self.event)
        if self.id is not None:
            lines.append("id: " + self.id)
        if self.retry is not None:
            lines.append("retry: " + str(self.retry))
        data = self.data
        if data is not None:
            text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
            lines.extend("data: " + line for line in _lines(text))
        lines.append("\n")
        return "\n".join(lines).encode()

    def __repr__(self) -> str:
        fields = ("data", "event", "id", "retry", "comment")
        shown = ", ".join(
            f"{name}={getattr(self, name)!r}" for name in fields if getattr(self, name) is not None
        )
        return f"ServerSentEvent({shown})"


def _lines(text: str) -> list[str]:
    # The standard's line ends: CRLF, CR or LF; each becomes a line of its own field.
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


# The keep-alive: a comment, which every client ignores and every hop forwards.
KEEP_ALIVE = b": ping\n\n"


class EventSourceResponse(StreamingResponse):
    """A ``text/event-stream`` answer: server-sent events as the handler yields them.

    ``events`` yields :class:`ServerSentEvent` objects, str (the data of an
    event) or any other value (its data as JSON); bytes pass as they are
    (already encoded events). When no event came for ``ping`` seconds (15 by
    default, as FastAPI; None: never) a comment is sent, so that no hop on the
    way (the proxy's idle limit between two chunks, a load balancer) closes a
    quiet stream. ``Cache-Control: no-cache`` and ``X-Accel-Buffering: no``
    (nginx in front then passes each event at once) are set unless
    ``headers`` set them.
    """

    __slots__ = ("ping",)

    def __init__(
        self,
        events: AsyncIterable[Any] | Iterable[Any],
        status: int = 200,
        headers: list[tuple[str, str]] | Mapping[str, str] | None = None,
        *,
        ping: float | None = 15.0,
    ) -> None:
        pairs = (
            []
            if headers is None
            else list(headers.items())
            if isinstance(headers, Mapping)
            else list(headers)
        )
        names = {name.lower() for name, _ in pairs if isinstance(name, str)}
        if "cache-control" not in names:
            pairs.append(("cache-control", "no-cache"))
        if "x-accel-buffering" not in names:
            pairs.append(("x-accel-buffering", "no"))
        super().__init__(events, status, pairs, "text/event-stream; charset=utf-8")
        if ping is not None and not ping > 0:
            raise ValueError(f"ping must be a number of seconds > 0 or None, not {ping!r}")
        self.ping = ping

    def chunks(self) -> AsyncIterator[Chunk]:
        return _encode_events(_iterate(self.content), self.ping)


def encode_event(item: Any) -> bytes:
    """What one item an event stream yields becomes on the wire."""
    if isinstance(item, ServerSentEvent):
        return item.encode()
    if isinstance(item, bytes | bytearray | memoryview):
        return bytes(item)
    return ServerSentEvent(item).encode()


async def _encode_events(events: AsyncIterator[Any], ping: float | None) -> AsyncIterator[bytes]:
    if ping is None:
        try:
            async for item in events:
                yield encode_event(item)
        finally:
            await _close(events)
        return
    # The next event is awaited in a task of its own, so that waiting for it
    # can time out (and send a keep-alive) without cancelling the generator.
    loop = asyncio.get_running_loop()
    pending: asyncio.Future[Any] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(events, _DONE), loop=loop)
            done, _ = await asyncio.wait((pending,), timeout=ping)
            if not done:
                yield KEEP_ALIVE
                continue
            item = pending.result()
            pending = None
            if item is _DONE:
                return
            yield encode_event(item)
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            await asyncio.wait((pending,))
        await _close(events)


async def _close(iterator: AsyncIterator[Any]) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()


# ----------------------------------------------------------------------------- sending


class Streamed:
    """A handler's streaming answer, ready for whichever way the caller can take it.

    ``head`` is the RESPONSE payload without its body (validated like any
    Response: a bad status or header fails the call before anything is sent).
    """

    __slots__ = ("chunks", "handler", "head", "limit", "size")

    def __init__(
        self, head: bytes, chunks: AsyncIterator[Chunk], size: int | None, handler: str, limit: int
    ) -> None:
        self.head = head
        self.chunks = chunks
        self.size = size
        self.handler = handler
        self.limit = limit

    def streamed_head(self) -> bytes:
        """The head of a streamed RESPONSE: with ``body_size`` when the total is known."""
        size = self.size
        if size is None:
            return self.head
        return self.head + _BODY_SIZE_KEY + encode_varint(size)

    async def body(self) -> AsyncGenerator[bytes, None]:
        """The body as the transport sends it: bytes, checked against ``size``; logs a failure."""
        chunks = self.chunks
        size = self.size
        sent = 0
        try:
            async for chunk in chunks:
                if type(chunk) is not bytes:
                    chunk = _as_bytes(chunk)
                if not chunk:
                    continue
                sent += len(chunk)
                if size is not None and sent > size:
                    raise ValueError(f"body longer than its size of {size} bytes")
                yield chunk
            if size is not None and sent != size:
                raise ValueError(f"body of {sent} bytes, shorter than its size of {size} bytes")
        except Exception as exc:
            log.error(
                "handler %s failed after %d bytes of its streamed answer: cut (%s: %s)",
                self.handler,
                sent,
                type(exc).__name__,
                exc,
            )  # the transport logs the traceback with the request's id
            raise
        finally:
            await _close(chunks)

    async def collect(self) -> bytes:
        """The whole RESPONSE payload, for a caller that cannot take a stream.

        Over the frame limit: ValueError, the error a too-large whole answer
        gets (an INTERNAL error to the caller, 502 at the proxy), and the
        handler's iterator is closed there rather than drained.
        """
        head = self.head
        room = self.limit - len(head) - 10  # the body field's key and length
        parts: list[bytes] = []
        total = 0
        body = self.body()
        try:
            async for chunk in body:
                total += len(chunk)
                if total > room:
                    log.error(
                        "handler %s answered more than %d bytes, over the frame limit of %d"
                        " bytes, to a caller that cannot take a streamed answer: not sent",
                        self.handler,
                        total + len(head),
                        self.limit,
                    )
                    raise ValueError(
                        f"response of more than {total + len(head)} bytes exceeds"
                        f" the frame limit of {self.limit}"
                    )
                parts.append(chunk)
        finally:
            await body.aclose()
        return with_body(head, parts[0] if len(parts) == 1 else b"".join(parts))


def _as_bytes(chunk: Any) -> bytes:
    if isinstance(chunk, str):
        return chunk.encode()
    if isinstance(chunk, bytes | bytearray | memoryview):
        return bytes(chunk)
    raise TypeError(f"a streamed body yielded {type(chunk).__name__}, not bytes or str")
