"""A request through a real proxy to a real SDK service: one trace, the proxy's span the parent."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme
from opentelemetry.trace import SpanKind, StatusCode

from pitcher_rpc.sdk import Context, Request, Response, Service
from tests.inprocess import running_proxy, serving
from tests.tracing.spans import get, hex_id, proxy_module, service_exporter, spans_of

CONFIG = """
[server]
listen = "127.0.0.1:0"

# A busy test machine must not shed the module under test.
[overload]
mode = "off"

[modules.tracing]
sample_ratio = {ratio}
schedule_delay = 0.01
{extra}
[[routes]]
name = "api"
prefix = "/api/"
cluster = "backend"

[clusters.backend]
nodes = ["{node}"]
"""

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def traced_service() -> Service:
    app = Service("traced", tracing=True)

    @app.route("/api/")
    async def answer(request: Request, context: Context) -> Response | dict[str, Any]:
        await asyncio.sleep(0)  # a handler that waits: its span outlives the first step
        if request.path.endswith("/fail"):
            return Response(503, "down")
        trace = context.trace
        return {
            "traceparent": request.headers.get_all("traceparent"),
            "tracestate": request.headers.get_all("tracestate"),
            "x-env": request.headers.get("x-env"),
            "trace": None
            if trace is None
            else [trace.trace_id, trace.parent_id, trace.sampled, trace.tracestate],
        }

    return app


async def through_proxy(ratio: float, requests: list[tuple[str, str]], extra: str = "") -> Any:
    """The answers to ``requests`` (path, header lines) through a traced proxy and service."""
    async with (
        serving(traced_service()) as [node],
        running_proxy(CONFIG.format(node=node, ratio=ratio, extra=extra)) as (_, port),
    ):
        return [await get(port, path, headers) for path, headers in requests], node


def test_one_trace_two_spans_the_service_span_a_child_of_the_proxys() -> None:
    service_spans = service_exporter()
    with proxy_module() as proxy_spans:

        async def main() -> None:
            [(status, seen)], node = await through_proxy(1.0, [("/api/items?x=1", "")])
            assert status == 200
            [proxy] = await spans_of(proxy_spans, 1)
            [service] = await spans_of(service_spans, 1)
            trace_id = proxy.context.trace_id
            assert service.context.trace_id == trace_id
            assert proxy.parent is None  # a new trace: the proxy's span is its root
            assert service.parent is not None
            assert service.parent.span_id == proxy.context.span_id
            assert proxy.kind == service.kind == SpanKind.SERVER
            # What the service received: the proxy's span as its parent, sampled.
            [traceparent] = seen["traceparent"]
            assert (
                traceparent == f"00-{hex_id(trace_id, 32)}-{hex_id(proxy.context.span_id, 16)}-03"
            )
            assert seen["trace"] == [
                hex_id(trace_id, 32),
                hex_id(proxy.context.span_id, 16),
                True,
                "",
            ]

            attributes = dict(proxy.attributes or {})
            host, port = node.removeprefix("tcp://").rsplit(":", 1)
            assert attributes["http.request.method"] == "GET"
            assert attributes["url.path"] == "/api/items"
            assert attributes["http.response.status_code"] == 200
            assert attributes["http.route"] == "/api/"
            assert attributes["pitcher.route"] == "api"
            assert attributes["pitcher.cluster"] == "backend"
            assert attributes["pitcher.node"] == node
            assert attributes["server.address"] == host
            assert attributes["server.port"] == int(port)
            assert attributes["pitcher.attempts"] == 1
            assert attributes["client.address"] == "127.0.0.1"
            assert attributes["url.scheme"] == "http"
            total = (proxy.end_time - proxy.start_time) / 1e9
            residence = attributes["pitcher.residence_time"]
            backend = attributes["pitcher.backend_time"]
            assert 0 < residence < total
            assert 0 < backend < total
            assert residence + backend == pytest.approx(total, abs=1e-5)
            assert proxy.name == "GET /api/"
            assert proxy.resource.attributes["service.name"] == "pitcher"
            # The service's span lies within the proxy's.
            assert proxy.start_time <= service.start_time <= service.end_time <= proxy.end_time

            service_attributes = dict(service.attributes or {})
            assert service.name == "GET /api/"
            assert service_attributes["http.response.status_code"] == 200
            assert service_attributes["pitcher.route"] == "api"

        asyncio.run(main())


def test_an_incoming_traceparent_is_continued_and_its_tracestate_kept() -> None:
    service_spans = service_exporter()
    with proxy_module() as proxy_spans:

        async def main() -> None:
            sent = f"traceparent: 00-{TRACE}-{PARENT}-01\r\ntracestate: rojo=1,congo=2\r\n"
            [(status, seen)], _ = await through_proxy(0.0, [("/api/a", sent)])
            assert status == 200
            [proxy] = await spans_of(proxy_spans, 1)
            [service] = await spans_of(service_spans, 1)
            assert hex_id(proxy.context.trace_id, 32) == TRACE
            assert proxy.parent is not None and hex_id(proxy.parent.span_id, 16) == PARENT
            assert proxy.parent.is_remote
            assert service.parent is not None
            assert service.parent.span_id == proxy.context.span_id
            span_id = hex_id(proxy.context.span_id, 16)
            # Sampled by the parent's flag, though the ratio is 0.
            assert seen["traceparent"] == [f"00-{TRACE}-{span_id}-01"]
            assert seen["tracestate"] == ["rojo=1,congo=2"]
            assert seen["trace"] == [TRACE, span_id, True, "rojo=1,congo=2"]
            assert dict(service.context.trace_state) == {"rojo": "1", "congo": "2"}

        asyncio.run(main())


@pytest.mark.parametrize(
    "headers",
    [
        f"traceparent: 00-{TRACE.upper()}-{PARENT}-01\r\n",
        f"traceparent: 00-{'0' * 32}-{PARENT}-01\r\n",
        f"traceparent: 00-{TRACE}-{'0' * 16}-01\r\n",
        f"traceparent: ff-{TRACE}-{PARENT}-01\r\n",
        f"traceparent: 00-{TRACE}-{PARENT}-01-extra\r\n",
        f"traceparent: 00-{TRACE}-{PARENT}-01\r\ntraceparent: 00-{TRACE}-{PARENT}-01\r\n",
        "traceparent: nonsense\r\n",
        "tracestate: rojo=1\r\n",  # a tracestate alone is discarded
    ],
    ids=["upper", "zero-trace", "zero-parent", "ff", "long-00", "twice", "nonsense", "no-parent"],
)
def test_a_malformed_traceparent_is_replaced_by_a_new_trace(headers: str) -> None:
    service_spans = service_exporter()
    with proxy_module() as proxy_spans:

        async def main() -> None:
            sent = headers + "tracestate: rojo=1\r\n"
            [(status, seen)], _ = await through_proxy(1.0, [("/api/a", sent)])
            assert status == 200
            [proxy] = await spans_of(proxy_spans, 1)
            assert proxy.parent is None
            trace_id = hex_id(proxy.context.trace_id, 32)
            assert trace_id != TRACE
            [traceparent] = seen["traceparent"]
            assert traceparent == f"00-{trace_id}-{hex_id(proxy.context.span_id, 16)}-03"
            assert seen["tracestate"] == []
            [service] = await spans_of(service_spans, 1)
            assert hex_id(service.context.trace_id, 32) == trace_id

        asyncio.run(main())


def test_sampling_0_passes_an_unsampled_traceparent_and_records_nothing() -> None:
    service_spans = service_exporter()
    with proxy_module() as proxy_spans:

        async def main() -> None:
            unsampled = f"traceparent: 00-{TRACE}-{PARENT}-00\r\n"
            answers, _ = await through_proxy(0.0, [("/api/a", ""), ("/api/b", unsampled)])
            trace_ids = []
            for status, seen in answers:
                assert status == 200
                [traceparent] = seen["traceparent"]
                _, trace_id, _, flags = traceparent.split("-")
                assert int(flags, 16) & 1 == 0
                assert seen["trace"][2] is False
                trace_ids.append(trace_id)
            assert trace_ids[1] == TRACE  # an unsampled parent is continued, unsampled
            [module] = proxy_module_instances()
            assert module.stats() == {
                "continued": 1,
                "started": 1,
                "malformed": 0,
                "sampled": 0,
                "recorded": 0,
            }
            assert module._recorder is None  # OpenTelemetry's SDK never even made
            assert list(proxy_spans.get_finished_spans()) == []
            assert list(service_spans.get_finished_spans()) == []

        asyncio.run(main())


def proxy_module_instances() -> list[Any]:
    from tests.tracing.spans import TracingInMemory

    return TracingInMemory.instances


def test_an_unsampled_parent_is_followed_at_ratio_1_and_a_sampled_one_at_0() -> None:
    service_exporter()
    with proxy_module() as proxy_spans:

        async def main() -> None:
            unsampled = f"traceparent: 00-{TRACE}-{PARENT}-00\r\n"
            [(_, seen)], _ = await through_proxy(1.0, [("/api/a", unsampled)])
            assert seen["traceparent"][0].endswith("-00")
            assert list(proxy_spans.get_finished_spans()) == []

        asyncio.run(main())


def test_header_edits_of_the_headers_module_are_kept_and_errors_recorded() -> None:
    service_exporter()
    with proxy_module() as proxy_spans:

        async def main() -> None:
            extra = (
                '[modules.headers]\nrequest_set = { "x-env" = "prod" }\n'
                'request_add = { "traceparent" = "00-forged" }\n'
            )
            answers, _ = await through_proxy(
                1.0, [("/api/a", "X-Env: dev\r\n"), ("/api/fail", ""), ("/nowhere", "")], extra
            )
            (status, seen), (failed, _), (missing, _) = answers
            assert status == 200 and seen["x-env"] == "prod" and len(seen["traceparent"]) == 1
            assert (failed, missing) == (503, 404)
            spans = await spans_of(proxy_spans, 3)
            by_path = {span.attributes["url.path"]: span for span in spans}  # type: ignore[index]
            assert by_path["/api/fail"].status.status_code == StatusCode.ERROR
            assert by_path["/api/fail"].attributes["http.response.status_code"] == 503  # type: ignore[index]
            # No route: recorded all the same, with what is known.
            unrouted = by_path["/nowhere"]
            assert unrouted.name == "GET"
            assert unrouted.attributes["http.response.status_code"] == 404  # type: ignore[index]
            assert "pitcher.route" not in unrouted.attributes  # type: ignore[operator]

        asyncio.run(main())


@pytest.mark.parametrize("ratio", [1.0, 0.0])
def test_the_access_log_names_the_trace_the_service_was_sent(ratio: float, tmp_path: Any) -> None:
    """A trace the proxy started or replaced is logged, not the client's (absent or malformed)."""
    service_exporter()  # the service's spans stay in memory
    log = tmp_path / "access.log"
    extra = f'exporter = "none"\n\n[modules.access_log]\npath = "{log}"\nflush_interval = 0.02\n'
    requests = [("/api/new", ""), ("/api/bad", "traceparent: 00-not-a-trace-01\r\n")]
    requests.append(("/api/kept", f"traceparent: 00-{TRACE}-{PARENT}-01\r\n"))

    async def main() -> list[str]:
        answers, _ = await through_proxy(ratio, requests, extra)
        await asyncio.sleep(0.2)  # the log's flush
        return [seen["traceparent"][0].split("-")[1] for _, seen in answers]

    sent = asyncio.run(main())
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["trace_id"] for line in lines] == sent
    assert sent[2] == TRACE and len(set(sent)) == 3


def test_the_proxy_s_span_says_https_on_a_tls_listener(tmp_path: Path) -> None:
    ca = trustme.CA()
    pair = tmp_path / "pair.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pair))
    tls = f'[server.tls]\ncertificate = "{pair}"\nkey = "{pair}"\n'
    client = ssl.create_default_context()
    ca.configure_trust(client)
    with proxy_module() as proxy_spans:

        async def main() -> None:
            async with (
                serving(traced_service()) as [node],
                running_proxy(CONFIG.format(node=node, ratio=1.0, extra=tls)) as (_, port),
            ):
                reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
                writer.write(b"GET /api/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                answer = await reader.read()
                writer.close()
                assert answer.startswith(b"HTTP/1.1 200"), answer
                [proxy] = await spans_of(proxy_spans, 1)
                assert dict(proxy.attributes or {})["url.scheme"] == "https"

        asyncio.run(main())
