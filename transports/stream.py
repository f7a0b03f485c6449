"""Stream carriers: TCP (``tcp://host:port``) and Unix domain sockets (``unix:///path``).

Both carry exactly the same bytes (docs/wire.md); only the socket differs.
The client lives in :mod:`transports.stream_client`, the server in
:mod:`transports.stream_server`.
"""

from __future__ import annotations

from typing import ClassVar

from .base import ClientOptions, Handler, ServerOptions
from .registry import AddressError, parse_address
from .stream_client import StreamClient
from .stream_server import StreamServer

__all__ = ["StreamClient", "StreamServer", "TcpTransport", "UnixTransport"]


class _StreamTransport:
    schemes: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def client(cls, address: str, options: ClientOptions | None = None) -> StreamClient:
        cls._check(address)
        return StreamClient(address, options)

    @classmethod
    async def serve(
        cls, address: str, handler: Handler, options: ServerOptions | None = None
    ) -> StreamServer:
        cls._check(address)
        server = StreamServer(address, handler, options)
        await server.start()
        return server

    @classmethod
    def _check(cls, address: str) -> None:
        scheme = parse_address(address).scheme
        if scheme not in cls.schemes:
            raise AddressError(f"{cls.__name__} does not serve {scheme!r} addresses")


class TcpTransport(_StreamTransport):
    schemes = ("tcp",)


class UnixTransport(_StreamTransport):
    schemes = ("unix",)
