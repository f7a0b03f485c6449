"""The proxy's TLS listener: `pitcher serve` with [server.tls], real clients on loopback."""

from __future__ import annotations

import asyncio
import http.client
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from pitcher_rpc.config import parse_config
from pitcher_rpc.proxy.server import ProxyServer
from pitcher_rpc.sdk.echo import app as echo_app
from tests.inprocess import running_proxy, serving
from tests.proxy.conftest import Backend, Launcher, Proxy
from tests.tls.conftest import Pki, connect, expired, get, proxy_config, san


@pytest.fixture(scope="module")
def launcher_m() -> Iterator[Launcher]:
    launcher = Launcher()
    try:
        yield launcher
    finally:
        launcher.close()


@pytest.fixture(scope="module")
def backend(launcher_m: Launcher) -> Backend:
    return launcher_m.echo_backend("tcp")


@pytest.fixture(scope="module")
def proxy(launcher_m: Launcher, backend: Backend, pki: Pki) -> Proxy:
    """A default certificate for 127.0.0.1, and another for api.test chosen by SNI."""
    default, named = pki.issue("listener"), pki.issue("named", "api.test", "*.api.test")
    tls = f"""certificate = "{default.certificate}"
key = "{default.key}"
[[server.tls.certificates]]
names = ["api.test", "*.api.test"]
certificate = "{named.certificate}"
key = "{named.key}"
"""
    return launcher_m.proxy(proxy_config(backend.uri, tls))


@pytest.fixture(scope="module")
def strict(launcher_m: Launcher, backend: Backend, pki: Pki) -> Proxy:
    """TLS 1.3 only, and a client certificate from the main CA required."""
    pair = pki.issue("strict")
    tls = f"""certificate = "{pair.certificate}"
key = "{pair.key}"
min_version = "1.3"
client_ca = "{pki.ca_file}"
"""
    # The handshake is held to header_timeout.
    return launcher_m.proxy(proxy_config(backend.uri, tls, server="header_timeout = 0.5"))


def wait_logged(proxy: Proxy, needle: str) -> str:
    return proxy.process.wait_for_line(needle, timeout=5.0)


def test_http_client_is_answered_over_tls_on_a_keep_alive_connection(
    proxy: Proxy, pki: Pki
) -> None:
    assert "(TLS 1.2+, 2 certificates by SNI; backlog" in proxy.process.wait_for_line("listening")
    context = pki.client_context()
    context.set_alpn_protocols(["h2", "http/1.1"])
    connection = http.client.HTTPSConnection("127.0.0.1", proxy.port, context=context, timeout=5)
    try:
        for path in ("/one", "/two"):
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read()
            assert response.status == 200, body
            assert b'"path": "%s"' % path.encode() in body
            assert b'["x-forwarded-proto", "https"]' in body, body
        # A client's own X-Forwarded-* takes the header-rewriting path: https there too.
        connection.request("GET", "/three", headers={"X-Forwarded-Proto": "http"})
        body = connection.getresponse().read()
        assert body.count(b'"x-forwarded-proto"') == 1, body
        assert b'["x-forwarded-proto", "https"]' in body, body
        secure = connection.sock
        assert isinstance(secure, ssl.SSLSocket)
        # HTTP/1.1 is all the listener speaks, and ALPN says so to a client offering h2.
        assert secure.selected_alpn_protocol() == "http/1.1"
        assert secure.version() in ("TLSv1.2", "TLSv1.3")
        assert "127.0.0.1" in san(secure)
    finally:
        connection.close()


