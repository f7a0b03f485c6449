"""Request and Response payloads (``proto/pitcher.proto``) on the hot path.

The wire is protobuf and stays readable by the generated classes. Each of the
four functions uses whichever of the generated (upb) classes and protobuf
bytes written or read in Python measured faster here. Measured with
``bench/bench_service.py --codec`` (timeit, median of 15 runs of 5000 calls,
Python 3.11, protobuf 7.36 upb, a request like the proxy's, a response of 3
headers and 259 bytes of JSON; a 2-core machine shared with other work, so
read the ratios, not the absolute numbers), in µs per call:

=======================  ================  ================  ==================
function                 generated (upb)   by hand           used
=======================  ================  ================  ==================
encode_request,  5 h.    2.84              2.57              by hand
encode_request, 20 h.    4.30              6.73              upb
decode_request,  5 h.    2.23              4.99              upb
decode_request, 20 h.    3.19              15.39             upb
encode_response          2.26              1.87              by hand
decode_response          2.85              5.05              upb
=======================  ================  ================  ==================

So a request is written by hand up to ``HAND_MAX_HEADERS`` headers (the two
ways cross between 8 and 10) and by the generated class past it, in the
pure-Python build; compiled by mypyc, the hand-written way wins at any count
and is the only one used. A
response's fields before the body can be made once (``response_head``) and
completed per response (``with_body``), which is how the SDK answers JSON. A
Python loop over the fields costs more than upb's parse, so both payloads
are read by upb, and a response's header lists come out by slicing (one C
call each) rather than by iterating the repeated fields. This contradicts
what this docstring said before (hand-written bytes slower): that was
measured against a loop writing varints for every field, not against the
one-table-look-up prefixes used here.

A streamed body (docs/streaming.md) travels apart from its head: the head's
``body`` holds the first bytes only, and ``body_size`` (Request field 9,
Response field 5, optional) the whole body's length when it is known.

What is written by hand is canonical protobuf, the very bytes upb writes:
fields in number order, proto3 defaults (empty strings, status 0) left out.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from pitcher_rpc.pb import pitcher_pb2
from transports.native import choose

Request = pitcher_pb2.Request
Response = pitcher_pb2.Response
_parse_request: Final = Request.FromString
_parse_response: Final = Response.FromString


class BadPayload(ValueError):
    """A payload that is not a valid message of the expected type."""


# ----------------------------------------------------------------------------- field prefixes


def encode_varint(value: int) -> bytes:
    if value < 0x80:
        return _BYTES[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# A body may be any of these; the frame takes it as it is.
BytesLike = bytes | bytearray | memoryview

_BYTES: Final = tuple(bytes((n,)) for n in range(256))


def _prefixes(field: int) -> tuple[bytes, ...]:
    """Key and length of a length-delimited field, for every length that fits one byte."""
    key = _BYTES[field << 3 | 2]
    return tuple(key + _BYTES[n] for n in range(0x80))


def _prefix(field: int, length: int) -> bytes:
    if length < 0x4000:  # two bytes of varint: a response body, a long header value
        return bytes((field << 3 | 2, (length & 0x7F) | 0x80, length >> 7))
    return _BYTES[field << 3 | 2] + encode_varint(length)


# Up to this many headers a Request is written faster by hand, past it by the
# generated class: in pure Python the two cross between 8 and 10 headers here;
# compiled, the hand-written bytes win at any count (timeit, µs per call, upb
# against hand: 2.07/0.98 at 8 headers, 3.16/2.29 at 23).
HAND_MAX_HEADERS: Final = 1 << 30 if choose().compiled else 8

# Request fields 1-8 and Response fields 2-4: key and length written from one
# table look-up. Final: compiled, a table is a C static, not a look-up in the
# module's dict (some 140 instructions each, 21 times per request).
_METHOD: Final = _prefixes(1)
_PATH: Final = _prefixes(2)
_QUERY: Final = _prefixes(3)
_NAME: Final = _prefixes(4)
_VALUE: Final = _prefixes(5)
_BODY: Final = _prefixes(6)
_ROUTE: Final = _prefixes(7)
_CLIENT: Final = _prefixes(8)
_RESPONSE_NAME: Final = _prefixes(2)
_RESPONSE_VALUE: Final = _prefixes(3)
_RESPONSE_BODY: Final = _prefixes(4)
# Request field 9 (body_size, a varint): its key.
_BODY_SIZE_KEY: Final = b"\x48"
# Field 1 (status, a varint) with its value, for every status a response may carry.
_STATUS: Final = tuple(b"\x08" + encode_varint(status) for status in range(1000))


# ----------------------------------------------------------------------------- Request


def encode_request(
    method: bytes,
    path: bytes,
    query: bytes,
    header_names: Iterable[bytes],
    header_values: Iterable[bytes],
    body: BytesLike,
    route: str,
    client: str,
    body_size: int = -1,
) -> bytes:
    """The Request payload, written straight to bytes (any bytes-like body will do).

    ``body_size`` >= 0 is the length of a body streamed after this head
    (``body`` its first bytes); negative leaves the field out (a whole body,
    or a streamed one of unknown length).
    """
    if type(header_names) is list and len(header_names) > HAND_MAX_HEADERS and type(body) is bytes:
        try:
            return _encode_request_upb(
                method, path, query, header_names, header_values, body, route, client, body_size
            )
        except TypeError:  # a bytes-like field the generated class refuses (memoryview)
            pass
    # parts.append(), not a bound-method alias: Python 3.11 specializes the
    # call on a list (1.50 against 1.79 µs for this function, pure Python),
    # and mypyc makes it a PyList_Append rather than a Python call.
    parts: list[BytesLike] = []
    size = len(method)
    if size:
        parts.append(_METHOD[size] if size < 0x80 else _prefix(1, size))
        parts.append(method)
    size = len(path)
    if size:
        parts.append(_PATH[size] if size < 0x80 else _prefix(2, size))
        parts.append(path)
    size = len(query)
    if size:
        parts.append(_QUERY[size] if size < 0x80 else _prefix(3, size))
        parts.append(query)
    for name in header_names:
        size = len(name)
        parts.append(_NAME[size] if size < 0x80 else _prefix(4, size))
        parts.append(name)
    for value in header_values:
        size = len(value)
        parts.append(_VALUE[size] if size < 0x80 else _prefix(5, size))
        parts.append(value)
    size = len(body)
    if size:
        parts.append(_BODY[size] if size < 0x80 else _prefix(6, size))
        parts.append(body)
    if route:
        text = route.encode()
        size = len(text)
        parts.append(_ROUTE[size] if size < 0x80 else _prefix(7, size))
        parts.append(text)
    if client:
        text = client.encode()
        size = len(text)
        parts.append(_CLIENT[size] if size < 0x80 else _prefix(8, size))
        parts.append(text)
    if body_size >= 0:
        parts.append(_BODY_SIZE_KEY)
        parts.append(encode_varint(body_size))
    return b"".join(parts)


def _encode_request_upb(
    method: bytes,
    path: bytes,
    query: bytes,
    header_names: Iterable[bytes],
    header_values: Iterable[bytes],
    body: bytes,
    route: str,
    client: str,
    body_size: int = -1,
) -> bytes:
    message = Request()
    message.method = method
    message.path = path
    if query:
        message.query = query
    message.header_names.extend(header_names)
    message.header_values.extend(header_values)
    if body:
        message.body = body
    message.route = route
    message.client = client
    if body_size >= 0:
        message.body_size = body_size
    return message.SerializeToString()


def decode_request(payload: bytes) -> pitcher_pb2.Request:
    """The Request message; BadPayload if it does not decode or its headers do not pair up."""
    try:
        message = _parse_request(payload)
    except Exception as exc:  # DecodeError, or upb's own errors on hostile input
        raise BadPayload(f"undecodable request payload: {exc}") from None
    if len(message.header_names) != len(message.header_values):
        raise BadPayload(
            f"request has {len(message.header_names)} header names"
            f" but {len(message.header_values)} values"
        )
    return message


# ----------------------------------------------------------------------------- Response


class ResponseMessage:
    """A decoded Response: the fields of ``pitcher.v1.Response`` as plain values (lists).

    ``body_size`` is read by :func:`decode_response_head` only (the head of a
    streamed answer): the body's whole length, or None when not given.
    """

    __slots__ = ("body", "body_size", "header_names", "header_values", "status")

    def __init__(
        self,
        status: int,
        header_names: list[bytes],
        header_values: list[bytes],
        body: bytes,
        body_size: int | None = None,
    ) -> None:
        self.status = status
        self.header_names = header_names
        self.header_values = header_values
        self.body = body
        self.body_size = body_size

    def __repr__(self) -> str:
        return (
            f"ResponseMessage({self.status}, {self.header_names!r}, {self.header_values!r},"
            f" {self.body!r})"
        )


def response_head(
    status: int, header_names: Iterable[bytes], header_values: Iterable[bytes]
) -> bytes:
    """A Response payload without its body: what :func:`with_body` completes."""
    parts = [_STATUS[status] if 0 < status < 1000 else _status_field(status)]
    for name in header_names:
        size = len(name)
        parts.append(_RESPONSE_NAME[size] if size < 0x80 else _prefix(2, size))
        parts.append(name)
    for value in header_values:
        size = len(value)
        parts.append(_RESPONSE_VALUE[size] if size < 0x80 else _prefix(3, size))
        parts.append(value)
    return b"".join(parts)


def with_body(head: bytes, body: BytesLike) -> bytes:
    """A Response payload: ``head`` (from :func:`response_head`) and ``body``."""
    size = len(body)
    if size < 0x80:
        return head + _RESPONSE_BODY[size] + body if size else head
    return b"".join((head, _prefix(4, size), body))


def encode_response(
    status: int, header_names: Iterable[bytes], header_values: Iterable[bytes], body: BytesLike
) -> bytes:
    return with_body(response_head(status, header_names, header_values), body)


def _status_field(status: int) -> bytes:
    if status < 0 or status > 0xFFFFFFFF:
        raise ValueError(f"status {status} is not a uint32")
    return b"\x08" + encode_varint(status) if status else b""


def decode_response(payload: bytes) -> ResponseMessage:
    """The Response; BadPayload if it does not decode or its headers do not pair up."""
    try:
        message = _parse_response(payload)
    except Exception as exc:  # DecodeError, or upb's own errors on hostile input
        raise BadPayload(f"undecodable response payload: {exc}") from None
    # A slice copies a repeated field into a list in one C call; iterating it
    # (list(), a loop) makes a Python call per element.
    names = message.header_names[:]
    values = message.header_values[:]
    if len(names) != len(values):
        raise BadPayload(f"response has {len(names)} header names but {len(values)} values")
    return ResponseMessage(message.status, names, values, message.body)


def decode_response_head(payload: bytes) -> ResponseMessage:
    """The head of a streamed Response: as :func:`decode_response`, with ``body_size``."""
    try:
        message = _parse_response(payload)
    except Exception as exc:  # DecodeError, or upb's own errors on hostile input
        raise BadPayload(f"undecodable response payload: {exc}") from None
    names = message.header_names[:]
    values = message.header_values[:]
    if len(names) != len(values):
        raise BadPayload(f"response has {len(names)} header names but {len(values)} values")
    size = message.body_size if message.HasField("body_size") else None
    return ResponseMessage(message.status, names, values, message.body, size)
