"""``[server] trusted_proxies``: who the client really is behind a proxy the operator trusts.

The rule is nginx's ``real_ip`` with ``real_ip_recursive on``: only a trusted
peer's X-Forwarded-For is read, from the right, past trusted addresses; the
first untrusted address is the client, and an element that is not an address
stops the walk. The client found is what the service gets in the frame's
``client`` field (port 0: not known) and what ip_filter judges. X-Forwarded-For itself is passed
on with the peer appended, trusted or not.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable

import pytest

from pitcher_rpc.config import ConfigError, parse_config
from pitcher_rpc.modules.base import AddressSet, address_key, real_client, trusted_proxies
from pitcher_rpc.proxy.server import ProxyServer
from pitcher_rpc.sdk.echo import app as echo_app
from tests.inprocess import running_proxy, serving
from tests.proxy.conftest import (
    Launcher,
    Proxy,
    RawClient,
    build_request,
    short_tmpdir,
    toml_config,
)

# ------------------------------------------------------------------ the rule itself

TRUSTED = ("10.0.0.0/8", "192.168.0.0/16", "2001:db8:ffff::/48")


@pytest.mark.parametrize(
    ("chain", "client"),
    [
        (b"203.0.113.7", b"203.0.113.7"),
        (b"203.0.113.7, 10.1.1.1", b"203.0.113.7"),  # past one trusted hop
        (
            b"198.51.100.1, 203.0.113.7, 10.1.1.1, 192.168.3.4",
            b"203.0.113.7",
        ),  # the first untrusted
        (b"10.9.9.9, 10.1.1.1", b"10.9.9.9"),  # all trusted: the leftmost
        (b"203.0.113.7, not-an-address, 10.1.1.1", b"10.1.1.1"),  # stops at the malformed one
        (b"203.0.113.7, unknown", b"10.0.0.2"),  # malformed at once: the peer
        (b"203.0.113.7,,  ,10.1.1.1", b"203.0.113.7"),  # empty elements are no elements
        (b"\t203.0.113.7 ,\t10.1.1.1 ", b"203.0.113.7"),
        (b"203.0.113.7:4711, 10.1.1.1:80", b"203.0.113.7"),  # ports, as some proxies write
        (b"[2001:DB8::7]:4711", b"2001:db8::7"),  # canonical text
        (b"2001:db8::7, 2001:db8:ffff::1", b"2001:db8::7"),
        (b"[2001:db8::7", b"10.0.0.2"),
        (b"203.0.113.7:http", b"10.0.0.2"),
        (b"::ffff:203.0.113.7, ::ffff:10.1.1.1", b"203.0.113.7"),  # IPv4-mapped
        (b"203.0.113.300", b"10.0.0.2"),
        (b"", b"10.0.0.2"),
    ],
)
def test_the_client_is_the_first_untrusted_address_from_the_right(
    chain: bytes, client: bytes
) -> None:
    trusted = trusted_proxies(TRUSTED)
    assert trusted is not None
    assert real_client(b"10.0.0.2", chain, trusted) == client


def test_trusted_networks_are_made_once_per_setting_and_none_means_none() -> None:
    assert trusted_proxies(()) is None
    assert trusted_proxies(TRUSTED) is trusted_proxies(tuple(TRUSTED))


@pytest.mark.parametrize(
    ("address", "held"),
    [
        (b"10.200.0.1", True),
        (b"::ffff:10.200.0.1", True),  # an IPv4 peer of a dual-stack listener
        (b"11.0.0.1", False),
        (b"2001:db8:ffff:1::1", True),
        (b"2001:db8:fffe::1", False),
        (b"unix", False),
        (b"", False),
    ],
)
def test_peers_are_matched_whatever_their_family(address: bytes, held: bool) -> None:
    trusted = trusted_proxies(TRUSTED)
    assert trusted is not None
    assert trusted.holds(address) is held


def test_address_keys_keep_the_families_apart() -> None:
    assert address_key("0.0.0.1") != address_key("::1")
    assert address_key("::ffff:0.0.0.1") == address_key("0.0.0.1")
    assert address_key("fe80::1%eth0") == address_key("fe80::1")
    assert address_key("1.2.3") == address_key("example.com") == -1
    everything = AddressSet(["::/0"])
    assert everything.holds(b"192.0.2.1") and everything.holds(b"::1")
    assert not AddressSet(["0.0.0.0/0"]).holds(b"::1")


# ------------------------------------------------------------------ through a proxy


def proxy_with(launcher: Launcher, trusted: list[str], modules: str = "") -> Proxy:
    echo = launcher.echo_backend("tcp")
    text = toml_config(
        [{"prefix": "/", "cluster": "echo"}],
        {"echo": {"nodes": [echo.uri]}},
        server={"trusted_proxies": trusted},
    )
    return launcher.proxy(text + modules)


def seen(client: RawClient, *forwarded_for: str) -> tuple[str, list[str]]:
    """The client the service was told of, and the X-Forwarded-For it received."""
    response = client.request("GET", "/who", [("X-Forwarded-For", v) for v in forwarded_for])
    assert response.status == 200, response.body
    answer = response.json()
    return answer["client"], [v for n, v in answer["headers"] if n == "x-forwarded-for"]


def test_a_trusted_peer_names_the_client(launcher: Launcher) -> None:
    proxy = proxy_with(launcher, ["127.0.0.0/8"])
    with proxy.connect() as client:
        port = client.sock.getsockname()[1]
        assert seen(client, "198.51.100.7, 10.9.9.9") == (
            "10.9.9.9:0",
            ["198.51.100.7, 10.9.9.9, 127.0.0.1"],
        )
        # Recursive: past every trusted hop, over repeated fields.
        assert seen(client, "198.51.100.7", "127.0.0.5")[0] == "198.51.100.7:0"
        assert seen(client, "198.51.100.7, bogus, 127.0.0.9")[0] == "127.0.0.9:0"
        # The port is not known (0): the field keeps its form, the port after the last colon.
        assert seen(client, "[2001:DB8::7]:4711")[0] == "2001:db8::7:0"
        # No X-Forwarded-For: the peer is the client, with its port.
        assert seen(client) == (f"127.0.0.1:{port}", ["127.0.0.1"])


def test_an_untrusted_peer_cannot_name_a_client(launcher: Launcher) -> None:
    proxy = proxy_with(launcher, ["10.0.0.0/8"])
    with proxy.connect() as client:
        port = client.sock.getsockname()[1]
        # Not believed, but passed on, with the address the proxy saw last.
        assert seen(client, "198.51.100.7") == (
            f"127.0.0.1:{port}",
            ["198.51.100.7, 127.0.0.1"],
        )


def test_ip_filter_judges_the_client_a_trusted_proxy_names(launcher: Launcher) -> None:
    proxy = proxy_with(
        launcher,
        ["127.0.0.0/8"],
        '\n[modules.ip_filter]\nallow = ["198.51.100.0/24"]\ndeny = ["198.51.100.66"]\n',
    )
    with proxy.connect() as client:
        # The trusted proxy itself is not in `allow`: let in, judged per request.
        for forwarded_for, status in [
            ("198.51.100.7", 200),
            ("203.0.113.1", 403),
            ("198.51.100.66", 403),
            ("198.51.100.7, 127.0.0.3", 200),
            ("203.0.113.1, 198.51.100.7", 200),  # the left one is the client's own claim
            (None, 403),  # no client named: the proxy's own address is judged
            ("198.51.100.8", 200),
        ]:
            headers = [("X-Forwarded-For", forwarded_for)] if forwarded_for else []
            response = client.request("GET", "/f", headers)
            assert response.status == status, (forwarded_for, response.body)


def test_ip_filter_refuses_an_untrusted_peer_at_accept_whatever_it_claims(
    launcher: Launcher,
) -> None:
    proxy = proxy_with(
        launcher, ["10.0.0.0/8"], '\n[modules.ip_filter]\nallow = ["198.51.100.0/24"]\n'
    )
    with proxy.connect() as client:
        client.send(build_request("GET", "/f", [("X-Forwarded-For", "198.51.100.7")]))
        assert client.response().status == 403
        assert client.is_closed()


RELOADABLE = """
[server]
listen = "{listen}"
trusted_proxies = {trusted}
[[routes]]
prefix = "/"
cluster = "echo"
[clusters.echo]
nodes = ["{node}"]
"""


async def client_seen(
    connected: Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
    *forwarded_for: str,
) -> str:
    """The client the echo service was told of, for one request with these X-Forwarded-For."""
    reader, writer = await connected
    try:
        headers = [("X-Forwarded-For", value) for value in forwarded_for]
        writer.write(build_request("GET", "/", headers))
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        return str(json.loads(await reader.readexactly(length))["client"])
    finally:
        writer.close()


def test_a_reload_changes_who_is_trusted() -> None:
    def text(trusted: str, node: str) -> str:
        return RELOADABLE.format(listen="127.0.0.1:0", trusted=trusted, node=node)

    async def main() -> None:
        async with (
            serving(echo_app) as [node],
            running_proxy(text("[]", node)) as (proxy, port),
        ):
            seen = await client_seen(asyncio.open_connection("127.0.0.1", port), "203.0.113.9")
            assert seen.startswith("127.0.0.1:")
            proxy.reload(parse_config(text('["127.0.0.1"]', node)))
            seen = await client_seen(asyncio.open_connection("127.0.0.1", port), "203.0.113.9")
            assert seen == "203.0.113.9:0"

    asyncio.run(main())


def test_unix_socket_peers_are_trusted_when_unix_is_named() -> None:
    """nginx's ``set_real_ip_from unix:``: a front proxy on the same host over a Unix socket."""
    socket_path = short_tmpdir() + "/front.sock"

    def text(trusted: str, node: str) -> str:
        return RELOADABLE.format(listen=f"unix://{socket_path}", trusted=trusted, node=node)

    def seen(*forwarded_for: str) -> Awaitable[str]:
        return client_seen(asyncio.open_unix_connection(socket_path), *forwarded_for)

    async def main() -> None:
        async with serving(echo_app) as [node]:
            proxy = ProxyServer(parse_config(text('["unix"]', node)))
            await proxy.start()
            try:
                assert await seen("203.0.113.9") == "203.0.113.9:0"
                assert await seen() == "unix"
                proxy.reload(parse_config(text('["10.0.0.0/8"]', node)))
                assert await seen("203.0.113.9") == "unix"
            finally:
                await proxy.stop(1.0)

    asyncio.run(main())


ROUTED = """
[server]
trusted_proxies = {trusted}
[[routes]]
prefix = "/"
cluster = "echo"
[clusters.echo]
nodes = ["tcp://127.0.0.1:9"]
"""


def test_trusted_proxies_takes_unix_and_refuses_other_names() -> None:
    assert trusted_proxies(("unix",)) is not None
    assert trusted_proxies(("unix",)).holds(b"unix")  # type: ignore[union-attr]
    assert not trusted_proxies(("unix",)).holds(b"127.0.0.1")  # type: ignore[union-attr]
    config = parse_config(ROUTED.format(trusted='["unix", "10.0.0.1"]'))
    assert config.server.trusted_proxies == ("unix", "10.0.0.1/32")
    with pytest.raises(ConfigError, match=r"server\.trusted_proxies\[0\].*unix"):
        parse_config(ROUTED.format(trusted='["localhost"]'))
