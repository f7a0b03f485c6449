"""ip_filter: the rule itself, its config, and switching it at run time across workers."""

from __future__ import annotations

import pytest

from pitcher_rpc.config import ConfigError, parse_config
from pitcher_rpc.modules.base import Record
from pitcher_rpc.modules.ip_filter import IpFilter
from tests.inprocess import module_error
from tests.process.test_master import admin, admin_port
from tests.proxy.conftest import Launcher, RawClient, toml_config


def rule(**settings: object) -> IpFilter:
    return IpFilter(IpFilter.validate(settings))


@pytest.mark.parametrize(
    ("settings", "client", "allowed"),
    [
        ({}, b"127.0.0.1", True),
        ({"deny": ["127.0.0.0/8"]}, b"127.0.0.1", False),
        ({"deny": ["10.0.0.0/8"]}, b"127.0.0.1", True),
        ({"allow": ["10.0.0.0/8"]}, b"127.0.0.1", False),
        ({"allow": ["10.0.0.0/8"]}, b"10.2.3.4", True),
        ({"allow": ["10.0.0.0/8"], "deny": ["10.2.0.0/16"]}, b"10.2.3.4", False),
        ({"allow": ["::1"]}, b"::1", True),
        ({"deny": ["::/0"]}, b"::1", False),
        ({"allow": ["10.0.0.0/8"]}, b"unix", True),
        # An IPv4 client of a dual-stack listener is judged as its IPv4 address.
        ({"allow": ["10.0.0.0/8"]}, b"::ffff:10.2.3.4", True),
        ({"deny": ["10.0.0.0/8"]}, b"::ffff:10.2.3.4", False),
        ({"deny": ["::ffff:10.0.0.0/104"]}, b"10.2.3.4", False),
    ],
)
def test_deny_wins_then_allow_decides(settings: dict, client: bytes, allowed: bool) -> None:
    assert rule(**settings).allowed(client) is allowed


def test_each_request_is_judged_by_its_client() -> None:
    """Behind a trusted proxy the client is known per request (Record.client_ip)."""
    ip_filter = rule(allow=["198.51.100.0/24"])
    record = Record()
    record.client_ip = b"198.51.100.7"
    assert ip_filter.before_cluster(record) is None
    record.client_ip = b"203.0.113.1"
    answer = ip_filter.before_cluster(record)
    assert answer is not None and answer.status == 403


def test_a_bad_section_is_refused_with_its_line() -> None:
    text = (
        '[modules.ip_filter]\ndeny = ["not-a-network"]\n'
        '[[routes]]\ncluster = "a"\n[clusters.a]\nnodes = ["tcp://127.0.0.1:1"]\n'
    )
    error = module_error(text, "p.toml", "ip_filter")
    assert error.line == 'deny = ["not-a-network"]'
    assert error.text.startswith("p.toml:2: modules.ip_filter.deny: module ip_filter: deny:")
    with pytest.raises(ConfigError, match="no module named 'nope'"):
        parse_config(text.replace("ip_filter", "nope"), "p.toml")


def test_a_route_may_only_name_configured_modules() -> None:
    text = (
        '[[routes]]\ncluster = "a"\nmodules = ["ip_filter"]\n'
        '[clusters.a]\nnodes = ["tcp://127.0.0.1:1"]\n'
    )
    with pytest.raises(ConfigError, match=r"routes\[0\]\.modules\[0\]: no \[modules.ip_filter\]"):
        parse_config(text, "p.toml")


def status_of(host: str, port: int) -> int:
    try:
        with RawClient.connect(host, port) as client:
            return client.request("GET", "/x").status
    except (ConnectionError, OSError):
        return 0


def test_switching_a_module_reaches_every_worker_and_outlives_a_reload(
    launcher: Launcher,
) -> None:
    echo = launcher.echo_backend("tcp")
    text = toml_config([{"prefix": "/", "cluster": "echo"}], {"echo": {"nodes": [echo.uri]}})
    text += '\n[modules.ip_filter]\ndeny = ["127.0.0.0/8"]\n'
    proxy = launcher.proxy(text, workers=2)
    port = admin_port(proxy)
    assert {status_of(proxy.host, proxy.port) for _ in range(6)} == {403}

    status, answer = admin(port, "/admin/modules/ip_filter/disable", "POST")
    assert status == 200 and answer["complete"] is True
    assert {status_of(proxy.host, proxy.port) for _ in range(6)} == {200}
    status, listing = admin(port, "/admin/modules")
    states = {
        (w["index"], m["name"]): m["enabled"] for w in listing["workers"] for m in w["modules"]
    }
    # request_id is loaded by default and stays on.
    assert states == {
        (0, "request_id"): True,
        (0, "ip_filter"): False,
        (1, "request_id"): True,
        (1, "ip_filter"): False,
    }

    status, _ = admin(port, "/admin/reload", "POST")
    assert status == 200
    assert {status_of(proxy.host, proxy.port) for _ in range(6)} == {200}

    status, _ = admin(port, "/admin/modules/ip_filter/enable", "POST")
    assert status == 200
    assert {status_of(proxy.host, proxy.port) for _ in range(6)} == {403}
    assert admin(port, "/admin/modules/ghost/enable", "POST")[0] == 404
