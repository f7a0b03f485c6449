"""The admin HTTP server over real sockets on 127.0.0.1.

Each test runs one scenario with ``asyncio.run``: the server serves on the
event loop while the clients, plain blocking sockets or ``http.client``, run
in worker threads, so the server sees exactly what an operator's curl would
send.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
import uvloop

from pitcher_rpc.process.admin import (
    AdminError,
    AdminHandler,
    AdminRequest,
    AdminResponse,
    AdminServer,
)
from tests.proxy.conftest import HttpResponse, RawClient, build_request

# Bounds for things that take milliseconds; they only stop a broken build
# from hanging the suite.
SCENARIO_TIMEOUT = 3.0
SOCKET_TIMEOUT = 2.0

Address = tuple[str, int]


Runner = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
    """Runs a scenario on each loop: the master serves on uvloop, tests elsewhere on asyncio's."""
    loop_factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def run_scenario(scenario: Coroutine[Any, Any, None]) -> None:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(asyncio.wait_for(scenario, SCENARIO_TIMEOUT))

    return run_scenario


@contextlib.asynccontextmanager
async def serving(server: AdminServer) -> AsyncIterator[Address]:
    await server.start("127.0.0.1", 0)
    try:
        yield server.address
    finally:
        await server.stop()


def fetch(
    address: Address,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> HttpResponse:
    """One request with http.client on a connection of its own."""
    connection = http.client.HTTPConnection(*address, timeout=SOCKET_TIMEOUT)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return HttpResponse(
            response.status,
            response.reason,
            "1.1",
            [(name.lower(), value) for name, value in response.getheaders()],
            response.read(),
        )
    finally:
        connection.close()


def connect(address: Address) -> RawClient:
    return RawClient.connect(*address, timeout=SOCKET_TIMEOUT)


def answer(response: AdminResponse) -> AdminHandler:
    async def handler(request: AdminRequest) -> AdminResponse:
        return response

    return handler


async def describe(request: AdminRequest) -> AdminResponse:
    return AdminResponse(
        200,
        {
            "method": request.method,
            "path": request.path,
            "query": request.query,
            "params": request.params,
            "client": request.client,
        },
    )


# -- answers ---------------------------------------------------------------------


def test_json_text_bytes_and_custom_content_type(run: Runner) -> None:
    server = AdminServer()
    server.route("GET", "/healthz", answer(AdminResponse(200, {"status": "serving"})))
    server.route("GET", "/workers", answer(AdminResponse(200, [1, 2])))
    server.route("GET", "/hello", answer(AdminResponse(200, "héllo\n")))
    server.route("GET", "/blob", answer(AdminResponse(200, b"\x00\x01")))
    metrics = AdminResponse(
        200, "requests_total 3\n", (("content-type", "text/plain; version=0.0.4"),)
    )
    server.route("GET", "/metrics", answer(metrics))

    async def scenario() -> None:
        async with serving(server) as address:
            health = await asyncio.to_thread(fetch, address, "GET", "/healthz")
            workers = await asyncio.to_thread(fetch, address, "GET", "/workers")
            hello = await asyncio.to_thread(fetch, address, "GET", "/hello")
            blob = await asyncio.to_thread(fetch, address, "GET", "/blob")
            prometheus = await asyncio.to_thread(fetch, address, "GET", "/metrics")
        assert (health.status, health.json()) == (200, {"status": "serving"})
        assert health.header("content-type") == "application/json"
        assert workers.json() == [1, 2]
        assert hello.body == "héllo\n".encode()
        assert hello.header("content-type") == "text/plain; charset=utf-8"
        assert blob.body == b"\x00\x01"
        assert blob.header("content-type") == "application/octet-stream"
        assert prometheus.body == b"requests_total 3\n"
        assert prometheus.all("content-type") == ["text/plain; version=0.0.4"]
        for response in (health, workers, hello, blob, prometheus):
            assert response.header("cache-control") == "no-store"
            assert response.header("date") is not None

    run(scenario())


def test_path_params_query_and_trailing_slash(run: Runner) -> None:
    server = AdminServer()
    server.route("POST", "/admin/modules/{name}/enable", describe)
    server.route("GET", "/admin/clusters/{cluster}/nodes/{node}", describe)
    server.route("GET", "/admin/clusters/all/nodes/{node}", answer(AdminResponse(200, "all")))
    server.route("GET", "/", answer(AdminResponse(200, "root")))

    async def scenario() -> None:
        async with serving(server) as address:
            enable = await asyncio.to_thread(
                fetch, address, "POST", "/admin/modules/rate%20limit/enable/?a=1&b=2&a=3&c=&force"
            )
            nodes = await asyncio.to_thread(fetch, address, "GET", "/admin/clusters/c1/nodes/n%2D2")
            literal = await asyncio.to_thread(fetch, address, "GET", "/admin/clusters/all/nodes/x")
            root = await asyncio.to_thread(fetch, address, "GET", "/")
            slash = await asyncio.to_thread(fetch, address, "POST", "/admin/modules/a%2Fb/enable")
            empty = await asyncio.to_thread(fetch, address, "POST", "/admin/modules//enable")
        assert enable.status == 200
        assert enable.json() == {
            "method": "POST",
            "path": "/admin/modules/rate%20limit/enable",
            "query": {"a": "3", "b": "2", "c": "", "force": ""},
            "params": {"name": "rate limit"},
            "client": enable.json()["client"],
        }
        assert enable.json()["client"].startswith("127.0.0.1:")
        assert nodes.json()["params"] == {"cluster": "c1", "node": "n-2"}
        # A literal segment wins over a placeholder in the same place.
        assert literal.body == b"all"
        assert root.body == b"root"
        # A placeholder is exactly one non-empty segment, even once decoded.
        assert slash.status == 404
        assert empty.status == 404

    run(scenario())


def test_unknown_path_is_404_json(run: Runner) -> None:
    server = AdminServer()
    server.route("GET", "/healthz", answer(AdminResponse()))

    async def scenario() -> None:
        async with serving(server) as address:
            missing = await asyncio.to_thread(fetch, address, "GET", "/nope")
            options = await asyncio.to_thread(
                lambda: connect(address).request("OPTIONS", "*", host="x")
            )
        assert missing.status == 404
        assert missing.header("content-type") == "application/json"
        assert missing.header("cache-control") == "no-store"
        assert "/nope" in missing.json()["error"]
        assert options.status == 404

    run(scenario())


def test_other_method_is_405_with_allow(run: Runner) -> None:
    server = AdminServer()
    server.route("GET", "/admin/config", answer(AdminResponse()))
    server.route("PUT", "/admin/config", answer(AdminResponse()))
    server.route("POST", "/admin/reload", answer(AdminResponse()))

    async def scenario() -> None:
        async with serving(server) as address:
            config = await asyncio.to_thread(fetch, address, "DELETE", "/admin/config")
            reload = await asyncio.to_thread(fetch, address, "GET", "/admin/reload")
        assert config.status == 405
        assert config.header("allow") == "GET, HEAD, PUT"
        assert "DELETE" in config.json()["error"]
        assert reload.status == 405
        assert reload.header("allow") == "POST"

    run(scenario())


def test_admin_error_answers_its_status(run: Runner) -> None:
    async def refuse(request: AdminRequest) -> AdminResponse:
        raise AdminError(409, "a reload is already running")

    server = AdminServer()
    server.route("POST", "/admin/reload", refuse)

    async def scenario() -> None:
        async with serving(server) as address:
            response = await asyncio.to_thread(fetch, address, "POST", "/admin/reload")
        assert response.status == 409
        assert response.json() == {"error": "a reload is already running"}
        assert response.header("cache-control") == "no-store"

    run(scenario())


def test_handler_crash_is_500_logged_and_the_connection_goes_on(
    caplog: pytest.LogCaptureFixture, run: Runner
) -> None:
    async def crash(request: AdminRequest) -> AdminResponse:
        raise RuntimeError("boom")

    async def bad_response(request: AdminRequest) -> AdminResponse:
        return AdminResponse(200, float("nan"))  # type: ignore[arg-type]

    server = AdminServer()
    server.route("GET", "/crash", crash)
    server.route("GET", "/bad", bad_response)
    server.route("GET", "/healthz", answer(AdminResponse(200, {"status": "serving"})))

    def client(address: Address) -> list[HttpResponse]:
        with connect(address) as raw:
            return [raw.request("GET", path) for path in ("/crash", "/bad", "/healthz")]

    async def scenario() -> None:
        async with serving(server) as address:
            crashed, bad, health = await asyncio.to_thread(client, address)
        assert crashed.status == 500
        assert crashed.json() == {"error": "internal error"}
        assert crashed.header("connection") is None
        assert bad.status == 500
        assert (health.status, health.json()) == (200, {"status": "serving"})

    with caplog.at_level(logging.ERROR, logger="pitcher.admin"):
        run(scenario())
    failures = [record for record in caplog.records if record.name == "pitcher.admin"]
    assert len(failures) == 2
    assert failures[0].exc_info is not None
    assert "boom" in str(failures[0].exc_info[1])
    assert "/crash" in failures[0].getMessage()


# -- connections -----------------------------------------------------------------


def test_keep_alive_serves_several_requests_on_one_connection(run: Runner) -> None:
    server = AdminServer()
    server.route("GET", "/who", describe)

    def client(address: Address) -> list[HttpResponse]:
        with connect(address) as raw:
            return [raw.request("GET", f"/who?n={n}") for n in range(3)]

    async def scenario() -> None:
        async with serving(server) as address:
            responses = await asyncio.to_thread(client, address)
        assert [r.json()["query"] for r in responses] == [{"n": "0"}, {"n": "1"}, {"n": "2"}]
        assert len({r.json()["client"] for r in responses}) == 1
        assert all(r.header("connection") is None for r in responses)

    run(scenario())


def test_pipelined_requests_are_answered_in_order(run: Runner) -> None:
    async def slow(request: AdminRequest) -> AdminResponse:
        await asyncio.sleep(0.05)
        return AdminResponse(200, f"slow {request.query['n']}")

    async def fast(request: AdminRequest) -> AdminResponse:
        return AdminResponse(200, f"fast {request.query['n']}")

    server = AdminServer()
    server.route("GET", "/slow", slow)
    server.route("GET", "/fast", fast)
    paths = ["/slow?n=0", "/fast?n=1", "/slow?n=2", "/fast?n=3", "/fast?n=4"]

    def client(address: Address) -> tuple[list[HttpResponse], bool]:
        with connect(address) as raw:
            pipeline = [build_request("GET", path) for path in paths[:-1]]
            pipeline.append(build_request("GET", paths[-1], [("Connection", "close")]))
            raw.send(b"".join(pipeline))
            responses = [raw.response() for _ in paths]
            return responses, raw.is_closed(timeout=1.0)

    async def scenario() -> None:
        async with serving(server) as address:
            responses, closed = await asyncio.to_thread(client, address)
        assert [r.body.decode() for r in responses] == [
            "slow 0",
            "fast 1",
            "slow 2",
            "fast 3",
            "fast 4",
        ]
        assert responses[-1].header("connection") == "close"
        assert closed

    run(scenario())


def test_flow_control_with_many_pipelined_large_answers(run: Runner) -> None:
    # More requests than the pipeline holds before it stops reading, and more
    # answer bytes than the transport buffers before it pauses writing.
    chunk = b"x" * (256 * 1024)

    async def big(request: AdminRequest) -> AdminResponse:
        return AdminResponse(200, request.query["n"].encode() + chunk)

    server = AdminServer()
    server.route("GET", "/big", big)
    count = 40

    def client(address: Address) -> list[HttpResponse]:
        with connect(address) as raw:
            raw.send(b"".join(build_request("GET", f"/big?n={n:02}") for n in range(count)))
            return [raw.response() for _ in range(count)]

    async def scenario() -> None:
        async with serving(server) as address:
            responses = await asyncio.to_thread(client, address)
        assert [r.body[:2].decode() for r in responses] == [f"{n:02}" for n in range(count)]
        assert all(r.body[2:] == chunk for r in responses)

    run(scenario())


def test_client_half_close_still_gets_its_answers(run: Runner) -> None:
    server = AdminServer()
    server.route("GET", "/who", describe)

    def client(address: Address) -> tuple[list[HttpResponse], bool]:
        with connect(address) as raw:
            raw.send(build_request("GET", "/who?n=0") + build_request("GET", "/who?n=1"))
            raw.sock.shutdown(socket.SHUT_WR)
            return [raw.response(), raw.response()], raw.is_closed(timeout=1.0)

    async def scenario() -> None:
        async with serving(server) as address:
            responses, closed = await asyncio.to_thread(client, address)
        assert [r.json()["query"]["n"] for r in responses] == ["0", "1"]
        assert closed

    run(scenario())


def test_http10_and_connection_close_end_the_connection(run: Runner) -> None:
    server = AdminServer()
    server.route("GET", "/healthz", answer(AdminResponse(200, "ok")))

    def client(
        address: Address, version: str, headers: list[tuple[str, str]]
    ) -> tuple[HttpResponse, bool]:
        with connect(address) as raw:
            response = raw.request("GET", "/healthz", headers, version=version)
            return response, raw.is_closed(timeout=0.3)

    async def scenario() -> None:
        async with serving(server) as address:
            old, old_closed = await asyncio.to_thread(client, address, "1.0", [])
            kept, kept_closed = await asyncio.to_thread(
                client, address, "1.0", [("Connection", "keep-alive")]
            )
            close, close_closed = await asyncio.to_thread(
                client, address, "1.1", [("Connection", "close")]
            )
        assert (old.status, old.header("connection"), old_closed) == (200, "close", True)
        assert (kept.header("connection"), kept_closed) == ("keep-alive", False)
        assert (close.header("connection"), close_closed) == ("close", True)

    run(scenario())


def test_head_on_a_get_route_answers_headers_only(run: Runner) -> None:
    seen: list[str] = []

    async def config(request: AdminRequest) -> AdminResponse:
        seen.append(request.method)
        return AdminResponse(200, {"source": "pitcher.toml"})

    server = AdminServer()
    server.route("GET", "/admin/config", config)

    def client(address: Address) -> tuple[HttpResponse, HttpResponse, HttpResponse]:
        with connect(address) as raw:
            # The GET after each HEAD shows that no body was sent for the HEAD.
            head = raw.request("HEAD", "/admin/config")
            missing = raw.request("HEAD", "/nope")
            get = raw.request("GET", "/admin/config")
            return head, missing, get

    async def scenario() -> None:
        async with serving(server) as address:
            head, missing, get = await asyncio.to_thread(client, address)
        assert head.status == 200
        assert head.body == b""
        assert head.header("content-length") == str(len(get.body))
        assert head.header("content-type") == "application/json"
        assert missing.status == 404
        assert get.json() == {"source": "pitcher.toml"}
        assert seen == ["HEAD", "GET"]

    run(scenario())


def test_continue_behind_a_slow_answer_comes_after_it(run: Runner) -> None:
    async def slow(request: AdminRequest) -> AdminResponse:
        await asyncio.sleep(0.1)
        return AdminResponse(200, "slow")

    server = AdminServer()
    server.route("GET", "/slow", slow)
    server.route("POST", "/echo", answer(AdminResponse(200, "done")))

    def client(address: Address) -> tuple[HttpResponse, bytes, HttpResponse]:
        with connect(address) as raw:
            raw.send(
                build_request("GET", "/slow")
                + build_request("POST", "/echo", [("Expect", "100-continue")])[:-2]
                + b"Content-Length: 2\r\n\r\n"
            )
            # A 100 Continue ahead of the first answer would be taken for it.
            first = raw.response()
            interim = raw.response()
            raw.send(b"{}")
            return first, interim.raw_head, raw.response()

    async def scenario() -> None:
        async with serving(server) as address:
            first, interim, final = await asyncio.to_thread(client, address)
        assert first.body == b"slow"
        assert interim == b"HTTP/1.1 100 Continue"
        assert final.body == b"done"

    run(scenario())


def test_deadlines_count_from_a_slow_answer(run: Runner) -> None:
    # The next request's first bytes, sent while the slow handler ran, and the
    # idle time before it, are measured from the answer, not from the bytes.
    async def slow(request: AdminRequest) -> AdminResponse:
        await asyncio.sleep(0.8)
        return AdminResponse(200, "slow")

    server = AdminServer(header_timeout=0.5, keepalive_timeout=0.4)
    server.route("GET", "/slow", slow)
    server.route("GET", "/healthz", answer(AdminResponse(200, "ok")))

    def partial_head(address: Address) -> list[HttpResponse]:
        with connect(address) as raw:
            raw.send(build_request("GET", "/slow") + b"GET /healthz HTTP/1.1\r\n")
            first = raw.response()
            time.sleep(0.2)
            raw.send(b"Host: x\r\n\r\n")
            return [first, raw.response()]

    def idle(address: Address) -> list[HttpResponse]:
        with connect(address) as raw:
            first = raw.request("GET", "/slow")
            time.sleep(0.15)
            return [first, raw.request("GET", "/healthz")]

    async def scenario() -> None:
        async with serving(server) as address:
            arriving, waiting = await asyncio.gather(
                asyncio.to_thread(partial_head, address), asyncio.to_thread(idle, address)
            )
        for responses in (arriving, waiting):
            assert [(r.status, r.body) for r in responses] == [(200, b"slow"), (200, b"ok")]

    run(scenario())


def test_client_gone_during_a_handler_lets_it_finish_and_drops_the_answer(
    caplog: pytest.LogCaptureFixture, run: Runner
) -> None:
    entered = asyncio.Event()
    released = asyncio.Event()
    finished: list[str] = []

    async def reload(request: AdminRequest) -> AdminResponse:
        entered.set()
        await released.wait()
        finished.append(request.path)
        return AdminResponse(200, "reloaded")

    server = AdminServer()
    server.route("POST", "/admin/reload", reload)
    server.route("GET", "/healthz", answer(AdminResponse(200, "ok")))

    async def scenario() -> None:
        async with serving(server) as address:
            raw = await asyncio.to_thread(connect, address)
            with raw:
                await asyncio.to_thread(raw.send, build_request("POST", "/admin/reload"))
                await entered.wait()
                # A reset, not a close: after a close the server cannot tell the
                # client from one that half-closed and still wants its answer.
                raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            for _ in range(100):
                if not server.connections:
                    break
                await asyncio.sleep(0.01)
            assert not server.connections
            released.set()
            for _ in range(100):
                if not server.handlers:
                    break
                await asyncio.sleep(0.01)
            assert finished == ["/admin/reload"]
            health = await asyncio.to_thread(fetch, address, "GET", "/healthz")
            assert health.body == b"ok"

    with caplog.at_level(logging.WARNING):
        run(scenario())
    assert [record.getMessage() for record in caplog.records] == []


# -- request bodies ----------------------------------------------------------------


def test_post_json_body_and_invalid_json_is_400(run: Runner) -> None:
    async def reload(request: AdminRequest) -> AdminResponse:
        document = request.json()
        return AdminResponse(200, {"received": document})

    server = AdminServer(max_body_size=1 << 20)
    server.route("POST", "/admin/reload", reload)
    nested = b"[" * 100_000 + b"]" * 100_000

    async def scenario() -> None:
        async with serving(server) as address:
            good = await asyncio.to_thread(
                fetch, address, "POST", "/admin/reload", b'{"path": "/etc/pitcher.toml"}'
            )
            bad = await asyncio.to_thread(fetch, address, "POST", "/admin/reload", b"{nope")
            empty = await asyncio.to_thread(fetch, address, "POST", "/admin/reload", b"")
            latin = await asyncio.to_thread(fetch, address, "POST", "/admin/reload", b'"\xff"')
            deep = await asyncio.to_thread(fetch, address, "POST", "/admin/reload", nested)
        assert (good.status, good.json()) == (200, {"received": {"path": "/etc/pitcher.toml"}})
        for refused in (bad, empty, latin, deep):
            assert refused.status == 400
            assert refused.json() == {"error": "request body is not valid JSON"}

    run(scenario())


def test_expect_100_continue(run: Runner) -> None:
    server = AdminServer()
    server.route("POST", "/echo", answer(AdminResponse(200, "done")))

    def client(address: Address) -> tuple[bytes, HttpResponse]:
        with connect(address) as raw:
            raw.send(build_request("POST", "/echo", [("Expect", "100-continue")])[:-2])
            raw.send(b"Content-Length: 2\r\n\r\n")
            interim = raw.response()
            raw.send(b"{}")
            return interim.raw_head, raw.response()

    async def scenario() -> None:
        async with serving(server) as address:
            interim, final = await asyncio.to_thread(client, address)
        assert interim == b"HTTP/1.1 100 Continue"
        assert final.body == b"done"

    run(scenario())


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_max_body_size_is_413_and_close(chunked: bool, run: Runner) -> None:
    called: list[bytes] = []

    async def sink(request: AdminRequest) -> AdminResponse:
        called.append(request.body)
        return AdminResponse()

    server = AdminServer(max_body_size=16)
    server.route("POST", "/sink", sink)
    if chunked:
        request = build_request("POST", "/sink", [("Transfer-Encoding", "chunked")])
        request += b"a\r\n0123456789\r\na\r\n0123456789\r\n0\r\n\r\n"
    else:
        request = build_request("POST", "/sink", body=b"x" * 17)

    def client(address: Address) -> tuple[HttpResponse, bool]:
        with connect(address) as raw:
            raw.send(request)
            return raw.response(), raw.is_closed(timeout=1.0)

    async def scenario() -> None:
        async with serving(server) as address:
            response, closed = await asyncio.to_thread(client, address)
            fits = await asyncio.to_thread(fetch, address, "POST", "/sink", b"x" * 16)
        assert response.status == 413
        assert response.header("connection") == "close"
        assert response.header("cache-control") == "no-store"
        assert "error" in response.json()
        assert closed
        assert fits.status == 200
        assert called == [b"x" * 16]

    run(scenario())


# -- refusals and timeouts -----------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\n\r\n", 400),  # no Host
        (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            400,
        ),
        (b"GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    ],
    ids=["garbage", "no-host", "two-content-lengths", "http2"],
)
def test_bad_http_answers_the_parser_status_and_closes(
    request_bytes: bytes, status: int, run: Runner
) -> None:
    server = AdminServer()
    server.route("GET", "/healthz", answer(AdminResponse(200, "ok")))

    def client(address: Address) -> tuple[list[HttpResponse], bool]:
        with connect(address) as raw:
            # A good request ahead of the bad one in the same packet is still answered.
            raw.send(build_request("GET", "/healthz") + request_bytes)
            responses = [raw.response(), raw.response()]
            return responses, raw.is_closed(timeout=1.0)

    async def scenario() -> None:
        async with serving(server) as address:
            (good, refused), closed = await asyncio.to_thread(client, address)
        assert (good.status, good.body) == (200, b"ok")
        assert refused.status == status
        assert refused.header("connection") == "close"
        assert refused.header("content-type") == "application/json"
        assert "error" in refused.json()
        assert closed

    run(scenario())


def test_refusal_survives_what_the_client_still_sends(run: Runner) -> None:
    # The server reads and drops what follows a refusal before it closes: a
    # close with unread bytes would reset the connection and the client could
    # lose the refusal before reading it.
    server = AdminServer()

    def client(address: Address) -> tuple[HttpResponse, bool]:
        with connect(address) as raw:
            raw.send(b"NOT HTTP\r\n\r\n" + b"x" * 300_000)
            time.sleep(0.1)
            raw.send(b"y" * 1000)
            return raw.response(), raw.is_closed(timeout=1.0)

    async def scenario() -> None:
        async with serving(server) as address:
            refused, closed = await asyncio.to_thread(client, address)
        assert refused.status == 400
        assert refused.header("cache-control") == "no-store"
        assert closed

    run(scenario())


def test_request_not_received_in_time_is_408(run: Runner) -> None:
    server = AdminServer(header_timeout=0.2)
    server.route("GET", "/healthz", answer(AdminResponse(200, "ok")))

    def client(address: Address) -> tuple[HttpResponse, HttpResponse, bool]:
        with connect(address) as raw:
            first = raw.request("GET", "/healthz")
            raw.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            return first, raw.response(), raw.is_closed(timeout=1.0)

    async def scenario() -> None:
        async with serving(server) as address:
            first, late, closed = await asyncio.to_thread(client, address)
        assert first.status == 200
        assert late.status == 408
        assert closed

    run(scenario())


def test_whole_request_body_included_must_arrive_within_header_timeout(run: Runner) -> None:
    server = AdminServer(header_timeout=0.3)
    server.route("POST", "/sink", answer(AdminResponse(200, "ok")))

    def client(address: Address) -> tuple[HttpResponse, bool, float]:
        with connect(address) as raw:
            started = time.monotonic()
            raw.send(build_request("POST", "/sink", [("Content-Length", "20")]))
            # Each byte comes well within the timeout; the whole body does not.
            with contextlib.suppress(OSError):
                for _ in range(20):
                    raw.send(b"x")
                    time.sleep(0.05)
            return raw.response(), raw.is_closed(timeout=1.0), time.monotonic() - started

    async def scenario() -> None:
        async with serving(server) as address:
            late, closed, elapsed = await asyncio.to_thread(client, address)
        assert late.status == 408
        assert late.header("content-type") == "application/json"
        assert closed
        assert elapsed < 1.5

    run(scenario())


def test_idle_keep_alive_connection_is_closed_after_keepalive_timeout(run: Runner) -> None:
    server = AdminServer(keepalive_timeout=0.2)
    server.route("GET", "/healthz", answer(AdminResponse(200, "ok")))

    def client(address: Address) -> tuple[HttpResponse, bool]:
        with connect(address) as raw:
            return raw.request("GET", "/healthz"), raw.is_closed(timeout=1.0)

    async def scenario() -> None:
        async with serving(server) as address:
            response, closed = await asyncio.to_thread(client, address)
        assert response.status == 200
        assert closed

    run(scenario())


# -- concurrency and stopping ----------------------------------------------------------


def test_slow_handler_does_not_block_another_connection(run: Runner) -> None:
    released = asyncio.Event()

    async def slow(request: AdminRequest) -> AdminResponse:
        await released.wait()
        return AdminResponse(200, "slow")

    async def release(request: AdminRequest) -> AdminResponse:
        released.set()
        return AdminResponse(200, "released")

    server = AdminServer()
    server.route("GET", "/slow", slow)
    server.route("POST", "/release", release)

    async def scenario() -> None:
        async with serving(server) as address:
            waiting = asyncio.ensure_future(asyncio.to_thread(fetch, address, "GET", "/slow"))
            # Answered only if the other connection's handler is not in the way.
            other = await asyncio.to_thread(fetch, address, "POST", "/release")
            assert other.body == b"released"
            assert (await waiting).body == b"slow"

    run(scenario())


def test_stop_closes_idle_connections_and_refuses_new_ones(run: Runner) -> None:
    server = AdminServer()
    server.route("GET", "/healthz", answer(AdminResponse(200, "ok")))

    async def scenario() -> None:
        await server.start("127.0.0.1", 0)
        address = server.address
        raw = await asyncio.to_thread(connect, address)
        with raw:
            assert (await asyncio.to_thread(raw.request, "GET", "/healthz")).status == 200
            loop = asyncio.get_running_loop()
            started = loop.time()
            await server.stop()
            assert loop.time() - started < 0.5
            assert await asyncio.to_thread(raw.is_closed, 1.0)
        with pytest.raises(ConnectionRefusedError):
            await asyncio.to_thread(connect, address)

    run(scenario())


def test_stop_cancels_a_handler_in_progress(run: Runner) -> None:
    entered = asyncio.Event()
    cancelled = asyncio.Event()

    async def stuck(request: AdminRequest) -> AdminResponse:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return AdminResponse()

    server = AdminServer()
    server.route("POST", "/admin/reload", stuck)

    async def scenario() -> None:
        await server.start("127.0.0.1", 0)
        raw = await asyncio.to_thread(connect, server.address)
        with raw:
            await asyncio.to_thread(raw.send, build_request("POST", "/admin/reload"))
            await entered.wait()
            await server.stop()
            assert cancelled.is_set()
            assert await asyncio.to_thread(raw.is_closed, 1.0)

    run(scenario())


def test_address_and_double_start(run: Runner) -> None:
    server = AdminServer()
    with pytest.raises(RuntimeError):
        _ = server.address

    async def scenario() -> None:
        async with serving(server) as (host, port):
            assert host == "127.0.0.1"
            assert port > 0
            with pytest.raises(RuntimeError):
                await server.start("127.0.0.1", 0)

    run(scenario())


# -- registration and response checks --------------------------------------------------


def test_duplicate_and_malformed_routes_are_refused() -> None:
    server = AdminServer()
    handler = answer(AdminResponse())
    server.route("GET", "/admin/modules/{name}", handler)
    server.route("POST", "/admin/modules/{name}", handler)
    server.route("GET", "/admin/modules/list", handler)
    for method, pattern in [
        ("GET", "/admin/modules/{name}"),
        ("GET", "/admin/modules/{other}/"),  # the same shape under another name
        ("get", "/healthz"),
        ("GET", "healthz"),
        ("GET", "/admin//x"),
        ("GET", "/admin/x{name}"),
        ("GET", "/admin/{name}/{name}"),
    ]:
        with pytest.raises(ValueError):
            server.route(method, pattern, handler)


def test_response_and_error_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        AdminResponse(200, b"", (("content-length", "3"),))
    with pytest.raises(ValueError):
        AdminResponse(200, b"", (("x-bad", "a\r\nb"),))
    with pytest.raises(ValueError):
        AdminResponse(200, b"", (("bad name", "x"),))
    with pytest.raises(ValueError):
        AdminResponse(99)
    with pytest.raises(TypeError):
        AdminResponse(200, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        AdminError(200, "not an error")
    assert str(AdminError(404, "no such module")) == "404 no such module"
