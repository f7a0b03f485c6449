"""Streamed bodies in the SDK, the pieces that need no server.

Server-sent events as the HTML standard's parser reads them back, the
collecting of a streamed answer for a caller that cannot take one (bounded
by the frame limit), and a request body read as a stream or whole. The same
paths over real sockets are in test_streams_served.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pitcher_rpc.codec import encode_request
from pitcher_rpc.pb import pitcher_pb2
from pitcher_rpc.sdk import (
    EventSourceResponse,
    Request,
    ServerSentEvent,
    Service,
    StreamingResponse,
)
from pitcher_rpc.sdk.streams import KEEP_ALIVE, encode_event


def payload(path: bytes = b"/", body: bytes = b"", method: bytes = b"GET") -> bytes:
    return encode_request(method, path, b"", [b"host"], [b"h"], body, "r", "127.0.0.1:1")


def respond(app: Service, request: bytes) -> bytes:
    """The whole answer, as a server without streams (or a direct call) gets it."""

    async def run() -> bytes:
        answer = app.respond(request, 0)
        result: bytes = answer if isinstance(answer, bytes) else await answer
        return result

    return asyncio.run(run())


# ----------------------------------------------------------------------------- event streams


def parse_event_stream(stream: bytes) -> list[dict[str, Any]]:
    """The events a browser's EventSource dispatches (HTML standard, 9.2.6), with id and retry.

    Written from the standard's steps, not from the encoder: lines end in
    CRLF, LF or CR; ``field: value`` loses one space after the colon; a
    blank line dispatches when the data buffer is not empty.
    """
    text = stream.decode("utf-8")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    events: list[dict[str, Any]] = []
    data: str = ""
    event_type = ""
    last_id: str | None = None
    retry: int | None = None
    comments: list[str] = []
    for line in lines[:-1]:  # what follows the last line end is not a line yet
        if line == "":
            if data:
                events.append(
                    {"type": event_type or "message", "data": data[:-1], "id": last_id,
                     "retry": retry}
                )  # fmt: skip
            data, event_type = "", ""
            continue
        if line.startswith(":"):
            comments.append(line[1:])
            continue
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            data += value + "\n"
        elif name == "event":
            event_type = value
        elif name == "id" and "\0" not in value:
            last_id = value
        elif name == "retry" and value.isdigit():
            retry = int(value)
    return events


def test_a_str_event_comes_back_as_the_same_data_line_by_line() -> None:
    wire = ServerSentEvent("first\nsecond\r\nthird\rfourth", event="update", id="7").encode()
    assert wire == (
        b"event: update\nid: 7\ndata: first\ndata: second\ndata: third\ndata: fourth\n\n"
    )
    [event] = parse_event_stream(wire)
    assert event == {
        "type": "update",
        "data": "first\nsecond\nthird\nfourth",
        "id": "7",
        "retry": None,
    }


def test_an_empty_string_is_an_event_and_no_data_is_none() -> None:
    assert parse_event_stream(ServerSentEvent("").encode())[0]["data"] == ""
    assert parse_event_stream(ServerSentEvent(retry=3000).encode()) == []
    assert ServerSentEvent(retry=3000).encode() == b"retry: 3000\n\n"


def test_other_values_are_sent_as_json_and_comments_are_ignored() -> None:
    wire = (
        encode_event({"price": 2.5, "tags": ["a"]})
        + ServerSentEvent(comment="hello\nthere").encode()
    )
    assert wire.endswith(b": hello\n: there\n\n")
    [event] = parse_event_stream(wire)
    assert json.loads(event["data"]) == {"price": 2.5, "tags": ["a"]}
    assert encode_event(b"data: raw\n\n") == b"data: raw\n\n"


@pytest.mark.parametrize(
    "fields",
    [
        {"event": "two\nlines"},
        {"event": "cr\r"},
        {"id": "a\nb"},
        {"id": "nul\0"},
        {"retry": -1},
        {"retry": 1.5},
    ],
)
def test_fields_the_format_cannot_carry_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ServerSentEvent("x", **fields)


@settings(max_examples=300, deadline=None)
@given(
    data=st.text(st.characters(exclude_categories=("Cs",))),
    event=st.none() | st.text(st.characters(exclude_characters="\r\n", exclude_categories=("Cs",))),
    event_id=st.none()
    | st.text(st.characters(exclude_characters="\r\n\0", exclude_categories=("Cs",))),
)
def test_any_text_survives_the_standard_parser(
    data: str, event: str | None, event_id: str | None
) -> None:
    wire = ServerSentEvent(data, event=event, id=event_id).encode()
    [parsed] = parse_event_stream(wire)
    assert parsed["data"] == data.replace("\r\n", "\n").replace("\r", "\n")
    assert parsed["type"] == (event or "message")
    assert parsed["id"] == event_id


async def drain(response: StreamingResponse) -> list[bytes]:
    out: list[bytes] = []
    async for chunk in response.chunks():
        out.append(chunk if isinstance(chunk, bytes) else str(chunk).encode())
    return out


def test_a_quiet_event_stream_sends_keep_alive_comments() -> None:
    async def slow() -> AsyncIterator[str]:
        yield "one"
        await asyncio.sleep(0.25)
        yield "two"

    chunks = asyncio.run(drain(EventSourceResponse(slow(), ping=0.05)))
    assert chunks[0] == b"data: one\n\n" and chunks[-1] == b"data: two\n\n"
    pings = chunks[1:-1]
    assert 1 <= len(pings) <= 6 and set(pings) == {KEEP_ALIVE}
    assert [e["data"] for e in parse_event_stream(b"".join(chunks))] == ["one", "two"]


def test_an_event_stream_is_closed_with_its_generator() -> None:
    closed = asyncio.Event()

    async def endless() -> AsyncIterator[str]:
        try:
            while True:
                await asyncio.sleep(0.01)
                yield "tick"
        finally:
            closed.set()

    async def take_two() -> None:
        chunks = EventSourceResponse(endless(), ping=1.0).chunks()
        assert await anext(chunks) == b"data: tick\n\n"
        await anext(chunks)
        await chunks.aclose()  # type: ignore[attr-defined]
        assert closed.is_set()

    asyncio.run(take_two())


def test_event_stream_headers() -> None:
    response = EventSourceResponse([], headers={"Cache-Control": "no-store"})
    assert response.header_pairs() == [
        ("content-type", "text/event-stream; charset=utf-8"),
        ("Cache-Control", "no-store"),
        ("x-accel-buffering", "no"),
    ]


# ----------------------------------------------------------------------------- answers collected


def streaming_service(response: Any, limit: int | None = None) -> Service:
    app = Service("s")

    @app.route("/")
    async def handler(request: Request) -> Any:
        return response() if callable(response) else response

    if limit is not None:
        app._frame_limit = limit
    return app


def test_a_streamed_answer_is_collected_for_a_caller_without_streams() -> None:
    async def parts() -> AsyncIterator[bytes | str]:
        yield b"ab"
        yield "cé"
        yield b""
        yield bytearray(b"d")

    app = streaming_service(
        lambda: StreamingResponse(parts(), 201, [("x-a", "1")], media_type="text/plain")
    )
    message = pitcher_pb2.Response.FromString(respond(app, payload()))
    assert message.status == 201 and message.body == "abcéd".encode()
    assert list(zip(message.header_names, message.header_values, strict=True)) == [
        (b"content-type", b"text/plain"),
        (b"x-a", b"1"),
    ]
    assert not message.HasField("body_size")


@pytest.mark.parametrize("content", [[b"a", "b", b"c"], (b"abc",), b"abc", "abc"])
def test_plain_iterables_of_chunks(content: Any) -> None:
    app = streaming_service(lambda: StreamingResponse(content))
    assert pitcher_pb2.Response.FromString(respond(app, payload())).body == b"abc"


def test_a_blocking_generator_runs_in_a_thread() -> None:
    threads: list[int] = []

    def blocking() -> Iterator[bytes]:
        threads.append(threading.get_ident())
        yield b"x"
        threads.append(threading.get_ident())
        yield b"y"

    app = streaming_service(lambda: StreamingResponse(blocking()))
    assert pitcher_pb2.Response.FromString(respond(app, payload())).body == b"xy"
    assert threads and threading.get_ident() not in threads


def test_a_collected_answer_over_the_frame_limit_fails_without_draining(
    caplog: pytest.LogCaptureFixture,
) -> None:
    made = []
    closed = []

    async def endless() -> AsyncIterator[bytes]:
        try:
            while True:
                made.append(1)
                yield b"x" * 1000
        finally:
            closed.append(True)

    app = streaming_service(lambda: StreamingResponse(endless()), limit=50_000)
    limit_error = pytest.raises(ValueError, match="exceeds the frame limit of 50000")
    with caplog.at_level(logging.ERROR, "pitcher.sdk"), limit_error:
        respond(app, payload())
    assert 49 <= len(made) <= 52 and closed == [True]
    assert "over the frame limit of 50000 bytes" in caplog.text
    assert "handler" in caplog.text and "tests.sdk.test_streams" in caplog.text


@pytest.mark.parametrize(("chunks", "size"), [([b"abc", b"de"], 4), ([b"abc"], 4)])
def test_a_body_that_is_not_its_declared_size_fails(chunks: list[bytes], size: int) -> None:
    app = streaming_service(lambda: StreamingResponse(chunks, size=size))
    with pytest.raises(ValueError, match="size of 4 bytes"):
        respond(app, payload())
    exact = streaming_service(lambda: StreamingResponse([b"ab", b"cd"], size=4))
    assert pitcher_pb2.Response.FromString(respond(exact, payload())).body == b"abcd"


def test_an_exception_midway_fails_the_collected_answer(caplog: pytest.LogCaptureFixture) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"start"
        raise RuntimeError("disk gone")

    app = streaming_service(lambda: StreamingResponse(broken()))
    with caplog.at_level(logging.ERROR, "pitcher.sdk"), pytest.raises(RuntimeError):
        respond(app, payload())
    assert "failed after 5 bytes of its streamed answer" in caplog.text


def test_a_bad_head_fails_before_any_chunk_is_made() -> None:
    made = []

    async def chunks() -> AsyncIterator[bytes]:
        made.append(1)
        yield b"x"

    app = streaming_service(lambda: StreamingResponse(chunks(), headers=[("bad name", "v")]))
    with pytest.raises(ValueError, match="not an HTTP token"):
        respond(app, payload())
    assert made == []


def test_a_sync_handler_may_stream_and_handle_returns_the_response_as_is() -> None:
    app = Service("sync")
    response = StreamingResponse([b"a"])
    app.route("/")(lambda request: response)
    assert pitcher_pb2.Response.FromString(respond(app, payload())).body == b"a"
    assert asyncio.run(app.handle(Request("GET", "/"))) is response
    assert asyncio.run(app.handle_payload(payload())).endswith(b"a")


def test_streamed_size_is_validated() -> None:
    for size in (-1, 1.5):
        with pytest.raises(ValueError):
            StreamingResponse([], size=size)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- request bodies


def test_a_whole_body_is_one_chunk_and_read_returns_it() -> None:
    seen: list[Any] = []
    app = Service("r")

    @app.route("/")
    async def handler(request: Request) -> dict[str, Any]:
        chunks = [chunk async for chunk in request.stream()]
        seen.append((chunks, await request.read(), request.body_size))
        return {}

    respond(app, payload(body=b"hello"))
    respond(app, payload(body=b""))
    assert seen == [([b"hello"], b"hello", 5), ([], b"", 0)]


async def pieces(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        await asyncio.sleep(0)
        yield chunk


def respond_streamed(app: Service, request: bytes, *rest: bytes) -> pitcher_pb2.Response:
    """The answer to a request whose body goes on in ``rest`` (as the server's ServerCall)."""
    from transports.base import ServerCall

    async def run() -> bytes:
        answer = app.respond(request, 0, ServerCall(pieces(*rest), False))
        result: bytes = answer if isinstance(answer, bytes) else await answer
        return result

    return pitcher_pb2.Response.FromString(asyncio.run(run()))


def test_a_streamed_body_is_read_once() -> None:
    outcomes: list[Any] = []
    app = Service("once")

    @app.route("/twice", stream=True)
    async def twice(request: Request) -> bytes:
        assert request.body == b""  # not read yet
        first = [chunk async for chunk in request.stream()]
        outcomes.append(first)
        try:
            request.stream()
        except RuntimeError as exc:
            outcomes.append(str(exc))
        try:
            await request.read()
        except RuntimeError as exc:
            outcomes.append(str(exc))
        return b"ok"

    @app.route("/read", stream=True)
    async def read_then_stream(request: Request) -> bytes:
        body = await request.read()
        outcomes.append((body, request.body, [chunk async for chunk in request.stream()]))
        return b"ok"

    assert respond_streamed(app, payload(b"/twice", b"he"), b"ll", b"", b"o").body == b"ok"
    assert outcomes[0] == [b"he", b"ll", b"o"]
    assert all("read already" in message for message in outcomes[1:3])
    outcomes.clear()
    assert respond_streamed(app, payload(b"/read", b"a"), b"b").body == b"ok"
    assert outcomes == [(b"ab", b"ab", [b"ab"])]


def test_a_buffered_route_gets_the_whole_body_and_413_past_its_limit() -> None:
    seen: list[bytes] = []
    app = Service("buffered", max_body_size=5)
    app.route("/")(lambda request: seen.append(request.body) or b"ok")
    assert respond_streamed(app, payload(b"/", b"ab"), b"cd", b"e").body == b"ok"
    assert seen == [b"abcde"]
    refused = respond_streamed(app, payload(b"/", b"ab"), b"cd", b"ef")
    assert refused.status == 413 and seen == [b"abcde"]
