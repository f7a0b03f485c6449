"""The sans-IO frame decoder, on byte strings alone; and the stream server's own reads."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transports.base import ServerOptions
from transports.decoder import FrameDecoder
from transports.errors import BadPreface, ErrorCode, FrameTooLarge, ProtocolError
from transports.frame import (
    HEADER,
    HEADER_SIZE,
    PREFACE,
    PREFACE_SIZE,
    VERSION,
    Frame,
    FrameType,
    encode_frame,
)
from transports.stream_server import StreamServer, _ServerConnection

CALL_TYPES = (FrameType.REQUEST, FrameType.RESPONSE, FrameType.CANCEL)
CONNECTION_TYPES = (FrameType.PING, FrameType.PONG, FrameType.GOAWAY, FrameType.SETTINGS)


def raw_header(
    frame_type: int,
    request_id: int = 1,
    length: int = 0,
    *,
    version: int = VERSION,
    flags: int = 0,
    deadline_ms: int = 0,
) -> bytes:
    return HEADER.pack(version, frame_type, flags, length, request_id, deadline_ms)


# ----------------------------------------------------------------------------- helpers


Outcome = tuple[list[Frame], tuple[type, str, int] | None]


def error_key(exc: ProtocolError) -> tuple[type, str, int]:
    return type(exc), str(exc), int(exc.code)


def decode_in_chunks(chunks: list[bytes], max_frame_size: int, expect_preface: bool) -> Outcome:
    """Feed chunks in order; collect frames until the first ProtocolError.

    Anything other than a ProtocolError propagates and fails the test.
    """
    decoder = FrameDecoder(max_frame_size, expect_preface=expect_preface)
    frames: list[Frame] = []
    for chunk in chunks:
        try:
            frames.extend(decoder.feed(chunk))
        except ProtocolError as exc:
            frames.extend(exc.frames)  # type: ignore[attr-defined]
            # A dead decoder must keep refusing, with the same error.
            with pytest.raises(ProtocolError) as again:
                decoder.feed(b"")
            assert error_key(again.value) == error_key(exc)
            with pytest.raises(ProtocolError):
                decoder.feed(PREFACE + encode_frame(FrameType.PING, 0))
            return frames, error_key(exc)
    return frames, None


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    chunks = []
    start = 0
    for point in [*points, len(data)]:
        chunks.append(data[start:point])
        start = point
    return chunks


def assert_feeding_is_split_invariant(
    data: bytes, cuts: list[int], max_frame_size: int, expect_preface: bool
) -> Outcome:
    whole = decode_in_chunks([data], max_frame_size, expect_preface)
    byte_by_byte = decode_in_chunks(
        [data[i : i + 1] for i in range(len(data))], max_frame_size, expect_preface
    )
    chunked = decode_in_chunks(split_at(data, cuts), max_frame_size, expect_preface)
    assert byte_by_byte == whole
    assert chunked == whole
    return whole


# ----------------------------------------------------------------------------- strategies

max_frame_sizes = st.sampled_from([0, 8, 64, 5000, 4 * 1024 * 1024])


# Weighted by repetition: mostly valid values, so that a stream gets a few
# frames in before anything goes wrong, and now and then one that is not.
frame_types = st.sampled_from([*FrameType] * 5 + [0, 9, 99, 255])
versions = st.sampled_from([VERSION] * 12 + [0, 2])
flag_values = st.sampled_from([0] * 4 + [1, 0xFFFF])


@st.composite
def frame_bytes(draw: st.DrawFn) -> bytes:
    """One frame header + payload: mostly well-formed, sometimes not."""
    frame_type = draw(frame_types)
    if frame_type in CALL_TYPES:
        usual_id = st.integers(1, 2**64 - 1)
    elif frame_type in CONNECTION_TYPES:
        usual_id = st.just(0)
    else:
        usual_id = st.integers(0, 2**64 - 1)
    request_id = draw(st.one_of(usual_id, usual_id, usual_id, st.sampled_from([0, 1, 2**64 - 1])))
    payload = draw(st.binary(max_size=40))
    header = HEADER.pack(
        draw(versions),
        frame_type,
        draw(flag_values),
        len(payload),
        request_id,
        draw(st.integers(0, 2**32 - 1)),
    )
    return header + payload


OPENINGS = [(PREFACE, True)] * 12 + [
    (b"", False),  # a decoder told not to expect a preface
    (b"", True),  # frames where the preface should be
    (b"PITCHER\x02", True),
    (b"PITCHEX\x01", True),
    (b"HTTP/1.1", True),
    (b"PITCH", True),
]


@st.composite
def damaged_streams(draw: st.DrawFn) -> tuple[bytes, bool]:
    """Frame streams, mostly valid, then corrupted, truncated or padded."""
    opening, expect_preface = draw(st.sampled_from(OPENINGS))
    data = bytearray(opening + b"".join(draw(st.lists(frame_bytes(), min_size=1, max_size=6))))
    for position, value in draw(
        st.lists(st.tuples(st.integers(0), st.integers(0, 255)), max_size=3)
    ):
        data[position % len(data)] = value
    if draw(st.sampled_from([False, False, True])):
        del data[draw(st.integers(0, len(data) - 1)) :]
    data += draw(st.binary(max_size=30))
    return bytes(data), expect_preface


# ----------------------------------------------------------------------------- properties


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.binary(max_size=200),
    cuts=st.lists(st.integers(0), max_size=12),
    max_frame_size=max_frame_sizes,
    expect_preface=st.booleans(),
)
def test_arbitrary_bytes_decode_the_same_however_split(
    data: bytes, cuts: list[int], max_frame_size: int, expect_preface: bool
) -> None:
    assert_feeding_is_split_invariant(data, cuts, max_frame_size, expect_preface)


@settings(max_examples=350, suppress_health_check=[HealthCheck.too_slow])
@given(
    stream=damaged_streams(),
    cuts=st.lists(st.integers(0), max_size=12),
    max_frame_size=max_frame_sizes,
)
def test_damaged_frame_streams_decode_the_same_however_split(
    stream: tuple[bytes, bool], cuts: list[int], max_frame_size: int
) -> None:
    data, expect_preface = stream
    assert_feeding_is_split_invariant(data, cuts, max_frame_size, expect_preface)


@settings(max_examples=200)
@given(
    frames=st.lists(
        st.tuples(
            st.sampled_from(list(FrameType)), st.integers(1, 2**64 - 1), st.binary(max_size=64)
        ),
        max_size=8,
    ),
    cuts=st.lists(st.integers(0), max_size=12),
)
def test_valid_frames_come_back_unchanged(
    frames: list[tuple[FrameType, int, bytes]], cuts: list[int]
) -> None:
    wanted = []
    for frame_type, request_id, payload in frames:
        if frame_type == FrameType.WINDOW_UPDATE:
            # Its payload is an increment: 4 bytes, not zero.
            payload = (1 + int.from_bytes(payload[:3] or b"\0", "big")).to_bytes(4, "big")
        rid = 0 if frame_type in CONNECTION_TYPES else request_id
        deadline = 1234 if frame_type == FrameType.REQUEST else 0
        wanted.append(Frame(int(frame_type), rid, payload, deadline, 0))
    data = PREFACE + b"".join(
        encode_frame(f.type, f.request_id, f.payload, f.deadline_ms) for f in wanted
    )
    decoded, error = assert_feeding_is_split_invariant(data, cuts, 1024, True)
    assert error is None
    assert decoded == wanted


# ----------------------------------------------------------------------------- units


def test_oversized_frame_is_refused_on_its_header_alone() -> None:
    decoder = FrameDecoder(100)
    header = raw_header(FrameType.REQUEST, 1, 101)
    assert decoder.feed(PREFACE + header[:-1]) == []
    with pytest.raises(FrameTooLarge) as caught:
        decoder.feed(header[-1:])
    assert caught.value.code == ErrorCode.FRAME_TOO_LARGE
    assert "101" in str(caught.value)


def test_a_huge_announced_length_is_refused_without_waiting_for_it() -> None:
    decoder = FrameDecoder(4 * 1024 * 1024)
    with pytest.raises(FrameTooLarge):
        decoder.feed(PREFACE + raw_header(FrameType.RESPONSE, 7, 2**32 - 1))


def test_frame_of_exactly_max_frame_size_is_accepted() -> None:
    decoder = FrameDecoder(100)
    frames = decoder.feed(PREFACE + encode_frame(FrameType.RESPONSE, 3, b"x" * 100))
    assert frames == [Frame(FrameType.RESPONSE, 3, b"x" * 100, 0, 0)]


def test_control_frames_have_their_own_small_limit() -> None:
    decoder = FrameDecoder(1024 * 1024)
    with pytest.raises(FrameTooLarge):
        decoder.feed(PREFACE + raw_header(FrameType.SETTINGS, 0, 4097))


def test_payload_waits_for_all_its_bytes() -> None:
    decoder = FrameDecoder(1024)
    data = PREFACE + encode_frame(FrameType.REQUEST, 9, b"abcdef", 250)
    assert decoder.feed(data[:-1]) == []
    assert decoder.buffered == len(data) - 1 - PREFACE_SIZE
    assert decoder.feed(data[-1:]) == [Frame(FrameType.REQUEST, 9, b"abcdef", 250, 0)]
    assert decoder.buffered == 0


@pytest.mark.parametrize("bad_at", range(PREFACE_SIZE - 1))
def test_wrong_preface_is_refused_at_the_first_wrong_byte(bad_at: int) -> None:
    decoder = FrameDecoder(1024)
    for byte in PREFACE[:bad_at]:
        assert decoder.feed(bytes((byte,))) == []
    with pytest.raises(BadPreface) as caught:
        decoder.feed(b"\x00")
    assert str(caught.value) == "not a Pitcher RPC peer (bad preface)"
    assert caught.value.code == ErrorCode.PROTOCOL_ERROR


def test_an_http_client_is_refused_on_its_first_byte() -> None:
    with pytest.raises(BadPreface):
        FrameDecoder(1024).feed(b"G")


@pytest.mark.parametrize("split", [True, False])
def test_version_mismatch_in_preface_gets_its_own_message(split: bool) -> None:
    decoder = FrameDecoder(1024)
    other = b"PITCHER" + bytes((VERSION + 1,))
    with pytest.raises(BadPreface) as caught:
        if split:
            decoder.feed(other[:7])
            decoder.feed(other[7:])
        else:
            decoder.feed(other + b"more bytes")
    assert str(caught.value) == f"unsupported protocol version {VERSION + 1} (this side speaks 1)"


def test_no_preface_expected_means_frames_at_once() -> None:
    decoder = FrameDecoder(1024, expect_preface=False)
    assert decoder.feed(encode_frame(FrameType.PING, 0, b"12345678")) == [
        Frame(FrameType.PING, 0, b"12345678", 0, 0)
    ]


@pytest.mark.parametrize("frame_type", [0, 11, 42, 255])
def test_unknown_frame_type_is_refused(frame_type: int) -> None:
    with pytest.raises(ProtocolError, match=f"unknown frame type {frame_type}"):
        FrameDecoder(1024).feed(PREFACE + raw_header(frame_type, 1))


def test_unsupported_header_version_is_refused() -> None:
    with pytest.raises(ProtocolError, match="unsupported frame version 2"):
        FrameDecoder(1024).feed(PREFACE + raw_header(FrameType.REQUEST, 1, version=2))


@pytest.mark.parametrize("frame_type", CALL_TYPES)
def test_call_frames_need_a_request_id(frame_type: FrameType) -> None:
    with pytest.raises(ProtocolError, match="request id 0") as caught:
        FrameDecoder(1024).feed(PREFACE + raw_header(frame_type, 0))
    assert type(caught.value) is ProtocolError


@pytest.mark.parametrize("frame_type", CONNECTION_TYPES)
def test_connection_frames_must_not_carry_a_request_id(frame_type: FrameType) -> None:
    with pytest.raises(ProtocolError, match="with a request id"):
        FrameDecoder(1024).feed(PREFACE + raw_header(frame_type, 5))


@pytest.mark.parametrize("request_id", [0, 1, 2**64 - 1])
def test_error_frames_may_be_about_the_connection_or_one_call(request_id: int) -> None:
    frames = FrameDecoder(1024).feed(
        PREFACE + encode_frame(FrameType.ERROR, request_id, b"\x08\x01")
    )
    assert frames == [Frame(FrameType.ERROR, request_id, b"\x08\x01", 0, 0)]


def test_reserved_flags_are_passed_through_not_refused() -> None:
    data = PREFACE + raw_header(FrameType.RESPONSE, 4, 2, flags=0xBEEF) + b"ok"
    assert FrameDecoder(1024).feed(data) == [Frame(FrameType.RESPONSE, 4, b"ok", 0, 0xBEEF)]


def test_frames_before_an_error_travel_on_the_exception() -> None:
    good = [
        encode_frame(FrameType.RESPONSE, 1, b"one"),
        encode_frame(FrameType.PING, 0, b"p"),
        encode_frame(FrameType.REQUEST, 2, b"two", 99),
    ]
    decoder = FrameDecoder(1024)
    with pytest.raises(ProtocolError) as caught:
        decoder.feed(PREFACE + b"".join(good) + raw_header(77, 3) + encode_frame(2, 5, b"after"))
    assert caught.value.frames == [  # type: ignore[attr-defined]
        Frame(FrameType.RESPONSE, 1, b"one", 0, 0),
        Frame(FrameType.PING, 0, b"p", 0, 0),
        Frame(FrameType.REQUEST, 2, b"two", 99, 0),
    ]


def test_frames_from_earlier_feeds_are_not_repeated_on_the_exception() -> None:
    decoder = FrameDecoder(1024)
    assert decoder.feed(PREFACE + encode_frame(FrameType.RESPONSE, 1, b"one")) != []
    with pytest.raises(ProtocolError) as caught:
        decoder.feed(raw_header(FrameType.RESPONSE, 0))
    assert caught.value.frames == []  # type: ignore[attr-defined]


def test_decoder_is_dead_after_an_error() -> None:
    decoder = FrameDecoder(1024)
    with pytest.raises(ProtocolError) as first:
        decoder.feed(PREFACE + raw_header(FrameType.CANCEL, 0))
    for more in (b"", encode_frame(FrameType.RESPONSE, 1, b"fine"), PREFACE):
        with pytest.raises(ProtocolError) as again:
            decoder.feed(more)
        assert again.value == first.value
        assert error_key(again.value) == error_key(first.value)


def test_header_size_is_twenty_bytes() -> None:
    # Other implementations are written against this number (docs/wire.md).
    assert HEADER_SIZE == 20
    assert PREFACE == b"PITCHER\x01"


# ----------------------------------------------------------------------------- the server's reads

# The stream server reads whole in-order REQUEST frames itself and leaves
# everything else to the decoder; however the bytes are cut, a connection
# must write the same bytes and end in the same state as if every byte came
# alone (which takes the decoder's path nearly always).


class _Sink:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def serve_in_chunks(chunks: list[bytes], max_frame_size: int) -> tuple[bytes, bool, int]:
    """What a server connection writes for these reads, whether it closed, the last id taken.

    The handler answers at once, except a payload starting with ``!`` (it
    raises), ``?`` (it waits, for longer than the test: two of them fill the
    connection), ``G`` (the server sends GOAWAY before it answers) and ``X``
    (the server closes the connection).
    """

    async def scenario() -> tuple[bytes, bool, int]:
        loop = asyncio.get_running_loop()

        def handler(payload: bytes) -> bytes | asyncio.Future[bytes]:
            if payload.startswith(b"!"):
                raise ValueError("refused on purpose")
            if payload.startswith(b"?"):
                return loop.create_future()  # never done
            if payload.startswith(b"G"):
                connection.send_goaway("going away on purpose")
            if payload.startswith(b"X"):
                connection.close()
            return b"<" + payload + b">"

        server = StreamServer("unix:///nonexistent/never-bound.sock", handler)  # type: ignore[arg-type]
        server.options = ServerOptions(max_frame_size=max_frame_size, max_in_flight=2)
        connection = _ServerConnection(server, loop)
        sink = _Sink()
        connection.connection_made(sink)  # type: ignore[arg-type]
        for chunk in chunks:
            if sink.closed:
                break
            connection.data_received(chunk)
            await asyncio.sleep(0)
        written = b"".join(sink.written)
        connection.close()
        return written, sink.closed, connection.last_request_id

    return asyncio.run(scenario())


@st.composite
def request_streams(draw: st.DrawFn) -> list[bytes]:
    """A client's bytes: mostly requests in order, with control frames and mistakes among them."""
    parts = [PREFACE] if draw(st.integers(0, 9)) else [draw(st.binary(max_size=9))]
    last = 0
    for _ in range(draw(st.integers(0, 12))):
        choice = draw(st.integers(0, 19))
        payload = draw(
            st.one_of(
                st.binary(max_size=12),
                st.binary(min_size=60, max_size=70),
                st.sampled_from([b"!", b"?", b"?", b"G", b"X"]),
            )
        )
        if choice < 11:  # the usual: the next request ids, some payloads refused
            last += draw(st.integers(1, 3))
            deadline = draw(st.sampled_from([0, 60_000]))
            parts.append(encode_frame(FrameType.REQUEST, last, payload, deadline))
        elif choice == 11:  # a request in another version of the protocol
            last += 1
            parts.append(HEADER.pack(VERSION + 1, 1, 0, len(payload), last, 0) + payload)
        elif choice == 12:
            parts.append(encode_frame(FrameType.REQUEST, draw(st.integers(0, last + 1)), payload))
        elif choice == 13:
            parts.append(encode_frame(FrameType.PING, 0, payload[:8]))
        elif choice == 14:
            parts.append(encode_frame(FrameType.CANCEL, draw(st.integers(1, last + 2))))
        elif choice == 15:
            parts.append(encode_frame(FrameType.SETTINGS, 0, b"\x08\x80\x01"))
        elif choice == 16:
            parts.append(encode_frame(FrameType.GOAWAY, 0))
        else:
            parts.append(draw(frame_bytes()))
    if draw(st.integers(0, 4)) == 0:
        parts[-1] = parts[-1][: draw(st.integers(0, len(parts[-1])))]
    return parts


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    parts=request_streams(),
    cuts=st.lists(st.integers(0), max_size=8),
    groups=st.lists(st.integers(1, 4), max_size=12),
    cut=st.integers(0),
    max_frame_size=st.sampled_from([64, 5000]),
)
def test_a_server_connection_answers_the_same_however_its_reads_are_cut(
    parts: list[bytes], cuts: list[int], groups: list[int], cut: int, max_frame_size: int
) -> None:
    data = b"".join(parts)
    alone = serve_in_chunks([data[i : i + 1] for i in range(len(data))], max_frame_size)
    assert serve_in_chunks([data], max_frame_size) == alone
    assert serve_in_chunks(split_at(data, cuts), max_frame_size) == alone
    # Reads that end where frames end: the server reads these itself.
    assert serve_in_chunks(parts, max_frame_size) == alone
    after_preface = b"".join(parts[1:])
    assert serve_in_chunks([parts[0], after_preface], max_frame_size) == alone
    # A read from a frame's start that ends inside a later frame.
    cut %= len(after_preface) + 1
    two_reads = [parts[0], after_preface[:cut], after_preface[cut:]]
    assert serve_in_chunks(two_reads, max_frame_size) == alone
    grouped = []
    start = 0
    for size in [*groups, len(parts)]:
        grouped.append(b"".join(parts[start : start + size]))
        start += size
    assert serve_in_chunks(grouped, max_frame_size) == alone
