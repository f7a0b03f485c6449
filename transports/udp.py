"""The UDP carrier (``udp://host:port``, ``udp://[::1]:port``): one frame per datagram.

Each datagram is a CRC-32C followed by an ordinary frame (docs/wire.md,
section "UDP"); the codec is :mod:`transports.datagram`, the client
:mod:`transports.udp_client` and the server :mod:`transports.udp_server`.
"""

from __future__ import annotations

from .base import CarrierTransport
from .udp_client import UdpClient
from .udp_server import UdpServer

__all__ = ["UdpClient", "UdpServer", "UdpTransport"]


class UdpTransport(CarrierTransport):
    schemes = ("udp",)
    client_class = UdpClient
    server_class = UdpServer
