"""A traced Service streams both ways: its span covers the whole stream, not just the head.

The service is served on a real Unix socket in the test's event loop; the
caller is the transports' StreamClient (``tests.sdk.streaming``). Spans go to
OpenTelemetry's in-memory exporter through the global provider.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from opentelemetry import trace as trace_api
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import StatusCode

from pitcher_rpc.pb import pitcher_pb2
from pitcher_rpc.sdk import Request, Service, StreamingResponse
from tests.sdk.streaming import Body, _Receiver, request_payload, streamed_call
from tests.sdk.test_streams_served import serve
from tests.tracing.spans import service_exporter

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = (b"traceparent", f"00-{TRACE}-{PARENT}-01".encode())
PIECE = 16 * 1024


def finished(exporter: Any, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


def test_a_traced_stream_route_reads_its_body_as_it_comes() -> None:
    """The handler sees the first piece while the sender still holds back the last."""
    exporter = service_exporter()
    app = Service("traced-upload", tracing=True)
    tracer = trace_api.get_tracer("handler")
    first_seen = asyncio.Event()
    sizes: list[int] = []

    @app.route("/upload", stream=True)
    async def upload(request: Request) -> dict[str, Any]:
        total = 0
        async for chunk in request.stream():
            if not first_seen.is_set():
                # A span of the handler's while the body streams: a child of the request's.
                with tracer.start_as_current_span("first-piece"):
                    first_seen.set()
            total += len(chunk)
        sizes.append(total)
        return {"size": total}

    @app.route("/whole")
    def whole(request: Request) -> dict[str, Any]:
        return {"size": len(request.body)}

    async def scenario(client: Any) -> None:
        receiver = _Receiver(asyncio.get_running_loop())
        outgoing = client.send_stream(
            request_payload(b"/upload", method=b"PUT", headers=[TRACEPARENT]), receiver, True
        )
        outgoing.write(b"a" * PIECE)
        # Read whole before the handler runs, the body would never show its first
        # piece before its end: this would time out.
        await asyncio.wait_for(first_seen.wait(), 5)
        assert not receiver.head.done()
        outgoing.write(b"b" * PIECE)
        outgoing.end()
        head, _ = await receiver.head
        answer = pitcher_pb2.Response.FromString(head)
        assert json.loads(answer.body) == {"size": 2 * PIECE}
        # A route without stream=True still gets the streamed body whole, in one span.
        _, body = await streamed_call(
            client, request_payload(b"/whole", headers=[TRACEPARENT]), [b"c" * PIECE] * 3
        )
        assert json.loads(body if isinstance(body, bytes) else await body.read()) == {
            "size": 3 * PIECE
        }

    serve(app, scenario)
    assert sizes == [2 * PIECE]
    [span] = finished(exporter, "PUT /upload")
    [inner] = finished(exporter, "first-piece")
    assert inner.parent is not None and inner.parent.span_id == span.context.span_id
    assert f"{span.context.trace_id:032x}" == TRACE
    assert span.attributes is not None and span.attributes["http.response.status_code"] == 200
    assert inner.end_time is not None and span.end_time is not None
    assert inner.end_time <= span.end_time
    [gathered] = finished(exporter, "GET /whole")
    assert gathered.attributes is not None
    assert gathered.attributes["http.response.status_code"] == 200


def streaming_service() -> Service:
    app = Service("traced-answers", tracing=True)
    tracer = trace_api.get_tracer("handler")

    @app.route("/pieces")
    def pieces(request: Request) -> StreamingResponse:
        count = int(request.query_params["n"])

        async def make() -> AsyncIterator[bytes]:
            for index in range(count):
                # Made after the handler returned: still a child of the request's span.
                with tracer.start_as_current_span("piece"):
                    await asyncio.sleep(0)
                yield bytes([65 + index]) * PIECE

        return StreamingResponse(make(), media_type="application/octet-stream")

    @app.route("/fail")
    def fail(request: Request) -> StreamingResponse:
        async def make() -> AsyncIterator[bytes]:
            yield b"x" * PIECE
            await asyncio.sleep(0)
            raise RuntimeError("the source went away")

        return StreamingResponse(make())

    @app.route("/endless")
    def endless(request: Request) -> StreamingResponse:
        async def make() -> AsyncIterator[bytes]:
            while True:
                yield b"e" * PIECE
                await asyncio.sleep(0.001)

        return StreamingResponse(make())

    @app.route("/json")
    async def json_answer(request: Request) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"ok": True}

    return app


def test_a_streamed_answers_span_ends_after_its_last_piece_and_carries_its_size() -> None:
    exporter = service_exporter()

    async def scenario(client: Any) -> None:
        head, body = await streamed_call(
            client, request_payload(b"/pieces", b"n=4", headers=[TRACEPARENT])
        )
        assert head.status == 200 and isinstance(body, Body)
        # The head is here and a piece read: the span is still open.
        received = []
        async for piece in body:
            received.append(piece)
            if len(received) == 1:
                assert finished(exporter, "GET /pieces") == []
        assert b"".join(received) == b"".join(bytes([65 + i]) * PIECE for i in range(4))
        # A caller that takes no stream gets it collected: the span ends with the answer.
        collected = pitcher_pb2.Response.FromString(
            await client.call(request_payload(b"/pieces", b"n=2"), 5)
        )
        assert len(collected.body) == 2 * PIECE

    serve(streaming_service(), scenario)
    streamed, collected = finished(exporter, "GET /pieces")
    assert streamed.attributes is not None
    assert streamed.attributes["http.response.status_code"] == 200
    assert streamed.attributes["http.response.body.size"] == 4 * PIECE
    assert streamed.status.status_code is StatusCode.UNSET
    assert f"{streamed.context.trace_id:032x}" == TRACE
    pieces = [
        s for s in finished(exporter, "piece") if s.context.trace_id == streamed.context.trace_id
    ]
    assert len(pieces) == 4
    assert all(
        p.parent is not None and p.parent.span_id == streamed.context.span_id for p in pieces
    )
    assert streamed.end_time is not None
    assert all(p.end_time is not None and p.end_time <= streamed.end_time for p in pieces)
    assert collected.attributes is not None
    assert collected.attributes["http.response.status_code"] == 200
    assert collected.status.status_code is StatusCode.UNSET


def test_a_stream_cut_midway_or_abandoned_has_an_error_span() -> None:
    exporter = service_exporter()

    async def scenario(client: Any) -> None:
        head, body = await streamed_call(client, request_payload(b"/fail"))
        assert head.status == 200 and isinstance(body, Body)
        pieces = []
        with pytest.raises(Exception):  # noqa: B017 (the transport's error for a cut stream)
            async for piece in body:
                pieces.append(piece)
        assert b"".join(pieces) == b"x" * PIECE
        # A caller that goes away mid-stream: the span ends, marked cancelled.
        head, body = await streamed_call(client, request_payload(b"/endless"))
        assert isinstance(body, Body)
        await anext(aiter(body))
        await client.close(0)
        for _ in range(500):
            if finished(exporter, "GET /endless"):
                break
            await asyncio.sleep(0.01)

    serve(streaming_service(), scenario)
    [cut] = finished(exporter, "GET /fail")
    assert cut.status.status_code is StatusCode.ERROR
    assert cut.attributes is not None
    assert cut.attributes["error.type"] == "RuntimeError"
    assert cut.attributes["http.response.body.size"] == PIECE
    assert any(event.name == "exception" for event in cut.events)
    [gone] = finished(exporter, "GET /endless")
    assert gone.status.status_code is StatusCode.ERROR
    assert gone.attributes is not None and gone.attributes["error.type"] == "cancelled"
    sent = gone.attributes["http.response.body.size"]
    assert isinstance(sent, int) and sent >= PIECE


def test_a_whole_answers_span_is_as_before() -> None:
    exporter = service_exporter()

    async def scenario(client: Any) -> None:
        for stream_response in (True, False):
            head, body = await streamed_call(
                client,
                request_payload(b"/json", headers=[TRACEPARENT]),
                stream_response=stream_response,
            )
            assert head.status == 200 and body == b'{"ok": true}'
        head, _ = await streamed_call(client, request_payload(b"/nowhere"))
        assert head.status == 404

    serve(streaming_service(), scenario)
    spans = finished(exporter, "GET /json")
    assert len(spans) == 2
    for span in spans:
        assert span.attributes is not None
        assert dict(span.attributes) == {
            "http.request.method": "GET",
            "url.path": "/json",
            "url.scheme": "http",
            "pitcher.route": "r",
            "client.address": "127.0.0.1",
            "http.route": "/json",
            "http.response.status_code": 200,
        }
        assert span.parent is not None and f"{span.parent.span_id:016x}" == PARENT
    [missing] = finished(exporter, "GET")
    assert missing.attributes is not None
    assert missing.attributes["http.response.status_code"] == 404
