"""The header rules a proxy applies, each in one pass over a message's headers.

- Hop-by-hop fields, and every field a ``Connection`` header names, are not
  forwarded in either direction (RFC 9110 §7.6.1); a field named so is gone
  before the proxy adds its own, so it never reaches the X-Forwarded-For
  chain either. Host is kept whatever Connection says: routing used it, and
  the backend must see the host routing saw.
- The edits modules ask for (:class:`HeaderChanges`: remove, set, add).
- A backend's response headers are validated as a whole (one C-level regex
  match over all names and one over all values) before anything is relayed.

Names are lower-case bytes on the request side (the parser lowers them);
response names are compared lower-cased and relayed as the backend wrote them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Final

__all__ = [
    "HOP_BY_HOP",
    "REQUEST_DROP",
    "RESPONSE_DROP",
    "HeaderChanges",
    "HeaderEdits",
    "InvalidHeader",
    "connection_tokens",
    "forward_request_headers",
    "is_valid_name",
    "is_valid_value",
    "response_fields",
    "response_headers",
]

# Fields that describe one connection rather than the message, so a proxy
# must not forward them (RFC 9110 §7.6.1 names connection, proxy-connection,
# keep-alive, te, transfer-encoding and upgrade). Also listed:
# - trailer: the proxy de-chunks bodies and drops trailers, so an announcement
#   of trailer fields would be false on the other side;
# - proxy-authenticate / proxy-authorization: RFC 9110 §11.7 addresses them to
#   the next hop only; a proxy that does not authenticate must not pass the
#   client's proxy credentials on to a backend.
HOP_BY_HOP: Final[frozenset[bytes]] = frozenset(
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
# Request headers the proxy drops or rewrites. Content-Length is dropped too:
# the body field of the frame carries the exact length; so is Expect: the
# proxy answered 100-continue itself and the service gets the whole body.
REQUEST_DROP: Final[frozenset[bytes]] = HOP_BY_HOP | {
    b"content-length",
    b"expect",
    b"x-forwarded-for",
    b"x-forwarded-proto",
}
# Response headers the proxy itself owns: the HTTP framing is ours to write,
# and so is Date (one per message, RFC 9110 6.6.1; the proxy always writes
# it, as nginx does in place of its upstream's).
RESPONSE_DROP: Final[frozenset[bytes]] = HOP_BY_HOP | {b"content-length", b"date"}
# Request fields a Connection header cannot remove: a client naming Host there
# would have the request routed by one host and served without any.
_END_TO_END: Final[frozenset[bytes]] = frozenset((b"host",))

# RFC 9110 §5.6.2 token and §5.5 field-value (no leading or trailing
# whitespace, HTAB inside, obs-text allowed, no other CTL).
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_VALUE = rb"(?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?"
_is_token: Final = re.compile(_TOKEN).fullmatch
_is_value: Final = re.compile(_VALUE).fullmatch
# All names (values) of a response checked by one regex call over them joined
# with a newline, which neither a token nor a field value may contain: one
# C-level match instead of a Python call per header.
_VALID_NAMES: Final = re.compile(rb"%s(?:\n%s)*" % (_TOKEN, _TOKEN)).fullmatch
_VALID_VALUES: Final = re.compile(rb"%s(?:\n%s)*" % (_VALUE, _VALUE)).fullmatch


class InvalidHeader(ValueError):
    """A header a proxy must not relay (not a token name, or a value with CR, LF, NUL...)."""


def is_valid_name(name: bytes) -> bool:
    """Whether ``name`` is an RFC 9110 token, as a field name must be."""
    return _is_token(name) is not None


def is_valid_value(value: bytes) -> bool:
    """Whether ``value`` is an RFC 9110 field-value (may be empty)."""
    return _is_value(value) is not None


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


class HeaderChanges:
    """Headers to remove, set (replace) and add, in that order; names lower-case."""

    __slots__ = ("add", "remove", "set")

    def __init__(
        self,
        add: tuple[tuple[bytes, bytes], ...] = (),
        set: tuple[tuple[bytes, bytes], ...] = (),
        remove: frozenset[bytes] = frozenset(),
    ) -> None:
        self.add = add
        self.set = set
        self.remove = remove | {name for name, _ in set}

    def __bool__(self) -> bool:
        return bool(self.add or self.set or self.remove)

    def apply(self, names: list[bytes], values: list[bytes]) -> tuple[list[bytes], list[bytes]]:
        remove = self.remove
        if remove:
            kept = [(n, v) for n, v in zip(names, values, strict=True) if n.lower() not in remove]
            names = [n for n, _ in kept]
            values = [v for _, v in kept]
        for name, value in (*self.set, *self.add):
            names.append(name)
            values.append(value)
        return names, values


class HeaderEdits:
    """What a module changes in the headers of one route's requests and responses."""

    __slots__ = ("request", "response")

    def __init__(self, request: HeaderChanges, response: HeaderChanges) -> None:
        self.request = request
        self.response = response


