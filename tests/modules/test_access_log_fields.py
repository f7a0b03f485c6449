"""access_log: the fields beside the times (host, user agent, protocol, request size,
retries, the reason a request failed, trace id), a chosen field list, and refusals
in the same format.

A proxy in the test's event loop before real backends on loopback: SDK
services that answer, fail, stall or drop their connection, a bare transport
handler that answers what no SDK would, and a port nobody listens on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pitcher_rpc.modules.access_log import AccessLog, trace_id
from pitcher_rpc.modules.base import FAILURES
from pitcher_rpc.pb import pitcher_pb2
from pitcher_rpc.proxy.exchange import _failure_of
from pitcher_rpc.proxy.glue import Refusal
from pitcher_rpc.sdk import Request, Response, Service
from tests.inprocess import assert_module_refuses, running_proxy, serving
from tests.modules.test_access_log import FIELDS
from tests.proxy.conftest import free_port
from transports.base import Server, ServerOptions
from transports.errors import (
    Closed,
    ConnectError,
    ConnectionLost,
    DeadlineExceeded,
    ErrorCode,
    Overloaded,
    Rejected,
    RemoteError,
    RequestTooLarge,
    TransportError,
)
from transports.registry import transport_for

CONFIG = """
[server]
listen = "127.0.0.1:0"
header_timeout = 2.0

[modules.access_log]
path = {path}
flush_interval = 0.02
{settings}

[[routes]]
name = "app"
prefix = "/app/"
cluster = "app"

[[routes]]
name = "slow"
prefix = "/slow/"
cluster = "app"
timeout = 0.1

[[routes]]
name = "dead"
prefix = "/dead/"
cluster = "dead"

[[routes]]
name = "raw"
prefix = "/raw/"
cluster = "raw"

[[routes]]
name = "dropping"
prefix = "/dropping/"
cluster = "dropping"
retries = 0

[[routes]]
name = "narrow"
prefix = "/narrow/"
cluster = "narrow"
retries = 0

[clusters.app]
nodes = ["{app}"]

[clusters.dead]
nodes = ["{dead}"]

[clusters.raw]
nodes = ["{raw}"]

[clusters.dropping]
nodes = ["{dropping}"]

