"""Certificates made at test time (trustme), written to files as an operator has them."""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import trustme

from tests.proxy.conftest import SOCKET_TIMEOUT, RawClient, build_request


@dataclass
class Pair:
    """A certificate chain and its key, as PEM files."""

    certificate: str
    key: str


@dataclass
class Pki:
    """Two CAs and certificates they issued, in a directory of their own."""

    directory: str
    ca: trustme.CA
    ca_file: str
    other_ca: trustme.CA
    other_ca_file: str

    def issue(
        self,
        stem: str,
        *names: str,
        ca: trustme.CA | None = None,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> Pair:
        """A certificate for ``names`` (default: 127.0.0.1 and localhost), signed by ``ca``."""
        issued = (ca or self.ca).issue_cert(
            *(names or ("127.0.0.1", "localhost")), not_before=not_before, not_after=not_after
        )
        certificate = os.path.join(self.directory, f"{stem}.pem")
        key = os.path.join(self.directory, f"{stem}.key")
        with open(certificate, "wb") as file:
            for blob in issued.cert_chain_pems:
                file.write(blob.bytes())
        issued.private_key_pem.write_to_path(key)
        return Pair(certificate, key)

    def client_context(
        self, ca_file: str | None = None, pair: Pair | None = None
    ) -> ssl.SSLContext:
        """A client's context trusting ``ca_file`` (default: the main CA), maybe with a pair."""
        context = ssl.create_default_context(cafile=ca_file or self.ca_file)
        if pair is not None:
            context.load_cert_chain(pair.certificate, pair.key)
        return context


def expired() -> dict[str, datetime.datetime]:
    """not_before and not_after of a certificate that expired a year ago."""
    now = datetime.datetime.now(datetime.UTC)
    return {
        "not_before": now - datetime.timedelta(days=730),
        "not_after": now - datetime.timedelta(days=365),
    }


@pytest.fixture(scope="module")
def pki() -> Iterator[Pki]:
    directory = tempfile.mkdtemp(prefix="pitcher-tls-", dir="/tmp")
    ca, other = trustme.CA(), trustme.CA()
    ca_file = os.path.join(directory, "ca.pem")
    other_file = os.path.join(directory, "other-ca.pem")
    ca.cert_pem.write_to_path(ca_file)
    other.cert_pem.write_to_path(other_file)
    try:
        yield Pki(directory, ca, ca_file, other, other_file)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def proxy_config(backend_uri: str, tls: str, server: str = "", clusters: str = "") -> str:
    """A proxy on a free loopback port whose [server.tls] table holds ``tls`` (TOML lines)."""
    return f"""[server]
listen = "127.0.0.1:0"
{server}
[server.tls]
{tls}
[admin]
listen = "127.0.0.1:0"
[[routes]]
cluster = "echo"
[clusters.echo]
nodes = ["{backend_uri}"]
{clusters}
"""


def connect(
    port: int, context: ssl.SSLContext, server_hostname: str | None = "127.0.0.1"
) -> tuple[ssl.SSLSocket, int]:
    """A TLS connection to the proxy, and the client's own port (what the proxy logs)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT)
    local_port = sock.getsockname()[1]
    try:
        return context.wrap_socket(sock, server_hostname=server_hostname), local_port
    except BaseException:
        sock.close()
        raise


def get(sock: ssl.SSLSocket, path: str = "/hello") -> RawClient:
    """Send one GET on ``sock``; the RawClient reads the answer."""
    client = RawClient(sock)
    client.send(build_request("GET", path, (), b"", "127.0.0.1", "1.1"))
    return client


def san(sock: ssl.SSLSocket) -> list[str]:
    """The names in the certificate the server presented."""
    certificate = sock.getpeercert()
    assert certificate is not None
    return [value for _, value in certificate.get("subjectAltName", ())]
