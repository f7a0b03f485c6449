"""The ASGI adapter on its own: scopes, events and answers, in one process without sockets."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from pitcher_rpc.codec import decode_response, encode_request
from pitcher_rpc.sdk import Service
from pitcher_rpc.sdk.asgi import AppError, AsgiService, LifespanError, as_service, is_asgi_app


def request_payload(
    method: bytes = b"GET",
    path: bytes = b"/a%20b/c",
    query: bytes = b"x=1&y=2",
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
) -> bytes:
    pairs = headers if headers is not None else [(b"host", b"example"), (b"x-request-id", b"r-1")]
    return encode_request(
        method,
        path,
        query,
        [name for name, _ in pairs],
        [value for _, value in pairs],
        body,
        "api",
        "10.0.0.7:5555",
    )


async def call(service: AsgiService, payload: bytes, deadline_ms: int = 0) -> Any:
    return decode_response(await service.respond(payload, deadline_ms))


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


class Recorder:
    """A raw ASGI app that answers with what it saw."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            raise RuntimeError("no lifespan here")
        self.scopes.append(scope)
        event = await receive()
        self.events.append(event)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-a", b"1")]})
        await send({"type": "http.response.body", "body": b"part1,", "more_body": True})
        await send({"type": "http.response.body", "body": b"part2"})
        self.events.append(await receive())


def test_the_scope_and_events_follow_the_asgi_spec() -> None:
    app = Recorder()
    service = AsgiService(app, root_path="/mounted")

    async def scenario() -> Any:
        return await call(service, request_payload(method=b"POST", body=b"hello"), 1500)

    answer = run(scenario())
    assert (answer.status, answer.header_names, answer.header_values, answer.body) == (
        200,
        [b"x-a"],
        [b"1"],
        b"part1,part2",
    )
    [scope] = app.scopes
    assert scope["type"] == "http"
    assert scope["asgi"]["version"] == "3.0"
    assert scope["http_version"] == "1.1"
    assert scope["method"] == "POST"
    # With a root path, as uvicorn: the full path (the app's routing takes root_path off).
    assert scope["path"] == "/mounted/a b/c"
    assert scope["raw_path"] == b"/mounted/a%20b/c"
    assert scope["query_string"] == b"x=1&y=2"
    assert scope["root_path"] == "/mounted"
    assert scope["scheme"] == "http"
    assert scope["client"] == ("10.0.0.7", 5555)
    assert scope["headers"] == [
        (b"host", b"example"),
        (b"x-request-id", b"r-1"),
        (b"content-length", b"5"),
    ]
    extension = scope["extensions"]["pitcher"]
    assert extension["request_id"] == "r-1"
    assert extension["route"] == "api"
    assert 1.0 < extension["deadline"] - time.monotonic() <= 1.5  # 1500 ms from the frame
    assert "state" not in scope  # no lifespan was run
    assert app.events == [
        {"type": "http.request", "body": b"hello", "more_body": False},
        {"type": "http.disconnect"},  # after the response: at once
    ]


def test_an_empty_post_says_content_length_0_and_a_get_none() -> None:
    app = Recorder()
    service = AsgiService(app)

    async def scenario() -> None:
        await call(service, request_payload(method=b"POST", headers=[]))
        await call(service, request_payload(method=b"GET", headers=[]))

    run(scenario())
    assert app.scopes[0]["headers"] == [(b"content-length", b"0")]
    assert app.scopes[1]["headers"] == []


def test_an_app_that_raises_before_answering_gets_a_500(caplog: pytest.LogCaptureFixture) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise KeyError("missing")

    answer = run(call(AsgiService(app), request_payload()))
    assert answer.status == 500
    assert answer.body == b"Internal Server Error"
    assert "Exception in ASGI application" in caplog.text


def test_an_app_that_returns_without_answering_gets_a_500(caplog: pytest.LogCaptureFixture) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        return None

    assert run(call(AsgiService(app), request_payload())).status == 500
    assert "returned without starting a response" in caplog.text


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([{"type": "http.response.start", "status": 101}], "not a final HTTP status"),
        ([{"type": "http.response.start", "status": 200}], "without completing"),
        (
            [{"type": "http.response.start", "status": 200, "headers": [(b"bad name", b"v")]}],
            "header the proxy would refuse",
        ),
    ],
)
def test_answers_the_proxy_would_refuse_fail_the_call(
    messages: list[dict[str, Any]], error: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        for message in messages:
            await send(message)
        if messages[0]["status"] != 200 or messages[0].get("headers"):
            await send({"type": "http.response.body", "body": b"x"})

    with pytest.raises(AppError, match=error):
        run(call(AsgiService(app), request_payload()))
    assert error in caplog.text


def test_an_answer_over_the_frame_limit_fails_with_the_limit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200})
        for _ in range(3):
            await send({"type": "http.response.body", "body": b"y" * 600, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    service = AsgiService(app)
    service._frame_limit = 1000
    with pytest.raises(AppError, match="1800 bytes, over the frame limit of 1000 bytes"):
        run(call(service, request_payload()))


def test_a_cancelled_call_gives_the_app_http_disconnect_and_lets_it_finish() -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        message = await receive()  # waits: nothing comes until the call ends
        seen.append(message["type"])
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"late"})  # ignored
        seen.append("finished")

    async def scenario() -> None:
        service = AsgiService(app)
        waiting = asyncio.ensure_future(service.respond(request_payload()))
        await asyncio.sleep(0.01)
        assert seen == []
        waiting.cancel()  # what the server does on CANCEL or at the deadline
        with pytest.raises(asyncio.CancelledError):
            await waiting
        for _ in range(10):
            await asyncio.sleep(0)
        assert not service._tasks

    run(scenario())
    assert seen == ["http.disconnect", "finished"]


