"""The ASGI adapter's more_body, both ways, driven as the transports' server drives it.

``AsgiService.respond`` gets the transports' real ServerCall (a streamed
request body, and whether the caller takes a streamed answer) and its answer
is read as the server reads it: bytes, or a StreamedAnswer whose chunks are
iterated. Over real sockets: test_streams_served.py and test_streams_proxied.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pitcher_rpc.pb import pitcher_pb2
from pitcher_rpc.sdk.asgi import AppError, AsgiService, ClientDisconnected
from tests.sdk.streaming import request_payload
from transports.base import WHOLE_CALL, WHOLE_CALL_MAY_STREAM, ServerCall, StreamedAnswer


async def pieces(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        await asyncio.sleep(0)
        yield chunk


async def chunks_of(answer: StreamedAnswer) -> list[bytes]:
    return [bytes(chunk) async for chunk in answer.chunks]


def run(coroutine: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, 5))


def answer_of(app: Any, payload: bytes, call: ServerCall) -> Any:
    """What the server gets from the adapter for one request, awaited in a loop."""

    async def respond() -> Any:
        return await AsgiService(app).respond(payload, 0, call)

    return run(respond())


def test_a_streamed_request_body_arrives_in_pieces_with_more_body() -> None:
    received: list[dict[str, Any]] = []
    scopes: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        scopes.append(scope)
        while True:
            message = await receive()
            received.append(message)
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"done"})

    async def scenario() -> bytes:
        service = AsgiService(app)
        head = request_payload(b"/up", method=b"POST", body=b"first", body_size=13)
        answer = await service.respond(head, 0, ServerCall(pieces(b"sec", b"", b"ond!!"), False))
        assert isinstance(answer, bytes)
        return answer

    answer = pitcher_pb2.Response.FromString(run(scenario()))
    assert answer.body == b"done"
    assert [(m["body"], m["more_body"]) for m in received] == [
        (b"first", True),
        (b"sec", True),
        (b"ond!!", True),
        (b"", False),
    ]
    assert (b"content-length", b"13") in scopes[0]["headers"]


def test_without_a_declared_size_there_is_no_content_length() -> None:
    scopes: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        scopes.append(scope)
        await send({"type": "http.response.start", "status": 204})
        await send({"type": "http.response.body"})

    answer_of(app, request_payload(b"/", method=b"POST"), ServerCall(pieces(), False))
    assert not any(name == b"content-length" for name, _ in scopes[0]["headers"])


def test_a_cut_upload_is_http_disconnect() -> None:
    seen: list[str] = []

    async def broken() -> AsyncIterator[bytes]:
        yield b"some"
        raise ConnectionError("the sender went away")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            seen.append(message["type"])
            if message["type"] == "http.disconnect":
                return

    async def scenario() -> None:
        service = AsgiService(app)
        with pytest.raises(ConnectionError, match="the sender went away"):
            await service.respond(request_payload(b"/"), 0, ServerCall(broken(), False))

    run(scenario())
    assert seen == ["http.request", "http.request", "http.disconnect"]


def streaming_app(*bodies: tuple[bytes, bool], headers: Any = (), fail: bool = False) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": list(headers)})
        for body, more in bodies:
            await send({"type": "http.response.body", "body": body, "more_body": more})
        if fail:
            raise RuntimeError("midway")

    return app


def test_several_body_messages_stream_to_a_caller_that_takes_them() -> None:
    app = streaming_app(
        (b"one ", True), (b"", True), (b"two", True), (b"", False),
        headers=[(b"content-type", b"text/plain"), (b"content-length", b"7")],
    )  # fmt: skip

    async def scenario() -> tuple[Any, list[bytes]]:
        answer = await AsgiService(app).respond(request_payload(b"/"), 0, WHOLE_CALL_MAY_STREAM)
        assert isinstance(answer, StreamedAnswer)
        return pitcher_pb2.Response.FromString(answer.head), await chunks_of(answer)

    head, chunks = run(scenario())
    assert head.status == 200 and head.body_size == 7 and head.body == b""
    assert list(head.header_names) == [b"content-type", b"content-length"]
    assert chunks == [b"one ", b"two"]


def test_one_body_message_is_a_whole_answer_and_a_whole_caller_gets_pieces_gathered() -> None:
    whole_app = streaming_app((b"all", False))
    answer = answer_of(whole_app, request_payload(b"/"), WHOLE_CALL_MAY_STREAM)
    assert isinstance(answer, bytes) and pitcher_pb2.Response.FromString(answer).body == b"all"
    pieces_app = streaming_app((b"a", True), (b"b", True), (b"", False))
    answer = answer_of(pieces_app, request_payload(b"/"), WHOLE_CALL)
    assert isinstance(answer, bytes) and pitcher_pb2.Response.FromString(answer).body == b"ab"


@pytest.mark.parametrize(
    "app",
    [
        streaming_app((b"a", True), fail=True),  # raises after a piece
        streaming_app((b"a", True)),  # returns before the body ended
    ],
)
def test_an_app_failing_midway_cuts_the_stream(app: Any) -> None:
    async def scenario() -> list[bytes]:
        answer = await AsgiService(app).respond(request_payload(b"/"), 0, WHOLE_CALL_MAY_STREAM)
        received: list[bytes] = []
        with pytest.raises(AppError):
            async for chunk in answer.chunks:
                received.append(chunk)
        return received

    assert run(scenario()) == [b"a"]


def test_a_bad_header_fails_before_any_head_is_sent() -> None:
    app = streaming_app((b"a", True), (b"", False), headers=[(b"bad name", b"v")])
    with pytest.raises(AppError, match="header the proxy would refuse"):
        answer_of(app, request_payload(b"/"), WHOLE_CALL_MAY_STREAM)


def test_send_waits_for_the_transport_and_raises_once_the_caller_is_gone() -> None:
    sent: list[int] = []
    outcome: list[BaseException] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200})
        try:
            for n in range(100):
                await send({"type": "http.response.body", "body": b"x", "more_body": True})
                sent.append(n)
        except OSError as exc:
            outcome.append(exc)

    async def scenario() -> None:
        answer = await AsgiService(app).respond(request_payload(b"/"), 0, WHOLE_CALL_MAY_STREAM)
        chunks = answer.chunks
        await anext(chunks)
        await anext(chunks)
        for _ in range(5):
            await asyncio.sleep(0)
        # The app is held at the piece the transport has not taken.
        assert len(sent) <= 2
        await chunks.aclose()  # the caller went away (CANCEL)
        for _ in range(5):
            await asyncio.sleep(0)

    run(scenario())
    assert len(outcome) == 1 and isinstance(outcome[0], ClientDisconnected)
    assert len(sent) <= 3


def test_a_response_under_way_is_cut_when_the_request_body_is_cut() -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"some"
        await asyncio.sleep(0.01)
        raise ConnectionError("the sender went away")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"echo:", "more_body": True})
        while (await receive())["type"] == "http.request":
            await send({"type": "http.response.body", "body": b".", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def scenario() -> list[bytes]:
        answer = await AsgiService(app).respond(
            request_payload(b"/", method=b"POST"), 0, ServerCall(broken(), True)
        )
        assert isinstance(answer, StreamedAnswer)
        received: list[bytes] = []
        with pytest.raises(AppError, match="ended before"):
            async for chunk in answer.chunks:
                received.append(chunk)
        return received

    assert b"".join(run(scenario())).startswith(b"echo:")
