"""Backends that die, stall, lie or leave, seen through a running proxy.

Whatever a backend does, the client must get a prompt, well-formed answer
(502, 503 or 504), nothing may hang, and the proxy must go on serving other
requests. Each test builds its own proxy and backends, since it breaks them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import signal
import time

import pytest

from tests.proxy.conftest import (
    SERVE_APP,
    SERVE_PEER,
    Backend,
    HttpResponse,
    Launcher,
    Proxy,
    build_request,
    established_connections,
    free_port,
    get,
    toml_config,
    wait_until,
)


def single_route_proxy(
    launcher: Launcher, nodes: list, *, timeout: float = 3.0, retries: int = 1, **cluster
) -> Proxy:
    return launcher.proxy(
        toml_config(
            [
                {
                    "name": "main",
                    "prefix": "/",
                    "cluster": "main",
                    "timeout": timeout,
                    "retries": retries,
                }
            ],
            {"main": {"nodes": nodes, **cluster}},
            upstream={"connect_timeout": 1.0},
        )
    )


def timed_get(proxy: Proxy, path: str, **kwargs) -> tuple[HttpResponse, float]:
    started = time.monotonic()
    response = get(proxy, path, **kwargs)
    return response, time.monotonic() - started


# ------------------------------------------------------------------ a backend dies


@pytest.mark.parametrize("transport", ["tcp", "unix"])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_backend_killed_mid_request_gives_502_promptly(
    launcher: Launcher, transport: str, method: str
) -> None:
    backend = launcher.test_backend(transport)
    proxy = single_route_proxy(launcher, [backend.uri], timeout=4.0)
    assert get(proxy, "/warm").status == 200

    with proxy.connect() as client, concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.request, method, f"/slow?sleep=3&mark={method}-{transport}")
        launcher.wait_for_mark(f"{method}-{transport}")
        killed_at = time.monotonic()
        backend.process.signal(signal.SIGKILL)
        response = pending.result(timeout=3.0)
        assert response.status == 502, response.body
        assert time.monotonic() - killed_at < 1.0
        # A failed backend is no reason to drop the client's connection.
        assert response.header("connection") is None
        again = client.request("GET", "/after-death")
        assert again.status == 502

    for _ in range(5):
        response, elapsed = timed_get(proxy, "/still-dead")
        assert response.status == 502
        assert elapsed < 0.5


@pytest.mark.parametrize(("method", "status"), [("GET", 200), ("POST", 502)])
def test_idempotent_request_lost_with_its_node_is_retried_on_another(
    launcher: Launcher, method: str, status: int
) -> None:
    doomed = launcher.test_backend("tcp", name="doomed")
    spare = launcher.test_backend("tcp", name="spare")
    proxy = single_route_proxy(launcher, [doomed.uri, spare.uri], timeout=4.0)
    with proxy.connect() as client, concurrent.futures.ThreadPoolExecutor(1) as pool:
        # Round robin starts at the first node.
        pending = pool.submit(client.request, method, "/lost?sleep=3&only=doomed&mark=lost")
        launcher.wait_for_mark("lost")
        doomed.process.signal(signal.SIGKILL)
        response = pending.result(timeout=3.0)
    # A POST may have had effects on the dead node: it must not run twice.
    assert response.status == status, response.body
    if status == 200:
        assert response.json()["backend"] == "spare"


def test_every_request_in_flight_on_a_killed_backend_gets_502(launcher: Launcher) -> None:
    backend = launcher.test_backend("tcp")
    proxy = single_route_proxy(launcher, [backend.uri], timeout=4.0)
    count = 30
    marks = [f"doomed{index}" for index in range(count)]

    async def run() -> list[int]:
        async with asyncio.timeout(4.0):
            calls = [
                asyncio.create_task(
                    _one_client(proxy.port, f"/doomed?sleep=3&mark={mark}", method="POST")
                )
                for mark in marks
            ]
            for mark in marks:
                await asyncio.to_thread(launcher.wait_for_mark, mark, 2.0)
            backend.process.signal(signal.SIGKILL)
            return [status for status, _, _ in await asyncio.gather(*calls)]

    started = time.monotonic()
    assert asyncio.run(run()) == [502] * count
    assert time.monotonic() - started < 2.5


def test_requests_succeed_again_once_the_backend_is_back(launcher: Launcher) -> None:
    backend = launcher.test_backend("tcp")
    proxy = single_route_proxy(launcher, [backend.uri])
    assert get(proxy, "/warm").status == 200
    backend.process.signal(signal.SIGKILL)
    backend.process.popen.wait(2.0)
    assert get(proxy, "/dead").status == 502

    launcher.test_backend("tcp", name="reborn", uri=backend.uri)
    last: list[HttpResponse] = []

    def recovered() -> bool:
        response = get(proxy, "/alive-again")
        last[:] = [response]
        return response.status == 200

    # Reconnects back off up to 2 s between tries.
    wait_until(recovered, 4.0, "the proxy to reach the restarted backend", interval=0.05)
    assert last[0].json()["backend"] == "reborn"


def test_node_that_was_never_there_gives_502_quickly(launcher: Launcher) -> None:
    proxy = single_route_proxy(launcher, [f"tcp://127.0.0.1:{free_port()}"])
    for method in ("GET", "POST"):
        response, elapsed = timed_get(proxy, "/nobody", method=method, body=b"x")
        assert response.status == 502
        assert elapsed < 0.5


def test_missing_unix_socket_gives_502_quickly(launcher: Launcher) -> None:
    proxy = single_route_proxy(launcher, [f"unix://{launcher.tmpdir}/absent.sock"])
    response, elapsed = timed_get(proxy, "/nobody")
    assert response.status == 502
    assert elapsed < 0.5


# ------------------------------------------------------------------ a backend stalls


def test_slow_backend_gives_504_in_time_and_the_connection_stays_usable(
    launcher: Launcher,
) -> None:
    echo = launcher.echo_backend("tcp")
    proxy = single_route_proxy(launcher, [echo.uri], timeout=0.5)
    with proxy.connect() as client:
        started = time.monotonic()
        response = client.request("GET", "/slow?sleep=2")
        elapsed = time.monotonic() - started
        assert response.status == 504
        assert 0.45 <= elapsed < 0.7
        assert response.header("connection") is None
        fast = client.request("GET", "/fast")
        assert fast.status == 200
        assert fast.json()["path"] == "/fast"


def test_a_timed_out_request_does_not_delay_the_next_one(launcher: Launcher) -> None:
    echo = launcher.echo_backend("tcp")
    proxy = single_route_proxy(launcher, [echo.uri], timeout=0.3)
    with proxy.connect() as client:
        client.send(build_request("GET", "/slow?sleep=1") + build_request("GET", "/next"))
        assert client.response().status == 504
        started = time.monotonic()
        follow = client.response()
        assert follow.status == 200
        assert follow.json()["path"] == "/next"
        assert time.monotonic() - started < 0.2


def test_client_that_goes_away_gets_its_backend_call_cancelled(launcher: Launcher) -> None:
    backend = launcher.test_backend("tcp")
    proxy = single_route_proxy(launcher, [backend.uri], timeout=4.0)
    client = proxy.connect()
    client.send(build_request("GET", "/abandoned?sleep=3&mark=abandoned"))
    launcher.wait_for_mark("abandoned")
    client.reset()
    # The work nobody waits for stops at once, not when its 3 s are up.
    launcher.wait_for_mark("abandoned.cancelled", timeout=1.0)
    assert get(proxy, "/next").status == 200


def test_request_too_large_for_the_node_fails_alone(launcher: Launcher) -> None:
    # The proxy takes bodies larger than the node's frame limit (4 MiB by default).
    backend = launcher.test_backend("tcp")
    proxy = launcher.proxy(
        toml_config(
            [{"name": "main", "prefix": "/", "cluster": "main", "timeout": 4.0}],
            {"main": {"nodes": [backend.uri]}},
            server={"max_body_size": 6 * 1024 * 1024},
        )
    )
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        small = [
            pool.submit(get, proxy, f"/small/{i}?sleep=0.4&mark=small{i}", method="POST", body=b"s")
            for i in range(4)
        ]
        for index in range(4):
            launcher.wait_for_mark(f"small{index}")
        big, elapsed = timed_get(proxy, "/big", method="POST", body=b"b" * (5 * 1024 * 1024))
        assert big.status in (413, 502), big.body
        assert elapsed < 1.0
        # Requests sharing the backend connection must not pay for it.
        for index, future in enumerate(small):
            response = future.result(timeout=3.0)
            assert response.status == 200, response.body
            assert response.json()["path"] == f"/small/{index}"


# An SDK service answering with a body of ?size= bytes.
SIZED_ANSWERS = """
import asyncio, sys
from pitcher_rpc.sdk import Response, Service

