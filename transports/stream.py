"""Stream carriers: TCP (``tcp://host:port``) and Unix domain sockets (``unix:///path``).

Both carry exactly the same bytes (docs/wire.md); only the socket differs.
The client lives in :mod:`transports.stream_client`, the server in
:mod:`transports.stream_server`.
"""

from __future__ import annotations

from .base import CarrierTransport
from .stream_client import StreamClient
from .stream_server import StreamServer

__all__ = ["StreamClient", "StreamServer", "TcpTransport", "UnixTransport"]


class TcpTransport(CarrierTransport):
    schemes = ("tcp",)
    client_class = StreamClient
    server_class = StreamServer


class UnixTransport(CarrierTransport):
    schemes = ("unix",)
    client_class = StreamClient
    server_class = StreamServer
