"""ZeroMQ carrier: ``zmq+tcp://host:port`` and ``zmq+ipc:///path``.

A DEALER socket in the proxy (:class:`~transports.zeromq_client.ZmqClient`)
talks to a ROUTER socket in the split service
(:class:`~transports.zeromq_server.ZmqServer`). One ZeroMQ message carries one
Pitcher frame: the same 20-byte header as the stream carriers, then the
payload. There is no preface and no CRC: ZeroMQ frames every message and
refuses a peer that does not speak ZMTP. The ROUTER receives
``[identity, frame]`` and answers with ``[identity, frame]``. See the
"ZeroMQ" section of docs/wire.md; what both ends share is in
:mod:`transports.zeromq_io`.
"""

from __future__ import annotations

from .base import CarrierTransport
from .zeromq_client import ZmqClient
from .zeromq_io import SCHEMES, read_header, shared_context
from .zeromq_server import ZmqServer

__all__ = ["ZmqClient", "ZmqServer", "ZmqTransport", "read_header", "shared_context"]


class ZmqTransport(CarrierTransport):
    """The ZeroMQ carrier, registered for ``zmq+tcp`` and ``zmq+ipc``."""

    schemes = SCHEMES
    client_class = ZmqClient
    server_class = ZmqServer
