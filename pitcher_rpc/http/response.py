"""Building HTTP/1.1 responses as bytes, and the header rules a proxy applies.

Everything a response needs on every request is computed at import: the
status lines, the hop-by-hop set and the validation patterns.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from http import HTTPStatus

__all__ = [
    "HOP_BY_HOP",
    "STATUS_LINES",
    "build_response",
    "connection_tokens",
    "error_response",
    "is_valid_name",
    "is_valid_value",
    "status_line",
]

STATUS_LINES: dict[int, bytes] = {
    status.value: b"HTTP/1.1 %d %s\r\n" % (status.value, status.phrase.encode("ascii"))
    for status in HTTPStatus
}

# Fields that describe one connection rather than the message, so a proxy
# must not forward them (RFC 9110 §7.6.1 names connection, proxy-connection,
# keep-alive, te, transfer-encoding and upgrade). Also listed:
# - trailer: the proxy de-chunks bodies and drops trailers, so an announcement
#   of trailer fields would be false on the other side;
# - proxy-authenticate / proxy-authorization: RFC 9110 §11.7 addresses them to
#   the next hop only; a proxy that does not authenticate must not pass the
#   client's proxy credentials on to a backend.
HOP_BY_HOP: frozenset[bytes] = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    )
)

# RFC 9110 §5.6.2 token and §5.5 field-value (no leading or trailing
# whitespace, HTAB inside, obs-text allowed, no other CTL).
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(
    rb"(?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?"
)
# Statuses whose responses never carry content (RFC 9110 §6.4.1).
_NO_CONTENT = frozenset((204, 304))
_CONNECTION_CLOSE = b"connection: close\r\n"


def status_line(code: int) -> bytes:
    """``HTTP/1.1 <code> <phrase>\\r\\n``; codes without a registered phrase get "Unknown"."""
    line = STATUS_LINES.get(code)
    if line is not None:
        return line
    if not 100 <= code <= 599:
        raise ValueError(f"status code {code} is outside 100..599")
    return b"HTTP/1.1 %d Unknown\r\n" % code


def is_valid_name(name: bytes) -> bool:
    """Whether ``name`` is an RFC 9110 token, as a field name must be."""
    return _TOKEN.fullmatch(name) is not None


def is_valid_value(value: bytes) -> bool:
    """Whether ``value`` is an RFC 9110 field-value (may be empty)."""
    return _FIELD_VALUE.fullmatch(value) is not None


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The lower-case options named in all Connection fields of ``headers``.

    Names in ``headers`` must already be lower case, as the request parser
    gives them. A proxy removes these fields too (RFC 9110 §7.6.1).
    """
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            for token in value.split(b","):
                token = token.strip(b" \t")
                if token:
                    tokens.add(token.lower())
    return frozenset(tokens)


def build_response(
    status: int,
    headers: Iterable[tuple[bytes, bytes]],
    body: bytes,
    *,
    keep_alive: bool,
    head: bool = False,
    extra: bytes = b"",
) -> bytes:
    """Serialize a response.

    ``headers`` must already be validated and free of content-length,
    connection and hop-by-hop fields: this adds ``content-length`` itself
    (the length of ``body``, also for a HEAD response, which carries no body)
    and ``connection: close`` when the connection will not be kept. ``extra``
    is appended to the header lines as is, e.g. ``b"x-request-id: 7\\r\\n"``.
    1xx, 204 and 304 responses never carry content or a Content-Length, and
    1xx ones no ``connection: close`` either: the final response says that.
    """
    parts = [status_line(status)]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    if status < 200:
        parts += (extra, b"\r\n")
        return b"".join(parts)
    if status not in _NO_CONTENT:
        parts.append(b"content-length: %d\r\n" % len(body))
    if not keep_alive:
        parts.append(_CONNECTION_CLOSE)
    parts += (extra, b"\r\n")
    if not head and status not in _NO_CONTENT:
        parts.append(body)
    return b"".join(parts)


@lru_cache(maxsize=256)
def error_response(
    status: int, message: str, *, keep_alive: bool = False, head: bool = False
) -> bytes:
    """A short plain-text response: ``"<status> <phrase>: <message>\\n"``.

    Cached, since refusals repeat the same few messages; the cache is bounded
    in case a message ever carries variable text.
    """
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    body = f"{status} {phrase}: {message}\n".encode()
    headers = ((b"content-type", b"text/plain; charset=utf-8"),)
    return build_response(status, headers, body, keep_alive=keep_alive, head=head)