@pytest.mark.skipif(
    shutil.which("curl") is None and not os.environ.get("PITCHER_REQUIRE_CURL"),
    reason="curl is not installed (CI sets PITCHER_REQUIRE_CURL and installs it)",
)
def test_curl_is_answered_over_tls(proxy: Proxy, pki: Pki) -> None:
    result = subprocess.run(
        [
            "curl",
            "--silent",
            "--show-error",
            "--cacert",
            pki.ca_file,
            "--write-out",
            "\n%{http_code} %{http_version} %{ssl_verify_result}",
            f"https://127.0.0.1:{proxy.port}/curl?x=1",
        ],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert result.returncode == 0, result.stderr
    body, _, outcome = result.stdout.rpartition("\n")
    assert outcome == "200 1.1 0"
    assert '"query": "x=1"' in body
    # And the name chosen by SNI, through curl's --resolve.
    result = subprocess.run(
        [
            "curl",
            "--silent",
            "--cacert",
            pki.ca_file,
            "--resolve",
            f"v2.api.test:{proxy.port}:127.0.0.1",
            "--write-out",
            "%{http_code}",
            "--output",
            "/dev/null",
            f"https://v2.api.test:{proxy.port}/",
        ],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert result.stdout == "200", result.stderr


def test_sni_chooses_the_certificate(proxy: Proxy, pki: Pki) -> None:
    context = pki.client_context()
    for asked, expected in (
        ("api.test", "api.test"),
        ("v1.api.test", "*.api.test"),
        ("127.0.0.1", "127.0.0.1"),  # no SNI for an address: the default certificate
    ):
        secure, _ = connect(proxy.port, context, server_hostname=asked)
        with secure:
            assert expected in san(secure)
            assert get(secure).response().status == 200
    # A name no certificate has gets the default one, which the client then refuses.
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        connect(proxy.port, context, server_hostname="elsewhere.test")


def test_a_client_that_does_not_trust_the_certificate_is_refused_and_logged(
    proxy: Proxy, pki: Pki
) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        connect(proxy.port, pki.client_context(pki.other_ca_file))
    line = wait_logged(proxy, "TLS handshake with 127.0.0.1:")
    assert "WARNING pitcher.tls" in line and " failed: " in line


def test_plain_http_on_the_tls_port_is_logged(proxy: Proxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        port = sock.getsockname()[1]
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(100) == b""  # closed: no HTTP answer on a TLS port
    wait_logged(proxy, f"TLS handshake with 127.0.0.1:{port} failed: plain HTTP sent to the")


def test_a_version_below_min_version_is_refused(strict: Proxy, pki: Pki) -> None:
    context = pki.client_context(pair=pki.issue("client"))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        connect(strict.port, context)
    wait_logged(strict, "failed: the client offers no TLS version at or above min_version")


def test_a_required_client_certificate(strict: Proxy, pki: Pki) -> None:
    line = strict.process.wait_for_line("listening")
    assert "(TLS 1.3+, client certificates required; backlog" in line
    # With one from the CA it trusts: served.
    context = pki.client_context(pair=pki.issue("client"))
    secure, _ = connect(strict.port, context)
    with secure:
        assert get(secure).response().status == 200
    # Without one: refused (TLS 1.3 tells the client on its first read).
    secure, port = connect(strict.port, pki.client_context())
    with secure, pytest.raises((ssl.SSLError, ConnectionError)):
        get(secure).response()
    wait_logged(strict, f"TLS handshake with 127.0.0.1:{port} failed: the client sent no cert")
    # With one from another CA: refused.
    stranger = pki.client_context(pair=pki.issue("stranger", ca=pki.other_ca))
    secure, port = connect(strict.port, stranger)
    with secure, pytest.raises((ssl.SSLError, ConnectionError)):
        get(secure).response()
    wait_logged(strict, f"TLS handshake with 127.0.0.1:{port} failed: the client's certificate")


def test_an_optional_client_certificate(launcher_m: Launcher, backend: Backend, pki: Pki) -> None:
    pair = pki.issue("optional")
    tls = f"""certificate = "{pair.certificate}"
key = "{pair.key}"
client_ca = "{pki.ca_file}"
client_certificate = "optional"
"""
    proxy = launcher_m.proxy(proxy_config(backend.uri, tls))
    for context in (pki.client_context(), pki.client_context(pair=pki.issue("client"))):
        secure, _ = connect(proxy.port, context)
        with secure:
            assert get(secure).response().status == 200
    # A certificate sent must still be a valid one.
    stranger = pki.client_context(pair=pki.issue("stranger", ca=pki.other_ca))
    secure, _ = connect(proxy.port, stranger)
    with secure, pytest.raises((ssl.SSLError, ConnectionError)):
        get(secure).response()
    proxy.process.stop()


def test_an_expired_certificate_is_served_with_a_warning(
    launcher_m: Launcher, backend: Backend, pki: Pki
) -> None:
    pair = pki.issue("expired", **expired())
    tls = f'certificate = "{pair.certificate}"\nkey = "{pair.key}"\n'
    proxy = launcher_m.proxy(proxy_config(backend.uri, tls))
    line = proxy.process.wait_for_line("warning: ")
    assert "server.tls.certificate: the certificate in" in line and "expired on" in line
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate has expired"):
        connect(proxy.port, pki.client_context())
    wait_logged(proxy, "TLS handshake with 127.0.0.1:")
    proxy.process.stop()


def test_handshakes_under_way_count_against_the_connection_cap(
    launcher_m: Launcher, backend: Backend, pki: Pki
) -> None:
    pair = pki.issue("capped")
    tls = f'certificate = "{pair.certificate}"\nkey = "{pair.key}"\n'
    proxy = launcher_m.proxy(proxy_config(backend.uri, tls, server="max_connections = 2"))
    # Clients that connect and leave before their handshake (TCP health checks)
    # hold no place once gone.
    for _ in range(3):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=5).close()
    # Two clients that connect and never say hello hold both places.
    silent = [socket.create_connection(("127.0.0.1", proxy.port), timeout=5) for _ in range(2)]
    outcome: list[int] = []

    def third() -> None:
        secure, _ = connect(proxy.port, pki.client_context())
        with secure:
            outcome.append(get(secure).response().status)

    waiting = threading.Thread(target=third)
    waiting.start()
    try:
        waiting.join(0.5)
        assert waiting.is_alive() and outcome == []  # in the backlog, not handshaking
        silent[0].close()
        waiting.join(5.0)
        assert outcome == [200]
    finally:
        for sock in silent:
            sock.close()
        waiting.join(5.0)
        proxy.process.stop()


def test_the_scheme_follows_the_listener_across_reloads(pki: Pki) -> None:
    # What X-Forwarded-Proto is to say: https on a TLS listener, http again without.
    pair = pki.issue("scheme")
    tls = f'certificate = "{pair.certificate}"\nkey = "{pair.key}"\n'
    text = proxy_config("tcp://127.0.0.1:7001", tls)
    secure = parse_config(text)
    plain = parse_config(text.replace("[server.tls]\n" + tls, ""))

    async def run() -> None:
        server = ProxyServer(secure)
        assert (server.scheme, server.forwarded_proto) == ("https", b"https")
        server.reload(plain)
        assert (server.scheme, server.forwarded_proto) == ("http", b"http")
        await server.upstreams.close(0.1)

    asyncio.run(run())


def test_a_handshake_is_held_to_header_timeout(strict: Proxy) -> None:
    with socket.create_connection(("127.0.0.1", strict.port), timeout=5) as silent:
        port = silent.getsockname()[1]
        began = time.monotonic()
        assert silent.recv(100) == b""  # closed by the proxy, nothing said
        assert 0.3 < time.monotonic() - began < 3.0
    wait_logged(strict, f"TLS handshake with 127.0.0.1:{port} failed: no handshake in time")


def test_the_stock_event_loop_hands_over_bytes_sent_behind_the_handshake(pki: Pki) -> None:
    # asyncio's own loop reads what the client sends right after its handshake
    # before start_tls returns: those bytes must reach the HTTP connection, in order.
    pair = pki.issue("stock")
    tls = f'certificate = "{pair.certificate}"\nkey = "{pair.key}"\n'

    async def main() -> None:
        async with (
            serving(echo_app) as [node],
            running_proxy(proxy_config(node, tls)) as (proxy, port),
        ):
            context = pki.client_context()
            for _ in range(3):
                reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
                # Two pipelined requests in the same write as the end of the handshake.
                writer.write(
                    b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n"
                )
                for path in (b"/a", b"/b"):
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                    assert head.startswith(b"HTTP/1.1 200"), head
                    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    assert b'"path": "%s"' % path in await reader.readexactly(length)
                writer.close()
            assert proxy.handshake_failures == {}

    asyncio.run(main())
