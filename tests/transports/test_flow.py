"""Streamed bodies without sockets: frame checks, SETTINGS field 3, per-call credit."""

from __future__ import annotations

import pytest

from pitcher_rpc.pb import pitcher_pb2
from transports.control import Settings, decode_window_update
from transports.decoder import FrameDecoder
from transports.errors import ErrorCode, FlowControlError, ProtocolError
from transports.flow import ReceiveWindow, SendWindow, take_bytes_field, with_bytes_field
from transports.frame import (
    FLAG_MORE,
    HEADER,
    MAX_WINDOW,
    PREFACE,
    VERSION,
    FrameType,
    encode_data,
    encode_frame,
    encode_window_update,
)

# ----------------------------------------------------------------------------- frames


def test_data_and_window_update_decode() -> None:
    decoder = FrameDecoder(1024)
    frames = decoder.feed(
        PREFACE + encode_data(3, b"abc", more=True) + encode_data(3, b"", more=False)
    )
    frames += decoder.feed(encode_window_update(3, 65536))
    assert [(f.type, f.request_id, f.payload, f.flags) for f in frames] == [
        (FrameType.DATA, 3, b"abc", FLAG_MORE),
        (FrameType.DATA, 3, b"", 0),
        (FrameType.WINDOW_UPDATE, 3, (65536).to_bytes(4, "big"), 0),
    ]


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (encode_data(0, b"x", more=False), "DATA frame with request id 0"),
        (encode_window_update(0, 5), "WINDOW_UPDATE frame with request id 0"),
        (HEADER.pack(VERSION, 10, 0, 3, 1, 0) + b"\0\0\1", "WINDOW_UPDATE payload of 3 bytes"),
        (HEADER.pack(VERSION, 10, 0, 8, 1, 0) + bytes(8), "WINDOW_UPDATE payload of 8 bytes"),
        (HEADER.pack(VERSION, 10, 0, 4, 1, 0) + bytes(4), "increment of 0"),
    ],
)
def test_bad_stream_frames_are_protocol_errors(frame: bytes, message: str) -> None:
    decoder = FrameDecoder(1024)
    good = encode_data(1, b"ok", more=True)
    with pytest.raises(ProtocolError, match=message) as info:
        decoder.feed(PREFACE + good + frame)
    assert info.value.code == ErrorCode.PROTOCOL_ERROR
    # The frames before the bad one are kept for the caller.
    assert [f.payload for f in info.value.frames] == [b"ok"]  # type: ignore[attr-defined]


def test_window_update_size_is_refused_from_its_header() -> None:
    # 20 header bytes announcing a 1 MB WINDOW_UPDATE: refused before any payload.
    decoder = FrameDecoder(4 * 1024 * 1024)
    with pytest.raises(ProtocolError, match="must be 4"):
        decoder.feed(PREFACE + HEADER.pack(VERSION, 10, 0, 1 << 20, 1, 0))


def test_data_over_the_frame_limit_is_refused() -> None:
    decoder = FrameDecoder(16)
    with pytest.raises(ProtocolError) as info:
        decoder.feed(PREFACE + encode_data(1, b"x" * 17, more=True))
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE


def test_decode_window_update() -> None:
    assert decode_window_update(encode_window_update(1, MAX_WINDOW)[20:]) == MAX_WINDOW
    with pytest.raises(ProtocolError):
        decode_window_update(b"\0\0\0\0")
    with pytest.raises(ProtocolError):
        decode_window_update(b"\0\0\1")


# ----------------------------------------------------------------------------- SETTINGS


def test_settings_initial_window_matches_the_generated_class() -> None:
    ours = Settings(1 << 20, 64, 256 * 1024).encode()
    theirs = pitcher_pb2.Settings(
        max_frame_size=1 << 20, max_in_flight=64, initial_window=256 * 1024
    )
    assert pitcher_pb2.Settings.FromString(ours) == theirs
    assert Settings.decode(theirs.SerializeToString()) == Settings(1 << 20, 64, 256 * 1024)
    # Today's peers send no field 3: whole frames only.
    assert Settings.decode(Settings(1024, 8).encode()).initial_window == 0