app = Service("sized")
calls = 0

@app.route("/")
def sized(request):
    global calls
    calls += 1
    print("call", calls, flush=True)
    return Response(200, b"b" * int(request.query_params.get("size", "1")))
"""


@pytest.mark.parametrize("transport", ["tcp", "unix", "udp"])
def test_answer_over_the_frame_limit_gives_502_naming_the_limit(
    launcher: Launcher, transport: str
) -> None:
    limit = 65536
    backend = launcher.script_backend(SIZED_ANSWERS + SERVE_APP, transport)
    proxy = launcher.proxy(
        toml_config(
            [{"name": "main", "prefix": "/", "cluster": "main", "timeout": 3.0, "retries": 1}],
            {"main": {"nodes": [backend.uri]}},
            upstream={"max_frame_size": limit},
        )
    )
    with proxy.connect() as client:
        assert client.request("GET", "/?size=1000").body == b"b" * 1000
        started = time.monotonic()
        response = client.request("GET", f"/?size={limit + 1000}")
        assert time.monotonic() - started < 1.0
        assert response.status == 502, response.body
        text = response.body.decode()
        if transport == "udp":
            # A datagram is smaller than the frame limit: that is the limit met.
            assert "over the datagram limit of" in text, text
        else:
            assert f"over the frame limit of {limit} bytes ([upstream] max_frame_size)" in text
        size = int(text.split("answer of ", 1)[1].split(" bytes", 1)[0])
        assert limit + 1000 < size < limit + 1100, text
        # It would be as large again: not retried, though GET is idempotent.
        backend.process.wait_for_line("call 2", stream="stdout")
        with pytest.raises(AssertionError):
            backend.process.wait_for_line("call 3", timeout=0.3, stream="stdout")
        # The connection to the node is fine: the next answer comes.
        assert client.request("GET", "/?size=10").body == b"b" * 10


# ------------------------------------------------------------------ many at once


async def _one_client(
    port: int, path: str, method: str = "GET"
) -> tuple[int, dict[str, object], dict[str, str]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(build_request(method, path))
        await writer.drain()
        raw_head = await reader.readuntil(b"\r\n\r\n")
        lines = raw_head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.lower()] = value.strip()
        body = await reader.readexactly(int(headers["content-length"]))
        answer = json.loads(body) if headers.get("content-type") == "application/json" else {}
        return status, answer, headers
    finally:
        writer.close()


def test_concurrent_requests_share_one_backend_connection_and_get_their_own_answers(
    launcher: Launcher,
) -> None:
    backend = launcher.test_backend("tcp")
    proxy = single_route_proxy(launcher, [backend.uri], timeout=4.0)
    count = 100

    async def run() -> list[tuple[int, dict, dict[str, str]]]:
        async with asyncio.timeout(4.0):
            return await asyncio.gather(
                *(_one_client(proxy.port, f"/many/{i}?jitter=0.05") for i in range(count))
            )

    results = asyncio.run(run())
    for index, (status, body, _headers) in enumerate(results):
        assert status == 200
        assert body["path"] == f"/many/{index}"
    # The backend saw them all, and finished them in another order than they came.
    assert sorted(body["arrival"] for _, body, _ in results) == list(range(1, count + 1))
    assert any(body["arrival"] != body["finish"] for _, body, _ in results)
    assert {body["connections"] for _, body, _ in results} == {1}
    established = established_connections(backend.port)
    if established is not None:
        assert established == 1


# ------------------------------------------------------------------ a backend lies

# A hand-written Pitcher peer misbehaving in one way, chosen by MODE. It
# speaks the real preface and SETTINGS frame first (except in "silent" mode)
# so that the proxy's client is past its handshake when the fault comes.
RAW_PEER = """
import asyncio, struct, sys
from transports.control import ErrorInfo, Settings
from transports.frame import HEADER, PREFACE, FrameType, encode_frame, encode_response

