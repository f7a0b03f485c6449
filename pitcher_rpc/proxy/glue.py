"""What every asyncio protocol over the sans-IO HTTP connection does with its socket.

The proxy's client connections (:mod:`.frontend`) and the admin API's
(:mod:`pitcher_rpc.process.admin_http`) differ only in what they do with a
request; :class:`HttpGlue` acts on the sans-IO connection's state for both:
writes what it asks to write, half-closes and lingers after a refusal,
closes, pauses and resumes reading, applies deadlines.

A refusal (the parser's 400, 408, 413, 414, 431, 505 ...) makes no request
to hand out; :meth:`HttpGlue.refused` is told of each one as its answer is
written, with a :class:`Refusal` that says what is known of it, so that a
subclass can count and log it.
"""

from __future__ import annotations

import asyncio
import contextlib

from ..http.connection import ServerConnection

# What a refusal is counted and logged as, by status: a small fixed set, since
# each one is a metrics label. A 400's details are in ``Refusal.detail``.
_REASONS = {
    400: "bad_request",
    403: "forbidden",
    408: "header_timeout",
    413: "body_too_large",
    414: "request_line_too_long",
    431: "headers_too_large",
    501: "method_not_implemented",
    505: "version_not_supported",
}


class Refusal:
    """A request answered without an exchange: refused by the parser, a deadline, or at accept.

    ``status`` and ``response_bytes`` are what was written; ``reason`` a
    short fixed name (``header_timeout``, ``body_too_large`` ...) and
    ``detail`` the text of the answer; ``client_ip`` is the connection's;
    ``method`` and ``target`` are the request's as far as they were parsed
    (None when they were not, or not completely).
    """

    __slots__ = ("client_ip", "detail", "method", "reason", "response_bytes", "status", "target")

    def __init__(
        self,
        status: int,
        reason: str,
        detail: str,
        client_ip: bytes,
        method: bytes | None = None,
        target: bytes | None = None,
        response_bytes: int = 0,
    ) -> None:
        self.status = status
        self.reason = reason
        self.detail = detail
        self.client_ip = client_ip
        self.method = method
        self.target = target
        self.response_bytes = response_bytes


def refusal_reason(status: int, detail: str, head_complete: bool) -> str:
    """The fixed name a refusal is counted under (see ``_REASONS``)."""
    if status == 408:
        return "body_timeout" if head_complete else "header_timeout"
    if status == 431 and detail.startswith("too many"):
        return "too_many_headers"
    if status == 400:
        if "Host" in detail:
            return "bad_host"
        if "Content-Length" in detail or "Transfer-Encoding" in detail or "chunk" in detail:
            return "bad_framing"
    reason = _REASONS.get(status)
    return reason if reason is not None else "status_" + str(status)


def refusal_of(answer: bytes, client_ip: bytes, parser: object) -> Refusal:
    """What is known of the refusal whose whole answer is ``answer``.

    The status comes from the status line and the detail from the plain-text
    body (``"<status> <phrase>: <detail>"``, see ``error_body``). The method
    and target are the parser's scratch state of the refused request, read
    by name: absent (None) if it keeps none, as before its request line ended.
    """
    status = int(answer[9:12]) if answer[9:12].isdigit() else 0
    body = answer.partition(b"\r\n\r\n")[2]
    detail = body.partition(b": ")[2].rstrip(b"\n").decode("utf-8", "replace")
    method: bytes | None = None
    target: bytes | None = None
    if getattr(parser, "in_request", False):
        value = getattr(parser, "_method", None)
        method = value if isinstance(value, bytes) and value else None
        value = getattr(parser, "_target", None)
        # A 414's target is cut short: not logged as if it were the path.
        if isinstance(value, bytes) and value and status != 414 and method is not None:
            target = value
    head_complete = bool(getattr(parser, "headers_complete", False))
    return Refusal(
        status,
        refusal_reason(status, detail, head_complete),
        detail,
        client_ip,
        method,
        target,
        len(answer),
    )


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

    def refused(self, answer: bytes) -> None:
        """A refusal's whole answer (status line to body) is being written; see :class:`Refusal`.

        Called once per refusal, before the connection half-closes. Nothing
        here; the proxy's connection counts and logs it.
        """

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
            if http.half_close and not http.linger_until:
                # A refusal was just queued (last): it is written now, once.
                self.refused(http.outgoing[-1])
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
