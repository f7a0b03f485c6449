"""A TLS listener's connections: the handshake, then the same HttpConnection as plain HTTP.

asyncio's own ``create_server(ssl=...)`` hides a failed handshake (an
OSError is logged only in the loop's debug mode, and the protocol never
hears of the connection), and fixes one SSLContext for the server's life.
So the listener accepts plain connections, and each is upgraded here with
``loop.start_tls``: its handshake uses the context of the configuration
current when it was accepted (a reload's new certificate serves the next
handshake, while open connections carry on with the session they have), a
failure is logged with the peer and the reason and counted, and only a
connection whose handshake succeeded becomes an :class:`HttpConnection`.
A handshake under way holds a place under the connection cap, as nginx
counts it: a flood of clients that never finish theirs cannot grow without
bound.

Per connection this costs one small protocol object and one task, for the
handshake only, next to the handshake's own public-key work.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from transports.stepping import resume

from ..logs import RateLimitedLog
from .frontend import HttpConnection

if TYPE_CHECKING:
    from .server import ProxyServer

log = logging.getLogger("pitcher.tls")
# Scanners and clients that distrust the certificate fail by the thousand: one
# line a second per reason, with how many more there were.
_failures = RateLimitedLog(log, every=1.0, flush_at_exit=True)


# OpenSSL's reasons for the failures an operator meets most, said in their terms.
_EXPLAINED = {
    "http request": "plain HTTP sent to the TLS port",
    "unsupported protocol": "the client offers no TLS version at or above min_version",
    "peer did not return a certificate": "the client sent no certificate (one is required)",
    "tlsv1 alert unknown ca": "the client does not trust the certificate (alert: unknown ca)",
    "sslv3 alert bad certificate": "the client refused the certificate (alert: bad certificate)",
    "sslv3 alert certificate expired": "the client refused the certificate: it has expired",
    "no shared cipher": "no cipher in common with the client",
}


def failure_reason(exc: BaseException) -> str:
    """A short reason for a failed handshake, as an operator would search for it."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the client's certificate failed verification: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        reason = str(exc.reason).lower().replace("_", " ")
        return _EXPLAINED.get(reason, reason)
    if isinstance(exc, TimeoutError) or "taking longer" in str(exc):
        return "no handshake in time"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        # What a client that refuses the certificate usually does (TLS 1.3 sends
        # its alert after the server's part of the handshake is done).
        return "the client closed the connection (did it refuse the certificate?)"
    if isinstance(exc, ConnectionError | EOFError):
        return "the client closed the connection"
    text = str(exc)
    return text or type(exc).__name__


class _Early(asyncio.Protocol):
    """Holds what arrives between the end of the handshake and the HttpConnection taking over.

    The stock loop reads the bytes a client sends right behind its handshake
    before ``start_tls`` returns; they are handed over in order.
    """

    __slots__ = ("data", "eof", "lost", "lost_with")

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.eof = False
        self.lost = False
        self.lost_with: Exception | None = None

    def data_received(self, data: bytes) -> None:
        self.data.append(data)

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.lost_with = exc

    def hand_over(self, connection: HttpConnection) -> None:
        for data in self.data:
            if connection.closed:
                return
            connection.data_received(data)
        if self.eof and not connection.closed and not connection.eof_received():
            connection.close()
        if self.lost:
            connection.connection_lost(self.lost_with)


class TlsAccept(asyncio.Protocol):
    """One connection to a TLS listener until its handshake is done."""

    __slots__ = ("context", "peer", "server", "task")

    def __init__(self, server: ProxyServer, context: ssl.SSLContext) -> None:
        self.server = server
        self.context = context
        self.peer = "unknown"
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        name = transport.get_extra_info("peername")
        if isinstance(name, tuple) and name:
            host = str(name[0])
            self.peer = f"[{host}]:{name[1]}" if ":" in host else f"{host}:{name[1]}"
        elif name is not None:
            self.peer = "unix"
        server = self.server
        early = _Early()
        # start_tls is stepped here, not in a task's first step: uvloop starts
        # reading when connection_made returns (a pause asked for in it does not
        # hold), and a ClientHello read before the TLS protocol is in place would
        # be lost. Stepped, the TLS protocol takes the transport now; it keeps
        # what arrives until its handshake starts.
        handshake = server.loop.start_tls(
            transport,  # type: ignore[arg-type]
            early,
            self.context,
            server_side=True,
            # nginx holds the handshake to client_header_timeout too.
            ssl_handshake_timeout=server.snapshot.header_timeout,
        )
        try:
            waiting_on = handshake.send(None)
        except StopIteration:  # never: the handshake needs the client's answer
            transport.close()
            return
        except Exception as exc:
            transport.close()
            server.handshake_failed(self.peer, failure_reason(exc))
            return
        task = server.loop.create_task(
            self._finish(transport, resume(handshake, waiting_on), early),
            name="pitcher-tls-handshake",
        )
        self.task = task
        server.handshake_started(task)

    async def _finish(
        self, transport: asyncio.BaseTransport, handshake: Awaitable[Any], early: _Early
    ) -> None:
        server = self.server
        try:
            secure = await handshake
        except asyncio.CancelledError:
            transport.close()
            raise
        except Exception as exc:
            transport.close()
            server.handshake_failed(self.peer, failure_reason(exc))
            return
        if secure is None or secure.is_closing() or early.lost or server.draining:
            # uvloop hands back a closed transport when the client went away
            # before its ClientHello (a TCP health check, a port scan): counted,
            # not logged, as nginx logs it at info only.
            if secure is not None:
                secure.close()
            transport.close()
            if not server.draining:
                server.handshake_failed(self.peer, "closed before the handshake", logged=False)
            return
        connection = HttpConnection(server)
        secure.set_protocol(connection)
        connection.connection_made(secure)
        early.hand_over(connection)


def log_handshake_failure(peer: str, reason: str) -> None:
    _failures.warning(reason, "TLS handshake with %s failed: %s", peer, reason)
