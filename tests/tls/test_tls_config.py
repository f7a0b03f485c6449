"""[server.tls] and [clusters.NAME.tls]: what a file may say, and every mistake at its line."""

from __future__ import annotations

import datetime
import os
import ssl
import subprocess

import pytest
from cryptography import x509

from pitcher_rpc.config import ConfigError, load_config
from pitcher_rpc.config.certificates import certificate_fields, covers, read_leaf
from tests.proxy.conftest import pitcher_command
from tests.tls.conftest import Pki, expired

ROUTE = """
[[routes]]
cluster = "api"
[clusters.api]
nodes = ["tls://127.0.0.1:7443"]
"""


def write(pki: Pki, name: str, text: str) -> str:
    path = os.path.join(pki.directory, name)
    with open(path, "w", encoding="utf-8") as file:
        file.write(text)
    return path


def errors(path: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return [str(issue) for issue in caught.value.errors]


def test_a_listener_with_a_certificate_builds_its_context(pki: Pki) -> None:
    pair = pki.issue("server")
    # Relative paths are the configuration file's directory's.
    path = write(
        pki,
        "ok.toml",
        f"""[server.tls]
certificate = "{os.path.basename(pair.certificate)}"
key = "{os.path.basename(pair.key)}"
min_version = "1.3"
client_ca = "ca.pem"
client_certificate = "optional"
{ROUTE}""",
    )
    config = load_config(path)
    tls = config.server.tls
    assert tls is not None and tls.context is not None
    assert tls.certificate == pair.certificate
    assert tls.context.minimum_version == ssl.TLSVersion.TLSv1_3
    assert tls.context.verify_mode == ssl.CERT_OPTIONAL
    assert config.server.scheme == "https"
    assert config.warnings == ()
    # The same files give the same digest; a new certificate another.
    assert load_config(path).server.tls.digest == tls.digest  # type: ignore[union-attr]
    pki.issue("server")
    assert load_config(path).server.tls.digest != tls.digest  # type: ignore[union-attr]


def test_each_unusable_file_is_named_at_its_key_and_line(pki: Pki) -> None:
    server, other = pki.issue("a"), pki.issue("b")
    encrypted = write(
        pki,
        "encrypted.key",
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n",
    )
    path = write(
        pki,
        "bad.toml",
        f"""[server]
listen = "127.0.0.1:0"
[server.tls]
certificate = "{server.certificate}"
key = "{other.key}"
min_version = "1.1"
[[server.tls.certificates]]
names = ["api.example.com", "bad name"]
certificate = "missing.pem"
key = "{encrypted}"
[[server.tls.certificates]]
names = ["API.example.com"]
certificate = "{other.key}"
key = "{other.key}"
{ROUTE}
[clusters.api.tls]
ca = "{server.key}"
server_name = "not a name"
certificate = "{server.certificate}"
""",
    )
    found = errors(path)
    assert found == [
        f'{path}:5: server.tls.key: the key in "{other.key}" does not match the certificate'
        f' in "{server.certificate}"',
        f'{path}:6: server.tls.min_version: must be one of "1.2", "1.3", got "1.1";'
        ' did you mean "1.3"?',
        f'{path}:8: server.tls.certificates[0].names[1]: must be a host name or "*.domain"'
        ' (one label), got "bad name"',
        f"{path}:9: server.tls.certificates[0].certificate: cannot read"
        f' "{pki.directory}/missing.pem": No such file or directory',
        f'{path}:10: server.tls.certificates[0].key: the key in "{encrypted}" is encrypted:'
        " a passphrase-protected key is not supported (write it decrypted: openssl pkey -in"
        f" {encrypted} -out PLAIN.pem)",
        f'{path}:12: server.tls.certificates[1].names: "api.example.com" is already served by'
        " certificates[0]",
        f'{path}:13: server.tls.certificates[1].certificate: "{other.key}" holds no PEM'
        " certificate (-----BEGIN CERTIFICATE-----)",
        # A key that is not written is reported at its table's line.
        f"{path}:21: clusters.api.tls.key: missing required key (its private key)",
        f'{path}:22: clusters.api.tls.ca: "{server.key}" holds no PEM certificate'
        " (-----BEGIN CERTIFICATE-----)",
        f"{path}:23: clusters.api.tls.server_name: must be a host name or an IP address, got"
        ' "not a name"',
    ]


def test_client_certificates_need_a_ca_and_a_known_mode(pki: Pki) -> None:
    pair = pki.issue("mode")
    path = write(
        pki,
        "mode.toml",
        f"""[server.tls]
certificate = "{pair.certificate}"
key = "{pair.key}"
client_certificate = "optional"
{ROUTE}""",
    )
    assert errors(path) == [
        f"{path}:4: server.tls.client_certificate: needs client_ca: the CA file client"
        " certificates are verified against"
    ]
    path = write(
        pki,
        "mode2.toml",
        f"""[server.tls]
certificate = "{pair.certificate}"
key = "{pair.key}"
client_ca = "{pair.key}"
client_certificate = "sometimes"
{ROUTE}""",
    )
    assert errors(path) == [
        f'{path}:4: server.tls.client_ca: "{pair.key}" holds no PEM certificate'
        " (-----BEGIN CERTIFICATE-----)",
        f'{path}:5: server.tls.client_certificate: must be one of "required", "optional",'
        ' got "sometimes"',
    ]


def test_a_listener_needs_a_certificate_and_a_key(pki: Pki) -> None:
    path = write(pki, "none.toml", f'[server.tls]\nmin_version = "1.2"\n{ROUTE}')
    assert errors(path) == [
        f"{path}:1: server.tls.certificate: missing required key (the certificate chain, PEM)",
        f"{path}:1: server.tls.key: missing required key (its private key)",
    ]


def test_an_expired_certificate_is_a_warning_and_check_still_passes(pki: Pki) -> None:
    # nginx starts with an expired certificate, and so does Pitcher: clients see why.
    pair = pki.issue("expired", **expired())
    path = write(
        pki,
        "expired.toml",
        f'[server.tls]\ncertificate = "{pair.certificate}"\nkey = "{pair.key}"\n{ROUTE}',
    )
    config = load_config(path)
    assert config.server.tls is not None
    (warning,) = config.warnings
    assert warning.line == 2 and warning.key == "server.tls.certificate"
    assert "expired on" in warning.message and "clients will refuse it" in warning.message
    result = subprocess.run(
        [*pitcher_command(), "check", "-c", path], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"OK: {path}")
    assert f"warning: {path}:2: server.tls.certificate: the certificate in" in result.stderr


def test_pitcher_check_names_a_key_that_does_not_match(pki: Pki) -> None:
    one, two = pki.issue("one"), pki.issue("two")
    path = write(
        pki,
        "mismatch.toml",
        f'[server.tls]\ncertificate = "{one.certificate}"\nkey = "{two.key}"\n' + ROUTE,
    )
    result = subprocess.run(
        [*pitcher_command(), "check", "-c", path], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f'{path}:3: server.tls.key: the key in "{two.key}" does not match the certificate'
        f' in "{one.certificate}"'
    )


def test_a_cluster_tls_table_without_tls_nodes_is_a_warning(pki: Pki) -> None:
    path = write(
        pki,
        "plain.toml",
        f"""[[routes]]
cluster = "api"
[clusters.api]
nodes = ["tcp://127.0.0.1:7001"]
[clusters.api.tls]
ca = "{pki.ca_file}"
server_name = "API.internal."
""",
    )
    config = load_config(path)
    tls = config.clusters["api"].tls
    assert tls is not None and tls.server_name == "api.internal"
    assert tls.context is not None and tls.context.verify_mode == ssl.CERT_REQUIRED
    assert tls.context.check_hostname
    assert [w.key for w in config.warnings] == ["clusters.api.tls"]


def test_validity_and_names_are_read_from_the_certificate(pki: Pki) -> None:
    moments = expired()
    for stem, dates in (("dated", moments), ("fresh", {})):
        pair = pki.issue(stem, "api.test", "*.api.test", "10.0.0.1", "::1", **dates)
        with open(pair.certificate, encoding="ascii") as file:
            pem = file.read()
        parsed = x509.load_pem_x509_certificate(pem.encode())
        leaf = read_leaf(pem)
        assert (leaf.not_before, leaf.not_after) == (
            parsed.not_valid_before_utc.timestamp(),
            parsed.not_valid_after_utc.timestamp(),
        )
        assert leaf.names == ("api.test", "*.api.test", "10.0.0.1", "::1")
    # GeneralizedTime (years past 2049) as well as UTCTime.
    late = pki.issue("late", not_after=datetime.datetime(2060, 1, 2, 3, 4, 5, tzinfo=datetime.UTC))
    with open(late.certificate, encoding="ascii") as file:
        pem = file.read()
    leaf = read_leaf(pem)
    assert leaf.not_after == datetime.datetime(2060, 1, 2, 3, 4, 5, tzinfo=datetime.UTC).timestamp()
    der = ssl.PEM_cert_to_DER_cert(
        pem.split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
    )
    assert certificate_fields(der) == leaf
    with pytest.raises(ValueError):
        certificate_fields(der[:40])
    with pytest.raises(ValueError):
        read_leaf("no certificate here")


def test_covers_follows_certificate_wildcards() -> None:
    names = ("api.test", "*.api.test", "10.0.0.1")
    assert covers(names, "API.test.")
    assert covers(names, "v1.api.test")
    assert covers(names, "*.api.test")
    assert covers(names, "10.0.0.1")
    assert not covers(names, "a.b.api.test")  # a wildcard covers one label
    assert not covers(names, "*.test")
    assert not covers(names, "other.test")


def test_an_sni_name_the_certificate_does_not_carry_is_a_warning(pki: Pki) -> None:
    default, named = pki.issue("sni-default"), pki.issue("sni-named", "api.test")
    path = write(
        pki,
        "sni.toml",
        f"""[server.tls]
certificate = "{default.certificate}"
key = "{default.key}"
[[server.tls.certificates]]
names = ["api.test", "www.test"]
certificate = "{named.certificate}"
key = "{named.key}"
{ROUTE}""",
    )
    (warning,) = load_config(path).warnings
    assert str(warning) == (
        f'{path}:5: server.tls.certificates[0].names[1]: "www.test" is not a name the'
        f' certificate in "{named.certificate}" carries (api.test): clients asking for it'
        " will refuse it"
    )


def test_nodes_found_in_dns_are_checked_against_the_dns_name(pki: Pki) -> None:
    # Discovered tls:// nodes are addresses; their certificates carry the name.
    def cluster(tls: str) -> str:
        text = '[[routes]]\ncluster = "api"\n[clusters.api.discovery]\n'
        return write(pki, "dns.toml", text + f'dns = "tls://API.internal:7443"\n{tls}')

    plain = load_config(cluster("")).clusters["api"].tls
    assert plain is not None and plain.server_name == "api.internal"
    assert plain.context is not None and plain.context.check_hostname
    with_ca = load_config(cluster(f'[clusters.api.tls]\nca = "{pki.ca_file}"\n'))
    tls = with_ca.clusters["api"].tls
    assert tls is not None and tls.server_name == "api.internal" and tls.ca == pki.ca_file
    named = cluster(f'[clusters.api.tls]\nca = "{pki.ca_file}"\nserver_name = "edge.internal"\n')
    tls = load_config(named).clusters["api"].tls
    assert tls is not None and tls.server_name == "edge.internal"
