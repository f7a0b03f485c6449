"""Streamed bodies end to end: an HTTP client, ``pitcher serve``, ``pitcher backend``.

The SDK service and the Starlette and FastAPI apps of tests/sdk/stream_apps.py
run under ``pitcher backend`` over Unix sockets, behind one proxy process;
the client is http.client (or a raw socket where it must see the bytes).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.proxy.conftest import Launcher, Proxy, pitcher_command, toml_config
from tests.sdk import stream_apps
from tests.sdk.test_streams import parse_event_stream

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MIB = 1024 * 1024


@dataclass
class Setup:
    proxy: Proxy
    service_pid: int

    def connect(self, timeout: float = 10.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.proxy.host, self.proxy.port, timeout=timeout)


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    launcher = Launcher()
    try:
        nodes = {}
        pids = {}
        apps = [
            ("sdk", "tests.sdk.stream_apps:service"),
            ("starlette", "tests.sdk.stream_apps:starlette_app"),
        ]
        if stream_apps.fastapi_app is not None:
            apps.append(("fastapi", "tests.sdk.stream_apps:fastapi_app"))
        for name, app in apps:
            uri = launcher.uri("unix")
            process = launcher.spawn(
                [*pitcher_command(), "backend", app, "--listen", uri], cwd=ROOT
            )
            nodes[name] = uri
            pids[name] = process.pid
        for process, uri in zip(launcher.processes, nodes.values(), strict=True):
            launcher._wait_listening(process, uri)
        config = toml_config(
            routes=[
                {
                    "name": name,
                    "prefix": f"/{name}/",
                    "cluster": name,
                    "strip_prefix": True,
                    "timeout": 10.0,
                }
                for name in nodes
            ],
            clusters={name: {"nodes": [uri]} for name, uri in nodes.items()},
            server={"max_body_size": 64 * MIB},
        )
        yield Setup(launcher.proxy(config), pids["sdk"])
    finally:
        launcher.close()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_large_answer_streams_with_its_length_and_the_service_stays_small(setup: Setup) -> None:
    connection = setup.connect()
    connection.request("GET", "/sdk/big?mib=1")
    assert len(connection.getresponse().read()) == MIB  # warm-up
    before = peak = rss_kib(setup.service_pid)
    connection.request("GET", "/sdk/big?mib=48&size=1")
    response = connection.getresponse()
    assert response.status == 200
    assert response.getheader("content-length") == str(48 * MIB)
    assert response.getheader("transfer-encoding") is None
    received = 0
    while piece := response.read(MIB):
        assert piece[:256] == bytes(range(256)) if received % 65536 == 0 else True
        received += len(piece)
        if received % (8 * MIB) == 0:
            peak = max(peak, rss_kib(setup.service_pid))
    print(f"48 MiB through the proxy: service RSS {before} -> peak {peak} KiB")
    assert received == 48 * MIB
    assert peak - before < 16 * 1024
    # Without a size: chunked.
    connection.request("GET", "/sdk/big?mib=2")
    response = connection.getresponse()
    assert response.getheader("transfer-encoding") == "chunked"
    assert len(response.read()) == 2 * MIB


def test_server_sent_events_reach_the_client_as_they_are_made(setup: Setup) -> None:
    connection = setup.connect()
    connection.request("GET", "/sdk/events", headers={"Accept": "text/event-stream"})
    response = connection.getresponse()
    assert response.status == 200
    assert response.getheader("content-type") == "text/event-stream; charset=utf-8"
    assert response.getheader("cache-control") == "no-cache"
    first = response.read1(65536)
    first_at = time.monotonic()
    assert parse_event_stream(first)[0]["data"] == "hello\nworld"
    rest = response.read()
    # The first event was at the client while the handler still paused (0.3 s).
    assert time.monotonic() - first_at >= 0.15, "the first event was held back"
    assert rest.count(b": ping\n\n") >= 1
    assert [event["data"] for event in parse_event_stream(first + rest)] == [
        "hello\nworld",
        '{"n":2}',
        "bye",
    ]


def chunked_upload(setup: Setup, path: str, data: bytes) -> http.client.HTTPResponse:
    connection = setup.connect()

    def pieces() -> Iterator[bytes]:
        for at in range(0, len(data), 100_000):
            yield data[at : at + 100_000]

    connection.request("POST", path, body=pieces(), encode_chunked=True)
    return connection.getresponse()


def test_an_upload_reaches_the_handler_as_a_stream(setup: Setup) -> None:
    data = os.urandom(8 * MIB + 3)
    digest = hashlib.sha256(data).hexdigest()
    answer = json.loads(chunked_upload(setup, "/sdk/upload", data).read())
    assert answer["size"] == len(data) and answer["sha256"] == digest
    assert answer["pieces"] > 1
    # A route that reads whole gets it whole, past the frame limit's 4 MiB too
    # when max_body_size allows: here the frame limit bounds it (413).
    response = chunked_upload(setup, "/sdk/buffered", data)
    assert response.status == 413
    small = data[: 2 * MIB]
    answer = json.loads(chunked_upload(setup, "/sdk/buffered", small).read())
    assert answer == {"size": len(small), "sha256": hashlib.sha256(small).hexdigest()}


def test_an_exception_midway_cuts_the_answer_the_client_sees(setup: Setup) -> None:
    connection = setup.connect()
    connection.request("GET", "/sdk/fail")
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("transfer-encoding") == "chunked"
    with pytest.raises(http.client.IncompleteRead) as cut:
        response.read()
    assert cut.value.partial == b"a" * 1000 + b"b" * 1000
    # A declared length not kept: the client gets fewer bytes than Content-Length.
    connection = setup.connect()
    connection.request("GET", "/sdk/short")
    response = connection.getresponse()
    assert response.getheader("content-length") == "10"
    with pytest.raises(http.client.IncompleteRead):
        response.read()


def test_asgi_streaming_response_and_upload_through_the_proxy(setup: Setup) -> None:
    connection = setup.connect()
    connection.request("GET", "/starlette/numbers?count=2000")
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("transfer-encoding") == "chunked"
    assert response.read() == b"".join(b"%d\n" % n for n in range(2000))
    connection.request("GET", "/starlette/big?mib=16")
    assert len(connection.getresponse().read()) == 16 * MIB
    connection.request("GET", "/starlette/broken")
    with pytest.raises(http.client.IncompleteRead):
        connection.getresponse().read()
    data = os.urandom(3 * MIB)
    answer = json.loads(chunked_upload(setup, "/starlette/upload", data).read())
    assert answer["size"] == len(data) and answer["pieces"] > 1
    assert answer["sha256"] == hashlib.sha256(data).hexdigest()
    assert answer["content_length"] is None  # chunked: no length was declared


def test_fastapi_event_source_response_through_the_proxy(setup: Setup) -> None:
    if stream_apps.fastapi_app is None:
        pytest.skip("needs FastAPI with fastapi.sse")
    connection = setup.connect()
    connection.request("GET", "/fastapi/events")
    response = connection.getresponse()
    assert response.status == 200
    assert response.getheader("content-type", "").startswith("text/event-stream")
    events = parse_event_stream(response.read())
    assert [(e["type"], e["data"], e["id"]) for e in events] == [
        ("note", "first", "a1"),
        ("message", '{"n":2}', "a1"),
    ]
    connection.request("GET", "/fastapi/json")
    assert json.loads(connection.getresponse().read()) == {"ok": True}
