"""The head of a streamed body in the codec: body_size written by hand, read back by upb."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pitcher_rpc.codec import _encode_request_upb, decode_response_head, encode_request
from pitcher_rpc.pb import pitcher_pb2


@pytest.mark.parametrize("encode", [encode_request, _encode_request_upb], ids=["codec", "upb"])
@pytest.mark.parametrize("headers", [2, 12])
@pytest.mark.parametrize("body_size", [-1, 0, 127, 128, 100 << 20])
def test_a_request_head_carries_body_size_only_when_given(
    encode: Callable[..., bytes], headers: int, body_size: int
) -> None:
    names = [b"h%d" % n for n in range(headers)]
    values = [b"v"] * headers
    payload = encode(b"POST", b"/up", b"", names, values, b"first", "r", "c:1", body_size)
    message = pitcher_pb2.Request.FromString(payload)
    assert message.body == b"first" and list(message.header_names) == names
    assert message.HasField("body_size") == (body_size >= 0)
    if body_size >= 0:
        assert message.body_size == body_size
    # Canonical: what the generated class writes for the same message.
    assert payload == message.SerializeToString()


def test_a_response_head_says_its_body_size_or_none() -> None:
    with_size = pitcher_pb2.Response(status=200, body=b"ab", body_size=10).SerializeToString()
    head = decode_response_head(with_size)
    assert (head.status, head.body, head.body_size) == (200, b"ab", 10)
    zero = decode_response_head(pitcher_pb2.Response(status=204, body_size=0).SerializeToString())
    assert zero.body_size == 0, "a stated 0 is not an absent size"
    assert (
        decode_response_head(pitcher_pb2.Response(status=200).SerializeToString()).body_size is None
    )
