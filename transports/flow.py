"""Per-call flow control for streamed bodies: sans-IO, no sockets, no asyncio.

A streamed body travels in DATA frames, and every call has its own credit,
as every HTTP/2 stream has its own window. The receiver of a body announces
``initial_window`` in its SETTINGS: each call starts with that many bytes of
credit toward it. The sender spends credit with every DATA payload byte and
stops at zero; the receiver hands credit back (WINDOW_UPDATE) as its consumer
takes the bytes, batched, once at least half the window was taken, so a
steady stream costs one small frame per half window and not one per DATA.

There is no connection-wide window on purpose: a call whose consumer stalls
stops only itself, and the bytes a connection may hold are bounded anyway by
``max_in_flight x initial_window`` (docs/wire.md, 6.10).

:class:`SendWindow` is the sender's account, :class:`ReceiveWindow` the
receiver's; both raise :class:`~transports.errors.FlowControlError` on a
peer's violation, which closes the connection with an ERROR of code
FLOW_CONTROL. The two helpers at the end edit a payload's body field for the
whole-frame fallback (a peer that announced no window).
"""

from __future__ import annotations

from .control import decode_varint, encode_varint
from .errors import FlowControlError, ProtocolError
from .frame import MAX_WINDOW


class SendWindow:
    """Credit left to send DATA for one call."""

    __slots__ = ("credit",)

    def __init__(self, initial: int) -> None:
        self.credit = initial

    def take(self, wanted: int) -> int:
        """Spend up to ``wanted`` bytes of credit; how many may be sent now."""
        credit = self.credit
        granted = wanted if wanted < credit else credit
        self.credit = credit - granted
        return granted

    def grant(self, increment: int) -> None:
        """A WINDOW_UPDATE arrived; credit past ``MAX_WINDOW`` is the peer's violation."""
        credit = self.credit + increment
        if credit > MAX_WINDOW:
            raise FlowControlError(f"window of {credit} bytes exceeds {MAX_WINDOW}")
        self.credit = credit


class ReceiveWindow:
    """What the peer may still send for one call, and what this side holds of it.

    ``held`` is the bytes received and not yet consumed: what the transport
    and the consumer above it keep of this call. It never exceeds ``window``
    (``max_held`` records the largest it was, for tests and metrics).
    """

    __slots__ = ("_unreturned", "available", "held", "max_held", "window")

    def __init__(self, window: int) -> None:
        self.window = window
        # Credit the peer has: DATA bytes it may send before the next WINDOW_UPDATE.
        self.available = window
        self.held = 0
        self.max_held = 0
        # Consumed bytes whose credit is not yet sent back.
        self._unreturned = 0

    def received(self, size: int) -> None:
        """A DATA payload of ``size`` bytes arrived."""
        if size > self.available:
            raise FlowControlError(
                f"DATA of {size} bytes beyond the window ({self.available} bytes of credit left)"
            )
        self.available -= size
        held = self.held + size
        self.held = held
        if held > self.max_held:
            self.max_held = held

    def consumed(self, size: int) -> int:
        """``size`` bytes were passed on; the increment to send now, or 0 to wait.

        Credit goes back in batches of at least half the window, and always
        when the peer has none left (or the window is too small to halve).
        """
        if size > self.held:
            size = self.held
        if size <= 0:
            return 0
        self.held -= size
        unreturned = self._unreturned + size
        if unreturned * 2 >= self.window or self.available == 0:
            self._unreturned = 0
            self.available += unreturned
            return unreturned
        self._unreturned = unreturned
        return 0

    @property
    def peer_blocked(self) -> bool:
        """The peer has no credit: a pause in its DATA is ours, not its."""
        return self.available == 0


def take_bytes_field(payload: bytes, number: int) -> tuple[bytes, bytes]:
    """Split a protobuf message: (the message without field ``number``, that field's bytes).

    For the whole-frame fallback: the head of a streamed body may hold the
    body's first bytes in its body field, and the whole message must hold the
    whole body in one field (a repeated bytes field is not concatenated: the
    last one wins). Top-level fields are walked, not decoded.
    """
    kept: list[bytes] = []
    found: list[bytes] = []
    pos = 0
    end = len(payload)
    while pos < end:
        start = pos
        key, pos = decode_varint(payload, pos)
        wire_type = key & 7
        if wire_type == 0:
            _, pos = decode_varint(payload, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 2:
            size, pos = decode_varint(payload, pos)
            if pos + size > end:
                raise ProtocolError("truncated field in a payload")
            if key >> 3 == number:
                found.append(payload[pos : pos + size])
                pos += size
                continue
            pos += size
        elif wire_type == 5:
            pos += 4
        else:
            raise ProtocolError(f"unsupported wire type {wire_type} in a payload")
        if pos > end:
            raise ProtocolError("truncated field in a payload")
        kept.append(payload[start:pos])
    if not found:
        return payload, b""
    # The last occurrence is the field's value, as protobuf reads it.
    return b"".join(kept), found[-1]


def with_bytes_field(payload: bytes, number: int, value: bytes) -> bytes:
    """``payload`` with field ``number`` (length-delimited) set to ``value``."""
    rest, _ = take_bytes_field(payload, number)
    if not value:
        return rest
    return rest + encode_varint((number << 3) | 2) + encode_varint(len(value)) + value
