"""Node URIs and the scheme -> transport registry."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from transports.registry import (
    ENTRY_POINT_GROUP,
    Address,
    AddressError,
    get_transport,
    known_schemes,
    parse_address,
    transport_for,
)
from transports.stream import TcpTransport, UnixTransport


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("tcp://127.0.0.1:9000", Address("tcp://127.0.0.1:9000", "tcp", "127.0.0.1", 9000)),
        ("tcp://localhost:1", Address("tcp://localhost:1", "tcp", "localhost", 1)),
        ("tcp://[::1]:9000", Address("tcp://[::1]:9000", "tcp", "::1", 9000)),
        ("tcp://10.0.0.1:0", Address("tcp://10.0.0.1:0", "tcp", "10.0.0.1", 0)),
        ("tcp://127.0.0.1:9000/", Address("tcp://127.0.0.1:9000/", "tcp", "127.0.0.1", 9000)),
        ("TCP://127.0.0.1:65535", Address("TCP://127.0.0.1:65535", "tcp", "127.0.0.1", 65535)),
        ("udp://127.0.0.1:53", Address("udp://127.0.0.1:53", "udp", "127.0.0.1", 53)),
    ],
)
def test_host_port_addresses(uri: str, expected: Address) -> None:
    assert parse_address(uri) == expected


@pytest.mark.parametrize(
    ("uri", "path"),
    [
        ("unix:///tmp/pitcher.sock", "/tmp/pitcher.sock"),
        ("unix:///var/run/a%20b.sock", "/var/run/a b.sock"),
        ("zmq+ipc:///tmp/z.ipc", "/tmp/z.ipc"),
    ],
)
def test_path_addresses(uri: str, path: str) -> None:
    address = parse_address(uri)
    assert (address.scheme, address.path, address.host, address.port) == (
        uri.split(":", 1)[0],
        path,
        "",
        0,
    )


@pytest.mark.parametrize(
    ("uri", "complaint"),
    [
        ("127.0.0.1:9000", "not a URI"),
        ("tcp://127.0.0.1", "needs a host and a port"),
        ("tcp://:9000", "needs a host and a port"),
        ("tcp://[::1]", "needs a host and a port"),
        ("tcp://127.0.0.1:99999", "out of range"),
        ("tcp://127.0.0.1:http", "integer"),
        ("tcp://127.0.0.1:9000/some/path", "has a path"),
        ("tcp://127.0.0.1:9000?x=1", "has a path or query"),
        ("tcp:///tmp/pitcher.sock", "needs a host and a port"),
        ("unix://", "no socket path"),
    ],
)
def test_bad_addresses_raise_address_error(uri: str, complaint: str) -> None:
    with pytest.raises(AddressError, match=complaint) as caught:
        parse_address(uri)
    assert isinstance(caught.value, ValueError)
    assert uri in str(caught.value)


def test_builtin_schemes_resolve_to_stream_transports() -> None:
    assert get_transport("tcp") is TcpTransport
    assert get_transport("unix") is UnixTransport
    assert get_transport("TCP") is TcpTransport
    assert transport_for("tcp://[::1]:80") is TcpTransport
    assert transport_for("unix:///tmp/x.sock") is UnixTransport


@pytest.mark.parametrize("uri", ["gopher://h:70", "http://127.0.0.1:80"])
def test_unknown_scheme_names_the_known_ones(uri: str) -> None:
    with pytest.raises(AddressError, match="no transport for scheme") as caught:
        transport_for(uri)
    assert "tcp" in str(caught.value) and "unix" in str(caught.value)


def test_a_transport_refuses_an_address_of_another_scheme() -> None:
    with pytest.raises(AddressError):
        TcpTransport.client("unix:///tmp/x.sock")
    with pytest.raises(AddressError):
        UnixTransport.client("tcp://127.0.0.1:1")


def test_installed_entry_points_name_the_builtin_transports() -> None:
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert {"tcp", "unix"} <= found.keys(), "is the package installed (pip install -e .)?"
    assert found["tcp"].load() is TcpTransport
    assert found["unix"].load() is UnixTransport
    assert {"tcp", "unix"} <= set(known_schemes())


def test_third_party_transport_plugs_in_through_an_entry_point(tmp_path: Path) -> None:
    # A real distribution on sys.path, as pip would leave it, in a fresh
    # interpreter so the plug-in cannot leak into other tests.
    (tmp_path / "acme_carrier.py").write_text("class PigeonTransport:\n    schemes = ('pigeon',)\n")
    dist_info = tmp_path / "acme_carrier-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-carrier\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\npigeon = acme_carrier:PigeonTransport\n"
    )
    script = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, sys.argv[1])
        from transports.registry import known_schemes, transport_for
        cls = transport_for("pigeon://coop:7")
        assert cls.__module__ == "acme_carrier" and cls.__name__ == "PigeonTransport", cls
        assert transport_for("pigeon://coop:8") is cls
        assert "pigeon" in known_schemes(), known_schemes()
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