[clusters.narrow]
nodes = ["{narrow}"]
"""

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE}-00f067aa0ba902b7-01"

app = Service("access-log-fields")
calls: dict[str, int] = {}


@app.route("/app/flaky")
def flaky(request: Request) -> Response:
    """Fails its first call for each query, answers the next."""
    calls[request.query] = calls.get(request.query, 0) + 1
    if calls[request.query] == 1:
        raise RuntimeError("the first call fails")
    return Response(200, "second time lucky")


@app.route("/app/broken")
def broken(request: Request) -> Response:
    raise RuntimeError("always fails")


@app.route("/slow/")
async def slow(request: Request) -> Response:
    await asyncio.sleep(2)
    return Response(200, "too late")


@app.route("/")
def fine(request: Request) -> Response:
    return Response(200, "fine")


dropping = Service("drops-its-connections")
dropping_servers: list[Server] = []


@dropping.route("/")
async def drop(request: Request) -> Response:
    # Every connection of this server goes at once, this request's among them.
    dropping_servers[0].abort()
    await asyncio.sleep(1)
    return Response(200, "never sent")


narrow = Service("one-at-a-time")


@narrow.route("/")
async def hold(request: Request) -> Response:
    await asyncio.sleep(0.3)
    return Response(200, "held")


def raw_answer(payload: bytes) -> bytes:
    """A bare transport handler: answers what the query asks, valid or not."""
    query = pitcher_pb2.Request.FromString(payload).query
    if query == b"garbage":
        return b"\xff\xff\xff not a protobuf Response"
    return pitcher_pb2.Response(status=int(query)).SerializeToString()


def closed_port() -> int:
    return free_port()


@contextlib.asynccontextmanager
async def proxy_before_backends(path: str, settings: str = "") -> AsyncIterator[int]:
    local = "tcp://127.0.0.1:0"
    servers = [await transport_for(local).serve(local, raw_answer)]
    try:
        servers.append(await dropping.serve(local))
        dropping_servers[:] = servers[-1:]
        # One request at a time, and a frame limit below the proxy's body limit; over
        # UDP, since a stream client never sends past the in-flight limit it was told.
        options = ServerOptions(65536, max_in_flight=1)
        servers.append(await narrow.serve("udp://127.0.0.1:0", options))
        raw, dropping_node, narrow_node = (server.address for server in servers)
        async with serving(app) as [app_node]:
            text = CONFIG.format(
                path=json.dumps(path),
                settings=settings,
                app=app_node,
                dead=f"tcp://127.0.0.1:{closed_port()}",
                raw=raw,
                dropping=dropping_node,
                narrow=narrow_node,
            )
            async with running_proxy(text) as (_, port):
                yield port
    finally:
        for server in servers:
            await server.close(0.5)


async def exchange(port: int, data: bytes) -> int:
    """Send ``data`` on a new connection; the status of the answer (read until closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return int(answer.split(b" ", 2)[1])


def request(
    target: str, *headers: str, version: str = "1.1", method: str = "GET", body: bytes = b""
) -> bytes:
    lines = [f"{method} {target} HTTP/{version}", "Host: logged.example", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join([*lines, "Connection: close", "", ""])).encode("latin-1") + body


def lines_of(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file]


def by_path(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {line["path"]: line for line in lines}


# ------------------------------------------------------------------- the new fields


def test_host_user_agent_protocol_size_and_trace_id(tmp_path: Any) -> None:
    path = str(tmp_path / "access.log")
    sent: dict[str, bytes] = {
        "/app/a": request("/app/a", "User-Agent: curl/8.5.0", f"traceparent: {TRACEPARENT}"),
        "/app/b": request("/app/b", "User-Agent: caf\xe9/1", version="1.0"),
        "/app/c": request("/app/c", "traceparent: 00-xyz", method="POST", body=b"x" * 300),
        "/app/d": request("/app/d", f"traceparent: {TRACEPARENT}", f"traceparent: {TRACEPARENT}"),
        "/app/e": request("/app/e", f"traceparent: {TRACEPARENT.upper()}"),
    }

    async def main() -> None:
        async with proxy_before_backends(path) as port:
            for data in sent.values():
                assert await exchange(port, data) == 200

    asyncio.run(main())
    lines = by_path(lines_of(path))
    assert sorted(lines) == sorted(sent)
    for target, data in sent.items():
        line = lines[target]
        assert line["host"] == "logged.example"
        # Every byte of the request as sent: no optional white space, no chunks here.
        assert line["request_bytes"] == len(data), target
        assert (line["retries"], line["reason"], line["detail"]) == (0, None, None)
    assert (lines["/app/a"]["user_agent"], lines["/app/a"]["protocol"]) == (
        "curl/8.5.0",
        "HTTP/1.1",
    )
    assert lines["/app/a"]["trace_id"] == TRACE
    # A byte outside ASCII is escaped, as in every string field.
    assert lines["/app/b"]["user_agent"] == "caf\xe9/1"
    assert lines["/app/b"]["protocol"] == "HTTP/1.0"
    assert lines["/app/b"]["trace_id"] is None  # absent
    assert lines["/app/c"]["user_agent"] is None
    assert lines["/app/c"]["trace_id"] is None  # malformed
    assert lines["/app/d"]["trace_id"] is None  # two: which one counts is not known
    assert lines["/app/e"]["trace_id"] is None  # upper case is malformed (W3C)
    with open(path, encoding="utf-8") as file:
        assert '"user_agent":"caf\\u00e9/1"' in file.read()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (TRACEPARENT, TRACE),
        (f"01-{TRACE}-00f067aa0ba902b7-01-what-comes-later", TRACE),  # a later version
        (f"00-{TRACE}-00f067aa0ba902b7-01-extra", None),  # version 00 has exactly 4 fields
        (f"ff-{TRACE}-00f067aa0ba902b7-01", None),
        (f"00-{'0' * 32}-00f067aa0ba902b7-01", None),
        (f"00-{TRACE}-{'0' * 16}-01", None),
        (f"00-{TRACE[:-1]}g-00f067aa0ba902b7-01", None),
        (f"00_{TRACE}-00f067aa0ba902b7-01", None),
        (f"00-{TRACE}-00f067aa0ba902b7", None),
        ("", None),
    ],
)
def test_trace_id_of_traceparent(value: str, expected: str | None) -> None:
    assert trace_id(value.encode()) == expected


