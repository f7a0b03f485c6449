from __future__ import annotations

import email.utils
import re
import time
from http import HTTPStatus

import pytest

from pitcher_rpc.http.headers import HOP_BY_HOP, connection_tokens, is_valid_name, is_valid_value
from pitcher_rpc.http.parser import RequestParser
from pitcher_rpc.http.response import STATUS_LINES, build_response, error_response, status_line

_DATE_LINE = re.compile(
    rb"date: [A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT\r\n"
)


def without_date(data: bytes) -> bytes:
    """The response with its Date line removed; fails unless there was exactly one."""
    stripped, count = _DATE_LINE.subn(b"", data)
    assert count == 1, data
    return stripped


def split_response(data: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    head, _, body = without_date(data).partition(b"\r\n\r\n")
    line, *fields = head.split(b"\r\n")
    headers = [tuple(field.split(b": ", 1)) for field in fields]
    return line, headers, body  # type: ignore[return-value]


# -- status lines ---------------------------------------------------------------


def test_status_lines_cover_every_registered_code() -> None:
    assert len(STATUS_LINES) == len(HTTPStatus)
    assert STATUS_LINES[200] == b"HTTP/1.1 200 OK\r\n"
    assert STATUS_LINES[404] == b"HTTP/1.1 404 Not Found\r\n"
    assert STATUS_LINES[431] == b"HTTP/1.1 431 Request Header Fields Too Large\r\n"


@pytest.mark.parametrize(
    ("code", "line"),
    [
        (200, b"HTTP/1.1 200 OK\r\n"),
        (299, b"HTTP/1.1 299 Unknown\r\n"),
        (100, b"HTTP/1.1 100 Continue\r\n"),
        (599, b"HTTP/1.1 599 Unknown\r\n"),
    ],
)
def test_status_line(code: int, line: bytes) -> None:
    assert status_line(code) == line


@pytest.mark.parametrize("code", [0, 99, 600, 1000, -200])
def test_status_line_out_of_range(code: int) -> None:
    with pytest.raises(ValueError, match=str(code)):
        status_line(code)


# -- field checks ---------------------------------------------------------------


@pytest.mark.parametrize("name", [b"content-type", b"X-Custom_1", b"!#$%&'*+-.^_`|~", b"a"])
def test_valid_names(name: bytes) -> None:
    assert is_valid_name(name)


@pytest.mark.parametrize(
    "name", [b"", b"a b", b"a:b", b"a\tb", b"(a)", b"a\r\n", b"caf\xc3\xa9", b"a\x00", b"a/b"]
)
def test_invalid_names(name: bytes) -> None:
    assert not is_valid_name(name)


@pytest.mark.parametrize(
    "value", [b"", b"text/plain", b"a b\tc", b"x", b"\x80\xff obs-text", b'"quoted" (c)']
)
def test_valid_values(value: bytes) -> None:
    assert is_valid_value(value)


@pytest.mark.parametrize(
    "value",
    [
        b" lead",
        b"trail ",
        b"trail\t",
        b"\t",
        b"a\r\nb",
        b"a\nb",
        b"a\rb",
        b"a\x00b",
        b"a\x7fb",
        b"\x1b",
    ],
)
def test_invalid_values(value: bytes) -> None:
    assert not is_valid_value(value)


# -- hop-by-hop ---------------------------------------------------------------------


def test_hop_by_hop_set() -> None:
    assert {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    } == HOP_BY_HOP
    assert all(name == name.lower() for name in HOP_BY_HOP)


def test_connection_tokens_from_all_fields() -> None:
    headers = [
        (b"connection", b"Keep-Alive, X-Secret ,,"),
        (b"x-secret", b"1"),
        (b"connection", b"\tUpgrade"),
        (b"x-connection", b"not-this"),
    ]
    assert connection_tokens(headers) == frozenset((b"keep-alive", b"x-secret", b"upgrade"))


def test_connection_tokens_none() -> None:
    assert connection_tokens([(b"host", b"a")]) == frozenset()
    assert connection_tokens([(b"connection", b" , ")]) == frozenset()


def test_connection_tokens_from_a_parsed_request() -> None:
    (req,) = RequestParser().feed(
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n\r\n"
    )
    assert connection_tokens(req.headers) == {b"keep-alive", b"x-hop"}


# -- build_response ---------------------------------------------------------------


def test_build_response_keep_alive() -> None:
    data = build_response(
        200, [(b"content-type", b"text/plain")], b"hello", keep_alive=True, extra=b"x-id: 7\r\n"
    )
    assert without_date(data) == (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\nx-id: 7\r\n\r\nhello"
    )


def test_build_response_close() -> None:
    line, headers, body = split_response(build_response(201, [], b"{}", keep_alive=False))
    assert line == b"HTTP/1.1 201 Created"
    assert headers == [(b"content-length", b"2"), (b"connection", b"close")]
    assert body == b"{}"


def test_build_response_head_gives_length_but_no_body() -> None:
    data = build_response(200, [], b"0123456789", keep_alive=True, head=True)
    assert without_date(data) == b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n"


@pytest.mark.parametrize("status", [204, 304])
def test_build_response_without_content(status: int) -> None:
    data = build_response(status, [(b"etag", b'"x"')], b"ignored", keep_alive=False)
    line, headers, body = split_response(data)
    assert line == STATUS_LINES[status][:-2]
    assert headers == [(b"etag", b'"x"'), (b"connection", b"close")]
    assert body == b""


@pytest.mark.parametrize("keep_alive", [True, False])
def test_build_interim_response(keep_alive: bool) -> None:
    assert build_response(100, [], b"", keep_alive=keep_alive) == b"HTTP/1.1 100 Continue\r\n\r\n"


def test_build_response_empty_body_has_zero_length() -> None:
    assert without_date(build_response(200, [], b"", keep_alive=True)) == (
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
    )


def test_build_response_unknown_status() -> None:
    assert build_response(299, [], b"", keep_alive=True).startswith(b"HTTP/1.1 299 Unknown\r\n")


def test_build_response_accepts_any_iterable() -> None:
    headers = ((b"x-%d" % i, b"%d" % i) for i in range(3))
    _, fields, _ = split_response(build_response(200, headers, b"", keep_alive=True))
    assert fields[:3] == [(b"x-0", b"0"), (b"x-1", b"1"), (b"x-2", b"2")]


# -- error_response ---------------------------------------------------------------


def test_error_response() -> None:
    data = error_response(400, "both Content-Length and Transfer-Encoding")
    line, headers, body = split_response(data)
    assert line == b"HTTP/1.1 400 Bad Request"
    assert body == b"400 Bad Request: both Content-Length and Transfer-Encoding\n"
    assert headers == [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]


def test_error_response_keep_alive_and_head() -> None:
    data = error_response(404, "no route", keep_alive=True, head=True)
    line, headers, body = split_response(data)
    assert line == b"HTTP/1.1 404 Not Found"
    assert (b"connection", b"close") not in headers
    assert (b"content-length", b"%d" % len(b"404 Not Found: no route\n")) in headers
    assert body == b""


def test_error_response_unknown_status_and_non_ascii_message() -> None:
    _, headers, body = split_response(error_response(599, "délai"))
    assert body == "599 Unknown: délai\n".encode()
    assert (b"content-length", b"%d" % len(body)) in headers


def test_responses_carry_the_current_date() -> None:
    # RFC 9110 §6.6.1: a server with a clock sends Date on final responses.
    before = time.time()
    data = error_response(413, "body too large")
    value = re.search(rb"\r\ndate: ([^\r]+)\r\n", data)
    assert value is not None
    sent = email.utils.parsedate_to_datetime(value.group(1).decode()).timestamp()
    assert before - 1 <= sent <= time.time() + 1


def test_http_1_0_keep_alive_is_announced() -> None:
    # An HTTP/1.0 client assumes close unless the response says keep-alive.
    _, headers, _ = split_response(build_response(200, [], b"", keep_alive=True, http10=True))
    assert (b"connection", b"keep-alive") in headers
    _, headers, _ = split_response(build_response(200, [], b"", keep_alive=False, http10=True))
    assert (b"connection", b"close") in headers
    _, headers, _ = split_response(build_response(200, [], b"", keep_alive=True))
    assert not any(name == b"connection" for name, _ in headers)


def test_response_fields_are_the_validated_headers_joined_and_repeat_from_the_cache() -> None:
    from pitcher_rpc.http.headers import InvalidHeader, response_fields

    names = [b"Content-Type", b"Connection", b"X-Gone", b"Content-Length"]
    values = [b"application/json", b"x-gone", b"1", b"12"]
    for _ in range(2):  # built, then from the cache
        assert response_fields(names, values, None, b"") == b"Content-Type: application/json\r\n"
        assert (
            response_fields(names, values, b"x-request-id", b"7")
            == b"Content-Type: application/json\r\nx-request-id: 7\r\n"
        )
    assert response_fields([b"X-Request-Id"], [b"own"], b"x-request-id", b"7") == (
        b"X-Request-Id: own\r\n"
    )
    assert response_fields([], [], b"x-request-id", b"7") == b"x-request-id: 7\r\n"
    # Split differently, the same bytes are invalid, and stay so after the valid ones were cached.
    response_fields([b"a", b"b"], [b"x", b"y"], None, b"")
    with pytest.raises(InvalidHeader):
        response_fields([b"a\nb"], [b"x\ny"], None, b"")
    with pytest.raises(InvalidHeader):
        response_fields([b"a"], [b"x\r\nInjected: 1"], None, b"")
