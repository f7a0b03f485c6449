"""The SDK's server path: a Request payload in, a Response payload out.

Most tests call ``Service.respond`` (what the transports run) on payloads the
proxy's codec writes and read the answer with the generated class; the last
ones serve a Service on a real Unix socket.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import tempfile
from typing import Any

import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from pitcher_rpc.codec import encode_request
from pitcher_rpc.pb import pitcher_pb2
from pitcher_rpc.sdk import Headers, Request, Response, Service
from pitcher_rpc.sdk.service import json_bytes
from transports.errors import ErrorCode, RemoteError
from transports.stream import StreamClient

HEADERS = [(b"host", b"example"), (b"X-Many", b"1"), (b"x-many", b"2"), (b"x-latin", b"caf\xe9")]


def payload(
    method: bytes = b"GET",
    path: bytes = b"/hello",
    query: bytes = b"",
    headers: list[tuple[bytes, bytes]] = HEADERS,
    body: bytes = b"",
) -> bytes:
    return encode_request(
        method,
        path,
        query,
        [name for name, _ in headers],
        [value for _, value in headers],
        body,
        "route-a",
        "127.0.0.1:5000",
    )


def answer(app: Service, request: bytes) -> pitcher_pb2.Response:
    """The Response the service gives, run in a loop as a server runs it."""

    async def respond() -> bytes:
        result = app.respond(request)
        return result if isinstance(result, bytes) else await result

    return pitcher_pb2.Response.FromString(asyncio.run(respond()))


def header_pairs(response: pitcher_pb2.Response) -> list[tuple[bytes, bytes]]:
    return list(zip(response.header_names, response.header_values, strict=True))


def recording_service() -> tuple[Service, list[Request]]:
    seen: list[Request] = []
    app = Service("record")

    @app.route("/")
    def record(request: Request) -> bytes:
        seen.append(request)
        return b"ok"

    return app, seen


# ----------------------------------------------------------------------------- Request


def test_the_handler_gets_every_field_of_the_request() -> None:
    app, seen = recording_service()
    response = answer(app, payload(b"POST", b"/a/b", b"x=1&y=&x=3", body=b"\x00\xff"))
    assert response.status == 200 and response.body == b"ok"
    [request] = seen
    assert (request.method, request.path, request.query) == ("POST", "/a/b", "x=1&y=&x=3")
    assert request.body == b"\x00\xff"
    assert (request.route, request.client) == ("route-a", "127.0.0.1:5000")
    assert request.query_params == {"x": "3", "y": ""}
    assert request.query_params is request.query_params  # parsed once


def test_headers_are_decoded_only_when_the_handler_reads_them() -> None:
    app, seen = recording_service()
    app.respond(payload())
    [request] = seen
    assert request._headers is None
    headers = request.headers
    assert request.headers is headers
    assert headers.items_list() == [
        ("host", "example"),
        ("x-many", "1"),
        ("x-many", "2"),
        ("x-latin", "café"),
    ]


def test_headers_are_a_case_insensitive_mapping_keeping_repeats() -> None:
    app, seen = recording_service()
    app.respond(payload())
    headers = seen[0].headers
    assert headers["X-MANY"] == "1" and headers.get("x-many") == "1"
    assert headers.get_all("X-Many") == ["1", "2"]
    assert headers.get("absent") is None and headers.get("absent", "d") == "d"
    assert "HOST" in headers and "absent" not in headers and 3 not in headers
    assert list(headers) == ["host", "x-many", "x-latin"] and len(headers) == 3
    assert dict(headers) == {"host": "example", "x-many": "1", "x-latin": "café"}
    with pytest.raises(KeyError):
        headers["absent"]


def test_a_nul_inside_a_header_keeps_names_and_values_paired() -> None:
    app, seen = recording_service()
    app.respond(payload(headers=[(b"a\x00b", b"1"), (b"c", b"2\x003")]))
    assert seen[0].headers.items_list() == [("a\x00b", "1"), ("c", "2\x003")]


def test_no_headers_at_all() -> None:
    app, seen = recording_service()
    app.respond(payload(headers=[]))
    assert seen[0].headers.items_list() == [] and len(seen[0].headers) == 0


def test_a_request_built_by_hand_works_as_one_from_the_wire() -> None:
    request = Request("GET", "/p", "a=1", [("Host", "h")], b'{"k": 2}', "r", "c")
    assert request.headers.items_list() == [("host", "h")]
    assert request.json() == {"k": 2} and request.text() == '{"k": 2}'
    assert Request("GET", "/").headers.items_list() == []
    request.headers = Headers([("A", "b")])
    assert request.headers["a"] == "b"
    assert "'/p'" in repr(request)


def test_a_payload_that_does_not_decode_fails_the_request() -> None:
    app, _ = recording_service()
    with pytest.raises(ValueError, match="undecodable request"):
        app.respond(b"\x0a\x09GE")


# ----------------------------------------------------------------------------- routes


def routed_service() -> Service:
    app = Service("routes")

    @app.route("/")
    def root(request: Request) -> str:
        return "root"

    @app.route("/api")
    def api(request: Request) -> str:
        return "api"

    @app.route("/api/items", methods=["post", "PUT"])
    def items(request: Request) -> str:
        return "items"

    @app.route("/only-get", methods=["GET"])
    def only_get(request: Request) -> str:
        return "only-get"

    return app


@pytest.mark.parametrize(
    ("method", "path", "status", "body"),
    [
        (b"GET", b"/", 200, b"root"),
        (b"GET", b"/elsewhere", 200, b"root"),
        (b"GET", b"/api/x", 200, b"api"),
        (b"POST", b"/api/items/1", 200, b"items"),
        (b"PUT", b"/api/items", 200, b"items"),
        # The longest prefix does not take GET: the next one that matches does.
        (b"GET", b"/api/items", 200, b"api"),
        (b"GET", b"/only-get", 200, b"only-get"),
        (b"DELETE", b"/only-get", 200, b"root"),
    ],
)
def test_the_longest_matching_prefix_that_takes_the_method_answers(
    method: bytes, path: bytes, status: int, body: bytes
) -> None:
    response = answer(routed_service(), payload(method, path))
    assert (response.status, response.body) == (status, body)


def test_no_route_is_404_and_no_method_is_405() -> None:
    app = Service("narrow")
    app.route("/a", methods=["GET"])(lambda request: "a")
    missing = answer(app, payload(b"GET", b"/b"))
    assert (missing.status, missing.body) == (404, b"not found\n")
    refused = answer(app, payload(b"POST", b"/a"))
    assert (refused.status, refused.body) == (405, b"method not allowed\n")
    assert header_pairs(refused) == [(b"content-type", b"text/plain; charset=utf-8")]


def test_a_single_root_route_serves_every_path_and_a_second_route_is_honoured() -> None:
    app = Service("one", handler=lambda request: request.path)
    assert answer(app, payload(path=b"/x/y")).body == b"/x/y"
    app.route("/z")(lambda request: "z")
    assert answer(app, payload(path=b"/z1")).body == b"z"
    assert answer(app, payload(path=b"/x")).body == b"/x"


# ----------------------------------------------------------------------------- results


class _Text(str):
    pass


@pytest.mark.parametrize(
    ("result", "status", "headers", "body"),
    [
        ({"a": [1, "é"]}, 200, [(b"content-type", b"application/json")], b'{"a": [1, "\\u00e9"]}'),
        ([1, 2], 200, [(b"content-type", b"application/json")], b"[1, 2]"),
        (7, 200, [(b"content-type", b"application/json")], b"7"),
        ("héllo", 200, [(b"content-type", b"text/plain; charset=utf-8")], "héllo".encode()),
        (b"\x00raw", 200, [], b"\x00raw"),
        (_Text("sub"), 200, [(b"content-type", b"text/plain; charset=utf-8")], b"sub"),
        (None, 204, [], b""),
        (
            Response(201, b"made", {"x-a": "1", "x-b": "2"}),
            201,
            [(b"x-a", b"1"), (b"x-b", b"2")],
            b"made",
        ),
        (
            Response(202, "text", [("Content-Type", "text/csv")]),
            202,
            [(b"Content-Type", b"text/csv")],
            b"text",
        ),
        (
            Response.json({"k": None}, status=404),
            404,
            [(b"content-type", b"application/json")],
            b'{"k": null}',
        ),
        (Response(299, b"", [("x-odd", "caf\xe9")]), 299, [(b"x-odd", b"caf\xe9")], b""),
        (Response(), 200, [], b""),
        (Response(599, b"x" * 200), 599, [], b"x" * 200),
        (
            Response.json([], headers={"cache-control": "no-store"}),
            200,
            [(b"content-type", b"application/json"), (b"cache-control", b"no-store")],
            b"[]",
        ),
        (
            Response.json(1, 201, [("Content-Type", "application/problem+json")]),
            201,
            [(b"Content-Type", b"application/problem+json")],
            b"1",
        ),
    ],
)
def test_what_a_handler_returns_becomes_the_response(
    result: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    for handler in (lambda request: result, _async_returning(result)):
        response = answer(Service("r", handler=handler), payload())
        assert (response.status, header_pairs(response), response.body) == (status, headers, body)


def _async_returning(result: Any) -> Any:
    async def handler(request: Request) -> Any:
        return result

    return handler


def test_a_handler_that_waits_answers_through_an_awaitable() -> None:
    async def slow(request: Request) -> dict[str, str]:
        await asyncio.sleep(0.01)
        await asyncio.sleep(0)
        return {"path": request.path}

    async def scenario() -> bool:
        result = Service("slow", handler=slow).respond(payload())
        if isinstance(result, bytes):
            return True
        result.close()  # type: ignore[attr-defined]
        return False

    assert not asyncio.run(scenario())
    assert json.loads(answer(Service("slow", handler=slow), payload()).body) == {"path": "/hello"}


def test_a_sync_handler_may_return_an_awaitable() -> None:
    async def later() -> str:
        await asyncio.sleep(0)
        return "later"

    class Handler:  # a callable object whose __call__ is a coroutine function
        async def __call__(self, request: Request) -> str:
            return "called"

    assert answer(Service("s", handler=lambda request: later()), payload()).body == b"later"
    assert answer(Service("s", handler=Handler()), payload()).body == b"called"


def test_handle_payload_is_respond_awaited() -> None:
    async def waits(request: Request) -> str:
        await asyncio.sleep(0)
        return "waited"

    async def scenario() -> tuple[bytes, bytes]:
        quick = await Service("q", handler=lambda request: "quick").handle_payload(payload())
        slow = await Service("w", handler=waits).handle_payload(payload())
        return quick, slow

    quick, slow = asyncio.run(scenario())
    assert pitcher_pb2.Response.FromString(quick).body == b"quick"
    assert pitcher_pb2.Response.FromString(slow).body == b"waited"


def test_handle_runs_a_request_built_by_hand() -> None:
    app = routed_service()

    async def scenario() -> list[Response]:
        return [
            await app.handle(Request("GET", "/api")),
            await app.handle(Request("DELETE", "/api/items")),
        ]

    found, refused = asyncio.run(scenario())
    assert (found.status, found.body) == (200, "api")
    assert (refused.status, refused.body) == (200, "api")
    narrow = Service("narrow")
    narrow.route("/a", methods=["GET"])(lambda request: {"n": 1})
    missing, not_allowed, ok = asyncio.run(_handle_all(narrow))
    assert (missing.status, not_allowed.status) == (404, 405)
    assert (ok.status, ok.body) == (200, b'{"n": 1}')


async def _handle_all(app: Service) -> list[Response]:
    return [
        await app.handle(Request("GET", "/b")),
        await app.handle(Request("POST", "/a")),
        await app.handle(Request("GET", "/a")),
    ]


def test_a_result_that_is_not_json_fails_the_request_as_json_dumps_would() -> None:
    app = Service("bad", handler=lambda request: {"when": object()})
    with pytest.raises(TypeError, match="not JSON serializable"):
        app.respond(payload())
    looped: list[Any] = []
    looped.append(looped)
    with pytest.raises(ValueError, match="Circular reference"):
        Service("loop", handler=lambda request: looped).respond(payload())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300)
@given(value=json_values)
def test_json_bytes_is_json_dumps(value: Any) -> None:
    assert json_bytes(value) == json.dumps(value).encode()


def test_json_bytes_writes_special_floats_as_json_dumps_does() -> None:
    value = [math.inf, -math.inf, 1e300, 0.1, -0.0]
    assert json_bytes(value) == json.dumps(value).encode()
    keys = {1: "int", 2.5: "float", None: "none", False: "bool"}
    assert json_bytes(keys) == json.dumps(keys).encode()


# ----------------------------------------------------------------------------- served


def test_a_service_on_a_unix_socket_answers_sync_waiting_and_failing_handlers() -> None:
    app = Service("served")

    @app.route("/sync")
    def sync(request: Request) -> dict[str, str]:
        return {"sync": request.headers.get("host", "")}

    @app.route("/wait")
    async def wait(request: Request) -> dict[str, str]:
        await asyncio.sleep(float(request.query_params["s"]))
        return {"waited": request.query}

    @app.route("/fail")
    async def fail(request: Request) -> None:
        raise RuntimeError("broken on purpose")

    async def scenario() -> None:
        with tempfile.TemporaryDirectory() as directory:
            address = f"unix://{os.path.join(directory, 's.sock')}"
            server = await app.serve(address)
            client = StreamClient(address)
            try:
                slow = asyncio.ensure_future(
                    client.call(payload(path=b"/wait", query=b"s=0.05"), 5)
                )
                fast = await client.call(payload(path=b"/sync"), 5)
                assert json.loads(pitcher_pb2.Response.FromString(fast).body) == {"sync": "example"}
                assert not slow.done()  # the waiting handler held nothing up
                body = pitcher_pb2.Response.FromString(await slow).body
                assert json.loads(body) == {"waited": "s=0.05"}
                many = await asyncio.gather(
                    *(client.call(payload(path=b"/sync"), 5) for _ in range(50))
                )
                assert len(set(many)) == 1
                with pytest.raises(RemoteError) as failed:
                    await client.call(payload(path=b"/fail"), 5)
                assert failed.value.code == ErrorCode.INTERNAL
                assert "broken on purpose" in failed.value.remote_message
            finally:
                await client.close(1)
                await server.close(1)

    uvloop.run(asyncio.wait_for(scenario(), 10))