# ------------------------------------------------------------ why a request failed


def test_each_failure_has_its_reason_and_retries_are_counted(tmp_path: Any) -> None:
    path = str(tmp_path / "access.log")
    calls.clear()

    async def main() -> None:
        async with proxy_before_backends(path) as port:
            assert await exchange(port, request("/app/flaky?once")) == 200
            assert await exchange(port, request("/app/broken")) == 502
            assert await exchange(port, request("/slow/x")) == 504
            assert await exchange(port, request("/dead/x")) == 502
            assert await exchange(port, request("/raw/x?garbage")) == 502
            assert await exchange(port, request("/raw/x?600")) == 502
            assert await exchange(port, request("/dropping/x", method="POST", body=b"y")) == 502
            big = b"z" * 600_000
            assert await exchange(port, request("/narrow/big", method="POST", body=big)) == 413
            # One at a time: the second, sent while the first is held, finds no room.
            first = asyncio.ensure_future(exchange(port, request("/narrow/first")))
            await asyncio.sleep(0.1)
            assert await exchange(port, request("/narrow/second")) == 503
            assert await first == 200

    asyncio.run(main())
    lines = by_path(lines_of(path))
    seen = {
        target: (line["status"], line["reason"], line["retries"]) for target, line in lines.items()
    }
    assert seen == {
        "/app/flaky?once": (200, None, 1),  # failed once, answered on the retry
        "/app/broken": (502, "error", 1),
        "/slow/x": (504, "timeout", 0),
        "/dead/x": (502, "connect", 0),
        "/raw/x?garbage": (502, "bad_answer", 0),
        "/raw/x?600": (502, "bad_answer", 0),
        "/dropping/x": (502, "reset", 0),
        "/narrow/big": (413, "too_large", 0),
        "/narrow/first": (200, None, 0),
        "/narrow/second": (503, "overloaded", 0),
    }


# ------------------------------------------------------ the field list, and refusals


def test_a_chosen_field_list_orders_every_line_refusals_too(tmp_path: Any) -> None:
    path = str(tmp_path / "access.log")
    fields = ["status", "reason", "trace_id", "time", "host", "path"]

    async def main() -> None:
        async with proxy_before_backends(path, f"fields = {json.dumps(fields)}") as port:
            assert await exchange(port, request("/app/x", f"traceparent: {TRACEPARENT}")) == 200
            assert await exchange(port, request("/dead/y")) == 502
            assert await exchange(port, b"NOT HTTP AT ALL\r\n\r\n") == 400
            assert await exchange(port, request("/app/z", "X-Big: " + "b" * 40000)) == 431

    asyncio.run(main())
    with open(path, encoding="utf-8") as file:
        raw = file.read().splitlines()
    lines = [json.loads(text) for text in raw]
    assert [list(line) for line in lines] == [fields] * 4
    ok, failed, bad, big = lines
    assert (ok["status"], ok["reason"], ok["trace_id"], ok["host"]) == (
        200,
        None,
        TRACE,
        "logged.example",
    )
    assert (failed["status"], failed["reason"], failed["trace_id"]) == (502, "connect", None)
    assert (bad["status"], bad["reason"], bad["path"], bad["host"]) == (
        400,
        "bad_request",
        None,
        None,
    )
    assert (big["status"], big["reason"], big["path"]) == (431, "headers_too_large", "/app/z")
    for text in raw:  # the time is where it was asked for, and only once
        assert text.count('"time":') == 1 and text.index('"time":') > text.index('"trace_id":')


def test_a_refusal_has_every_field_null_where_it_has_nothing(tmp_path: Any) -> None:
    path = str(tmp_path / "access.log")

    async def main() -> None:
        async with proxy_before_backends(path) as port:
            assert await exchange(port, request("/app/z", "X-Big: " + "b" * 40000)) == 431

    asyncio.run(main())
    [line] = lines_of(path)
    assert list(line) == list(FIELDS)
    assert (line["status"], line["reason"]) == (431, "headers_too_large")
    assert (line["method"], line["path"], line["client"]) == ("GET", "/app/z", "127.0.0.1")
    assert line["bytes"] > 0 and "too large" in line["detail"]
    known = {"time", "client", "method", "path", "status", "bytes", "reason", "detail"}
    assert all(value is None for key, value in line.items() if key not in known), line


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ('path = "a.log"\nfields = ["status", "nope"]', "fields: unknown field 'nope' (the fields"),
        ('path = "a.log"\nfields = ["status", 3]', "fields: unknown field 3"),
        ('path = "a.log"\nfields = ["time", "status", "time"]', "fields: 'time' is listed twice"),
        ('path = "a.log"\nfields = []', "fields must be a non-empty list of field names"),
        ('path = "a.log"\nfields = "status"', "fields must be a non-empty list of field names"),
    ],
)
def test_a_bad_field_list_is_refused_at_its_line(section: str, message: str) -> None:
    error = assert_module_refuses("access_log", section, message)
    assert error.key == "fields"


