"""UDP datagrams: one frame each, behind a CRC-32C. Pure functions, no I/O.

A datagram is a 4-byte checksum followed by an ordinary frame (all integers
big-endian)::

    offset  size  field
    0       4     crc32c        CRC-32C (Castagnoli) of every byte after this field
    4       20    frame header  as in transports/frame.py (version, type, flags,
                                length, request_id, deadline_ms)
    24      n     payload       ``length`` bytes: the datagram ends exactly here

There is no preface and no SETTINGS: the carrier has no connection. A datagram
that fails any check is not delivered and not answered; :func:`decode_datagram`
raises :class:`DatagramDropped` naming one :class:`DropReason`, which the
client and the server count. See docs/wire.md, section "UDP".
"""

from __future__ import annotations

import importlib
import logging
import struct
from collections.abc import Callable
from enum import StrEnum
from typing import Any

import crcmod.predefined

from .errors import ProtocolError
from .frame import HEADER, HEADER_SIZE, VERSION, Frame, FrameType

CRC_SIZE = 4
DATAGRAM_HEADER_SIZE = CRC_SIZE + HEADER_SIZE  # 24
# The largest UDP payload over IPv4 (65535 - 8 - 20). IPv6 would allow 20 bytes
# more; one ceiling for both keeps a node's limits independent of its address.
MAX_UDP_PAYLOAD = 65507
# The same cap the stream carriers put on PING, PONG and GOAWAY payloads.
MAX_CONTROL_PAYLOAD = 4096

# Built once: mkCrcFun generates the lookup table. What it returns is a Python
# wrapper around crcmod's C function (an extra call, ~0.25 µs); the hot paths
# call the C function itself: crc = XOR ^ update(data, XOR, TABLE). If crcmod
# ever changes that shape, the check below falls back to the wrapper.
_crc_wrapper = crcmod.predefined.mkCrcFun("crc-32c")
CRC_XOR = 0xFFFFFFFF


def _direct_crc() -> tuple[Callable[[bytes, int, Any], int], Any]:
    try:
        initial, table, update = _crc_wrapper.__defaults__
        if initial == 0 and CRC_XOR ^ update(b"123456789", CRC_XOR, table) == 0xE3069283:
            return update, table
    except (TypeError, ValueError):
        pass

    def update_by_wrapper(data: bytes, crc: int, table: Any) -> int:
        return CRC_XOR ^ _crc_wrapper(data, CRC_XOR ^ crc)

    return update_by_wrapper, None


# crc_update(data, running, CRC_TABLE): running starts at CRC_XOR, the CRC is CRC_XOR ^ it.
crc_update, CRC_TABLE = _direct_crc()


def crc32c(data: bytes) -> int:
    """The CRC-32C (Castagnoli) of ``data``."""
    return CRC_XOR ^ crc_update(data, CRC_XOR, CRC_TABLE)


log = logging.getLogger("pitcher.transports")

# crcmod computes in C only when its extension module was built at install
# time, and otherwise falls back to pure Python without a word: then every
# datagram's CRC costs about 20 times more (see crc_note). Said once per
# process, the first time a UDP client or server is made, and by `pitcher bench`.
# The module is looked up by name: the attribute crcmod.crcmod is the package
# itself, which star-imports the module.
CRC_IN_C: bool = bool(getattr(importlib.import_module("crcmod.crcmod"), "_usingExtension", False))
_crc_warned = False


def crc_note() -> str:
    """One line about a slow CRC-32C, or "" when crcmod runs in C."""
    if CRC_IN_C:
        return ""
    return (
        "CRC-32C runs in pure Python: crcmod's C extension (crcmod._crcfunext) is not"
        " built, so the CRC of every UDP datagram costs about 20x more (9 µs for"
        " 60 bytes, 145 µs for 1400, against 0.5 and 4 in C); reinstall"
        " crcmod where a C compiler and the Python headers are installed"
        " (pip install --force-reinstall --no-cache-dir crcmod)"
    )


def warn_if_crc_is_slow() -> None:
    """Log :func:`crc_note` once per process, if there is anything to say."""
    global _crc_warned
    if _crc_warned or CRC_IN_C:
        return
    _crc_warned = True
    log.warning("%s", crc_note())


_CRC = struct.Struct(">I")
_pack_crc = _CRC.pack
_pack_header = HEADER.pack
_unpack_datagram_header = struct.Struct(">IBBHIQI").unpack_from
# Frame's generated __new__ is a Python function; tuple.__new__ builds the same
# object in C (as in decoder.py).
_new_frame = tuple.__new__


class DropReason(StrEnum):
    """Why a datagram was dropped; the keys of the ``dropped`` counters."""

    SHORT = "short"  # fewer than 24 bytes
    TOO_LARGE = "too_large"  # over the receiver's max_datagram, or a control payload over 4096
    CHECKSUM = "checksum"  # the CRC-32C does not match
    VERSION = "version"  # frame version other than 1
    LENGTH = "length"  # the length field disagrees with the datagram's size
    UNKNOWN_TYPE = "unknown_type"  # a frame type outside 1..8
    UNEXPECTED_TYPE = "unexpected_type"  # a known type this side does not accept
    REQUEST_ID = "request_id"  # id 0 on a call frame, or an id on a node frame
    BAD_PAYLOAD = "bad_payload"  # a GOAWAY or ERROR payload that does not decode


