"""The SDK's spans: a handler's own spans are children of its SERVER span; failures recorded."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from opentelemetry import trace as trace_api
from opentelemetry.trace import SpanKind, StatusCode

from pitcher_rpc.sdk import Context, Request, Service
from pitcher_rpc.sdk.tracing import tracing_wanted
from tests.inprocess import serving
from tests.tracing.spans import service_exporter
from transports.registry import transport_for

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def request_payload(path: str, headers: list[tuple[bytes, bytes]]) -> bytes:
    from pitcher_rpc.codec import encode_request

    names = [name for name, _ in headers]
    values = [value for _, value in headers]
    return encode_request(b"GET", path.encode(), b"", names, values, b"", "api", "127.0.0.1:5")


def make_service() -> Service:
    app = Service("sdk-spans", tracing=True)
    tracer = trace_api.get_tracer("handler")

    @app.route("/sync")
    def sync(request: Request) -> dict[str, Any]:
        with tracer.start_as_current_span("inner-sync"):
            return {"ok": True}

    @app.route("/async")
    async def waits(request: Request, context: Context) -> dict[str, Any]:
        await asyncio.sleep(0.001)
        with tracer.start_as_current_span("inner-async"):
            await asyncio.sleep(0)
        return {"trace": context.trace.trace_id}

    @app.route("/boom")
    async def boom(request: Request) -> None:
        await asyncio.sleep(0)
        raise RuntimeError("the handler broke")

    return app


def test_handler_spans_are_children_and_errors_are_recorded() -> None:
    exporter = service_exporter()
    parent = (b"traceparent", f"00-{TRACE}-{PARENT}-01".encode())

    async def main() -> None:
        async with serving(make_service()) as [node]:
            client = transport_for(node).client(node)
            try:
                for path in ("/sync", "/async", "/boom", "/missing"):
                    try:
                        await client.call(request_payload(path, [parent]), 5.0)
                    except Exception:
                        assert path == "/boom"
            finally:
                client.abort()

    asyncio.run(main())
    spans = {span.name: span for span in exporter.get_finished_spans()}
    for name, inner in (("GET /sync", "inner-sync"), ("GET /async", "inner-async")):
        server = spans[name]
        assert server.kind == SpanKind.SERVER
        assert f"{server.context.trace_id:032x}" == TRACE
        assert server.parent is not None and f"{server.parent.span_id:016x}" == PARENT
        assert spans[inner].parent is not None
        assert spans[inner].parent.span_id == server.context.span_id
    boom = spans["GET /boom"]
    assert boom.status.status_code == StatusCode.ERROR
    assert boom.attributes["error.type"] == "RuntimeError"  # type: ignore[index]
    assert [event.name for event in boom.events] == ["exception"]
    assert spans["GET"].attributes["http.response.status_code"] == 404  # type: ignore[index]


@pytest.mark.parametrize(
    ("environment", "wanted"),
    [
        ({}, False),
        ({"PITCHER_TRACING": "true"}, True),
        ({"PITCHER_TRACING": "1"}, True),
        ({"PITCHER_TRACING": "TRUE "}, True),
        ({"PITCHER_TRACING": "no"}, False),
        ({"PITCHER_TRACING": "true", "OTEL_SDK_DISABLED": "true"}, False),
    ],
)
def test_the_environment_switch(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], wanted: bool
) -> None:
    monkeypatch.delenv("PITCHER_TRACING", raising=False)
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert tracing_wanted() is wanted
    assert (Service("env")._tracing is not None) is wanted
    assert Service("explicit", tracing=False)._tracing is None


def test_context_trace_without_tracing_reads_the_header_when_asked() -> None:
    app = Service("untraced", tracing=False)

    @app.route("/")
    def answer(request: Request, context: Context) -> dict[str, Any]:
        trace = context.trace
        if trace is None:
            return {"trace": None}
        return {"trace": [trace.trace_id, trace.parent_id, trace.sampled, trace.tracestate]}

    def trace_seen(headers: list[tuple[bytes, bytes]]) -> Any:
        from pitcher_rpc.codec import decode_response

        answer_payload = app.respond(request_payload("/", headers))
        assert isinstance(answer_payload, bytes)
        return json.loads(decode_response(answer_payload).body)["trace"]

    parent = (b"traceparent", f"00-{TRACE}-{PARENT}-00".encode())
    assert trace_seen([parent]) == [TRACE, PARENT, False, ""]
    assert trace_seen([parent, (b"tracestate", b"rojo=1")]) == [TRACE, PARENT, False, "rojo=1"]
    assert trace_seen([parent, (b"tracestate", b"Bad")]) == [TRACE, PARENT, False, ""]
    assert trace_seen([(b"traceparent", b"00-nonsense")]) is None
    assert trace_seen([]) is None
