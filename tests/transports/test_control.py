"""Hand-written control payloads against the generated protobuf classes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pitcher_rpc.pb import pitcher_pb2 as pb
from transports.control import (
    ErrorInfo,
    GoAwayInfo,
    Settings,
    decode_varint,
    encode_varint,
)
from transports.errors import ErrorCode, ProtocolError
from transports.frame import (
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_MAX_IN_FLIGHT,
    PREFACE,
    FrameType,
    encode_frame,
    encode_request,
    encode_response,
)

UINT32 = st.integers(0, 2**32 - 1)
UINT64 = st.integers(0, 2**64 - 1)
# proto3 enums are open: a reader must keep codes it does not know.
ERROR_CODES = st.one_of(st.sampled_from(list(ErrorCode)), st.integers(0, 2**31 - 1))


def varint(value: int) -> bytes:
    return encode_varint(value)


def key(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


# Fields of every wire type protobuf may put in a message, numbered past
# what the control messages define, as a newer peer might send them.
unknown_fields = st.lists(
    st.one_of(
        st.builds(lambda n, v: key(n, 0) + varint(v), st.integers(4, 2**29 - 1), UINT64),
        st.builds(
            lambda n, v: key(n, 1) + v, st.integers(4, 2**29 - 1), st.binary(min_size=8, max_size=8)
        ),
        st.builds(
            lambda n, v: key(n, 2) + varint(len(v)) + v, st.integers(4, 2**29 - 1), st.binary()
        ),
        st.builds(
            lambda n, v: key(n, 5) + v, st.integers(4, 2**29 - 1), st.binary(min_size=4, max_size=4)
        ),
    ),
    max_size=5,
)


# ----------------------------------------------------------------------------- varints


@given(UINT64)
def test_varint_round_trip(value: int) -> None:
    encoded = encode_varint(value)
    assert decode_varint(encoded + b"tail", 0) == (value, len(encoded))


# ----------------------------------------------------------------------------- byte equality


@settings(max_examples=300)
@given(max_frame_size=UINT32, max_in_flight=UINT32, window=st.integers(0, 2**31 - 1))
def test_settings_bytes_match_generated_class(
    max_frame_size: int, max_in_flight: int, window: int
) -> None:
    ours = Settings(max_frame_size, max_in_flight, window).encode()
    theirs = pb.Settings(
        max_frame_size=max_frame_size, max_in_flight=max_in_flight, initial_window=window
    )
    assert ours == theirs.SerializeToString()
    assert Settings.decode(theirs.SerializeToString()) == (max_frame_size, max_in_flight, window)
    parsed = pb.Settings.FromString(ours)
    assert (parsed.max_frame_size, parsed.max_in_flight, parsed.initial_window) == (
        max_frame_size,
        max_in_flight,
        window,
    )


@settings(max_examples=300)
@given(code=ERROR_CODES, message=st.text())
def test_error_bytes_match_generated_class(code: int, message: str) -> None:
    ours = ErrorInfo(code, message).encode()
    # The stubs only admit known members; proto3 itself takes any int32.
    theirs = pb.Error(code=cast("pb.ErrorCode", code), message=message)
    assert ours == theirs.SerializeToString()
    assert ErrorInfo.decode(theirs.SerializeToString()) == (code, message)
    parsed = pb.Error.FromString(ours)
    assert (parsed.code, parsed.message) == (code, message)


@settings(max_examples=300)
@given(last_request_id=UINT64, reason=st.text())
def test_goaway_bytes_match_generated_class(last_request_id: int, reason: str) -> None:
    ours = GoAwayInfo(last_request_id, reason).encode()
    theirs = pb.GoAway(last_request_id=last_request_id, reason=reason)
    assert ours == theirs.SerializeToString()
    assert GoAwayInfo.decode(theirs.SerializeToString()) == (last_request_id, reason)
    parsed = pb.GoAway.FromString(ours)
    assert (parsed.last_request_id, parsed.reason) == (last_request_id, reason)


def test_defaults_encode_to_nothing_like_proto3() -> None:
    assert Settings().encode() == b"" == pb.Settings().SerializeToString()
    assert ErrorInfo(0).encode() == b"" == pb.Error().SerializeToString()
    assert GoAwayInfo(0).encode() == b"" == pb.GoAway().SerializeToString()
    assert Settings.decode(b"") == Settings(0, 0)
    assert ErrorInfo.decode(b"") == ErrorInfo(0, "")
    assert GoAwayInfo.decode(b"") == GoAwayInfo(0, "")


def test_error_codes_are_the_proto_enum() -> None:
    proto_codes = dict(pb.ErrorCode.items())
    assert proto_codes.pop("ERROR_CODE_UNSPECIFIED") == ErrorCode.UNSPECIFIED
    assert proto_codes == {code.name: int(code) for code in ErrorCode if code.name != "UNSPECIFIED"}


# ----------------------------------------------------------------------------- unknown fields


@settings(max_examples=200)
@given(
    max_frame_size=UINT32,
    max_in_flight=UINT32,
    before=unknown_fields,
    after=unknown_fields,
)
def test_unknown_fields_are_skipped_in_settings(
    max_frame_size: int, max_in_flight: int, before: list[bytes], after: list[bytes]
) -> None:
    data = b"".join(before) + Settings(max_frame_size, max_in_flight).encode() + b"".join(after)
    assert Settings.decode(data) == (max_frame_size, max_in_flight, 0)
    parsed = pb.Settings.FromString(data)
    assert (parsed.max_frame_size, parsed.max_in_flight) == (max_frame_size, max_in_flight)


@settings(max_examples=200)
@given(code=ERROR_CODES, message=st.text(), extra=unknown_fields)
def test_unknown_fields_are_skipped_in_error(code: int, message: str, extra: list[bytes]) -> None:
    data = ErrorInfo(code, message).encode() + b"".join(extra)
    assert ErrorInfo.decode(data) == (code, message)


@settings(max_examples=200)
@given(last=UINT64, reason=st.text(), extra=unknown_fields)
def test_unknown_fields_are_skipped_in_goaway(last: int, reason: str, extra: list[bytes]) -> None:
    data = b"".join(extra) + GoAwayInfo(last, reason).encode()
    assert GoAwayInfo.decode(data) == (last, reason)


def test_a_field_seen_twice_keeps_its_last_value_like_protobuf() -> None:
    data = Settings(10, 1).encode() + Settings(20, 0).encode()
    assert Settings.decode(data) == (20, 1, 0)
    parsed = pb.Settings.FromString(data)
    assert (parsed.max_frame_size, parsed.max_in_flight) == (20, 1)


def test_describe_names_known_codes_and_keeps_unknown_numbers() -> None:
    assert ErrorInfo(ErrorCode.TOO_MANY_IN_FLIGHT, "slow down").describe() == (
        "TOO_MANY_IN_FLIGHT: slow down"
    )
    assert ErrorInfo(999).describe() == "999"


# ----------------------------------------------------------------------------- malformed


MALFORMED = {
    "truncated varint value": b"\x08",
    "truncated varint key": b"\x80",
    "truncated length-delimited": b"\x12\x05ab",
    "length past the end": b"\x12\x80\x80\x80\x80\x10",
    "field number zero": b"\x00\x01",
    "start group": b"\x0b",
    "end group": b"\x0c",
    "wire type 6": b"\x0e",
    "wire type 7": b"\x0f",
    "varint over 64 bits": b"\x08" + b"\xff" * 10 + b"\x01",
    "truncated fixed64": b"\x19\x00\x00",
    "truncated fixed32": b"\x1d\x00",
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
@pytest.mark.parametrize("message", [Settings, ErrorInfo, GoAwayInfo])
def test_malformed_payload_is_a_protocol_error(
    data: bytes, message: type[Settings] | type[ErrorInfo] | type[GoAwayInfo]
) -> None:
    with pytest.raises(ProtocolError):
        message.decode(data)


@settings(max_examples=1000)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_decode_or_raise_protocol_error(data: bytes) -> None:
    for message in (Settings, ErrorInfo, GoAwayInfo):
        try:
            decoded = message.decode(data)
        except ProtocolError:
            continue
        assert isinstance(decoded, message)


def test_invalid_utf8_text_does_not_escape_as_unicode_error() -> None:
    assert ErrorInfo.decode(b"\x08\x01\x12\x02\xff\xfe").code == 1


# ----------------------------------------------------------------------------- docs/wire.md


def wire_doc_hex_blocks() -> list[bytes]:
    """The bytes of each fenced block of the worked example in docs/wire.md."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "wire.md").read_text()
    example = text.split("## 9. Worked example", 1)[1].split("\n## ", 1)[0]
    blocks = []
    for block in re.findall(r"```\n(.*?)```", example, flags=re.S):
        data = bytearray()
        for line in block.splitlines():
            for token in line.split():
                if not re.fullmatch(r"[0-9a-f]{2}", token):
                    break
                data.append(int(token, 16))
        blocks.append(bytes(data))
    return blocks


def test_worked_example_in_wire_doc_is_what_the_code_writes() -> None:
    settings = Settings(DEFAULT_MAX_FRAME_SIZE, DEFAULT_MAX_IN_FLIGHT).encode()
    request = pb.Request(method=b"GET", path=b"/hello").SerializeToString()
    response = pb.Response(status=200, body=b"hi").SerializeToString()
    shutting_down = "server is shutting down"
    client_settings = Settings(DEFAULT_MAX_FRAME_SIZE, 0).encode()
    assert wire_doc_hex_blocks() == [
        PREFACE + encode_frame(FrameType.SETTINGS, 0, client_settings),
        PREFACE + encode_frame(FrameType.SETTINGS, 0, settings),
        encode_request(1, request, 1000),
        encode_response(1, response),
        encode_frame(FrameType.CANCEL, 1)
        + encode_frame(FrameType.GOAWAY, 0, GoAwayInfo(1, shutting_down).encode())
        + encode_frame(FrameType.ERROR, 2, ErrorInfo(ErrorCode.UNAVAILABLE, shutting_down).encode())
        + encode_frame(FrameType.PING, 0, b"12345678"),
    ]
