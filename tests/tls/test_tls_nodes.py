"""tls:// nodes: pitcher backend serving frames inside TLS, the proxy's clusters reaching them."""

from __future__ import annotations

import asyncio
import os
import subprocess

import pytest

from pitcher_rpc.config import parse_config
from pitcher_rpc.proxy.upstream import Upstreams
from tests.proxy.conftest import (
    Backend,
    Launcher,
    Process,
    free_port,
    get,
    pitcher_command,
    wait_until,
)
from tests.tls.conftest import Pair, Pki


def tls_backend(launcher: Launcher, pair: Pair, client_ca: str | None = None) -> Backend:
    """``pitcher backend`` of the echo app on a tls:// address, ready to serve."""
    uri = f"tls://127.0.0.1:{free_port()}"
    extra = ["--tls-client-ca", client_ca] if client_ca else []
    process = launcher.spawn(
        [
            *pitcher_command(),
            "backend",
            "pitcher_rpc.sdk.echo:app",
            "--listen",
            uri,
            "--tls-certificate",
            pair.certificate,
            "--tls-key",
            pair.key,
            *extra,
        ]
    )
    process.wait_for_line(f"serving on {uri}")
    return Backend(process, uri)


def cluster_config(uri: str, tls: str) -> str:
    return f"""[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[[routes]]
cluster = "echo"
retries = 0
[clusters.echo]
nodes = ["{uri}"]
[clusters.echo.tls]
{tls}
"""


def test_a_private_ca_and_the_node_name(launcher: Launcher, pki: Pki) -> None:
    backend = tls_backend(launcher, pki.issue("node", "127.0.0.1", "echo.internal"))
    proxy = launcher.proxy(cluster_config(backend.uri, f'ca = "{pki.ca_file}"'))
    response = get(proxy, "/over/tls?x=1")
    assert response.status == 200, response.body
    assert response.json()["path"] == "/over/tls"
    # server_name: the name the node's certificate must carry (and the SNI sent).
    named = launcher.proxy(
        cluster_config(backend.uri, f'ca = "{pki.ca_file}"\nserver_name = "echo.internal"')
    )
    assert get(named, "/named").status == 200
    # A name the certificate does not carry: refused, and said why.
    wrong = launcher.proxy(
        cluster_config(backend.uri, f'ca = "{pki.ca_file}"\nserver_name = "wrong.internal"')
    )
    assert get(wrong, "/wrong").status == 502
    line = wrong.process.wait_for_line("failed: ")
    assert "certificate verify failed" in line and "wrong.internal" in line
    # A CA that did not sign the node's certificate: refused.
    other = launcher.proxy(cluster_config(backend.uri, f'ca = "{pki.other_ca_file}"'))
    assert get(other, "/other").status == 502
    assert "certificate verify failed" in other.process.wait_for_line("failed: ")


def test_a_node_that_requires_the_proxys_certificate(launcher: Launcher, pki: Pki) -> None:
    backend = tls_backend(launcher, pki.issue("mtls-node"), client_ca=pki.ca_file)
    client = pki.issue("proxy-client", "pitcher-proxy")
    proxy = launcher.proxy(
        cluster_config(
            backend.uri,
            f'ca = "{pki.ca_file}"\ncertificate = "{client.certificate}"\nkey = "{client.key}"',
        )
    )
    assert get(proxy, "/with/certificate").status == 200
    without = launcher.proxy(cluster_config(backend.uri, f'ca = "{pki.ca_file}"'))
    assert get(without, "/without").status == 502


def test_backend_tls_options_are_checked(pki: Pki) -> None:
    pair, other = pki.issue("opt"), pki.issue("opt-other")

    def backend(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*pitcher_command(), "backend", "pitcher_rpc.sdk.echo:app", *args],
            capture_output=True,
            text=True,
            timeout=30,
        )

    result = backend("--listen", "tls://127.0.0.1:1")
    assert result.returncode == 2
    assert "a tls:// address needs --tls-certificate FILE and --tls-key FILE" in result.stderr
    result = backend(
        "--listen",
        "tcp://127.0.0.1:1",
        "--tls-certificate",
        pair.certificate,
        "--tls-key",
        pair.key,
    )
    assert result.returncode == 2
    assert "--tls-certificate needs --listen tls://HOST:PORT" in result.stderr
    result = backend(
        "--listen",
        "tls://127.0.0.1:1",
        "--tls-certificate",
        pair.certificate,
        "--tls-key",
        other.key,
    )
    assert result.returncode == 2
    assert f"the key in {other.key} does not match the certificate in {pair.certificate}" in (
        result.stderr.replace("\n", " ")
    )


@pytest.mark.parametrize("same", [True, False])
def test_a_reload_keeps_a_nodes_client_unless_its_tls_changed(pki: Pki, same: bool) -> None:
    # The pool of a tls:// node is kept across a reload that changes nothing of
    # its TLS (warm connections), and replaced (the old one drains) when it does.
    def config(ca: str) -> str:
        return cluster_config("tls://127.0.0.1:7443", f'ca = "{ca}"')

    first = parse_config(config(pki.ca_file))
    second = parse_config(config(pki.ca_file if same else pki.other_ca_file))

    async def run() -> None:
        upstreams = Upstreams(first.upstream)
        before = upstreams.cluster(first.clusters["echo"]).nodes[0].client
        after = upstreams.cluster(second.clusters["echo"]).nodes[0].client
        upstreams.retain_only({"tls://127.0.0.1:7443"}, in_use=[after])
        assert (after is before) == same
        # A new client carries the new snapshot's context.
        wanted = (first if same else second).clusters["echo"].tls
        assert wanted is not None and getattr(after, "ssl", None) is wanted.context
        await upstreams.close(0.1)

    asyncio.run(run())


def test_a_tls_service_registers_under_its_tls_address(launcher: Launcher, pki: Pki) -> None:
    pair = pki.issue("registered")

    def service(name: str, listen: str, *extra: str) -> Process:
        env = {
            "TEST_BACKEND_NAME": name,
            "TEST_MARK_DIR": launcher.mark_dir,
            "PYTHONPATH": launcher.tmpdir + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }
        command = [*pitcher_command(), "backend", "testapp:app", "--listen", listen]
        command += ["--tls-certificate", pair.certificate, "--tls-key", pair.key, *extra]
        return launcher.spawn(command, env=env)

    first_uri = f"tls://127.0.0.1:{free_port()}"
    service("first", first_uri).wait_for_line(f"serving on {first_uri}")
    admin = free_port()
    text = cluster_config(first_uri, f'ca = "{pki.ca_file}"').replace(
        '[admin]\nlisten = "127.0.0.1:0"', f'[admin]\nlisten = "127.0.0.1:{admin}"'
    )
    proxy = launcher.proxy(text, workers=1)
    joiner = service(
        "joiner",
        "tls://127.0.0.1:0",
        "--register",
        f"http://127.0.0.1:{admin}",
        "--cluster",
        "echo",
    )
    line = joiner.wait_for_line("registered ")
    assert "registered tls://127.0.0.1:" in line
    seen: set[str] = set()

    def both_answer() -> bool:
        response = get(proxy, "/")
        assert response.status == 200, response.body
        seen.add(response.json()["backend"])
        return seen == {"first", "joiner"}

    wait_until(both_answer, 10.0, "answers from both tls:// services")
