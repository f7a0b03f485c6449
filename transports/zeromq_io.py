"""What both ends of the ZeroMQ carrier share (the carrier itself: :mod:`transports.zeromq`).

The process-wide context, the mapping from node addresses to ZeroMQ
endpoints, the socket options common to both sockets, and the check every
received message goes through. See the "ZeroMQ" section of docs/wire.md.
"""

from __future__ import annotations

import os
import threading

import zmq
import zmq.asyncio

from .decoder import check_header
from .errors import ProtocolError
from .frame import HEADER, HEADER_SIZE
from .registry import Address, AddressError, parse_address

__all__ = [
    "SCHEMES",
    "endpoint_of",
    "new_socket",
    "parse_zmq_address",
    "read_header",
    "shared_context",
    "should_log",
]

SCHEMES = ("zmq+tcp", "zmq+ipc")

_unpack_header = HEADER.unpack_from


class SharedContext:
    """One ``zmq.asyncio.Context`` per process, alive while one of our sockets is open.

    A context owns ZeroMQ's I/O and reaper threads, so one per socket would
    multiply threads for nothing. It is terminated when the last socket that
    uses it is released, so a process (or a test) that is done with ZeroMQ
    keeps no thread behind. ``term()`` only waits for messages that sockets
    closed with a LINGER still hold, and every socket here bounds that.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._context: zmq.asyncio.Context | None = None
        self._pid = 0
        self._users = 0

    @property
    def users(self) -> int:
        """Sockets that hold the context now."""
        return self._users if self._pid == os.getpid() else 0

    def acquire(self) -> zmq.asyncio.Context:
        with self._lock:
            if self._context is None or self._pid != os.getpid():
                # A context inherited through fork() must not be touched in the
                # child (libzmq is not fork-safe): leave it and start afresh.
                self._context = zmq.asyncio.Context(io_threads=1)
                self._pid = os.getpid()
                self._users = 0
            self._users += 1
            return self._context

    def release(self, context: zmq.asyncio.Context) -> None:
        """Called once per ``acquire`` after the socket is closed."""
        with self._lock:
            if context is not self._context:
                return  # a parent process's context, or one already terminated
            self._users -= 1
            if self._users > 0:
                return
            self._context = None
        context.term()


shared_context = SharedContext()


def parse_zmq_address(uri: str) -> Address:
    address = parse_address(uri)
    if address.scheme not in SCHEMES:
        raise AddressError(f"the ZeroMQ carrier does not serve {address.scheme!r} addresses")
    return address


def endpoint_of(address: Address, *, any_port: bool = False) -> tuple[str, bool]:
    """The ZeroMQ endpoint of a node address, and whether the socket needs IPv6 on.

    ``any_port`` turns port 0 into ZeroMQ's ``*`` (a port the kernel picks);
    the bound endpoint is read back from ``LAST_ENDPOINT``.
    """
    if address.scheme == "zmq+ipc":
        return f"ipc://{address.path}", False
    # ZeroMQ refuses IPv6 literals unless the socket has IPV6 set; it is left
    # off otherwise, so "localhost" keeps resolving to 127.0.0.1 only.
    ipv6 = ":" in address.host
    host = f"[{address.host}]" if ipv6 else address.host
    port = "*" if any_port and address.port == 0 else str(address.port)
    return f"tcp://{host}:{port}", ipv6


def new_socket(
    context: zmq.asyncio.Context,
    socket_type: int,
    *,
    max_frame_size: int,
    high_water_mark: int,
    ipv6: bool,
) -> zmq.asyncio.Socket:
    """A socket with the options both ends share; closed again if one is refused."""
    socket = context.socket(socket_type)
    try:
        # ZeroMQ's decoder refuses a message over this size after reading its
        # length, before allocating it, and drops the sender's connection: a
        # peer announcing 3 GB costs nothing. The header rides in the message.
        socket.setsockopt(zmq.MAXMSGSIZE, max_frame_size + HEADER_SIZE)
        # Messages queued per peer before a send would block. Sends here never
        # block (NOBLOCK): a full queue is an error the caller handles.
        socket.setsockopt(zmq.SNDHWM, high_water_mark)
        socket.setsockopt(zmq.RCVHWM, high_water_mark)
        # close() must never hang on messages nobody will take: a socket is
        # closed with LINGER 0 unless its owner has drained it and chooses a
        # short bound (the server's graceful close).
        socket.setsockopt(zmq.LINGER, 0)
        if ipv6:
            socket.setsockopt(zmq.IPV6, 1)
    except zmq.ZMQError:
        socket.close(linger=0)
        raise
    return socket


def read_header(message: bytes, max_frame_size: int) -> tuple[int, int, int]:
    """(type, request id, deadline_ms) of a well-formed message; ProtocolError if not.

    The header rules are the stream carriers' (:func:`transports.decoder.check_header`);
    in addition, since ZeroMQ delivers whole messages, the header's length must
    be exactly the number of payload bytes the message carries.
    """
    size = len(message)
    if size < HEADER_SIZE:
        raise ProtocolError(f"message of {size} bytes is shorter than a frame header")
    version, frame_type, _flags, length, request_id, deadline_ms = _unpack_header(message)
    check_header(version, frame_type, length, request_id, max_frame_size)
    if length != size - HEADER_SIZE:
        raise ProtocolError(
            f"header announces {length} payload bytes, the message carries {size - HEADER_SIZE}"
        )
    return frame_type, request_id, deadline_ms


def should_log(count: int) -> bool:
    """True for the 1st, 2nd, 4th, 8th... event: a flood of garbage cannot flood the log."""
    return count & (count - 1) == 0
