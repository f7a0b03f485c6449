"""The UDP carrier (``udp://host:port``, ``udp://[::1]:port``): one frame per datagram.

Each datagram is a CRC-32C followed by an ordinary frame (docs/wire.md,
section "UDP"); the codec is :mod:`transports.datagram`, the client
:mod:`transports.udp_client` and the server :mod:`transports.udp_server`.
"""

from __future__ import annotations

from typing import ClassVar

from .base import ClientOptions, Handler, ServerOptions
from .registry import AddressError, parse_address
from .udp_client import UdpClient
from .udp_server import UdpServer

__all__ = ["UdpClient", "UdpServer", "UdpTransport"]


class UdpTransport:
    schemes: ClassVar[tuple[str, ...]] = ("udp",)

    @classmethod
    def client(cls, address: str, options: ClientOptions | None = None) -> UdpClient:
        cls._check(address)
        return UdpClient(address, options)

    @classmethod
    async def serve(
        cls, address: str, handler: Handler, options: ServerOptions | None = None
    ) -> UdpServer:
        cls._check(address)
        server = UdpServer(address, handler, options)
        await server.start()
        return server

    @classmethod
    def _check(cls, address: str) -> None:
        scheme = parse_address(address).scheme
        if scheme not in cls.schemes:
            raise AddressError(f"{cls.__name__} does not serve {scheme!r} addresses")