def test_the_answer_does_not_wait_for_what_the_app_does_after_it() -> None:
    done = asyncio.Event

    async def scenario() -> None:
        after = done()

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": 204})
            await send({"type": "http.response.body"})
            await asyncio.sleep(0.05)  # a background task
            after.set()

        service = AsgiService(app)
        answer = decode_response(await service.respond(request_payload()))
        assert answer.status == 204
        assert not after.is_set()
        await asyncio.wait_for(after.wait(), 2)

    run(scenario())


class LifespanApp:
    def __init__(self, fail: str = "") -> None:
        self.fail = fail
        self.log: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                self.log.append(message["type"])
                if message["type"] == "lifespan.startup":
                    if self.fail:
                        await send({"type": "lifespan.startup.failed", "message": self.fail})
                        return
                    scope["state"]["db"] = "connected"
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await receive()
        state = scope["state"]
        state["mutated"] = True  # a copy: the next request does not see it
        body = repr(sorted(state.items())).encode()
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": body})


def test_lifespan_state_reaches_each_request_as_a_copy() -> None:
    app = LifespanApp()

    async def scenario() -> list[bytes]:
        service = AsgiService(app)
        await service.startup()
        bodies = [(await call(service, request_payload())).body for _ in range(2)]
        await service.shutdown()
        return bodies

    first, second = run(scenario())
    assert first == second == b"[('db', 'connected'), ('mutated', True)]"
    assert app.log == ["lifespan.startup", "lifespan.shutdown"]


def test_a_failed_startup_raises_the_apps_message() -> None:
    async def scenario() -> None:
        await AsgiService(LifespanApp(fail="no database")).startup()

    with pytest.raises(LifespanError, match="no database"):
        run(scenario())


def test_an_app_without_lifespan_is_served_unless_lifespan_is_required() -> None:
    async def scenario(lifespan: str) -> int:
        service = AsgiService(Recorder(), lifespan=lifespan)
        await service.startup()
        status = (await call(service, request_payload())).status
        await service.shutdown()
        return int(status)

    assert run(scenario("auto")) == 200
    with pytest.raises(LifespanError, match="does not support the lifespan protocol"):
        run(scenario("on"))


def test_what_backend_serves_is_detected_or_forced() -> None:
    async def function_app(scope: Any, receive: Any, send: Any) -> None:
        pass

    service = Service("x")
    assert is_asgi_app(function_app)
    assert is_asgi_app(Recorder())
    assert not is_asgi_app(service)
    assert not is_asgi_app(lambda scope: None)
    assert as_service(service) is service
    assert isinstance(as_service(function_app), AsgiService)
    assert isinstance(as_service(function_app, "asgi"), AsgiService)
    with pytest.raises(ValueError, match=r"not a pitcher_rpc\.sdk\.Service"):
        as_service(function_app, "sdk")
    with pytest.raises(ValueError, match="not an ASGI app"):
        as_service(service, "asgi")
    with pytest.raises(ValueError, match="nor an ASGI 3 app"):
        as_service(object())

    async def sdk_handler(request: Any) -> dict[str, Any]:
        return {}

    class Asgi2:
        def __init__(self, scope: Any) -> None:
            pass

    class VariadicApp:
        async def __call__(self, *args: Any) -> None:
            pass

    assert not is_asgi_app(sdk_handler)
    assert not is_asgi_app(Asgi2)
    assert is_asgi_app(VariadicApp())


def test_an_app_stopped_before_it_answered_fails_the_call() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(10)

    async def scenario() -> None:
        service = AsgiService(app)
        waiting = service.respond(request_payload())
        await asyncio.sleep(0.01)
        for task in list(service._tasks):
            task.cancel()  # what close() does once the grace is over
        with pytest.raises(AppError, match="cancelled before it answered"):
            await waiting

    run(scenario())