def test_settings_window_over_the_limit_is_a_flow_control_error() -> None:
    payload = pitcher_pb2.Settings(initial_window=MAX_WINDOW + 1).SerializeToString()
    with pytest.raises(FlowControlError) as info:
        Settings.decode(payload)
    assert info.value.code == ErrorCode.FLOW_CONTROL == pitcher_pb2.FLOW_CONTROL


def test_error_codes_match_the_proto() -> None:
    assert {c.name: int(c) for c in ErrorCode if c} == {
        name: value for name, value in pitcher_pb2.ErrorCode.items() if value
    }


# ----------------------------------------------------------------------------- credit


def test_send_window_spends_and_grants() -> None:
    window = SendWindow(10)
    assert window.take(4) == 4
    assert window.take(100) == 6
    assert window.take(1) == 0
    window.grant(5)
    assert window.take(100) == 5
    window.grant(MAX_WINDOW)
    with pytest.raises(FlowControlError):
        window.grant(1)


def test_receive_window_refuses_data_beyond_credit() -> None:
    window = ReceiveWindow(8)
    window.received(5)
    window.received(3)
    with pytest.raises(FlowControlError) as info:
        window.received(1)
    assert info.value.code == ErrorCode.FLOW_CONTROL
    assert window.max_held == 8


def test_receive_window_returns_credit_in_half_window_batches() -> None:
    window = ReceiveWindow(100)
    window.received(60)
    # Under half the window consumed: nothing sent yet.
    assert window.consumed(20) == 0
    assert window.consumed(29) == 0
    assert window.consumed(1) == 50
    assert window.available == 90
    assert window.held == 10
    # Consuming more than is held counts only what is held.
    assert window.consumed(1000) == 0
    assert window.held == 0


def test_receive_window_returns_everything_when_the_peer_is_blocked() -> None:
    window = ReceiveWindow(100)
    window.received(30)
    window.received(70)
    assert window.peer_blocked
    # Below the half-window batch, but the peer can send nothing: credit goes now.
    assert window.consumed(10) == 10
    assert not window.peer_blocked


def test_a_sender_and_receiver_never_deadlock_and_never_exceed_the_window() -> None:
    sender = SendWindow(1000)
    receiver = ReceiveWindow(1000)
    to_send = 1_000_000
    delivered = 0
    step = 0
    while delivered < to_send:
        step += 1
        assert step < 100_000
        piece = sender.take(min(333, to_send - delivered - receiver.held))
        if piece:
            receiver.received(piece)
        # A consumer slower than the sender: 97 bytes a turn.
        taken = min(97, receiver.held)
        delivered += taken
        increment = receiver.consumed(taken)
        if increment:
            sender.grant(increment)
        assert receiver.held <= 1000
    assert receiver.max_held == 1000


# ----------------------------------------------------------------------------- payloads


def test_body_field_moves_into_one_whole_message() -> None:
    head = pitcher_pb2.Request(
        method=b"POST",
        path=b"/x",
        header_names=[b"a"],
        header_values=[b"b"],
        body=b"first-",
        body_size=11,
    ).SerializeToString()
    rest, first = take_bytes_field(head, 6)
    assert first == b"first-"
    whole = with_bytes_field(rest, 6, first + b"after")
    message = pitcher_pb2.Request.FromString(whole)
    assert message.body == b"first-after"
    assert message.method == b"POST" and list(message.header_names) == [b"a"]
    assert message.body_size == 11
    # A head with no body field is left as it is.
    assert take_bytes_field(rest, 6) == (rest, b"")


def test_take_bytes_field_refuses_a_truncated_payload() -> None:
    with pytest.raises(ProtocolError):
        take_bytes_field(b"\x0a\x05ab", 6)
    with pytest.raises(ProtocolError):
        take_bytes_field(b"\x32\x05ab", 6)
    assert encode_frame(FrameType.DATA, 1, b"") == encode_data(1, b"", more=False)
