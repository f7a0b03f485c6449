"""Building HTTP/1.1 responses as bytes (the header rules are in :mod:`.headers`).

Everything a response needs on every request is computed at import: the
status lines and the error bodies.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from email.utils import formatdate
from functools import lru_cache
from http import HTTPStatus
from typing import Final

__all__ = [
    "STATUS_LINES",
    "build_response",
    "date_line",
    "error_body",
    "error_response",
    "status_line",
]

STATUS_LINES: Final[dict[int, bytes]] = {
    status.value: b"HTTP/1.1 %d %s\r\n" % (status.value, status.phrase.encode("ascii"))
    for status in HTTPStatus
}

# Statuses whose responses never carry content (RFC 9110 §6.4.1).
_NO_CONTENT: Final = frozenset((204, 304))
_CONNECTION_CLOSE: Final = b"connection: close\r\n"
_CONNECTION_KEEP_ALIVE: Final = b"connection: keep-alive\r\n"


def status_line(code: int) -> bytes:
    """``HTTP/1.1 <code> <phrase>\\r\\n``; codes without a registered phrase get "Unknown"."""
    line = STATUS_LINES.get(code)
    if line is not None:
        return line
    if not 100 <= code <= 599:
        raise ValueError(f"status code {code} is outside 100..599")
    return b"HTTP/1.1 %d Unknown\r\n" % code


class _DateLine:
    """The ``date`` header line (RFC 9110 §6.6.1), made once per second."""

    __slots__ = ("line", "second")

    def __init__(self) -> None:
        self.second = -1
        self.line = b""

    def __call__(self) -> bytes:
        now = time.time()
        second = int(now)
        if second != self.second:
            self.second = second
            self.line = b"date: %s\r\n" % formatdate(now, usegmt=True).encode("ascii")
        return self.line


date_line: Final = _DateLine()


def build_response(
    status: int,
    headers: Iterable[tuple[bytes, bytes]],
    body: bytes,
    *,
    keep_alive: bool,
    head: bool = False,
    extra: bytes = b"",
    http10: bool = False,
) -> bytes:
    """Serialize a response.

    ``headers`` must already be validated and free of content-length,
    connection and hop-by-hop fields: this adds ``date``, ``content-length``
    (the length of ``body``, also for a HEAD response, which carries no body)
    and ``connection: close`` when the connection will not be kept, or
    ``connection: keep-alive`` when it will be kept for an HTTP/1.0 client
    (``http10``), which assumes the opposite otherwise. ``extra`` is appended
    to the header lines as is, e.g. ``b"x-request-id: 7\r\n"``. 1xx, 204 and
    304 responses never carry content or a Content-Length, and 1xx ones no
    ``connection`` field either: the final response says that.
    """
    parts = [status_line(status)]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    if status < 200:
        parts += (extra, b"\r\n")
        return b"".join(parts)
    parts.append(date_line())
    if status not in _NO_CONTENT:
        parts.append(b"content-length: %d\r\n" % len(body))
    if not keep_alive:
        parts.append(_CONNECTION_CLOSE)
    elif http10:
        parts.append(_CONNECTION_KEEP_ALIVE)
    parts += (extra, b"\r\n")
    if not head and status not in _NO_CONTENT:
        parts.append(body)
    return b"".join(parts)


_ERROR_HEADERS: Final = ((b"content-type", b"text/plain; charset=utf-8"),)


@lru_cache(maxsize=256)
def error_body(status: int, message: str) -> bytes:
    """The body of a short plain-text answer: ``"<status> <phrase>: <message>\\n"``."""
    # Refusals repeat the same few messages; bounded in case one carries variable text.
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    return f"{status} {phrase}: {message}\n".encode()


def error_response(
    status: int,
    message: str,
    *,
    keep_alive: bool = False,
    head: bool = False,
    extra: bytes = b"",
    http10: bool = False,
) -> bytes:
    """A short plain-text response: ``"<status> <phrase>: <message>\\n"``."""
    return build_response(
        status,
        _ERROR_HEADERS,
        error_body(status, message),
        keep_alive=keep_alive,
        head=head,
        extra=extra,
        http10=http10,
    )
