"""What a request forwards: the header rules over parsed requests, and the fast path's flag.

The exchange copies a request's fields as they are when the parser did not
flag it (``watched``) and runs :func:`forward_request_headers` otherwise; the
flag must therefore be set on every request that function would change.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pitcher_rpc.http.headers import HOP_BY_HOP, REQUEST_DROP, forward_request_headers
from pitcher_rpc.http.parser import HttpRequest, RequestParser


def parse(head: bytes) -> HttpRequest:
    (request,) = RequestParser(watch=REQUEST_DROP).feed(head)
    return request


def forwarded(request: HttpRequest) -> tuple[list[tuple[bytes, bytes]], bytes]:
    names, values, chain = forward_request_headers(request.names, request.values)
    return list(zip(names, values, strict=True)), chain


def test_x_forwarded_for_named_in_connection_is_not_taken_into_the_chain() -> None:
    request = parse(
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 6.6.6.6\r\n"
        b"Connection: X-Forwarded-For\r\n\r\n"
    )
    assert request.watched
    fields, chain = forwarded(request)
    assert fields == [(b"host", b"a")]
    assert chain == b""


def test_x_forwarded_for_not_named_in_connection_makes_the_chain() -> None:
    request = parse(
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 10.0.0.1\r\n"
        b"Connection: keep-alive\r\nX-Forwarded-For: 10.0.0.2\r\n\r\n"
    )
    fields, chain = forwarded(request)
    assert fields == [(b"host", b"a")]
    assert chain == b"10.0.0.1, 10.0.0.2"


def test_fields_named_in_connection_are_dropped_whatever_their_case() -> None:
    request = parse(
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: X-Secret\r\nconnection: ,, x-other ,\r\n"
        b"X-SECRET: 1\r\nX-Other: 2\r\nX-Kept: 3\r\n\r\n"
    )
    fields, _ = forwarded(request)
    assert fields == [(b"host", b"a"), (b"x-kept", b"3")]


def test_host_named_in_connection_is_kept() -> None:
    # Routing used Host; a backend that did not see it would serve another host's request.
    request = parse(b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: host, close\r\n\r\n")
    fields, _ = forwarded(request)
    assert fields == [(b"host", b"a.example")]


def test_absolute_form_forwards_the_targets_authority_as_host() -> None:
    request = parse(b"GET http://a.example:81/x HTTP/1.1\r\nHost: b.example\r\n\r\n")
    assert not request.watched, "nothing to drop: the fast path forwards it as parsed"
    assert request.headers == [(b"host", b"a.example:81")]
    assert request.host == b"a.example:81"


# -- the fast path's flag, over many header sets --------------------------------------

_TOKENS = [
    b"close",
    b"keep-alive",
    b"upgrade",
    b"te",
    b"x-forwarded-for",
    b"X-Forwarded-For",
    b"x-a",
    b"X-B",
    b"host",
    b"proxy-authorization",
    b"x-forwarded-proto",
]
_FIELDS = st.one_of(
    st.tuples(
        st.just(b"Connection"),
        st.lists(st.sampled_from(_TOKENS), max_size=4).map(b", ".join),
    ),
    st.tuples(
        st.sampled_from(
            [
                b"X-Forwarded-For",
                b"x-forwarded-proto",
                b"X-A",
                b"x-b",
                b"Keep-Alive",
                b"TE",
                b"Upgrade",
                b"Proxy-Authorization",
                b"Trailer",
                b"Accept",
                b"Content-Length",
            ]
        ),
        st.sampled_from([b"1", b"10.0.0.1", b"v"]),
    ),
)


def _head(target: bytes, fields: list[tuple[bytes, bytes]]) -> bytes:
    lines = [b"GET " + target + b" HTTP/1.1", b"Host: h.example"]
    for name, value in fields:
        if name == b"Content-Length":
            value = b"0"  # a body would need bytes; one field at most, below
        lines.append(name + b": " + value)
    return b"\r\n".join(lines) + b"\r\n\r\n"


@settings(max_examples=400, deadline=None)
@given(
    fields=st.lists(_FIELDS, max_size=6).filter(
        lambda fields: sum(name == b"Content-Length" for name, _ in fields) <= 1
    ),
    target=st.sampled_from([b"/p", b"http://a.example/p", b"https://[::1]:8443/p?q"]),
)
def test_an_unflagged_request_is_forwarded_as_parsed(
    fields: list[tuple[bytes, bytes]], target: bytes
) -> None:
    request = parse(_head(target, fields))
    names, values, chain = forward_request_headers(request.names, request.values)
    if not request.watched:
        # The fast path copies the fields as they are: that must be what the rules give.
        assert (names, values, chain) == (request.names, request.values, b"")
    named = {
        token.strip().lower()
        for name, value in request.headers
        if name == b"connection"
        for token in value.split(b",")
    }
    # Nothing hop-by-hop, nothing named in Connection (Host excepted) goes on...
    assert not set(names) & (HOP_BY_HOP | (named - {b"host"}))
    assert not set(names) & REQUEST_DROP
    # ...the backend sees the host routing used, once...
    assert [v for n, v in zip(names, values, strict=True) if n == b"host"] == [request.host]
    # ...and the chain holds only X-Forwarded-For values of fields not addressed to this hop.
    sent = [v for n, v in request.headers if n == b"x-forwarded-for"]
    expected = b"" if b"x-forwarded-for" in named else b", ".join(sent)
    assert chain == expected
