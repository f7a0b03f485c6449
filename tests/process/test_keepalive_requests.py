"""``[server] keepalive_requests`` through a running proxy, on real sockets.

After that many requests on one connection the answer says ``connection:
close`` and the proxy ends the connection; what was pipelined behind it is
not answered, and a client still sending is not answered with a reset that
would destroy the last answer. A reload changes the limit for connections
accepted after it. The admin API has no limit.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from tests.process.test_master import admin, admin_port
from tests.proxy.conftest import (
    Launcher,
    Proxy,
    RawClient,
    build_request,
    toml_config,
)

LIMIT = 3


def limited_config(echo_uri: str, limit: int) -> str:
    return toml_config(
        [{"name": "echo", "prefix": "/", "cluster": "echo"}],
        {"echo": {"nodes": [echo_uri]}},
        server={"keepalive_requests": limit, "drain_timeout": 2.0},
    )


@pytest.fixture(scope="module")
def site() -> Iterator[tuple[Launcher, Proxy, str]]:
    """One worker behind a master (for the admin API and reloads), limit LIMIT."""
    launcher = Launcher()
    try:
        echo = launcher.echo_backend("tcp")
        yield launcher, launcher.proxy(limited_config(echo.uri, LIMIT), workers=1), echo.uri
    finally:
        launcher.close()


def closes(response_header: str | None) -> bool:
    return response_header is not None and response_header.lower() == "close"


def test_the_last_request_allowed_is_answered_with_close(site: tuple[Launcher, Proxy, str]) -> None:
    _, proxy, _ = site
    with proxy.connect() as client:
        for number in range(1, LIMIT + 1):
            response = client.request("GET", f"/{number}")
            assert response.status == 200
            assert closes(response.header("connection")) == (number == LIMIT), number
        assert client.is_closed(2.0), "the proxy ends the connection after the last answer"


def test_http10_keep_alive_requests_count_too(site: tuple[Launcher, Proxy, str]) -> None:
    _, proxy, _ = site
    with proxy.connect() as client:
        for number in range(1, LIMIT + 1):
            response = client.request(
                "GET", f"/{number}", [("Connection", "keep-alive")], version="1.0"
            )
            assert response.status == 200
            expected = "close" if number == LIMIT else "keep-alive"
            assert response.header("connection") == expected, number
        assert client.is_closed(2.0)


def test_pipelined_requests_behind_the_last_get_no_answer(
    site: tuple[Launcher, Proxy, str],
) -> None:
    _, proxy, _ = site
    with proxy.connect() as client:
        client.send(b"".join(build_request("GET", f"/{n}") for n in range(1, LIMIT + 3)))
        for number in range(1, LIMIT + 1):
            response = client.response()
            assert response.status == 200
            assert response.json()["path"] == f"/{number}"
        assert closes(response.header("connection"))
        assert client.is_closed(2.0), "nothing after the last answer: the proxy's side is shut"
        assert client.buffer == b""


def test_a_client_still_sending_gets_the_whole_last_answer(
    site: tuple[Launcher, Proxy, str],
) -> None:
    """A large last answer, still in the proxy's send queue when more requests arrive.

    Bytes arriving at a socket its owner has closed are answered with a reset,
    and a reset throws away what of the answer was not sent yet. The proxy
    lingers instead (this client pipelines), so the answer arrives whole.
    """
    _, proxy, _ = site
    body = b"x" * 400_000
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A small window: most of the answer waits in the proxy's send queue.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.settimeout(5.0)
    sock.connect((proxy.host, proxy.port))
    client = RawClient(sock)
    with client:
        # Pipelined: the requests before the last, then the last (large) one.
        client.send(
            b"".join(build_request("GET", f"/{n}") for n in range(1, LIMIT))
            + build_request("POST", "/big", [("Content-Type", "text/plain")], body)
        )
        time.sleep(0.3)  # the proxy answers all of them meanwhile; we read none
        client.send(build_request("GET", "/after"))  # sent before we read the close
        time.sleep(0.2)
        for _ in range(1, LIMIT):
            assert client.response().status == 200
        last = client.response()
        assert last.status == 200 and closes(last.header("connection"))
        assert last.json()["body"] == body.decode()
        assert client.is_closed(2.0)


def test_a_reload_sets_the_limit_of_connections_accepted_after_it(
    site: tuple[Launcher, Proxy, str],
) -> None:
    _, proxy, echo_uri = site
    port = admin_port(proxy)
    before = proxy.connect()
    try:
        assert not closes(before.request("GET", "/before").header("connection"))
        with open(proxy.config_path, "w", encoding="utf-8") as file:
            file.write(limited_config(echo_uri, LIMIT + 2))
        status, answer = admin(port, "/admin/reload", method="POST")
        assert status == 200, answer
        # Accepted before the reload: the limit it was accepted with.
        for number in range(2, LIMIT + 1):
            response = before.request("GET", f"/{number}")
        assert closes(response.header("connection"))
        with proxy.connect() as after:
            for number in range(1, LIMIT + 3):
                response = after.request("GET", f"/{number}")
                assert closes(response.header("connection")) == (number == LIMIT + 2), number
    finally:
        before.close()
        with open(proxy.config_path, "w", encoding="utf-8") as file:
            file.write(limited_config(echo_uri, LIMIT))
        assert admin(port, "/admin/reload", method="POST")[0] == 200


def test_the_admin_api_has_no_limit(site: tuple[Launcher, Proxy, str]) -> None:
    _, proxy, _ = site
    with RawClient.connect("127.0.0.1", admin_port(proxy)) as client:
        for _ in range(LIMIT * 4):
            response = client.request("GET", "/healthz")
            assert response.status == 200
            assert response.header("connection") is None