MODE = "{mode}"

async def answer(writer, request_id):
    if MODE == "garbage":
        writer.write(b"\\xff\\x00garbage that is not a frame header at all")
    elif MODE == "bad-payload":
        writer.write(encode_response(request_id, b"\\xff\\xff\\xff\\xff not protobuf"))
    elif MODE == "error-frame":
        writer.write(encode_frame(FrameType.ERROR, request_id, ErrorInfo(4, "boom").encode()))
    elif MODE == "unknown-id":
        writer.write(encode_response(request_id + 1000, b""))
    elif MODE == "huge-frame":
        writer.write(HEADER.pack(1, FrameType.RESPONSE, 0, 1 << 30, request_id, 0))

async def peer(reader, writer):
    try:
        if MODE == "silent":
            await reader.read()
            return
        settings = Settings(1 << 20, 64).encode()
        writer.write(PREFACE + encode_frame(FrameType.SETTINGS, 0, settings))
        await reader.readexactly(len(PREFACE))
        while True:
            header = await reader.readexactly(HEADER.size)
            _, kind, _, length, request_id, _ = HEADER.unpack(header)
            await reader.readexactly(length)
            if kind == FrameType.REQUEST:
                await answer(writer, request_id)
                await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()
"""

# An HTTP server, not a Pitcher peer: the wrong preface.
HTTP_INSTEAD_OF_PITCHER = """
import asyncio, sys

