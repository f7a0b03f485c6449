"""``pitcher demo`` runs a master, so its admin listener and status page answer."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

from tests.proxy.conftest import (
    Launcher,
    child_pids,
    free_port,
    pitcher_command,
    wait_until,
)

# The demo's configured admin port (conf/demo.toml).
DEMO_ADMIN_PORT = 9180


def read(url: str) -> tuple[int, dict[str, str], bytes]:
    with urllib.request.urlopen(url, timeout=5) as response:
        headers = {name.lower(): value for name, value in response.headers.items()}
        return response.status, headers, response.read()


def read_json(url: str) -> Any:
    status, _, body = read(url)
    assert status == 200, body
    return json.loads(body)


@contextlib.contextmanager
def holding(port: int) -> Iterator[None]:
    """Keep ``port`` taken on loopback (it may already be: by another demo, say)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(OSError):
            sock.bind(("127.0.0.1", port))
            sock.listen(1)
        yield
    finally:
        sock.close()


def test_the_demo_serves_its_status_page_and_stops_with_ctrl_c(launcher: Launcher) -> None:
    port = free_port()
    # Its admin port taken, the demo takes any free one and says which.
    with holding(DEMO_ADMIN_PORT):
        demo = launcher.spawn([*pitcher_command(), "demo", "--listen", f"127.0.0.1:{port}"])
        line = demo.wait_for_line("Status page: ", stream="stdout")
    page = line.split("Status page: ", 1)[1].split()[0]
    assert page.startswith("http://127.0.0.1:") and page.endswith("/")
    assert not page.startswith(f"http://127.0.0.1:{DEMO_ADMIN_PORT}/")
    status, headers, body = read(page)
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"Pitcher RPC" in body

    for index in range(5):
        read(f"http://127.0.0.1:{port}/tcp/hello?n={index}")
        read(f"http://127.0.0.1:{port}/unix/hello?n={index}")
    report = read_json(page + "admin/status")
    routes = {route["name"]: route for route in report["routes"]}
    assert {"tcp", "unix", "udp", "zmq", "asgi"} <= set(routes)
    # The demo's configuration has the metrics module on: the page has rates.
    assert routes["tcp"]["rps"] > 0 and routes["tcp"]["p50"] is not None
    clusters = {cluster["name"]: cluster for cluster in report["clusters"]}
    assert clusters["echo_tcp"]["health"] is True
    assert [node["state"] for node in clusters["echo_tcp"]["nodes"]] == ["in_service"]
    (worker,) = report["workers"]
    assert worker["pid"] in child_pids(demo.pid)
    assert report["proxy"]["address"] == f"127.0.0.1:{port}"
    config_path = report["config"]["path"]
    assert os.path.exists(config_path)

    children = child_pids(demo.pid)
    started = time.monotonic()
    demo.signal(signal.SIGINT)
    assert demo.popen.wait(5.0) == 0, demo.output
    assert time.monotonic() - started < 3.0
    wait_until(lambda: not [p for p in children if os.path.exists(f"/proc/{p}")], 2.0, "exit")
    # The configuration it wrote goes with its temporary directory.
    assert not os.path.exists(os.path.dirname(config_path))
