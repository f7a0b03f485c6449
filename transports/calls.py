"""How a caller receives the outcome of one call, for every transport.

The hot path hands a client a *receiver*: an object with a ``deadline`` (in
event-loop time) and two methods, one of which the client calls exactly once,
directly from the code that read the answer. No future and no timer is made
per call: a future plus its callback costs about 3 µs and a timer about 2 µs
(uvloop, measured), a large share of the time a request spends in the proxy.
Deadlines are checked by one timer per connection, armed for the earliest.

:class:`FutureReceiver` adapts this to ``await client.call(...)``.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from .errors import TransportError


class Receiver(Protocol):
    """Gets the outcome of one call: exactly one of the two methods, once."""

    # Event-loop time after which the caller stops waiting.
    deadline: float
    # Whether sending the request twice does no harm: a lossy carrier (UDP)
    # re-sends only these, with the same request id.
    idempotent: bool

    def on_response(self, payload: bytes) -> None: ...

    def on_error(self, error: TransportError) -> None: ...


class FutureReceiver:
    """A receiver that completes an asyncio future."""

    __slots__ = ("deadline", "future", "idempotent")

    def __init__(
        self, future: asyncio.Future[bytes], deadline: float, idempotent: bool = False
    ) -> None:
        self.future = future
        self.deadline = deadline
        self.idempotent = idempotent

    def on_response(self, payload: bytes) -> None:
        if not self.future.done():
            self.future.set_result(payload)

    def on_error(self, error: TransportError) -> None:
        if not self.future.done():
            self.future.set_exception(error)
