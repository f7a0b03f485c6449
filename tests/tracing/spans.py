"""OpenTelemetry's in-memory exporter behind the proxy's tracing module and the SDK's spans.

``TracingInMemory`` is the tracing module with its OTLP exporter swapped for
an InMemorySpanExporter (everything else, the batch processor included, as
in production); :func:`proxy_module` registers it under the name
``tracing`` for one test. The SDK records through the global tracer
provider, which :func:`service_exporter` sets once per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk.trace")

from opentelemetry import trace as trace_api
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pitcher_rpc.modules import registry
from pitcher_rpc.modules.tracing import Tracing

_service_exporter: InMemorySpanExporter | None = None


def service_exporter() -> InMemorySpanExporter:
    """The exporter of the SDK's spans in this process (the global provider's), emptied."""
    global _service_exporter
    if _service_exporter is None:
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace_api.set_tracer_provider(provider)
        _service_exporter = exporter
    _service_exporter.clear()
    return _service_exporter


class TracingInMemory(Tracing):
    exporter = InMemorySpanExporter()
    instances: list[TracingInMemory] = []

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        TracingInMemory.instances.append(self)

    def _span_exporter(self) -> Any:
        return TracingInMemory.exporter


@contextlib.contextmanager
def proxy_module() -> Iterator[InMemorySpanExporter]:
    """The tracing module records into the exporter yielded, for the test's duration."""
    # A new one each time: the module's close shuts its exporter down.
    TracingInMemory.exporter = InMemorySpanExporter()
    TracingInMemory.instances.clear()
    registry.register(TracingInMemory)
    try:
        yield TracingInMemory.exporter
    finally:
        registry.unregister("tracing")


async def spans_of(
    exporter: InMemorySpanExporter, count: int, timeout: float = 5.0
) -> list[ReadableSpan]:
    """The spans exported once there are ``count`` of them (the batch processor's delay)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        spans = list(exporter.get_finished_spans())
        if len(spans) >= count or loop.time() > end:
            return spans
        await asyncio.sleep(0.01)


async def get(port: int, path: str, headers: str = "") -> tuple[int, dict[str, Any]]:
    """Status, and the JSON body the service answered with."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\n{headers}Connection: close\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body.startswith(b"{") else {}


def hex_id(value: int, width: int) -> str:
    return f"{value:0{width}x}"