def test_any_order_writes_the_same_values_as_the_default(tmp_path: Any) -> None:
    """The default line is written by its own code; any other list by a template: they agree."""
    default = list(FIELDS)
    sent = [
        request("/app/a?x=1", "User-Agent: ua/1", f"traceparent: {TRACEPARENT}"),
        request("/app/b", version="1.0", method="POST", body=b"body"),
        request("/dead/c", "X-Request-Id: fixed-id"),
        b"NOT HTTP AT ALL\r\n\r\n",
    ]
    written: dict[str, list[dict[str, Any]]] = {}
    for name, fields in (("default", default), ("reversed", default[::-1])):
        path = str(tmp_path / f"{name}.log")

        async def main(path: str = path, fields: list[str] = fields) -> None:
            async with proxy_before_backends(path, f"fields = {json.dumps(fields)}") as port:
                for data in sent:
                    await exchange(port, data)

        asyncio.run(main())
        written[name] = lines_of(path)
    assert [list(line) for line in written["reversed"]] == [default[::-1]] * len(sent)
    # What differs from run to run: when, how long, the node's port, a made request id.
    # A made request id is a process-wide counter in hex, echoed in the answer:
    # its length (and so the answer's) may grow by a digit between the two runs.
    varying = {"time", "total", "backend", "residence", "node", "request_id", "bytes"}
    for first, second in zip(written["default"], written["reversed"], strict=True):
        assert first["bytes"] - len(first["request_id"] or "") == second["bytes"] - len(
            second["request_id"] or ""
        )
        assert {k: v for k, v in first.items() if k not in varying} == {
            k: v for k, v in second.items() if k not in varying
        }
    assert [line["status"] for line in written["default"]] == [200, 200, 502, 400]


@pytest.mark.parametrize(
    ("fields", "pattern"),
    [
        (["status"], r'\{"status":431\}'),
        (["time"], r'\{"time":"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"\}'),
        (["reason", "time", "bytes"], r'\{"reason":"headers_too_large","time":"[^"]+","bytes":7\}'),
    ],
)
def test_one_field_or_a_few(fields: list[str], pattern: str) -> None:
    module = AccessLog({"path": "unused.log", "fields": fields})
    refusal = Refusal(431, "headers_too_large", "too large", b"127.0.0.1", response_bytes=7)
    assert re.fullmatch(pattern, module._refusal_line(refusal))


@pytest.mark.parametrize(
    ("error", "failure"),
    [
        (ConnectError("tcp://n:1: connection refused"), "connect"),
        (DeadlineExceeded("no answer before the deadline"), "timeout"),
        (ConnectionLost("connection to tcp://n:1 lost"), "reset"),
        (
            ConnectionLost("protocol error: frame of 9000 bytes exceeds the limit of 4096"),
            "too_large",
        ),
        (RemoteError(ErrorCode.INTERNAL, "RuntimeError: boom"), "error"),
        (RemoteError(ErrorCode.FRAME_TOO_LARGE, "too large"), "too_large"),
        (Overloaded("more than 1 requests in flight"), "overloaded"),
        (Rejected("the node is shutting down"), "rejected"),
        (RequestTooLarge("request of 9 bytes exceeds the node's frame limit"), "too_large"),
        (Closed("client closed"), "shutdown"),
    ],
)
def test_every_transport_error_has_its_reason(error: TransportError, failure: str) -> None:
    """Each error a node's call can end with, including those hard to cause on purpose
    (a node's GOAWAY race, the proxy's own stop), names one of the fixed reasons."""
    assert _failure_of(error) == failure
    assert failure in FAILURES
