"""Telling a service manager what the master is doing (systemd's sd_notify protocol).

With ``Type=notify`` and ``NotifyAccess=all`` in a unit, systemd reads these
datagrams: READY=1 once the proxy serves, and MAINPID when a graceful restart
makes a new master the one to watch (the old one then exits without systemd
taking the service for stopped). Without NOTIFY_SOCKET this does nothing.
"""

from __future__ import annotations

import contextlib
import os
import socket


def notify(**fields: str | int) -> bool:
    """Send ``KEY=value`` lines to $NOTIFY_SOCKET; False when there is none or it fails."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message, address)
        return True
    return False
