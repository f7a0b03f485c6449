"""Traces in a split service: the proxy's trace context, and a span per request.

:attr:`Context.trace <pitcher_rpc.sdk.Context.trace>` reads the request's
``traceparent`` (sent by the proxy's ``tracing`` module) when a handler asks,
with no OpenTelemetry needed. ``Service(..., tracing=True)``, or
``PITCHER_TRACING=true`` in the environment (``OTEL_SDK_DISABLED=true``
overrides it), runs every handler inside an OpenTelemetry span of kind SERVER
whose parent is the proxy's span; the handler's own spans are its children.
The span wraps what the Service does without tracing: a ``stream=True``
route reads its body as it comes inside it, and a streamed answer's span
ends after its last piece (with the bytes sent), or when it is cut.

The spans go to the global tracer provider when the program set one (its
own exporters and sampler apply); otherwise one is made here: service.name
is ``OTEL_SERVICE_NAME`` or the Service's name, spans go through a batch
processor to the OTLP/HTTP exporter, which reads the ``OTEL_EXPORTER_OTLP_*``
variables (``OTEL_TRACES_EXPORTER=none``: no exporter). This needs the
``tracing`` extra: ``pip install 'pitcher-rpc[tracing]'``.

Imported only when a handler asks for its trace or tracing is on: a service
without tracing pays nothing per request for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import importlib
import os
import types
from collections.abc import AsyncIterator, Awaitable, Generator
from typing import Any

from transports.base import StreamedAnswer

from ..modules.trace_context import SAMPLED, parse_traceparent, valid_tracestate
from .service import TRACING_ENV, _tracing_wanted

__all__ = ["TRACING_ENV", "ServiceTracing", "TraceContext", "trace_of", "tracing_wanted"]


def tracing_wanted() -> bool:
    """Whether the environment asks for tracing (OpenTelemetry's boolean style)."""
    return _tracing_wanted()


class TraceContext:
    """The W3C trace context a request came with.

    ``trace_id`` (32 hex digits) and ``parent_id`` (16: the proxy's span, the
    parent of anything the handler records), ``sampled`` (whether the trace
    is being recorded upstream), ``tracestate`` ("" if none), and
    ``traceparent``, the header as it came.
    """

    __slots__ = ("parent_id", "sampled", "trace_id", "traceparent", "tracestate")

    def __init__(
        self, trace_id: str, parent_id: str, sampled: bool, traceparent: str, tracestate: str = ""
    ) -> None:
        self.trace_id = trace_id
        self.parent_id = parent_id
        self.sampled = sampled
        self.traceparent = traceparent
        self.tracestate = tracestate

    def __repr__(self) -> str:
        return (
            f"TraceContext(trace_id={self.trace_id!r}, parent_id={self.parent_id!r},"
            f" sampled={self.sampled!r})"
        )


def trace_of(request: Any) -> TraceContext | None:
    """The trace context of a :class:`~pitcher_rpc.sdk.Request`; None without a valid one."""
    headers = request.headers
    found = headers.get_all("traceparent")
    if not found:
        return None
    traceparent = ", ".join(found)
    parent = parse_traceparent(traceparent)
    if parent is None:
        return None
    tracestate = ",".join(headers.get_all("tracestate"))
    return TraceContext(
        f"{parent.trace_id:032x}",
        f"{parent.parent_id:016x}",
        bool(parent.flags & SAMPLED),
        traceparent,
        tracestate if tracestate and valid_tracestate(tracestate) else "",
    )


_OTLP = "opentelemetry.exporter.otlp.proto.http.trace_exporter"
_NO_EXTRA = (
    "tracing needs OpenTelemetry: pip install 'pitcher-rpc[tracing]'"
    " (or leave tracing off: tracing=False, PITCHER_TRACING unset)"
)


class ServiceTracing:
    """Runs a Service's handlers inside spans (see the module docstring)."""

    def __init__(self, service_name: str) -> None:
        try:
            from opentelemetry import context as context_api
            from opentelemetry import trace as trace_api
            from opentelemetry.trace import Status, StatusCode
            from opentelemetry.trace.span import TraceState
        except ImportError as exc:
            raise RuntimeError(_NO_EXTRA) from exc
        self._service_name = service_name
        self._api = trace_api
        self._context_api = context_api
        self._error = Status(StatusCode.ERROR)
        self._trace_state = TraceState.from_header
        self._server = trace_api.SpanKind.SERVER
        self._tracer: Any = None
        # Imported now rather than on the first request (a ~0.2 s stall of the
        # event loop) in case no provider is set by then and one is made here.
        for name in ("opentelemetry.sdk.trace", _OTLP):
            # A missing one is reported if a provider has to be made.
            with contextlib.suppress(ImportError):
                importlib.import_module(name)

    def _get_tracer(self) -> Any:
        """The tracer, from the global provider, which is made first if the program set none."""
        api = self._api
        if isinstance(api.get_tracer_provider(), api.ProxyTracerProvider):
            _install_provider(self._service_name)
        self._tracer = tracer = api.get_tracer("pitcher_rpc.sdk")
        return tracer

    def _parent(self, names: list[bytes], values: list[bytes]) -> Any:
        """The OpenTelemetry context of the request's traceparent; None for a root span."""
        found = [values[i] for i, name in enumerate(names) if name.lower() == b"traceparent"]
        if not found:
            return None
        parent = parse_traceparent(b", ".join(found))
        if parent is None:
            return None
        states = [values[i] for i, name in enumerate(names) if name.lower() == b"tracestate"]
        tracestate = b",".join(states)
        api = self._api
        span_context = api.SpanContext(
            parent.trace_id,
            parent.parent_id,
            is_remote=True,
            trace_flags=api.TraceFlags(parent.flags),
            trace_state=(
                self._trace_state([tracestate.decode("ascii")])
                if tracestate and valid_tracestate(tracestate)
                else None
            ),
        )
        return api.set_span_in_context(api.NonRecordingSpan(span_context))

    def respond(self, service: Any, message: Any, deadline_ms: int, call: Any) -> Any:
        """:meth:`Service.respond <pitcher_rpc.sdk.Service.respond>` inside a span.

        The span wraps what the Service does without tracing (its request, a
        streamed body read as it comes, its answer): it ends with a whole
        answer, or with the last piece of a streamed one, or with its failure.
        """
        from .service import _NOT_ALLOWED

        tracer = self._tracer or self._get_tracer()
        method = message.method.decode("latin-1")
        path = message.path.decode("latin-1")
        route = service._only or service._match(method, path)
        attributes: dict[str, Any] = {
            "http.request.method": method,
            "url.path": path,
            "url.scheme": "http",
        }
        if message.route:
            attributes["pitcher.route"] = message.route
        if message.client:
            attributes["client.address"] = message.client.rpartition(":")[0] or message.client
        parent = self._parent(message.header_names[:], message.header_values[:])
        if isinstance(route, bytes):
            attributes["http.response.status_code"] = 405 if route is _NOT_ALLOWED else 404
            tracer.start_span(method, parent, kind=self._server, attributes=attributes).end()
            return route
        attributes["http.route"] = route.prefix
        span = tracer.start_span(
            f"{method} {route.prefix}", parent, kind=self._server, attributes=attributes
        )
        # The handler runs in a context of its own where the span is current
        # (its own spans are children of it): nothing is attached to the
        # caller's, and nothing has to be detached across the steps of a
        # coroutine that the server may start here and finish in a task.
        handler_context = contextvars.copy_context()
        handler_context.run(self._context_api.attach, self._api.set_span_in_context(span))
        try:
            answer = handler_context.run(service._dispatch, message, route, deadline_ms, call)
        except BaseException as exc:
            self._failed(span, exc)
            raise
        return self._finish(span, answer, handler_context)

    def _finish(self, span: Any, answer: Any, handler_context: contextvars.Context) -> Any:
        """The answer for the transport, the span ended when it is (or is cut)."""
        if type(answer) is bytes:
            self._end(span, _status_of(answer))
            return answer
        if isinstance(answer, StreamedAnswer):
            return StreamedAnswer(answer.head, self._traced_body(span, answer, handler_context))
        return self._finish_later(span, answer, handler_context)

    async def _finish_later(
        self, span: Any, awaitable: Any, handler_context: contextvars.Context
    ) -> Any:
        task = asyncio.get_running_loop().create_task(_wait(awaitable), context=handler_context)
        try:
            answer = await task
        except asyncio.CancelledError as exc:
            # The Service's own code marks the handler's Context cancelled
            # as the error leaves the handler.
            task.cancel()
            self._failed(span, exc)
            raise
        except BaseException as exc:
            self._failed(span, exc)
            raise
        return self._finish(span, answer, handler_context)

    async def _traced_body(
        self, span: Any, answer: StreamedAnswer, handler_context: contextvars.Context
    ) -> AsyncIterator[bytes]:
        """A streamed answer's body, each piece made with the span current; the span ends with it.

        Each piece is made with the handler's context current (its steps are
        run in it, as a task of that context would, without a task a piece),
        so that spans the handler's generator starts after it returned are
        children of this one too.
        """
        span.set_attribute("http.response.status_code", _status_of(answer.head))
        chunks = answer.chunks
        sent = 0
        ended = False
        try:
            while True:
                chunk = await _in_context(handler_context, _next(chunks))
                if chunk is None:
                    break
                sent += len(chunk)
                yield chunk
            ended = True
        except BaseException as exc:
            span.set_attribute(_BODY_SIZE, sent)
            if isinstance(exc, GeneratorExit):
                # The transport stopped asking: the caller went away or cancelled.
                exc = asyncio.CancelledError()
            self._failed(span, exc)
            raise
        finally:
            await _in_context(handler_context, _close(chunks))
        if ended:
            span.set_attribute(_BODY_SIZE, sent)
            if _status_of(answer.head) >= 500:
                span.set_status(self._error)
            span.end()

    def _end(self, span: Any, status: int) -> None:
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(self._error)
        span.end()

    def _failed(self, span: Any, error: BaseException) -> None:
        if isinstance(error, asyncio.CancelledError):
            span.set_attribute("error.type", "cancelled")
        else:
            span.record_exception(error)
            span.set_attribute("error.type", type(error).__qualname__)
        span.set_status(self._error)
        span.end()


# What a streamed answer's span says it sent (OpenTelemetry's HTTP conventions).
_BODY_SIZE = "http.response.body.size"


def _status_of(payload: bytes) -> int:
    """The status of a Response payload (field 1, a varint, first: see pitcher_rpc.codec)."""
    if not payload or payload[0] != 0x08:
        return 0
    status = 0
    shift = 0
    for byte in payload[1:6]:
        status |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
        shift += 7
    return status


@types.coroutine
def _in_context(context: contextvars.Context, coroutine: Any) -> Generator[Any, Any, Any]:
    """Await ``coroutine`` with each of its steps run in ``context`` (see stepping.resume)."""
    run = context.run
    sent: Any = None
    thrown: BaseException | None = None
    while True:
        try:
            yielded = run(coroutine.send, sent) if thrown is None else run(coroutine.throw, thrown)
        except StopIteration as stop:
            return stop.value
        thrown = None
        sent = None
        try:
            sent = yield yielded
        except GeneratorExit:
            run(coroutine.close)
            raise
        except BaseException as exc:
            thrown = exc


async def _next(chunks: AsyncIterator[bytes]) -> bytes | None:
    """The next piece of a streamed body; None at its end."""
    return await anext(chunks, None)


async def _close(chunks: AsyncIterator[bytes]) -> None:
    close = getattr(chunks, "aclose", None)
    if close is not None:
        await close()


async def _wait(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def _install_provider(service_name: str) -> None:
    """A global tracer provider exporting over OTLP/HTTP (see the module docstring)."""
    try:
        from opentelemetry import trace as trace_api
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise RuntimeError(_NO_EXTRA) from exc
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service_name}
    provider = TracerProvider(resource=Resource.create(attributes))
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() != "none":
        exporter = importlib.import_module(_OTLP).OTLPSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace_api.set_tracer_provider(provider)
