"""A caller of streamed calls for the SDK's tests: the transports' client, awaited.

``streamed_call`` sends a request (its body whole, or piece by piece through
the client's OutgoingBody, paused when the node's credit is spent) and
returns the answer's head and a :class:`Body` that hands credit back only as
the test reads, so a test can play a slow reader.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any

from pitcher_rpc.codec import encode_request
from pitcher_rpc.pb import pitcher_pb2
from transports.errors import TransportError


def request_payload(
    path: bytes,
    query: bytes = b"",
    method: bytes = b"GET",
    body: bytes = b"",
    headers: Iterable[tuple[bytes, bytes]] = (),
    body_size: int | None = None,
) -> bytes:
    pairs = list(headers)
    payload = encode_request(
        method,
        path,
        query,
        [name for name, _ in pairs],
        [value for _, value in pairs],
        body,
        "r",
        "127.0.0.1:1",
    )
    if body_size is not None:
        message = pitcher_pb2.Request.FromString(payload)
        message.body_size = body_size
        payload = message.SerializeToString()
    return payload


class _Receiver:
    __slots__ = ("deadline", "head", "idempotent", "timeout")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float = 10.0) -> None:
        self.deadline = loop.time() + timeout
        self.timeout = timeout
        self.idempotent = False
        self.head: asyncio.Future[tuple[bytes, Any]] = loop.create_future()

    def on_response(self, payload: bytes) -> None:
        if not self.head.done():
            self.head.set_result((payload, None))

    def on_error(self, error: TransportError) -> None:
        if not self.head.done():
            self.head.set_exception(error)

    def on_response_head(self, payload: bytes, body: Any) -> None:
        if not self.head.done():
            self.head.set_result((payload, body))


class Body:
    """A streamed answer's body; each piece read returns its credit, none before."""

    def __init__(self, incoming: Any) -> None:
        self.incoming = incoming
        self.pieces: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        self.received = 0
        incoming.start(self._data, self._end, self._error)

    def _data(self, data: bytes) -> None:
        self.received += len(data)
        self.pieces.put_nowait(data)

    def _end(self) -> None:
        self.pieces.put_nowait(None)

    def _error(self, error: BaseException) -> None:
        self.pieces.put_nowait(error)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            piece = await self.pieces.get()
            if piece is None:
                return
            if isinstance(piece, BaseException):
                raise piece
            self.incoming.consumed(len(piece))
            yield piece

    async def read(self) -> bytes:
        return b"".join([piece async for piece in self])


async def streamed_call(
    client: Any,
    payload: bytes,
    body: Iterable[bytes] | None = None,
    *,
    timeout: float = 10.0,
    stream_response: bool = True,
) -> tuple[pitcher_pb2.Response, bytes | Body]:
    """The answer's head and its body: bytes for a whole answer, a Body for a streamed one."""
    loop = asyncio.get_running_loop()
    receiver = _Receiver(loop, timeout)
    if body is None:
        client.send(payload, receiver, stream_response=stream_response)
    else:
        outgoing = client.send_stream(payload, receiver, stream_response=stream_response)
        writable = asyncio.Event()
        outgoing.on_writable = writable.set
        for piece in body:
            if outgoing.done:
                break
            writable.clear()
            if not outgoing.write(piece):
                await writable.wait()
        if not outgoing.done:
            outgoing.end()
    head, incoming = await receiver.head
    message = pitcher_pb2.Response.FromString(head)
    if incoming is None:
        return message, message.body
    return message, Body(incoming)


async def send_slowly(outgoing: Any, pieces: Iterable[bytes]) -> None:
    writable = asyncio.Event()
    outgoing.on_writable = writable.set
    for piece in pieces:
        writable.clear()
        if not outgoing.write(piece):
            await writable.wait()
    outgoing.end()