class DatagramDropped(ProtocolError):
    """A datagram that must be dropped (and counted), never delivered or answered."""

    def __init__(self, reason: DropReason, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


# Frames about one call carry its id; UDP has no connection for an ERROR with
# id 0 to be about, so ERROR is a call frame here.
# Plain ints in these sets: a lookup then never compares against an enum member.
_CALL_TYPES = frozenset(
    int(t) for t in (FrameType.REQUEST, FrameType.RESPONSE, FrameType.CANCEL, FrameType.ERROR)
)
# UDP carries whole frames only: DATA and WINDOW_UPDATE (streamed bodies) are
# not frame types of this carrier, and a datagram of either is dropped as unknown.
_KNOWN_TYPES = frozenset(int(t) for t in FrameType if t < FrameType.DATA)

# What each side accepts. SETTINGS has no use without a connection.
SERVER_ACCEPTS = frozenset(int(t) for t in (FrameType.REQUEST, FrameType.CANCEL, FrameType.PING))
CLIENT_ACCEPTS = frozenset(
    int(t)
    for t in (FrameType.RESPONSE, FrameType.ERROR, FrameType.GOAWAY, FrameType.PING, FrameType.PONG)
)
ANY_TYPE = _KNOWN_TYPES


def encode_datagram(
    frame_type: int,
    request_id: int,
    payload: bytes = b"",
    deadline_ms: int = 0,
    flags: int = 0,
) -> bytes:
    """CRC + header + payload as one bytes object.

    ``flags`` is reserved (senders write 0); it is a parameter so that any
    decoded frame re-encodes to the very bytes it came from.
    """
    body = _pack_header(VERSION, frame_type, flags, len(payload), request_id, deadline_ms) + payload
    return _pack_crc(CRC_XOR ^ crc_update(body, CRC_XOR, CRC_TABLE)) + body


def encode_request_datagram(request_id: int, payload: bytes, deadline_ms: int) -> bytes:
    body = _pack_header(VERSION, 1, 0, len(payload), request_id, deadline_ms) + payload
    return _pack_crc(CRC_XOR ^ crc_update(body, CRC_XOR, CRC_TABLE)) + body


def encode_response_datagram(request_id: int, payload: bytes) -> bytes:
    body = _pack_header(VERSION, 2, 0, len(payload), request_id, 0) + payload
    return _pack_crc(CRC_XOR ^ crc_update(body, CRC_XOR, CRC_TABLE)) + body


def decode_datagram(
    data: bytes, accepted: frozenset[int] = ANY_TYPE, max_size: int = MAX_UDP_PAYLOAD
) -> Frame:
    """The frame in ``data``, or DatagramDropped naming the first check that failed.

    The checks run in this order: size (short, too large), checksum, version,
    length, known type, accepted type, request id, control payload size.
    Nothing else is raised, whatever the bytes.
    """
    size = len(data)
    if size < DATAGRAM_HEADER_SIZE:
        raise DatagramDropped(DropReason.SHORT, f"datagram of {size} bytes")
    if size > max_size:
        raise DatagramDropped(
            DropReason.TOO_LARGE, f"datagram of {size} bytes exceeds the limit of {max_size}"
        )
    crc, version, frame_type, flags, length, request_id, deadline_ms = _unpack_datagram_header(data)
    # A slice, not a memoryview: copying is cheaper than making the view up to
    # a few KB (measured), and beyond that the CRC's own cost dwarfs either.
    if CRC_XOR ^ crc_update(data[CRC_SIZE:], CRC_XOR, CRC_TABLE) != crc:
        raise DatagramDropped(DropReason.CHECKSUM, "CRC-32C mismatch")
    if version != VERSION:
        raise DatagramDropped(DropReason.VERSION, f"frame version {version}")
    if length != size - DATAGRAM_HEADER_SIZE:
        raise DatagramDropped(
            DropReason.LENGTH,
            f"length field {length} in a datagram with {size - DATAGRAM_HEADER_SIZE} payload bytes",
        )
    if frame_type not in accepted:
        if frame_type not in _KNOWN_TYPES:
            raise DatagramDropped(DropReason.UNKNOWN_TYPE, f"frame type {frame_type}")
        raise DatagramDropped(
            DropReason.UNEXPECTED_TYPE, f"{FrameType(frame_type).name} is not accepted here"
        )
    if frame_type in _CALL_TYPES:
        if not request_id:
            raise DatagramDropped(
                DropReason.REQUEST_ID, f"{FrameType(frame_type).name} with request id 0"
            )
    else:
        if request_id:
            raise DatagramDropped(
                DropReason.REQUEST_ID, f"{FrameType(frame_type).name} with a request id"
            )
        if length > MAX_CONTROL_PAYLOAD:
            raise DatagramDropped(
                DropReason.TOO_LARGE, f"{FrameType(frame_type).name} payload of {length} bytes"
            )
    return _new_frame(
        Frame, (frame_type, request_id, data[DATAGRAM_HEADER_SIZE:], deadline_ms, flags)
    )
