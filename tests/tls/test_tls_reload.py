"""A reload swaps the listener's certificate: new handshakes get it, open connections carry on."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.proxy.conftest import Launcher, free_port, pitcher_command, wait_until
from tests.tls.conftest import Pair, Pki, connect, expired, get, proxy_config, san


def install(pair: Pair, live: Pair) -> None:
    """Put a new certificate and key where the configuration points, as a renewal does."""
    shutil.copyfile(pair.certificate, live.certificate)
    shutil.copyfile(pair.key, live.key)


def post_reload(port: int) -> tuple[int, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/admin/reload", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_reload_swaps_the_certificate_without_dropping_connections(
    launcher: Launcher, pki: Pki
) -> None:
    backend = launcher.echo_backend("tcp")
    first = pki.issue("first", "127.0.0.1", "first.test")
    live = Pair(f"{pki.directory}/live.pem", f"{pki.directory}/live.key")
    install(first, live)
    admin = free_port()
    text = proxy_config(backend.uri, f'certificate = "{live.certificate}"\nkey = "{live.key}"')
    text = text.replace('[admin]\nlisten = "127.0.0.1:0"', f'[admin]\nlisten = "127.0.0.1:{admin}"')
    proxy = launcher.proxy(text, workers=1)
    context = pki.client_context()

    kept, _ = connect(proxy.port, context)
    with kept:
        assert "first.test" in san(kept)
        client = get(kept, "/before")
        assert client.response().status == 200

        # A renewal: new files, SIGHUP. The master checks them, the worker swaps.
        install(pki.issue("second", "127.0.0.1", "second.test"), live)
        proxy.process.signal(signal.SIGHUP)
        proxy.process.wait_for_line("reloaded ")

        def serves(name: str) -> bool:
            fresh, _ = connect(proxy.port, context)
            with fresh:
                return name in san(fresh) and get(fresh).response().status == 200

        wait_until(lambda: serves("second.test"), 5.0, "the new certificate on a new connection")
        # The connection open before the reload carries on with its session.
        client.send(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
        assert client.response().status == 200
        assert "first.test" in san(kept)

        # A key that does not match: pitcher reload refuses at once, naming the key's line.
        install(Pair(pki.issue("third", "third.test").certificate, first.key), live)
        result = subprocess.run(
            [*pitcher_command(), "reload", "-c", proxy.config_path],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 1
        assert "server.tls.key: the key in" in result.stderr
        assert "does not match the certificate" in result.stderr
        # The admin API refuses it too, and the running certificate stays.
        status, answer = post_reload(admin)
        assert status == 400 and "does not match the certificate" in answer["error"], answer
        assert serves("second.test")

        # Fixed: the admin API's reload swaps again.
        install(pki.issue("fourth", "127.0.0.1", "fourth.test"), live)
        status, answer = post_reload(admin)
        assert status == 200 and answer["complete"], answer
        assert serves("fourth.test")
        client.send(b"GET /still HTTP/1.1\r\nHost: x\r\n\r\n")
        assert client.response().status == 200

    # An expired certificate is reloaded (as nginx would), with a warning in the answer and the log.
    install(pki.issue("expired", "127.0.0.1", **expired()), live)
    status, answer = post_reload(admin)
    assert status == 200 and answer["complete"], answer
    (warning,) = answer["warnings"]
    assert "server.tls.certificate: the certificate in" in warning and "expired on" in warning
    proxy.process.wait_for_line("WARNING pitcher.master: ")
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate has expired"):
        connect(proxy.port, context)

    # A failed handshake is counted by reason in the worker's status.
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as plain:
        plain.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert plain.recv(100) == b""

    def counted() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/admin/workers", timeout=5) as r:
            (worker,) = json.loads(r.read())["workers"]
        tls = worker["tls"]
        return (
            tls["enabled"] and tls["handshake_failures"].get("plain HTTP sent to the TLS port") == 1
        )

    wait_until(counted, 5.0, "the failed handshake in the worker's status")
    # And on /metrics, for Prometheus.
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        exposition = r.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(exposition)}
    failed = {
        s.labels["reason"]: s.value
        for s in families["pitcher_tls_handshake_failures"].samples
        if s.name.endswith("_total")
    }
    assert failed.get("plain HTTP sent to the TLS port") == 1, failed
    assert "pitcher_tls_handshakes_in_progress" in families
