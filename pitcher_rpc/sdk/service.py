"""The SDK: turn Python functions into a split service on any registered transport."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import signal
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from transports.base import Server, ServerOptions
from transports.registry import transport_for

from ..codec import decode_request, encode_response
from .registration import Registration

log = logging.getLogger("pitcher.sdk")


class Headers(Mapping[str, str]):
    """Request headers: case-insensitive lookup, repeated names kept in order."""

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str, str]]) -> None:
        self._items = [(name.lower(), value) for name, value in items]

    def __getitem__(self, name: str) -> str:
        name = name.lower()
        for key, value in self._items:
            if key == name:
                return value
        raise KeyError(name)

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


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: str
    headers: Headers
    body: bytes
    route: str = ""
    client: str = ""

    @property
    def query_params(self) -> dict[str, str]:
        return dict(parse_qsl(self.query, keep_blank_values=True))

    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(slots=True)
class Response:
    status: int = 200
    body: bytes | str = b""
    headers: list[tuple[str, str]] | dict[str, str] = field(default_factory=list)

    @classmethod
    def json(cls, value: Any, status: int = 200) -> Response:
        return cls(status, json.dumps(value).encode(), [("content-type", "application/json")])

    def encode(self) -> bytes:
        body = self.body.encode() if isinstance(self.body, str) else self.body
        pairs = self.headers.items() if isinstance(self.headers, dict) else self.headers
        names = [name.encode("latin-1") for name, _ in pairs]
        values = [value.encode("latin-1") for _, value in pairs]
        if isinstance(self.body, str) and "content-type" not in (n.lower() for n, _ in pairs):
            names.append(b"content-type")
            values.append(b"text/plain; charset=utf-8")
        return encode_response(self.status, names, values, body)


Handler = Callable[[Request], Any]


def _as_response(result: Any) -> Response:
    if isinstance(result, Response):
        return result
    if isinstance(result, bytes | str):
        return Response(200, result)
    if result is None:
        return Response(204)
    return Response.json(result)


class Service:
    """A split service: handlers matched by path prefix (longest first), optionally by method."""

    def __init__(self, name: str = "service", handler: Handler | None = None) -> None:
        self.name = name
        self._routes: list[tuple[str, frozenset[str] | None, Handler]] = []
        if handler is not None:
            self._routes.append(("/", None, handler))

    def route(
        self, prefix: str = "/", methods: Iterable[str] | None = None
    ) -> Callable[[Handler], Handler]:
        """Register a handler for paths starting with ``prefix`` (sync or async)."""
        allowed = frozenset(m.upper() for m in methods) if methods is not None else None

        def register(handler: Handler) -> Handler:
            self._routes.append((prefix, allowed, handler))
            self._routes.sort(key=lambda r: len(r[0]), reverse=True)
            return handler

        return register

    async def handle(self, request: Request) -> Response:
        path_matched = False
        for prefix, methods, handler in self._routes:
            if request.path.startswith(prefix):
                path_matched = True
                if methods is None or request.method in methods:
                    result = handler(request)
                    if inspect.isawaitable(result):
                        result = await result
                    return _as_response(result)
        if path_matched:
            return Response(405, "method not allowed\n")
        return Response(404, "not found\n")

    async def handle_payload(self, payload: bytes) -> bytes:
        """The transport handler: Request payload in, Response payload out."""
        message = decode_request(payload)
        request = Request(
            method=message.method.decode("latin-1"),
            path=message.path.decode("latin-1"),
            query=message.query.decode("latin-1"),
            headers=Headers(
                zip(
                    (n.decode("latin-1") for n in message.header_names),
                    (v.decode("latin-1") for v in message.header_values),
                    strict=True,
                )
            ),
            body=message.body,
            route=message.route,
            client=message.client,
        )
        return (await self.handle(request)).encode()

    async def serve(self, address: str, options: ServerOptions | None = None) -> Server:
        """Start serving on ``address`` (any registered transport URI); returns the server."""
        server: Server = await transport_for(address).serve(address, self.handle_payload, options)
        log.info("%s serving on %s", self.name, server.address)
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
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        server = await self.serve(address)
        refresher: asyncio.Task[None] | None = None
        try:
            if register is not None:
                await register.register(server.address)
                refresher = loop.create_task(register.keep_registered(server.address))
            await stop.wait()
            if refresher is not None:
                refresher.cancel()
            if register is not None and await register.drain(server.address):
                # Requests the proxy sent just before the drain may still be on their way.
                await asyncio.sleep(register.settle)
        finally:
            if refresher is not None:
                refresher.cancel()
            await server.close(grace)
        if register is not None:
            await register.deregister(server.address)
