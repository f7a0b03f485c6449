"""The payload codec against the generated classes: the wire stays protobuf.

What the codec writes by hand must decode with the generated classes to the
same message (and is the very bytes they write); what it reads must read
every message they write the same way, and any other bytes either the same
way as they do or not at all (BadPayload, never another exception).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pitcher_rpc.codec import (
    HAND_MAX_HEADERS,
    BadPayload,
    _encode_request_upb,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    encode_varint,
    response_head,
    with_body,
)
from pitcher_rpc.pb import pitcher_pb2

# Lengths on both sides of the one- and two-byte varint boundaries.
blobs = st.one_of(
    st.binary(max_size=140),
    st.integers(0x3F80, 0x4080).map(lambda n: b"v" * n),
)
texts = st.text(max_size=140)
statuses = st.one_of(st.integers(0, 999), st.integers(0, 2**32 - 1))


@st.composite
def headers(draw: st.DrawFn) -> tuple[list[bytes], list[bytes]]:
    names = draw(st.lists(st.binary(max_size=140), max_size=24))
    values = draw(st.lists(blobs, min_size=len(names), max_size=len(names)))
    return names, values


def response_fields(message: object) -> tuple[int, list[bytes], list[bytes], bytes]:
    return (
        message.status,  # type: ignore[attr-defined]
        list(message.header_names),  # type: ignore[attr-defined]
        list(message.header_values),  # type: ignore[attr-defined]
        message.body,  # type: ignore[attr-defined]
    )


def upb_response(payload: bytes) -> tuple[int, list[bytes], list[bytes], bytes] | None:
    """What the generated class reads, or None where it refuses the bytes."""
    try:
        message = pitcher_pb2.Response.FromString(payload)
    except Exception:
        return None
    return response_fields(message)


# ----------------------------------------------------------------------------- Request


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=blobs,
    path=blobs,
    query=blobs,
    pairs=headers(),
    body=blobs,
    route=texts,
    client=texts,
    as_tuples=st.booleans(),
)
def test_a_request_written_by_hand_is_what_the_generated_class_writes(
    method: bytes,
    path: bytes,
    query: bytes,
    pairs: tuple[list[bytes], list[bytes]],
    body: bytes,
    route: str,
    client: str,
    as_tuples: bool,
) -> None:
    # A tuple of names is always written by hand; a list past HAND_MAX_HEADERS
    # (pure Python) goes through the generated class. Both ways are checked
    # whatever the build, the second by calling it.
    names, values = pairs
    given_names = tuple(names) if as_tuples else names
    payload = encode_request(method, path, query, given_names, values, body, route, client)
    assert payload == _encode_request_upb(method, path, query, names, values, body, route, client)
    expected = pitcher_pb2.Request(
        method=method,
        path=path,
        query=query,
        header_names=names,
        header_values=values,
        body=body,
        route=route,
        client=client,
    )
    assert payload == expected.SerializeToString()
    assert pitcher_pb2.Request.FromString(payload) == expected
    assert decode_request(payload) == expected


@pytest.mark.parametrize("count", [0, min(HAND_MAX_HEADERS + 1, 40)])
def test_a_request_body_may_be_any_bytes_like_object(count: int) -> None:
    body = bytearray(b"x" * 300)
    names = [b"n%d" % n for n in range(count)]
    payload = encode_request(b"POST", b"/", b"", names, names, memoryview(body), "r", "c")
    decoded = pitcher_pb2.Request.FromString(payload)
    assert decoded.body == bytes(body) and list(decoded.header_names) == names


@pytest.mark.parametrize(
    "payload",
    [
        b"\x0a\x05GE",  # cut short
        b"\x22\x01a",  # a header name without its value
        b"\x07",  # wire type 7
        b"\x3a\x01\xff",  # route is not UTF-8
    ],
)
def test_a_bad_request_payload_is_refused(payload: bytes) -> None:
    with pytest.raises(BadPayload):
        decode_request(payload)


# ----------------------------------------------------------------------------- Response


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(status=statuses, pairs=headers(), body=blobs)
def test_a_response_written_by_hand_is_what_the_generated_class_writes(
    status: int, pairs: tuple[list[bytes], list[bytes]], body: bytes
) -> None:
    names, values = pairs
    payload = encode_response(status, names, values, body)
    expected = pitcher_pb2.Response(
        status=status, header_names=names, header_values=values, body=body
    )
    assert payload == expected.SerializeToString()
    assert with_body(response_head(status, names, values), body) == payload


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(status=statuses, pairs=headers(), body=blobs)
def test_every_response_the_generated_class_writes_decodes_the_same(
    status: int, pairs: tuple[list[bytes], list[bytes]], body: bytes
) -> None:
    names, values = pairs
    payload = pitcher_pb2.Response(
        status=status, header_names=names, header_values=values, body=body
    ).SerializeToString()
    assert response_fields(decode_response(payload)) == (status, names, values, body)


# Raw protobuf fields, good and bad: any field number (0 and past the largest
# too) with any wire type, varints canonical, overlong or endless, lengths that
# fit or overrun. Joined and cut anywhere, they make bytes close enough to a
# Response to reach every branch of a reader.
field_numbers = st.one_of(
    st.sampled_from([0, 1, 2, 3, 4, 5, 15, 16, 2**29 - 1, 2**29, 2**32]),
    st.integers(0, 2**35),
)


def raw_varint(value: int, overlong: int) -> bytes:
    encoded = bytearray(encode_varint(value))
    for _ in range(overlong):  # the same value in more bytes than needed
        encoded[-1] |= 0x80
        encoded.append(0)
    return bytes(encoded)


@st.composite
def raw_field(draw: st.DrawFn) -> bytes:
    number = draw(field_numbers)
    wire_type = draw(st.integers(0, 7))
    key = raw_varint(number << 3 | wire_type, draw(st.integers(0, 6)))
    if wire_type == 0:
        value = draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 2**70)))
        return key + raw_varint(value, draw(st.integers(0, 6)))
    if wire_type == 2:
        content = draw(st.binary(max_size=20))
        length = draw(st.one_of(st.just(len(content)), st.integers(0, 2**33)))
        return key + raw_varint(length, draw(st.integers(0, 2))) + content
    if wire_type == 1:
        return key + draw(st.binary(min_size=8, max_size=8))
    if wire_type == 5:
        return key + draw(st.binary(min_size=4, max_size=4))
    return key + draw(st.binary(max_size=6))


@st.composite
def near_responses(draw: st.DrawFn) -> bytes:
    good = pitcher_pb2.Response(
        status=draw(statuses),
        header_names=draw(st.lists(st.binary(max_size=8), max_size=3)),
        header_values=draw(st.lists(st.binary(max_size=8), max_size=3)),
        body=draw(st.binary(max_size=20)),
    ).SerializeToString()
    pieces = [good, *draw(st.lists(raw_field(), max_size=4))]
    payload = b"".join(draw(st.permutations(pieces)))
    cut = draw(st.integers(0, len(payload)))
    return payload[:cut] if draw(st.booleans()) else payload


def check_like_the_generated_class(payload: bytes) -> None:
    expected = upb_response(payload)
    try:
        decoded = decode_response(payload)
    except BadPayload:
        return  # refusing is always allowed; anything else escaping fails the test
    assert expected is not None, f"the generated class refuses {payload!r}"
    assert response_fields(decoded) == expected


@settings(max_examples=3000, suppress_health_check=[HealthCheck.too_slow])
@given(payload=near_responses())
@example(payload=b"\x08\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01")  # 10-byte varint
@example(payload=b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01")  # 2**64 - 1
@example(payload=b"\x08\x80\x80\x80\x80\x80\x80\x80\x80\x80\x02")  # over 64 bits
@example(payload=b"\x08\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01")  # 11 bytes
@example(payload=b"\x88\x00\xc8\x01")  # status in an overlong key
@example(payload=b"\x08\xc8\x81\x80\x00")  # status 200 in an overlong varint
@example(payload=b"\x0b\x0c")  # an empty group as field 1
@example(payload=b"\x0a\x01\x05")  # status as a length-delimited field
@example(payload=b"\x12\x01a")  # a name without a value
def test_any_bytes_decode_as_the_generated_class_reads_them_or_not_at_all(payload: bytes) -> None:
    check_like_the_generated_class(payload)


@settings(max_examples=1000)
@given(payload=st.binary(max_size=64))
def test_random_bytes_decode_as_the_generated_class_reads_them_or_not_at_all(
    payload: bytes,
) -> None:
    check_like_the_generated_class(payload)


def test_unknown_fields_are_skipped() -> None:
    known = encode_response(201, [b"a"], [b"1"], b"body")
    unknown = (
        b"\x28\x07"  # field 5, varint
        + b"\x31"
        + b"\x00" * 8  # field 6, 64-bit
        + b"\x3a\x02hi"  # field 7, bytes
        + b"\x45"
        + b"\x00" * 4  # field 8, 32-bit
        + b"\xf8\xff\xff\xff\x0f\x01"  # field 2**29 - 1, varint
    )
    decoded = decode_response(unknown + known + unknown)
    assert response_fields(decoded) == (201, [b"a"], [b"1"], b"body")
    assert upb_response(unknown + known + unknown) == response_fields(decoded)


def test_a_status_past_32_bits_is_read_as_the_generated_class_reads_a_uint32() -> None:
    payload = b"\x08" + encode_varint(2**32 + 204)
    assert decode_response(payload).status == 204 == upb_response(payload)[0]  # type: ignore[index]


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\x08", "undecodable"),  # cut short in a varint
        (b"\x22\x05abc", "undecodable"),  # cut short in a field
        (b"\x22\x80", "undecodable"),  # cut short in a length
        (b"\x31\x00\x00", "undecodable"),  # cut short in a 64-bit field
        (b"\x0f", "undecodable"),  # wire type 7
        (b"\x02\x00", "undecodable"),  # field number 0
        (b"\x08" + b"\x80" * 10 + b"\x01", "undecodable"),  # an 11-byte varint
        (b"\x12\x01a", "1 header names but 0 values"),
    ],
)
def test_what_cannot_be_read_is_refused_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(BadPayload, match=reason):
        decode_response(payload)


def test_a_decoded_response_holds_plain_lists() -> None:
    decoded = decode_response(encode_response(200, [b"a", b"b"], [b"1", b"2"], b"x"))
    assert type(decoded.header_names) is list and type(decoded.header_values) is list
    assert repr(decoded) == "ResponseMessage(200, [b'a', b'b'], [b'1', b'2'], b'x')"
