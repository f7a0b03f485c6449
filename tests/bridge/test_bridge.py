"""The HTTP bridge between ``pitcher serve`` and a real HTTP/1.1 origin, each its own process."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pitcher_rpc.codec import decode_response, encode_request
from pitcher_rpc.sdk.bridge import Bridge, BridgeSettings, OriginError
from tests.proxy.conftest import (
    Launcher,
    Process,
    Proxy,
    free_port,
    get,
    pitcher_command,
    toml_config,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]
ORIGIN = str(Path(__file__).with_name("origin.py"))


def bridge_command(*args: str) -> list[str]:
    """``pitcher bridge ARGS``."""
    return [*pitcher_command(), "bridge", *args]


@dataclass
class Setup:
    proxy: Proxy
    bridge: Process
    origin_uri: str
    marks: str


def start_origin(launcher: Launcher, uri: str, marks: str) -> Process:
    origin = launcher.spawn([sys.executable, ORIGIN, uri, marks])
    launcher._wait_listening(origin, uri)
    return origin


def start_bridge(launcher: Launcher, origin_url: str, *extra: str) -> tuple[Process, str]:
    uri = f"unix://{launcher.tmpdir}/{launcher.unique('bridge')}.sock"
    process = launcher.spawn(bridge_command("--listen", uri, "--to", origin_url, *extra))
    launcher._wait_listening(process, uri)
    return process, uri


def proxy_for(launcher: Launcher, node: str) -> Proxy:
    config = toml_config(
        routes=[
            {"name": "slow", "prefix": "/slow", "cluster": "app", "timeout": 0.5},
            {"name": "app", "prefix": "/", "cluster": "app", "timeout": 5.0, "retries": 0},
        ],
        clusters={"app": {"nodes": [node]}},
        server={"max_body_size": 4_000_000},
    )
    return launcher.proxy(config)


@pytest.fixture(scope="module")
def launcher() -> Iterator[Launcher]:
    launcher = Launcher()
    try:
        yield launcher
    finally:
        launcher.close()


@pytest.fixture(scope="module")
def setup(launcher: Launcher) -> Setup:
    marks = launcher.mark_dir
    port = free_port()
    origin_uri = f"tcp://127.0.0.1:{port}"
    start_origin(launcher, origin_uri, marks)
    bridge, uri = start_bridge(launcher, f"http://127.0.0.1:{port}")
    return Setup(proxy_for(launcher, uri), bridge, origin_uri, marks)


def test_the_request_reaches_the_origin_as_the_proxy_sent_it(setup: Setup) -> None:
    body = b'{"order": 1}'
    answer = get(
        setup.proxy,
        "/some/pa%2Fth?b=2&a=%20",
        method="POST",
        headers=[("X-Custom", "one"), ("X-Custom", "two"), ("Content-Type", "application/json")],
        body=body,
        host="shop.example",
    )
    assert answer.status == 200, setup.bridge.output
    echo = answer.json()
    assert (echo["method"], echo["path"], echo["query"]) == ("POST", "/some/pa%2Fth", "b=2&a=%20")
    names = [name.lower() for name, _ in echo["headers"]]
    values = dict((name.lower(), value) for name, value in echo["headers"])
    assert values["host"] == "shop.example"
    assert [v for n, v in echo["headers"] if n.lower() == "x-custom"] == ["one", "two"]
    assert values["content-length"] == str(len(body))
    assert values["x-forwarded-for"] == "127.0.0.1"
    # Nothing the client did not send: no User-Agent or Accept-Encoding of the bridge's own.
    assert "user-agent" not in names and "accept-encoding" not in names
    assert (echo["body_length"], echo["body_head"]) == (len(body), body.decode())


def test_connections_to_the_origin_are_kept_alive(setup: Setup) -> None:
    first = get(setup.proxy, "/a").json()["connection"]
    second = get(setup.proxy, "/b").json()["connection"]
    assert first == second


def test_hop_by_hop_fields_of_the_answer_are_dropped(setup: Setup) -> None:
    answer = get(setup.proxy, "/hop")
    assert answer.status == 200
    assert answer.all("set-cookie") == ["a=1", "b=2"]
    assert answer.header("x-kept") == "yes"
    assert answer.header("x-private") is None
    assert answer.header("keep-alive") is None


@pytest.mark.parametrize("status", [201, 404, 503])
def test_the_origins_status_is_relayed(setup: Setup, status: int) -> None:
    answer = get(setup.proxy, f"/status/{status}")
    assert (answer.status, answer.body) == (status, b"as you wish\n")


def test_a_slow_origin_is_cut_at_the_deadline(setup: Setup) -> None:
    started = time.monotonic()
    assert get(setup.proxy, "/slow?s=3&name=deadline").status == 504
    assert time.monotonic() - started < 2
    # The bridge gave up too: it closed its connection to the origin.
    path = os.path.join(setup.marks, "deadline.closed")
    wait_until(lambda: os.path.exists(path), 2, "the origin's connection closed")


def test_a_client_going_away_cancels_the_origins_request(setup: Setup) -> None:
    # /long is under the 5 s route: only the proxy's CANCEL can end it this soon.
    client = setup.proxy.connect()
    client.send(b"GET /long?s=3&name=gone HTTP/1.1\r\nHost: x\r\n\r\n")
    arrived = os.path.join(setup.marks, "gone.arrived")
    wait_until(lambda: os.path.exists(arrived), 5, "the request at the origin")
    client.reset()
    path = os.path.join(setup.marks, "gone.closed")
    wait_until(lambda: os.path.exists(path), 1.5, "the origin's connection closed")


def test_an_origin_closing_mid_response_is_a_clear_502(setup: Setup) -> None:
    answer = get(setup.proxy, "/cut")
    assert answer.status == 502
    setup.bridge.wait_for_line("origin closed the connection mid-response")
    assert get(setup.proxy, "/after").status == 200


def test_an_answer_that_is_not_http_is_a_clear_502(setup: Setup) -> None:
    assert get(setup.proxy, "/garbage").status == 502
    setup.bridge.wait_for_line("origin sent an invalid response")


def test_a_header_with_a_control_byte_is_a_clear_502(setup: Setup) -> None:
    assert get(setup.proxy, "/badheader").status == 502
    setup.bridge.wait_for_line("/badheader: origin sent an invalid response: Invalid header value")


def test_a_large_body_within_the_frame_limit_passes_both_ways(setup: Setup) -> None:
    body = os.urandom(1_500_000)
    echo = get(setup.proxy, "/upload", method="PUT", body=body).json()
    assert echo["body_length"] == len(body)
    answer = get(setup.proxy, "/big?size=3000000")
    assert (answer.status, len(answer.body)) == (200, 3_000_000)
    assert get(setup.proxy, "/big?size=5000000").status == 502
    setup.bridge.wait_for_line("over the frame limit")


def test_an_unreachable_origin_is_a_clear_502(launcher: Launcher) -> None:
    port = free_port()
    bridge, uri = start_bridge(launcher, f"http://127.0.0.1:{port}")
    proxy = proxy_for(launcher, uri)
    assert get(proxy, "/").status == 502
    bridge.wait_for_line("origin unreachable")


def test_a_unix_socket_origin(launcher: Launcher) -> None:
    origin_path = f"{launcher.tmpdir}/{launcher.unique('origin')}.sock"
    start_origin(launcher, f"unix://{origin_path}", launcher.mark_dir)
    _, uri = start_bridge(launcher, f"unix://{origin_path}")
    echo = get(proxy_for(launcher, uri), "/over/unix?x=1").json()
    assert (echo["path"], echo["query"]) == ("/over/unix", "x=1")


def test_a_bridge_registers_like_any_service(launcher: Launcher, setup: Setup) -> None:
    admin = free_port()
    # A cluster needs a node: one nobody serves (a request it refuses goes to the next).
    nobody = f"unix://{launcher.tmpdir}/nobody.sock"
    text = toml_config([{"prefix": "/", "cluster": "app"}], {"app": {"nodes": [nobody]}})
    text = text.replace('[admin]\nlisten = "127.0.0.1:0"', f'[admin]\nlisten = "127.0.0.1:{admin}"')
    proxy = launcher.proxy(text, workers=1)
    port = setup.origin_uri.rpartition(":")[2]
    bridge = launcher.spawn(
        bridge_command(
            "--listen",
            "tcp://127.0.0.1:0",
            "--to",
            f"http://127.0.0.1:{port}",
            "--register",
            f"http://127.0.0.1:{admin}",
            "--cluster",
            "app",
        )
    )
    bridge.wait_for_line("registered ")
    for _ in range(3):
        assert get(proxy, "/joined").json()["path"] == "/joined"
    bridge.stop()
    assert bridge.popen.returncode == 0
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/admin/clusters", timeout=5) as reply:
        nodes = json.load(reply)["clusters"]["app"]["nodes"]
    assert [node["uri"] for node in nodes] == [nobody]


def test_a_request_without_a_deadline_gets_the_bridges_timeout(setup: Setup) -> None:
    port = int(setup.origin_uri.rpartition(":")[2])
    payload = encode_request(b"GET", b"/slow", b"s=3&name=own", [], [], b"", "", "")

    async def scenario() -> None:
        bridge = Bridge(BridgeSettings(f"http://127.0.0.1:{port}", timeout=0.3))
        await bridge.open()
        try:
            with pytest.raises(OriginError, match=r"did not answer within 0\.3 s"):
                await bridge.respond(payload, 0)
            ok = encode_request(b"GET", b"/fine", b"", [], [], b"", "", "")
            assert decode_response(await bridge.respond(ok, 0)).status == 200
        finally:
            await bridge.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("origin", "error"),
    [
        ("https://example.test", "https origins are not bridged"),
        ("ftp://x", "http://HOST:PORT"),
        ("http://127.0.0.1:99999", "out of range"),
        ("unix://relative.sock", "absolute"),
        ("http://a:1/x?y=1", "no query"),
    ],
)
def test_an_origin_url_is_checked(origin: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        BridgeSettings(origin)


def test_a_kept_alive_connection_closed_under_a_request_is_retried_if_idempotent(
    setup: Setup,
) -> None:
    # One connection at a time to a fresh bridge, so the second request reuses the first's.
    port = setup.origin_uri.rpartition(":")[2]

    async def scenario() -> None:
        bridge = Bridge(BridgeSettings(f"http://127.0.0.1:{port}", connections=1))
        await bridge.open()
        try:
            first = decode_response(await bridge.respond(request(b"GET", b"/a"), 5000))
            number = json.loads(first.body)["connection"]
            again = decode_response(await bridge.respond(request(b"GET", b"/drop"), 5000))
            assert again.status == 200
            assert json.loads(again.body)["connection"] == number + 1  # a fresh one
            with pytest.raises(OriginError, match="closed the connection without an answer"):
                await bridge.respond(request(b"POST", b"/drop"), 5000)
        finally:
            await bridge.close()

    asyncio.run(scenario())


def request(method: bytes, path: bytes, query: bytes = b"") -> bytes:
    return encode_request(method, path, query, [b"host"], [b"origin.test"], b"", "", "")


def test_chunked_close_delimited_and_head_answers(setup: Setup) -> None:
    port = setup.origin_uri.rpartition(":")[2]

    async def scenario() -> None:
        bridge = Bridge(BridgeSettings(f"http://127.0.0.1:{port}", connections=1))
        await bridge.open()
        try:
            chunked = decode_response(await bridge.respond(request(b"GET", b"/chunked"), 5000))
            assert (chunked.status, chunked.body) == (200, b"hello world")
            ended = decode_response(await bridge.respond(request(b"GET", b"/eof"), 5000))
            assert (ended.status, ended.body) == (200, b"until the end")
            head = decode_response(await bridge.respond(request(b"HEAD", b"/a"), 5000))
            assert (head.status, head.body) == (200, b"")
            number = json.loads(
                decode_response(await bridge.respond(request(b"GET", b"/b"), 5000)).body
            )["connection"]
            # The answer to HEAD had a Content-Length and no body: the connection
            # was kept, and the next answer read right.
            after = decode_response(await bridge.respond(request(b"GET", b"/c"), 5000))
            assert json.loads(after.body)["connection"] == number
        finally:
            await bridge.close()

    asyncio.run(scenario())


def test_requests_wait_for_a_connection_at_the_limit(setup: Setup) -> None:
    port = setup.origin_uri.rpartition(":")[2]

    async def scenario() -> None:
        bridge = Bridge(BridgeSettings(f"http://127.0.0.1:{port}", connections=2))
        await bridge.open()
        try:
            answers = await asyncio.gather(
                *(
                    bridge.respond(request(b"GET", b"/slow", b"s=0.1&name=limit%d" % n), 5000)
                    for n in range(5)
                )
            )
            assert [decode_response(answer).status for answer in answers] == [200] * 5
            assert len(bridge._pool._open) <= 2  # type: ignore[union-attr]
        finally:
            await bridge.close()

    asyncio.run(scenario())
