"""The proxy's spans reach an OTLP/HTTP collector (a real one on loopback) at the endpoint set."""

from __future__ import annotations

import asyncio

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.inprocess import answering, running_proxy, serving

CONFIG = """
[server]
listen = "127.0.0.1:0"

# A busy test machine must not shed the module under test.
[overload]
mode = "off"

[modules.tracing]
endpoint = "http://127.0.0.1:{collector}/v1/traces"
headers = {{ "x-collector-key" = "secret" }}
service_name = "edge"
schedule_delay = 0.05

[[routes]]
name = "api"
prefix = "/"
cluster = "backend"

[clusters.backend]
nodes = ["{node}"]
"""


class Collector:
    """An OTLP/HTTP trace receiver: keeps each export's path, headers and decoded body."""

    def __init__(self) -> None:
        self.exports: list[tuple[str, dict[str, str], ExportTraceServiceRequest]] = []
        self.arrived = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split()[1]
                headers = {
                    name.lower(): value
                    for name, _, value in (line.partition(": ") for line in lines[1:] if line)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.exports.append((path, headers, ExportTraceServiceRequest.FromString(body)))
                self.arrived.set()
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\n"
                    b"content-length: 0\r\n\r\n"
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def test_spans_are_exported_over_otlp_http_to_the_endpoint() -> None:
    async def main() -> None:
        collector = Collector()
        receiver = await asyncio.start_server(collector.handle, "127.0.0.1", 0)
        collector_port = receiver.sockets[0].getsockname()[1]
        try:
            async with (
                serving(answering("plain", 200, "hi")) as [node],
                running_proxy(CONFIG.format(node=node, collector=collector_port)) as (_, port),
            ):
                for _ in range(3):
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.write(b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                    assert (await reader.read()).startswith(b"HTTP/1.1 200")
                    writer.close()
                await asyncio.wait_for(collector.arrived.wait(), 5)
            # The proxy's stop has flushed what was still queued.
        finally:
            receiver.close()
            await receiver.wait_closed()
        paths = {path for path, _, _ in collector.exports}
        assert paths == {"/v1/traces"}
        assert all(headers["x-collector-key"] == "secret" for _, headers, _ in collector.exports)
        spans = []
        for _, _, export in collector.exports:
            for resource_spans in export.resource_spans:
                resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                assert resource["service.name"] == "edge"
                for scope_spans in resource_spans.scope_spans:
                    assert scope_spans.scope.name == "pitcher_rpc.proxy"
                    spans.extend(scope_spans.spans)
        assert len(spans) == 3
        assert len({span.trace_id for span in spans}) == 3
        for span in spans:
            attributes = {a.key: a.value for a in span.attributes}
            assert span.name == "GET /"
            assert attributes["url.path"].string_value == "/x"
            assert attributes["http.response.status_code"].int_value == 200

    asyncio.run(main())
