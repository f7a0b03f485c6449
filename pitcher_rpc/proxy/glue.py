"""What every asyncio protocol over the sans-IO HTTP connection does with its socket.

The proxy's client connections (:mod:`.frontend`) and the admin API's
(:mod:`pitcher_rpc.process.admin_http`) differ only in what they do with a
request; :class:`HttpGlue` acts on the sans-IO connection's state for both:
writes what it asks to write, half-closes and lingers after a refusal,
closes, pauses and resumes reading, applies deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib

from ..http.connection import ServerConnection


class HttpGlue(asyncio.Protocol):
    """Base of an asyncio protocol driven by a :class:`ServerConnection` (``http``).

    A subclass sets ``http`` and ``loop``, starts requests in ``_advance``
    (called whenever the connection may have one to hand out) and may extend
    ``close``.
    """

    __slots__ = ("closed", "http", "loop", "read_paused", "transport")

    http: ServerConnection
    loop: asyncio.AbstractEventLoop

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.read_paused = False

    def _advance(self) -> None:
        raise NotImplementedError

    # asyncio callbacks ---------------------------------------------------------------

    def eof_received(self) -> bool:
        # True keeps the write side open: a client that half-closes after
        # sending its requests still gets the answers (RFC 9112 §9.6).
        keep_open = self.http.receive_eof()
        if keep_open:
            self._advance()
        return keep_open

    def pause_writing(self) -> None:
        self.http.pause_writing()
        self._sync_reading()

    def resume_writing(self) -> None:
        self.http.resume_writing()
        self._advance()

    # acting on the connection's state -----------------------------------------------

    def _act(self) -> None:
        """Do what the HTTP connection asks: write, half-close and linger, close, (un)pause."""
        transport = self.transport
        if self.closed or transport is None:
            return
        http = self.http
        if http.outgoing:
            transport.writelines(http.outgoing)
            http.outgoing.clear()
        if http.must_close:
            self.close()
            return
        if http.half_close and not http.linger_until:
            if transport.is_closing() or not transport.can_write_eof():
                self.close()
                return
            transport.write_eof()
            http.lingering(self.loop.time())
        self._sync_reading()

    def _sync_reading(self) -> None:
        transport = self.transport
        if transport is None or self.closed:
            return
        if self.read_paused:
            if self.http.can_resume_read():
                self.read_paused = False
                with contextlib.suppress(RuntimeError):
                    transport.resume_reading()
        elif not self.http.wants_read:
            self.read_paused = True
            with contextlib.suppress(RuntimeError):
                transport.pause_reading()

    def check_timeouts(self, now: float) -> None:
        """Apply the connection's deadlines (called by a periodic sweep)."""
        http = self.http
        http.check_timeouts(now)
        if http.outgoing or http.must_close or (http.half_close and not http.linger_until):
            self._act()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.transport is not None:
            self.transport.close()
