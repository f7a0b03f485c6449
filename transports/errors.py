"""The transport layer's exceptions, in one flat tree.

::

    TransportError                 base of everything raised here
    ├── ProtocolError              the peer broke the framing rules (carries an ErrorCode)
    │   ├── FrameTooLarge          a payload over the receiver's max_frame_size
    │   ├── FlowControlError       DATA beyond the window, or a window past 2^31-1
    │   └── BadPreface             the peer is not a Pitcher peer of our version
    ├── CallError                  one call failed; ``sent`` says if the peer may have seen it
    │   ├── ConnectError           could not connect (never sent: safe to retry anywhere)
    │   ├── ConnectionLost         the connection died with the call in flight
    │   ├── DeadlineExceeded       the caller's deadline passed (a cancel frame was sent)
    │   ├── Rejected               the peer refused the call before running it (goaway)
    │   ├── RequestTooLarge        the request exceeds the peer's frame limit (never sent)
    │   ├── StreamingUnsupported   a streamed body over a carrier that has none (UDP)
    │   └── RemoteError            the peer answered with an error frame for this call
    │       └── Overloaded         TOO_MANY_IN_FLIGHT: at its limit, it did not start the call
    └── Closed                     the client or server was closed by its owner

``OSError`` and friends become one of these at the edge (``raise X(...) from exc``),
so callers above never need to know which carrier failed.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Codes of an ERROR frame; the same numbers as ``pitcher.v1.ErrorCode``."""

    UNSPECIFIED = 0
    PROTOCOL_ERROR = 1
    FRAME_TOO_LARGE = 2
    TOO_MANY_IN_FLIGHT = 3
    INTERNAL = 4
    DEADLINE_EXCEEDED = 5
    UNAVAILABLE = 6
    BAD_PAYLOAD = 7
    FLOW_CONTROL = 8


class TransportError(Exception):
    """Base class of every error the transport layer raises."""


class ProtocolError(TransportError):
    """The peer sent bytes that break the wire protocol."""

    code: ErrorCode = ErrorCode.PROTOCOL_ERROR

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    def __eq__(self, other: object) -> bool:
        # Value equality lets tests compare the error raised by two decoding runs.
        return (
            type(self) is type(other)
            and isinstance(other, ProtocolError)
            and self.args == other.args
            and self.code == other.code
        )

    def __hash__(self) -> int:
        return hash((type(self), self.args, self.code))


class FrameTooLarge(ProtocolError):
    code = ErrorCode.FRAME_TOO_LARGE


class FlowControlError(ProtocolError):
    """DATA beyond the credit the receiver gave, or credit beyond ``MAX_WINDOW``."""

    code = ErrorCode.FLOW_CONTROL


class BadPreface(ProtocolError):
    """The first bytes of a connection were not a Pitcher preface of our version."""


class CallError(TransportError):
    """One call failed.

    ``sent`` is False when the request certainly never reached the peer's
    handler, so it may be sent again elsewhere whatever its method.
    """

    sent: bool = True

    def __init__(self, message: str, *, sent: bool | None = None) -> None:
        super().__init__(message)
        if sent is not None:
            self.sent = sent


class ConnectError(CallError):
    sent = False


class ConnectionLost(CallError):
    pass


class DeadlineExceeded(CallError):
    pass


class Rejected(CallError):
    """The peer said it did not start the call (GOAWAY past its id, UNAVAILABLE)."""

    sent = False


class RequestTooLarge(CallError):
    """The request is larger than the node accepts; it was not sent."""

    sent = False


class StreamingUnsupported(CallError):
    """A streamed body was asked of a carrier that sends whole frames only (UDP).

    Nothing was sent; the caller may gather the body and send it whole.
    """

    sent = False


class RemoteError(CallError):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(
            f"{ErrorCode(code).name if code in ErrorCode._value2member_map_ else code}: {message}"
        )
        self.code = code
        self.remote_message = message


class Overloaded(RemoteError):
    """The peer had ``max_in_flight`` requests running and did not start this one.

    An overload, not a fault: the call was never started, so it may go to
    another node whatever its method (``sent`` is False), and nothing about
    the peer's health follows from it (HTTP/2's REFUSED_STREAM, Envoy's
    overflow).
    """

    sent = False

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.TOO_MANY_IN_FLIGHT, message)


class Closed(TransportError):
    """The client or server was closed by its owner."""
