"""[clusters.NAME.discovery]: etcd and DNS sources, checked with the line of each mistake."""

from __future__ import annotations

import json

import pytest

from pitcher_rpc.config import ConfigError, NodeConfig, parse_config
from pitcher_rpc.config.discovery import parse_dns
from pitcher_rpc.config.model import DiscoveryConfig
from pitcher_rpc.config.overlay import NodeChange, Overlay

HEAD = '[[routes]]\ncluster = "c"\n\n[clusters.c]\n'


def issues(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="proxy.toml")
    return [str(issue) for issue in info.value.errors]


def test_a_cluster_may_take_all_its_nodes_from_etcd() -> None:
    config = parse_config(HEAD + '[clusters.c.discovery]\netcd = ["http://10.0.0.1:2379/"]\n')
    cluster = config.clusters["c"]
    assert cluster.nodes == ()
    assert cluster.discovery == DiscoveryConfig(
        etcd=("http://10.0.0.1:2379",), prefix="/pitcher/nodes/c/"
    )


def test_dns_with_its_scheme_interval_and_weight() -> None:
    config = parse_config(
        HEAD + 'nodes = ["tcp://h:1"]\n[clusters.c.discovery]\n'
        'dns = "udp://api.internal:7001"\ninterval = 2\nweight = 3\n'
    )
    discovery = config.clusters["c"].discovery
    assert discovery is not None
    assert (discovery.dns, discovery.dns_scheme) == (("api.internal", 7001), "udp")
    assert (discovery.interval, discovery.dns_weight, discovery.etcd) == (2.0, 3, ())
    assert parse_dns("localhost:80") == ("tcp", "localhost", 80)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("", "proxy.toml:5: clusters.c.discovery: names no source: set etcd = [...] or dns ="),
        (
            'etcd = ["10.0.0.1:2379"]',
            "proxy.toml:6: clusters.c.discovery.etcd[0]: must be an http:// or https:// URL",
        ),
        ("etcd = []", "proxy.toml:6: clusters.c.discovery.etcd: expected an array of URLs"),
        (
            'etcd = ["http://e:2379"]\nprefix = "/pitcher/nodes/c"',
            "proxy.toml:7: clusters.c.discovery.prefix: must start and end with '/'",
        ),
        ('dns = "api.internal"', "proxy.toml:6: clusters.c.discovery.dns: must be a name and"),
        ('dns = "h:99999"', "proxy.toml:6: clusters.c.discovery.dns: the port must be 1..65535"),
        ('dns = "unix://h:1"', "proxy.toml:6: clusters.c.discovery.dns: the scheme must be one"),
        ('dns = "h:1"\ninterval = 0', "proxy.toml:7: clusters.c.discovery.interval: must be a"),
        ('dns = "h:1"\nttl = 1', "proxy.toml:7: clusters.c.discovery.ttl: unknown key"),
    ],
)
def test_bad_discovery(body: str, expected: str) -> None:
    found = issues(HEAD + "[clusters.c.discovery]\n" + body + "\n")
    assert len(found) == 1 and found[0].startswith(expected), found


def test_nodes_are_the_file_then_discovery_then_the_admin_api() -> None:
    config = parse_config(
        HEAD + 'nodes = ["tcp://h:1"]\n[clusters.c.discovery]\netcd = ["http://e:2379"]\n'
    )
    overlay = Overlay().with_discovered(
        {"c": [NodeConfig("tcp://h:1", 9), NodeConfig("tcp://h:2", 2), NodeConfig("tcp://h:3")]}
    )
    overlay = overlay.change(config, NodeChange("drain", "c", "tcp://h:3"))
    overlay = overlay.change(config, NodeChange("add", "c", "tcp://h:4", 5))
    nodes = overlay.apply(config).clusters["c"].nodes
    # The file's weight wins over etcd's; the API's drain and add come last.
    assert nodes == (
        NodeConfig("tcp://h:1"),
        NodeConfig("tcp://h:2", 2),
        NodeConfig("tcp://h:4", 5),
    )
    # What the master sends its workers comes back the same (and the older form still reads).
    assert Overlay.from_json(json.loads(json.dumps(overlay.to_json()))) == overlay
    assert Overlay.from_json(overlay.changes_json()) == Overlay(overlay.changes)
    # A discovered node removed through the API is recorded (it is not only the API's).
    removed = overlay.change(config, NodeChange("remove", "c", "tcp://h:2"))
    assert removed.changes[-1].uri == "tcp://h:2"
    # A reload keeps discovered nodes only where the file still has discovery.
    plain = parse_config(HEAD + 'nodes = ["tcp://h:1"]\n')
    assert overlay.for_reload(config)[0].discovered == overlay.discovered
    assert overlay.for_reload(plain)[0].discovered == ()
