"""Payloads of the control frames (SETTINGS, ERROR, GOAWAY, WINDOW_UPDATE).

The transport layer knows no protobuf library; these three tiny messages are
written and read here in protobuf wire format by hand (varints and
length-delimited fields only), and a test checks them against the generated
classes from ``proto/pitcher.proto``. Unknown fields are skipped, as
protobuf requires.
"""

from __future__ import annotations

from typing import NamedTuple

from .errors import ErrorCode, FlowControlError, ProtocolError
from .frame import MAX_WINDOW


def encode_varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it; ProtocolError if cut short."""
    result = 0
    shift = 0
    end = len(data)
    while True:
        if pos >= end:
            raise ProtocolError("truncated varint in control payload")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 64:
            raise ProtocolError("varint longer than 64 bits in control payload")


def iter_fields(data: bytes) -> dict[int, int | bytes]:
    """Last value of each varint (wire type 0) or bytes (wire type 2) field.

    Fixed-width fields (types 1 and 5) are skipped; groups are refused.
    """
    fields: dict[int, int | bytes] = {}
    pos = 0
    end = len(data)
    while pos < end:
        key, pos = decode_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise ProtocolError("field number 0 in control payload")
        if wire_type == 0:
            value, pos = decode_varint(data, pos)
            fields[number] = value
        elif wire_type == 2:
            size, pos = decode_varint(data, pos)
            if pos + size > end:
                raise ProtocolError("truncated field in control payload")
            fields[number] = bytes(data[pos : pos + size])
            pos += size
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            raise ProtocolError(f"unsupported wire type {wire_type} in control payload")
    if pos != end:
        raise ProtocolError("truncated field in control payload")
    return fields


def _varint_field(number: int, value: int) -> bytes:
    return encode_varint(number << 3) + encode_varint(value) if value else b""


def _bytes_field(number: int, value: bytes) -> bytes:
    if not value:
        return b""
    return encode_varint((number << 3) | 2) + encode_varint(len(value)) + value


def _int(fields: dict[int, int | bytes], number: int) -> int:
    value = fields.get(number, 0)
    if not isinstance(value, int):
        raise ProtocolError(f"field {number} should be a varint")
    return value


def _text(fields: dict[int, int | bytes], number: int) -> str:
    value = fields.get(number, b"")
    if not isinstance(value, bytes):
        raise ProtocolError(f"field {number} should be length-delimited")
    return value.decode("utf-8", "replace")


class Settings(NamedTuple):
    max_frame_size: int = 0
    max_in_flight: int = 0
    # DATA credit every call starts with toward the sender; 0: whole frames only.
    initial_window: int = 0

    def encode(self) -> bytes:
        return (
            _varint_field(1, self.max_frame_size)
            + _varint_field(2, self.max_in_flight)
            + _varint_field(3, self.initial_window)
        )

    @classmethod
    def decode(cls, data: bytes) -> Settings:
        fields = iter_fields(data)
        initial_window = _int(fields, 3)
        if initial_window > MAX_WINDOW:
            raise FlowControlError(f"initial_window {initial_window} is over {MAX_WINDOW}")
        return cls(_int(fields, 1), _int(fields, 2), initial_window)


class ErrorInfo(NamedTuple):
    code: int
    message: str = ""

    def encode(self) -> bytes:
        return _varint_field(1, int(self.code)) + _bytes_field(2, self.message.encode())

    @classmethod
    def decode(cls, data: bytes) -> ErrorInfo:
        fields = iter_fields(data)
        return cls(_int(fields, 1), _text(fields, 2))

    def describe(self) -> str:
        name = ErrorCode(self.code).name if self.code in ErrorCode._value2member_map_ else self.code
        return f"{name}: {self.message}" if self.message else str(name)


class GoAwayInfo(NamedTuple):
    last_request_id: int
    reason: str = ""

    def encode(self) -> bytes:
        return _varint_field(1, self.last_request_id) + _bytes_field(2, self.reason.encode())

    @classmethod
    def decode(cls, data: bytes) -> GoAwayInfo:
        fields = iter_fields(data)
        return cls(_int(fields, 1), _text(fields, 2))


def decode_window_update(payload: bytes) -> int:
    """The increment of a WINDOW_UPDATE payload (4 bytes, big-endian, > 0)."""
    if len(payload) != 4:
        raise ProtocolError(f"WINDOW_UPDATE payload of {len(payload)} bytes (must be 4)")
    increment = int.from_bytes(payload, "big")
    if increment == 0:
        raise ProtocolError("WINDOW_UPDATE with an increment of 0")
    return increment
