"""Handlers' Context and the checks of what a handler returns, without sockets.

The same through a real proxy and ``pitcher backend``: test_served_checks.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import pytest

from pitcher_rpc.pb import pitcher_pb2
from pitcher_rpc.sdk import Context, InvalidResponse, Request, Response, Service
from tests.sdk.test_service import answer, payload


def _run(app: Service, request: bytes, deadline_ms: int = 0) -> bytes:
    async def respond() -> bytes:
        result = app.respond(request, deadline_ms)
        return result if isinstance(result, bytes) else await result

    return asyncio.run(respond())


def test_a_handler_with_a_second_parameter_gets_the_context() -> None:
    seen: list[Context] = []
    app = Service("ctx")

    @app.route("/")
    def handler(request: Request, context: Context) -> dict[str, Any]:
        seen.append(context)
        return {"remaining": context.remaining()}

    request = payload(headers=[(b"x-request-id", b"r-1")])
    _run(app, request, deadline_ms=500)
    remaining = seen[0].remaining()
    assert remaining is not None and 0.3 < remaining <= 0.5
    assert seen[0].request_id == "r-1"
    assert not seen[0].cancelled
    _run(app, payload(headers=[]))
    assert seen[1].remaining() is None and seen[1].deadline is None
    assert seen[1].request_id == ""


def test_the_context_is_cancelled_once_the_deadline_has_passed() -> None:
    contexts: list[Context] = []

    async def handler(request: Request, context: Context) -> bytes:
        contexts.append(context)
        return b""

    app = Service("late", handler=handler)
    _run(app, payload(), deadline_ms=20)
    assert not contexts[0].cancelled
    time.sleep(0.03)
    assert contexts[0].cancelled and contexts[0].remaining() == 0.0


def test_the_context_of_a_handler_cancelled_where_it_waits_says_so() -> None:
    contexts: list[Context] = []

    async def handler(request: Request, context: Context) -> bytes:
        contexts.append(context)
        await asyncio.sleep(5)
        return b""

    async def scenario() -> None:
        answer = Service("cancel", handler=handler).respond(payload())
        assert not isinstance(answer, bytes)
        task = asyncio.ensure_future(answer)
        await asyncio.sleep(0.01)
        assert not contexts[0].cancelled
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert contexts[0].cancelled


@pytest.mark.parametrize(
    "handler",
    [
        lambda request: {"one": 1},
        lambda request, extra=None: {"one": 1},
        lambda *args: {"one": len(args)},
    ],
)
def test_handlers_that_do_not_require_a_second_argument_are_called_with_the_request(
    handler: Any,
) -> None:
    response = answer(Service("plain", handler=handler), payload())
    assert response.body == b'{"one": 1}'


def test_handle_gives_a_context_too() -> None:
    app = Service("handle", handler=lambda request, context: context.request_id or "none")
    response = asyncio.run(app.handle(Request("GET", "/", headers=[("X-Request-Id", "h")])))
    assert response.body == "h"


@pytest.mark.parametrize(
    ("response", "why"),
    [
        (Response(200, b"", [("bad name", "v")]), "header name 'bad name' is not an HTTP token"),
        (Response(200, b"", [("", "v")]), "header name '' is not an HTTP token"),
        (Response(200, b"", [("x-a", "a\r\nb: c")]), "value of header 'x-a'"),
        (Response(200, b"", [("x-a", "a\0b")]), "value of header 'x-a'"),
        (Response(200, b"", [("x-a", " padded")]), "value of header 'x-a'"),
        (Response(200, "text", {"x-a": "caf\u20ac"}), "latin-1"),
        (Response.json([], headers=[("x:y", "1")]), "header name 'x:y'"),
        (Response(101), "status 101 is not a final HTTP status"),
        (Response(199, b"", [("content-type", "application/json")]), "status 199"),
        (Response(600), "status 600"),
    ],
)
def test_a_response_the_proxy_would_refuse_fails_and_names_its_handler(
    response: Response, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    def refused(request: Request) -> Response:
        return response

    with (
        caplog.at_level(logging.ERROR, logger="pitcher.sdk"),
        pytest.raises(InvalidResponse, match=why.replace("(", r"\(")),
    ):
        Service("bad", handler=refused).respond(payload())
    assert "refused" in caplog.text and why in caplog.text


def test_valid_odd_headers_are_sent() -> None:
    ok = Response(200, b"", [("x-tab", "a\tb"), ("x-latin", "caf\xe9"), ("x-empty", "")])
    parsed = pitcher_pb2.Response.FromString(ok.encode())
    assert list(parsed.header_values) == [b"a\tb", b"caf\xe9", b""]


def test_an_answer_over_the_frame_limit_is_logged_with_its_handler(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def big(request: Request) -> bytes:
        return b"x" * 5_000_000

    with caplog.at_level(logging.ERROR, logger="pitcher.sdk"):
        answer_bytes = _run(Service("big", handler=big), payload())
    assert len(answer_bytes) > 5_000_000  # the transport, not the SDK, refuses to send it
    assert "big answered" in caplog.text
    assert "over the frame limit of 4194304 bytes" in caplog.text


@pytest.mark.parametrize("scheme", ["tcp", "udp", "zmq+tcp"])
def test_a_served_handler_gets_the_callers_deadline_and_a_plain_one_still_runs(
    scheme: str,
) -> None:
    """Through a real server and client: the REQUEST frame's deadline_ms reaches the Context."""
    from transports.registry import transport_for

    app = Service("served")

    @app.route("/context")
    def with_context(request: Request, context: Context) -> dict[str, Any]:
        return {"remaining": context.remaining()}

    @app.route("/plain")
    def plain(request: Request) -> str:
        return "plain"

    async def scenario() -> None:
        server = await app.serve(f"{scheme}://127.0.0.1:0")
        client = transport_for(server.address).client(server.address)
        try:
            timed = pitcher_pb2.Response.FromString(
                await client.call(payload(path=b"/context"), 2.0)
            )
            remaining = json.loads(timed.body)["remaining"]
            assert 1.5 < remaining <= 2.0
            endless = pitcher_pb2.Response.FromString(
                await client.call(payload(path=b"/context"), 100 * 86400.0)
            )
            assert json.loads(endless.body) == {"remaining": None}
            bare = pitcher_pb2.Response.FromString(await client.call(payload(path=b"/plain"), 2.0))
            assert bare.body == b"plain"
        finally:
            client.abort()
            server.abort()

    asyncio.run(asyncio.wait_for(scenario(), 10.0))
