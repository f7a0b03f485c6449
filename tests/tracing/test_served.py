"""``pitcher serve`` with two workers and ``pitcher backend``: every span reaches the collector.

Each worker makes its own tracer provider and exporter thread after the fork,
and its own ids; what the service received matches what was exported.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.proxy.conftest import Launcher

REQUESTS = 12


class _Collector(BaseHTTPRequestHandler):
    exports: list[ExportTraceServiceRequest] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        _Collector.exports.append(ExportTraceServiceRequest.FromString(body))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def get(port: int, path: str) -> dict[str, object]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), data
    return json.loads(body)  # type: ignore[no-any-return]


def test_two_workers_export_every_span_with_the_ids_the_service_saw(launcher: Launcher) -> None:
    _Collector.exports = []
    collector = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=collector.serve_forever, name="collector", daemon=True)
    thread.start()
    try:
        backend = launcher.echo_backend("tcp")
        proxy = launcher.proxy(
            f"""
[server]
listen = "127.0.0.1:0"

# A busy test machine must not shed the module under test.
[overload]
mode = "off"

[modules.tracing]
endpoint = "http://127.0.0.1:{collector.server_address[1]}/v1/traces"
schedule_delay = 0.05

[[routes]]
name = "echo"
prefix = "/"
cluster = "echo"

[clusters.echo]
nodes = ["{backend.uri}"]
""",
            workers=2,
        )
        sent = {}
        for n in range(REQUESTS):
            seen = get(proxy.port, f"/n{n}")
            [traceparent] = [value for name, value in seen["headers"] if name == "traceparent"]  # type: ignore[attr-defined]
            sent[f"/n{n}"] = traceparent
        deadline = time.monotonic() + 5
        spans = []
        while time.monotonic() < deadline:
            spans = [
                span
                for export in list(_Collector.exports)
                for resource_spans in export.resource_spans
                for scope_spans in resource_spans.scope_spans
                for span in scope_spans.spans
            ]
            if len(spans) >= REQUESTS:
                break
            time.sleep(0.02)
        assert len(spans) == REQUESTS
        exported = {}
        for span in spans:
            path = next(a.value.string_value for a in span.attributes if a.key == "url.path")
            exported[path] = f"00-{span.trace_id.hex()}-{span.span_id.hex()}-03"
        assert exported == sent
        assert len({value.split("-")[1] for value in sent.values()}) == REQUESTS
    finally:
        collector.shutdown()
        collector.server_close()
        thread.join(5)
