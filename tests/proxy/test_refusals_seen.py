"""Requests refused before they make an exchange are counted and logged.

The parser's refusals (400, 408, 413, 414, 431, 505) and a connection refused
at ACCEPT reach the metrics module (by status and reason) and the access log
(a line with what is known), in one process and through ``pitcher serve``
with two workers, on real sockets.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from pitcher_rpc.proxy.server import ProxyServer
from pitcher_rpc.sdk import Request, Response, Service
from tests.inprocess import running_proxy, serving
from tests.process.test_master import admin_port
from tests.proxy.conftest import Launcher, short_tmpdir, toml_config, wait_until

app = Service("refusals-test")


@app.route("/")
def fine(request: Request) -> Response:
    return Response(200, "fine\n")


HEADER_TIMEOUT = 0.3

CONFIG = """
[server]
listen = "127.0.0.1:0"
header_timeout = {header_timeout}
max_header_size = 1024
max_body_size = 100

[modules.metrics]

[modules.access_log]
path = "{log}"
flush_interval = 0.05

[[routes]]
name = "fine"
prefix = "/"
cluster = "backend"

[clusters.backend]
nodes = ["{node}"]
"""

TOO_LARGE_HEAD = b"GET /big HTTP/1.1\r\nHost: x\r\nx-filler: " + b"a" * 2000 + b"\r\n\r\n"
BODY_TOO_LARGE = b"POST /upload?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n"
NOT_HTTP = b"\x16\x03\x01 hello\r\n\r\n"
MISSING_HOST = b"GET /nohost HTTP/1.1\r\n\r\n"
SLOW_HEAD = b"GET /slow HTTP/1.1\r\nHost: x\r\n"


async def answer_of(port: int, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection; everything the proxy sends until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5.0)
    finally:
        writer.close()


def log_lines(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def refusal_counts(proxy: ProxyServer) -> dict[str, dict[str, int]]:
    return proxy.module_stats()["metrics"]["refusals"]


def test_refusals_are_counted_by_status_and_reason_and_logged_in_one_process() -> None:
    directory = short_tmpdir()
    log = os.path.join(directory, "access.log")

    async def main() -> None:
        async with (
            serving(app) as [node],
            running_proxy(CONFIG.format(node=node, log=log, header_timeout=HEADER_TIMEOUT)) as (
                proxy,
                port,
            ),
        ):
            assert (await answer_of(port, TOO_LARGE_HEAD)).startswith(b"HTTP/1.1 431 ")
            assert (await answer_of(port, BODY_TOO_LARGE)).startswith(b"HTTP/1.1 413 ")
            assert (await answer_of(port, NOT_HTTP)).startswith(b"HTTP/1.1 400 ")
            assert (await answer_of(port, MISSING_HOST)).startswith(b"HTTP/1.1 400 ")
            started = time.monotonic()
            slow = await answer_of(port, SLOW_HEAD)
            assert slow.startswith(b"HTTP/1.1 408 "), slow
            assert time.monotonic() - started >= HEADER_TIMEOUT
            # A request that is served is not a refusal.
            fine = await answer_of(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert fine.startswith(b"HTTP/1.1 200 ")

            assert refusal_counts(proxy) == {
                "431": {"headers_too_large": 1},
                "413": {"body_too_large": 1},
                "400": {"bad_request": 1, "bad_host": 1},
                "408": {"header_timeout": 1},
            }
            # The request counters are left as they were: one request served.
            routes = proxy.module_stats()["metrics"]["routes"]
            assert routes["fine"]["requests"] == {"200": 1}
            await wait_for_lines(log, 6)

    asyncio.run(main())
    lines = log_lines(log)
    served = [line for line in lines if line["reason"] is None]
    assert [line["status"] for line in served] == [200]
    refused = {line["status"]: line for line in lines if line["reason"] and line["status"] != 400}
    bad = [line for line in lines if line["status"] == 400]
    assert sorted(refused) == [408, 413, 431]

    big = refused[431]
    assert big["reason"] == "headers_too_large"
    assert (big["method"], big["path"]) == ("GET", "/big")
    assert big["client"] == "127.0.0.1"
    assert big["bytes"] > 0 and big["detail"]
    assert big["time"].endswith("Z")
    assert big["route"] is None and big["request_id"] is None and big["total"] is None

    upload = refused[413]
    assert (upload["reason"], upload["method"], upload["path"]) == (
        "body_too_large",
        "POST",
        "/upload?x=1",
    )
    timeout = refused[408]
    assert (timeout["reason"], timeout["method"], timeout["path"]) == (
        "header_timeout",
        "GET",
        "/slow",
    )
    by_reason = {line["reason"]: line for line in bad}
    assert sorted(by_reason) == ["bad_host", "bad_request"]
    # Nothing of the request line was parsed: null, not a guess.
    assert by_reason["bad_request"]["method"] is None
    assert by_reason["bad_request"]["path"] is None
    assert by_reason["bad_host"]["path"] == "/nohost"
    assert "Host" in by_reason["bad_host"]["detail"]


async def wait_for_lines(path: str, count: int) -> None:
    deadline = time.monotonic() + 5.0
    while len(log_lines(path)) < count:
        assert time.monotonic() < deadline, log_lines(path)
        await asyncio.sleep(0.02)


def test_a_connection_refused_at_accept_is_counted_and_logged() -> None:
    directory = short_tmpdir()
    log = os.path.join(directory, "access.log")
    text = CONFIG.format(node="tcp://127.0.0.1:1", log=log, header_timeout=5.0)
    text += '\n[modules.ip_filter]\ndeny = ["127.0.0.1"]\n'

    async def main() -> None:
        async with running_proxy(text) as (proxy, port):
            answer = await answer_of(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 403 "), answer
            assert refusal_counts(proxy) == {"403": {"refused_at_accept": 1}}
            await wait_for_lines(log, 1)

    asyncio.run(main())
    [line] = log_lines(log)
    assert (line["status"], line["reason"], line["method"], line["path"]) == (
        403,
        "refused_at_accept",
        None,
        None,
    )


def test_refusals_of_two_workers_are_on_metrics_and_in_the_shared_log(
    launcher: Launcher,
) -> None:
    echo = launcher.echo_backend("tcp")
    log = os.path.join(launcher.tmpdir, "access.log")
    text = toml_config(
        [{"name": "echo", "prefix": "/", "cluster": "echo"}],
        {"echo": {"nodes": [echo.uri]}},
        server={"header_timeout": HEADER_TIMEOUT, "max_header_size": 1024},
    )
    text += f'\n[modules.metrics]\n\n[modules.access_log]\npath = "{log}"\nflush_interval = 0.05\n'
    proxy = launcher.proxy(text, workers=2)
    port = admin_port(proxy)

    def refused(data: bytes, count: int) -> None:
        for _ in range(count):
            with socket.create_connection((proxy.host, proxy.port), timeout=5) as sock:
                sock.sendall(data)
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 4"), answer

    refused(TOO_LARGE_HEAD, 4)
    refused(NOT_HTTP, 3)
    refused(SLOW_HEAD, 2)

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
    samples = {
        (sample.labels["status"], sample.labels["reason"]): sample.value
        for sample in families["pitcher_http_refusals"].samples
        if sample.name == "pitcher_http_refusals_total"
    }
    assert samples == {
        ("431", "headers_too_large"): 4,
        ("400", "bad_request"): 3,
        ("408", "header_timeout"): 2,
    }
    wait_until(lambda: len(log_lines(log)) >= 9, 5.0, "nine lines in the access log")
    lines = log_lines(log)
    assert sorted((line["status"], line["reason"]) for line in lines) == sorted(
        [(431, "headers_too_large")] * 4
        + [(400, "bad_request")] * 3
        + [(408, "header_timeout")] * 2
    )
