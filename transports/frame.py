"""Frame layout, constants and encoders: pure functions, no I/O.

A frame is a 20-byte header followed by ``length`` payload bytes
(all integers big-endian)::

    offset  size  field
    0       1     version       1
    1       1     type          FrameType
    2       2     flags         MORE (0x1), STREAM_OK (0x2); other bits sent as 0, ignored
    4       4     length        payload length in bytes
    8       8     request_id    1.. for calls; 0 for connection-level frames
    16      4     deadline_ms   REQUEST only: remaining budget in ms (0 = none)

A stream connection starts with an 8-byte preface from each side:
``b"PITCHER"`` followed by the version byte. See docs/wire.md.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Final, NamedTuple

VERSION: Final = 1
PREFACE_MAGIC: Final = b"PITCHER"
PREFACE: Final = PREFACE_MAGIC + bytes((VERSION,))
PREFACE_SIZE: Final = len(PREFACE)

HEADER: Final = struct.Struct(">BBHIQI")
HEADER_SIZE: Final = HEADER.size  # 20

DEFAULT_MAX_FRAME_SIZE: Final = 4 * 1024 * 1024
DEFAULT_MAX_IN_FLIGHT: Final = 1024
# A hard ceiling no setting may pass: the length field is 32 bits, but no
# sane single request needs more than this and we refuse to allocate it.
MAX_FRAME_SIZE_LIMIT: Final = 256 * 1024 * 1024


class FrameType(IntEnum):
    REQUEST = 1
    RESPONSE = 2
    PING = 3
    PONG = 4
    CANCEL = 5
    GOAWAY = 6
    ERROR = 7
    SETTINGS = 8
    # A piece of a streamed body (docs/wire.md, 6.9): payload = raw body bytes.
    DATA = 9
    # Credit back to the sender of DATA for one call: a uint32 increment.
    WINDOW_UPDATE = 10


# Header flags. MORE on REQUEST/RESPONSE: the body goes on in DATA frames; on DATA:
# another DATA follows. STREAM_OK on REQUEST: the caller takes a streamed RESPONSE.
FLAG_MORE: Final = 0x0001
FLAG_STREAM_OK: Final = 0x0002
# The window a side announces when its options say nothing else (SETTINGS field 3).
DEFAULT_INITIAL_WINDOW: Final = 256 * 1024
# The largest window a side may announce or accumulate (as HTTP/2: 2^31 - 1), so
# that no sum of increments overflows a signed 32-bit counter in another language.
MAX_WINDOW: Final = 0x7FFFFFFF
WINDOW_UPDATE_SIZE: Final = 4

_KNOWN_TYPES: Final = frozenset(int(t) for t in FrameType)


class Frame(NamedTuple):
    type: int
    request_id: int
    payload: bytes
    deadline_ms: int = 0
    flags: int = 0


_pack_header: Final = HEADER.pack


def encode_frame(
    frame_type: int, request_id: int, payload: bytes = b"", deadline_ms: int = 0
) -> bytes:
    """Header + payload as one bytes object."""
    return _pack_header(VERSION, frame_type, 0, len(payload), request_id, deadline_ms) + payload


def encode_request(request_id: int, payload: bytes, deadline_ms: int, flags: int = 0) -> bytes:
    return _pack_header(VERSION, 1, flags, len(payload), request_id, deadline_ms) + payload


def encode_response(request_id: int, payload: bytes, flags: int = 0) -> bytes:
    return _pack_header(VERSION, 2, flags, len(payload), request_id, 0) + payload


def encode_data(request_id: int, data: bytes, more: bool) -> bytes:
    """One DATA frame; ``more``: another DATA follows (the body is not complete)."""
    return _pack_header(VERSION, 9, FLAG_MORE if more else 0, len(data), request_id, 0) + data


def encode_window_update(request_id: int, increment: int) -> bytes:
    return _pack_header(VERSION, 10, 0, 4, request_id, 0) + increment.to_bytes(4, "big")


def is_known_type(frame_type: int) -> bool:
    return frame_type in _KNOWN_TYPES
