"""Sans-IO frame decoder: bytes in, frames out.

No sockets and no asyncio here, so the decoder is tested on byte strings
alone. Every check that can refuse a frame runs as soon as its 20-byte header
is complete (but a WINDOW_UPDATE's increment of 0, its one payload check), before any
payload is buffered: a peer announcing a 3 GB frame
is refused after 20 bytes, not after we allocate 3 GB.

A violation raises :class:`~transports.errors.ProtocolError`; the complete
frames that came before it in the same ``feed`` are on the exception as
``frames`` so the caller can still act on them. After an error the decoder is
dead and raises the same error again: the connection must be closed.
"""

from __future__ import annotations

from .control import decode_window_update
from .errors import BadPreface, FrameTooLarge, ProtocolError
from .frame import (
    HEADER,
    HEADER_SIZE,
    PREFACE,
    PREFACE_MAGIC,
    PREFACE_SIZE,
    VERSION,
    WINDOW_UPDATE_SIZE,
    Frame,
    FrameType,
)

_unpack_header = HEADER.unpack_from
# Frame's generated __new__ is a Python function; tuple.__new__ builds the same
# object in C, which matters at one frame per request.
_new_frame = tuple.__new__
# Frame types that belong to one call and so need a non-zero request id, and
# those that belong to the connection and must carry id 0. ERROR may be either.
_CALL_TYPES = frozenset(
    (
        FrameType.REQUEST,
        FrameType.RESPONSE,
        FrameType.CANCEL,
        FrameType.DATA,
        FrameType.WINDOW_UPDATE,
    )
)
_CONNECTION_TYPES = frozenset(
    (FrameType.PING, FrameType.PONG, FrameType.GOAWAY, FrameType.SETTINGS)
)
_MAX_CONTROL_PAYLOAD = 4096


def check_header(
    version: int, frame_type: int, length: int, request_id: int, max_frame_size: int
) -> None:
    """Raise ProtocolError if a frame header is not acceptable."""
    if version != VERSION:
        raise ProtocolError(f"unsupported frame version {version}")
    if frame_type in _CALL_TYPES:
        if request_id == 0:
            raise ProtocolError(f"{FrameType(frame_type).name} frame with request id 0")
        if frame_type == FrameType.WINDOW_UPDATE and length != WINDOW_UPDATE_SIZE:
            raise ProtocolError(f"WINDOW_UPDATE payload of {length} bytes (must be 4)")
    elif frame_type in _CONNECTION_TYPES:
        if request_id != 0:
            raise ProtocolError(f"{FrameType(frame_type).name} frame with a request id")
        if length > _MAX_CONTROL_PAYLOAD:
            raise FrameTooLarge(f"{FrameType(frame_type).name} payload of {length} bytes")
    elif frame_type != FrameType.ERROR:
        raise ProtocolError(f"unknown frame type {frame_type}")
    if length > max_frame_size:
        raise FrameTooLarge(f"frame of {length} bytes exceeds the limit of {max_frame_size}")


class FrameDecoder:
    __slots__ = ("_buffer", "_error", "_max_frame_size", "_need", "_preface_left")

    def __init__(self, max_frame_size: int, *, expect_preface: bool = True) -> None:
        self._max_frame_size = max_frame_size
        self._buffer = bytearray()
        # Bytes the buffer must hold before parsing is worth trying again.
        self._need = HEADER_SIZE
        self._preface_left = PREFACE_SIZE if expect_preface else 0
        self._error: ProtocolError | None = None

    @property
    def max_frame_size(self) -> int:
        return self._max_frame_size

    @max_frame_size.setter
    def max_frame_size(self, value: int) -> None:
        self._max_frame_size = value

    @property
    def in_preface(self) -> bool:
        """Whether the peer's preface is still (partly) to come."""
        return self._preface_left > 0

    @property
    def buffered(self) -> int:
        """Bytes received that do not yet form a complete frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Frame]:
        if self._error is not None:
            raise self._error
        if self._preface_left:
            data = self._take_preface(data)
            if not data:
                return []
        buffer = self._buffer
        if buffer:
            buffer += data
            if len(buffer) < self._need:
                return []
            data = bytes(buffer)
            buffer.clear()
        frames: list[Frame] = []
        pos = 0
        end = len(data)
        max_frame_size = self._max_frame_size
        try:
            while end - pos >= HEADER_SIZE:
                version, frame_type, flags, length, request_id, deadline = _unpack_header(data, pos)
                # Fast path for the two frames that make up nearly all traffic.
                if version != VERSION or not (
                    (frame_type == 1 or frame_type == 2) and request_id and length <= max_frame_size
                ):
                    check_header(version, frame_type, length, request_id, max_frame_size)
                start = pos + HEADER_SIZE
                stop = start + length
                if stop > end:
                    self._need = HEADER_SIZE + length
                    break
                if frame_type == 10:  # FrameType.WINDOW_UPDATE: its size is checked above
                    decode_window_update(data[start:stop])
                frames.append(
                    _new_frame(Frame, (frame_type, request_id, data[start:stop], deadline, flags))
                )
                pos = stop
            else:
                self._need = HEADER_SIZE
        except ProtocolError as exc:
            exc.frames = frames  # type: ignore[attr-defined]
            self._error = exc
            raise
        if pos < end:
            buffer += data[pos:] if pos else data
        return frames

    def _take_preface(self, data: bytes) -> bytes:
        """Check preface bytes as they come; return what follows the preface."""
        offset = PREFACE_SIZE - self._preface_left
        take = min(self._preface_left, len(data))
        if data[:take] != PREFACE[offset : offset + take]:
            received = (PREFACE[:offset] + data[:take])[:PREFACE_SIZE]
            if offset + take == PREFACE_SIZE and received[:-1] == PREFACE_MAGIC:
                error: ProtocolError = BadPreface(
                    f"unsupported protocol version {received[-1]} (this side speaks {VERSION})"
                )
            else:
                error = BadPreface("not a Pitcher RPC peer (bad preface)")
            error.frames = []  # type: ignore[attr-defined]
            self._error = error
            raise error
        self._preface_left -= take
        return data[take:]
