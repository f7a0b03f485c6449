"""What the UDP client and server both do to their sockets."""

from __future__ import annotations

import asyncio
import socket

# Room for a burst of answers while the loop is busy elsewhere; the kernel caps
# it at net.core.rmem_max and a smaller buffer only means earlier loss.
SOCKET_BUFFER = 1 << 20


def enlarge_socket_buffers(transport: asyncio.BaseTransport) -> None:
    """Give a datagram socket room for a burst (both ends use this)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            if sock.getsockopt(socket.SOL_SOCKET, option) < SOCKET_BUFFER:
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        except OSError:
            pass