def forward_request_headers(
    names: list[bytes], values: list[bytes], also_drop: bytes | None = None
) -> tuple[list[bytes], list[bytes], bytes]:
    """The request headers a proxy forwards, and the incoming X-Forwarded-For chain.

    ``names`` are lower-case, ``values`` parallel to them. Drops hop-by-hop
    fields, those the client named in Connection (Host excepted),
    Content-Length, X-Forwarded-For/-Proto (the proxy writes its own) and
    ``also_drop``. Returns new (names, values, forwarded_for) lists, where
    ``forwarded_for`` is every X-Forwarded-For field of the request joined in
    order (RFC 9110 §5.3), or b"" if there was none or the client named it in
    Connection: a field addressed to this hop only is removed before the
    proxy adds its own, so its value does not reach the chain.
    """
    drop = REQUEST_DROP
    chain = True
    if b"connection" in names:
        named = connection_tokens(zip(names, values, strict=True)) - _END_TO_END
        drop = drop | named
        chain = b"x-forwarded-for" not in named
    kept_names = []
    kept_values = []
    forwarded_for = b""
    for name, value in zip(names, values, strict=True):
        if name in drop or name == also_drop:
            if chain and name == b"x-forwarded-for":
                forwarded_for = forwarded_for + b", " + value if forwarded_for else value
            continue
        kept_names.append(name)
        kept_values.append(value)
    return kept_names, kept_values, forwarded_for


def response_headers(
    names: list[bytes], values: list[bytes], add_name: bytes | None, add_value: bytes
) -> tuple[list[bytes], list[bytes]]:
    """A backend's response headers as the proxy relays them, checked in one pass.

    Raises InvalidHeader if any name is not a token or any value is not a
    field value. Drops the framing and hop-by-hop fields and those named in
    Connection. ``add_name`` (lower-case), if given, is appended with
    ``add_value`` unless the backend set it already.
    """
    if not names:
        if add_name is not None:
            return [add_name], [add_value]
        return names, values
    joined = b"\n".join(names)
    joined_values = b"\n".join(values)
    separators = len(names) - 1
    # A newline inside a name or value would pass the pattern as a separator;
    # counting them closes that door (header injection).
    if not (
        _VALID_NAMES(joined)
        and _VALID_VALUES(joined_values)
        and joined.count(b"\n") == separators
        and joined_values.count(b"\n") == separators
    ):
        raise InvalidHeader("backend answered with an invalid header")
    lowered = joined.lower().split(b"\n")
    if not RESPONSE_DROP.isdisjoint(lowered):
        drop = RESPONSE_DROP | connection_tokens(zip(lowered, values, strict=True))
        kept = [
            (name, value)
            for name, lower, value in zip(names, lowered, values, strict=True)
            if lower not in drop
        ]
        names = [name for name, _ in kept]
        values = [value for _, value in kept]
    if add_name is not None and add_name not in lowered:
        names.append(add_name)
        values.append(add_value)
    return names, values


# Backends repeat the same few header blocks (content-type: application/json,
# cache-control: no-store...): the header lines built from one are kept,
# keyed by its names and values, so that a repeat costs two joins and a
# lookup instead of two regex matches, a split and a filter. Bounded both in
# entries and in the size of what is kept.
_FIELDS_CACHE: Final[dict[tuple[bytes, bytes, int], tuple[bytes, frozenset[bytes]]]] = {}
_FIELDS_CACHE_ENTRIES: Final = 512
_FIELDS_CACHE_KEY_SIZE: Final = 1024
_colon_join: Final = b": ".join


def response_fields(
    names: Sequence[bytes], values: Sequence[bytes], add_name: bytes | None, add_value: bytes
) -> bytes:
    """The header lines (``name: value CRLF`` each) a proxy relays for a backend's headers.

    What :func:`response_headers` keeps, joined; raises InvalidHeader like it.
    """
    if not names:
        return add_name + b": " + add_value + b"\r\n" if add_name is not None else b""
    # The count makes the key exact: a name or value with a newline in it
    # (invalid) has a different number of them than the same bytes split right.
    joined_names = b"\n".join(names)
    joined_values = b"\n".join(values)
    key = (joined_names, joined_values, len(names))
    entry = _FIELDS_CACHE.get(key)
    if entry is None:
        kept_names, kept_values = response_headers(list(names), list(values), None, b"")
        fields = b"".join(
            [_colon_join(pair) + b"\r\n" for pair in zip(kept_names, kept_values, strict=True)]
        )
        entry = (fields, frozenset(name.lower() for name in names))
        if len(joined_names) + len(joined_values) <= _FIELDS_CACHE_KEY_SIZE:
            if len(_FIELDS_CACHE) >= _FIELDS_CACHE_ENTRIES:
                _FIELDS_CACHE.clear()
            _FIELDS_CACHE[key] = entry
    fields, present = entry
    if add_name is not None and add_name not in present:
        return fields + add_name + b": " + add_value + b"\r\n"
    return fields