async def peer(reader, writer):
    writer.write(b"HTTP/1.1 400 Bad Request\\r\\nContent-Length: 0\\r\\n\\r\\n")
    try:
        await writer.drain()
        await reader.read()
    except ConnectionError:
        pass
    writer.close()
"""


def two_route_proxy(launcher: Launcher, broken: Backend, timeout: float = 3.0) -> Proxy:
    healthy = launcher.echo_backend("tcp")
    return launcher.proxy(
        toml_config(
            [
                {"name": "broken", "prefix": "/broken/", "cluster": "broken", "timeout": timeout},
                {"name": "healthy", "prefix": "/", "cluster": "healthy"},
            ],
            {"broken": {"nodes": [broken.uri]}, "healthy": {"nodes": [healthy.uri]}},
        )
    )


@pytest.mark.parametrize("mode", ["garbage", "bad-payload", "error-frame", "huge-frame"])
def test_malformed_answer_from_backend_gives_502_and_the_proxy_lives_on(
    launcher: Launcher, mode: str
) -> None:
    broken = launcher.script_backend(RAW_PEER.format(mode=mode) + SERVE_PEER)
    proxy = two_route_proxy(launcher, broken)
    for method in ("GET", "POST"):
        with proxy.connect() as client:
            started = time.monotonic()
            response = client.request(method, "/broken/x", body=b"data")
            assert response.status == 502, response.body
            assert time.monotonic() - started < 1.0
            assert client.request("GET", "/healthy/x").json()["route"] == "healthy"
    assert proxy.process.alive()


def test_answer_for_an_unknown_request_is_dropped_and_the_call_times_out(
    launcher: Launcher,
) -> None:
    broken = launcher.script_backend(RAW_PEER.format(mode="unknown-id") + SERVE_PEER)
    proxy = two_route_proxy(launcher, broken, timeout=0.5)
    response, elapsed = timed_get(proxy, "/broken/x")
    assert response.status == 504
    assert elapsed < 0.8
    assert get(proxy, "/healthy/x").status == 200


def test_backend_that_never_finishes_its_handshake_is_given_up_on(launcher: Launcher) -> None:
    broken = launcher.script_backend(RAW_PEER.format(mode="silent") + SERVE_PEER)
    healthy = launcher.echo_backend("tcp")
    proxy = launcher.proxy(
        toml_config(
            [
                {"name": "broken", "prefix": "/broken/", "cluster": "broken", "timeout": 5.0},
                {"name": "healthy", "prefix": "/", "cluster": "healthy"},
            ],
            {"broken": {"nodes": [broken.uri]}, "healthy": {"nodes": [healthy.uri]}},
            upstream={"connect_timeout": 0.3},
        )
    )
    response, elapsed = timed_get(proxy, "/broken/x")
    assert response.status == 502
    assert 0.25 <= elapsed < 1.0
    assert get(proxy, "/healthy/x").status == 200


def test_backend_that_is_not_a_pitcher_peer_gives_502_quickly(launcher: Launcher) -> None:
    broken = launcher.script_backend(HTTP_INSTEAD_OF_PITCHER + SERVE_PEER)
    proxy = two_route_proxy(launcher, broken, timeout=5.0)
    for _ in range(3):
        response, elapsed = timed_get(proxy, "/broken/x")
        assert response.status == 502
        # Refused at the preface, not left to run into the route's 5 s timeout.
        assert elapsed < 1.0
    assert proxy.process.alive()
    assert get(proxy, "/healthy/x").status == 200


# A backend's invalid headers and statuses, and its framing and hop-by-hop
# fields, are in test_raw_backend_answers.py: the SDK refuses to send the
# invalid ones, so a backend that writes raw answers tests the proxy there.


@pytest.mark.parametrize("status", [204, 304])
def test_backend_bodyless_status_sends_no_body(launcher: Launcher, status: int) -> None:
    backend = launcher.test_backend("tcp")
    proxy = single_route_proxy(launcher, [backend.uri])
    with proxy.connect() as client:
        response = client.request("GET", f"/empty?status={status}")
        assert response.status == status
        assert response.header("content-length") is None
        # A body sent anyway would be read as the start of the next response.
        assert client.request("GET", "/next").json()["path"] == "/next"


# ------------------------------------------------------------------ failover


@pytest.mark.parametrize("dead", ["tcp", "unix"])
@pytest.mark.parametrize("balance", ["round_robin", "weighted"])
def test_requests_fail_over_from_a_closed_port(launcher: Launcher, dead: str, balance: str) -> None:
    healthy = launcher.test_backend("tcp", name="healthy")
    dead_uri = (
        f"tcp://127.0.0.1:{free_port()}" if dead == "tcp" else f"unix://{launcher.tmpdir}/gone.sock"
    )
    proxy = single_route_proxy(launcher, [dead_uri, healthy.uri], balance=balance)
    with proxy.connect() as client:
        for index in range(20):
            # POST too: a request that never reached a node is safe to send elsewhere.
            method = "POST" if index % 2 else "GET"
            response = client.request(method, f"/failover/{index}", body=b"payload")
            assert response.status == 200, response.body
            assert response.json()["backend"] == "healthy"


def test_no_failover_when_retries_are_off(launcher: Launcher) -> None:
    healthy = launcher.test_backend("tcp", name="healthy")
    proxy = single_route_proxy(launcher, [f"tcp://127.0.0.1:{free_port()}", healthy.uri], retries=0)
    statuses = {get(proxy, f"/r0/{i}").status for i in range(4)}
    assert statuses == {200, 502}


# ------------------------------------------------------------------ a backend leaves


def test_backend_going_away_lets_in_flight_requests_complete(launcher: Launcher) -> None:
    backend = launcher.test_backend_via_cli("tcp", name="leaving")
    proxy = single_route_proxy(launcher, [backend.uri], timeout=4.0)
    count = 5
    clients = [proxy.connect() for _ in range(count)]
    try:
        for index, client in enumerate(clients):
            client.send(build_request("GET", f"/inflight/{index}?sleep=0.5&mark=leave{index}"))
        for index in range(count):
            launcher.wait_for_mark(f"leave{index}")
        backend.process.signal(signal.SIGTERM)
        for index, client in enumerate(clients):
            response = client.response()
            assert response.status == 200, response.body
            assert response.json()["path"] == f"/inflight/{index}"
    finally:
        for client in clients:
            client.close()
    assert backend.process.popen.wait(3.0) == 0
    response, elapsed = timed_get(proxy, "/after")
    assert response.status == 502
    assert elapsed < 0.5


def test_backend_going_away_sends_new_requests_to_the_other_node(launcher: Launcher) -> None:
    leaving = launcher.test_backend_via_cli("tcp", name="leaving")
    staying = launcher.test_backend("tcp", name="staying")
    proxy = single_route_proxy(launcher, [leaving.uri, staying.uri], timeout=4.0)
    # Round robin: the first request lands on the leaving node and stays in flight.
    with proxy.connect() as slow, proxy.connect() as client:
        slow.send(build_request("GET", "/long?sleep=0.8&mark=long"))
        launcher.wait_for_mark("long")
        leaving.process.signal(signal.SIGTERM)
        for index in range(10):
            response = client.request("POST", f"/during/{index}", body=b"x")
            assert response.status == 200
            assert response.json()["backend"] == "staying"
        long = slow.response()
        assert long.status == 200
        assert long.json()["backend"] == "leaving"


def test_no_request_fails_while_one_of_two_nodes_drains_under_load(launcher: Launcher) -> None:
    leaving = launcher.test_backend_via_cli("tcp", name="leaving")
    staying = launcher.test_backend("tcp", name="staying")
    proxy = single_route_proxy(launcher, [leaving.uri, staying.uri], timeout=4.0)
    workers = 20

    async def worker(index: int, stop: asyncio.Event) -> list[int]:
        statuses = []
        while not stop.is_set():
            method = "POST" if index % 2 else "GET"
            status, _, _ = await _one_client(proxy.port, f"/load/{index}?jitter=0.02", method)
            statuses.append(status)
        return statuses

    async def run() -> list[int]:
        stop = asyncio.Event()
        async with asyncio.timeout(4.0):
            tasks = [asyncio.create_task(worker(i, stop)) for i in range(workers)]
            await asyncio.sleep(0.2)
            leaving.process.signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            stop.set()
            return [status for statuses in await asyncio.gather(*tasks) for status in statuses]

    statuses = asyncio.run(run())
    assert len(statuses) > workers * 3
    # Requests that crossed the GOAWAY were never run by the leaving node, so
    # they are retried on the other one, whatever their method.
    assert set(statuses) == {200}
    assert leaving.process.popen.wait(3.0) == 0
