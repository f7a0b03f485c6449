from __future__ import annotations

import dataclasses
import hashlib
import textwrap
from pathlib import Path
from types import MappingProxyType

import pytest

from pitcher_rpc.config import (
    ClusterConfig,
    Config,
    ConfigError,
    ConfigIssue,
    ListenAddress,
    NodeConfig,
    RouteConfig,
    ServerConfig,
    UpstreamConfig,
    load_config,
    parse_config,
    parse_listen,
)
from pitcher_rpc.config import validate as validate_module

FULL = """\
# A complete configuration: every key set to something other than its default.
[server]
listen = "[::1]:9090"
backlog = 1024
header_timeout = 5            # an integer where seconds are expected is fine
keepalive_timeout = 0
max_request_line = 4096
max_header_size = 16384
max_headers = 50
max_body_size = 65536

[modules.request_id]
header = "X-Trace-Id"
trust_incoming = false

[upstream]
connect_timeout = 0.25
max_connections = 8
max_frame_size = 1024

[[routes]]
name = "echo"
host = "*.Example.COM"
prefix = "/tcp/"
cluster = "echo_tcp"
timeout = 5.5
retries = 0
idempotent_methods = ["get", "PUT"]
strip_prefix = true

[[routes]]
prefix = "/unix/"
cluster = "echo_unix"

[clusters.echo_tcp]
balance = "weighted"
nodes = [
  "tcp://127.0.0.1:7101",
  { uri = "unix:///tmp/echo.sock", weight = 3 },
]

[clusters.echo_unix]
nodes = ["unix:///tmp/other.sock"]

[clusters.spare]  # nobody routes here, which is fine
nodes = ["tcp://10.0.0.9:7000"]
"""

MINIMAL = """\
[[routes]]
cluster = "echo"

[clusters.echo]
nodes = ["tcp://127.0.0.1:7101"]
"""


def issues(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text), source="proxy.toml")
    assert str(info.value) == "\n".join(str(issue) for issue in info.value.errors)
    return [str(issue) for issue in info.value.errors]


# -- valid configurations ------------------------------------------------------


def test_full_config_round_trip() -> None:
    config = parse_config(FULL, source="proxy.toml")
    assert config.source == "proxy.toml"
    assert config.checksum == hashlib.sha256(FULL.encode()).hexdigest()
    assert config.server == ServerConfig(
        listen="[::1]:9090",
        backlog=1024,
        header_timeout=5.0,
        keepalive_timeout=0.0,
        max_request_line=4096,
        max_header_size=16384,
        max_headers=50,
        max_body_size=65536,
    )
    assert [(m.name, dict(m.settings)) for m in config.modules] == [
        ("request_id", {"header": "x-trace-id", "trust_incoming": False, "echo": True})
    ]
    assert type(config.server.header_timeout) is float
    assert config.server.listen_address == ListenAddress(host="::1", port=9090)
    assert config.upstream == UpstreamConfig(
        connect_timeout=0.25, max_connections=8, max_frame_size=1024
    )
    assert config.routes == (
        RouteConfig(
            name="echo",
            host="*.example.com",
            prefix="/tcp/",
            cluster="echo_tcp",
            timeout=5.5,
            retries=0,
            idempotent_methods=frozenset({"GET", "PUT"}),
            strip_prefix=True,
        ),
        RouteConfig(name="*/unix/", prefix="/unix/", cluster="echo_unix"),
    )
    assert dict(config.clusters) == {
        "echo_tcp": ClusterConfig(
            name="echo_tcp",
            balance="weighted",
            nodes=(
                NodeConfig("tcp://127.0.0.1:7101"),
                NodeConfig("unix:///tmp/echo.sock", weight=3),
            ),
        ),
        "echo_unix": ClusterConfig(name="echo_unix", nodes=(NodeConfig("unix:///tmp/other.sock"),)),
        "spare": ClusterConfig(name="spare", nodes=(NodeConfig("tcp://10.0.0.9:7000"),)),
    }
    # Parsing the same text again gives an equal snapshot.
    assert parse_config(FULL, source="proxy.toml") == config


def test_minimal_config_takes_every_default() -> None:
    config = parse_config(MINIMAL)
    assert config.source == "<config>"
    assert config.server == ServerConfig()
    assert config.upstream == UpstreamConfig()
    (route,) = config.routes
    assert route == RouteConfig(name="*/", host="*", prefix="/", cluster="echo")
    assert route.timeout == 30.0
    assert route.retries == 1
    assert route.idempotent_methods == frozenset({"GET", "HEAD"})
    assert route.strip_prefix is False
    assert config.clusters["echo"].balance == "round_robin"


def test_routes_may_be_written_as_inline_tables() -> None:
    config = parse_config(
        'routes = [{ prefix = "/a/", cluster = "c" }, { prefix = "/b/", cluster = "c" }]\n'
        'clusters.c.nodes = [{ uri = "tcp://127.0.0.1:1" }]\n'
    )
    assert [route.name for route in config.routes] == ["*/a/", "*/b/"]


def test_nodes_may_be_written_as_an_array_of_tables() -> None:
    config = parse_config(
        MINIMAL.replace('nodes = ["tcp://127.0.0.1:7101"]', "")
        + '[[clusters.echo.nodes]]\nuri = "tcp://127.0.0.1:1"\nweight = 2\n'
    )
    assert config.clusters["echo"].nodes == (NodeConfig("tcp://127.0.0.1:1", 2),)


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("0.0.0.0:0", ListenAddress(host="0.0.0.0", port=0)),
        ("localhost:65535", ListenAddress(host="localhost", port=65535)),
        ("[::]:80", ListenAddress(host="::", port=80)),
        ("unix:///run/pitcher.sock", ListenAddress(path="/run/pitcher.sock")),
    ],
)
def test_listen_forms(listen: str, expected: ListenAddress) -> None:
    config = parse_config(f'[server]\nlisten = "{listen}"\n' + MINIMAL)
    assert config.server.listen_address == expected
    assert parse_listen(listen).is_unix == bool(expected.path)


@pytest.mark.parametrize("host", ["*", "api.example.com", "*.example.com", "[::1]", "10.0.0.1"])
def test_route_host_forms(host: str) -> None:
    config = parse_config(MINIMAL.replace("[[routes]]", f'[[routes]]\nhost = "{host}"'))
    assert config.routes[0].host == host


# -- the snapshot is immutable -------------------------------------------------


def test_snapshot_is_immutable() -> None:
    config = parse_config(FULL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server = ServerConfig()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.backlog = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.routes[0].timeout = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.clusters["echo_tcp"].nodes[0].weight = 9  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.clusters["new"] = config.clusters["spare"]  # type: ignore[index]
    with pytest.raises(AttributeError):
        config.routes[0].idempotent_methods.add("POST")  # type: ignore[attr-defined]
    assert isinstance(config.clusters, MappingProxyType)
    assert isinstance(config.routes, tuple)
    assert isinstance(config.clusters["echo_tcp"].nodes, tuple)
    assert not hasattr(config, "__dict__")  # slots: no stray attributes either
    hash(config)


def test_constructors_copy_mutable_arguments() -> None:
    clusters = {"c": ClusterConfig(name="c", nodes=[NodeConfig("tcp://h:1")])}  # type: ignore[arg-type]
    config = Config(
        server=ServerConfig(),
        upstream=UpstreamConfig(),
        routes=[RouteConfig(cluster="c", idempotent_methods={"GET"})],  # type: ignore[arg-type]
        clusters=clusters,
        source="test",
        checksum="",
    )
    clusters.clear()
    assert list(config.clusters) == ["c"]
    assert isinstance(config.routes, tuple)
    assert isinstance(config.clusters["c"].nodes, tuple)
    assert isinstance(config.routes[0].idempotent_methods, frozenset)
    assert config.routes[0].name == "*/"


# -- invalid configurations: one issue each, exact line and key -----------------


def test_negative_route_timeout() -> None:
    assert issues(
        """\
        [[routes]]
        prefix = "/a/"
        cluster = "c"

        [[routes]]
        prefix = "/b/"
        cluster = "c"
        timeout = -3

        [clusters.c]
        nodes = ["tcp://127.0.0.1:1"]
        """
    ) == ["proxy.toml:8: routes[1].timeout: must be a positive number, got -3"]


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("timout = 5", "routes[0].timout: unknown key; did you mean 'timeout'?"),
        ("stripprefix = true", "routes[0].stripprefix: unknown key; did you mean 'strip_prefix'?"),
        (
            "zzz = 1",
            "routes[0].zzz: unknown key (expected one of: business, cluster, host, "
            "idempotent_methods, modules, name, prefix, retries, strip_prefix, timeout)",
        ),
        ('timeout = "5s"', 'routes[0].timeout: expected a number of seconds, got a string "5s"'),
        ("timeout = 0", "routes[0].timeout: must be a positive number, got 0"),
        ("timeout = 0.0", "routes[0].timeout: must be a positive number, got 0.0"),
        ("timeout = true", "routes[0].timeout: expected a number of seconds, got a boolean true"),
        ("timeout = inf", "routes[0].timeout: must be a finite number, got inf"),
        ("timeout = nan", "routes[0].timeout: must be a finite number, got nan"),
        (
            "timeout = 1979-05-27",
            "routes[0].timeout: expected a number of seconds, got a date 1979-05-27",
        ),
        ("timeout = [1]", "routes[0].timeout: expected a number of seconds, got an array"),
        ("retries = true", "routes[0].retries: expected an integer, got a boolean true"),
        ("retries = 1.0", "routes[0].retries: expected an integer, got a float 1.0"),
        ("retries = 6", "routes[0].retries: must be between 0 and 5, got 6"),
        ("retries = -1", "routes[0].retries: must be between 0 and 5, got -1"),
        (
            'strip_prefix = "yes"',
            'routes[0].strip_prefix: expected a boolean (true or false), got a string "yes"',
        ),
        ('prefix = "api/"', 'routes[0].prefix: must start with "/", got "api/"'),
        (
            'prefix = "/a b"',
            'routes[0].prefix: must not contain whitespace or control characters, got "/a b"',
        ),
        ('name = ""', "routes[0].name: must not be empty"),
        ("name = 7", "routes[0].name: expected a string, got an integer 7"),
        (
            'host = "api.example.com:8080"',
            "routes[0].host: must not include a port (ports are ignored when matching), "
            'got "api.example.com:8080"',
        ),
        (
            'host = "api*.example.com"',
            'routes[0].host: must be "*", a host name such as "api.example.com", '
            'or a wildcard such as "*.example.com", got "api*.example.com"',
        ),
        ('host = "-bad.com"', "routes[0].host: must be"),
        ('host = ""', "routes[0].host: must be"),
        (
            'host = "[zz]"',
            'routes[0].host: the part in brackets is not an IPv6 address, got "[zz]"',
        ),
        (
            'idempotent_methods = "GET"',
            "routes[0].idempotent_methods: expected an array of HTTP method names, "
            'got a string "GET"',
        ),
        (
            "idempotent_methods = {}",
            "routes[0].idempotent_methods: expected an array of HTTP method names, got a table",
        ),
    ],
)
def test_bad_route_key(snippet: str, expected: str) -> None:
    text = f'[[routes]]\ncluster = "c"\n{snippet}\n\n[clusters.c]\nnodes = ["tcp://h:1"]\n'
    (issue,) = issues(text)
    assert issue.startswith(f"proxy.toml:3: {expected}")


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ('listen = "localhost"', "server.listen: expected 'host:port'"),
        (
            'listen = "::1:80"',
            "server.listen: an IPv6 address must be in brackets: '[v6-address]:port', "
            'got "::1:80"',
        ),
        (
            'listen = "[::1]:99999"',
            'server.listen: the port must be between 0 and 65535, got "[::1]:99999"',
        ),
        ('listen = "[::1]80"', "server.listen: expected '[v6-address]:port'"),
        ('listen = "[nope]:80"', "server.listen: the host in brackets is not an IPv6 address"),
        ('listen = ":80"', 'server.listen: the host is empty, got ":80"'),
        ('listen = "host:http"', 'server.listen: the port must be a number, got "host:http"'),
        ('listen = "unix://"', "server.listen: a unix:// address needs a socket path"),
        ("listen = 8080", "server.listen: expected a string, got an integer 8080"),
        ("backlog = 0", "server.backlog: must be between 1 and 65535, got 0"),
        ("header_timeout = 0", "server.header_timeout: must be a positive number, got 0"),
        (
            "keepalive_timeout = -1",
            "server.keepalive_timeout: must be zero or a positive number, got -1",
        ),
        ("max_request_line = 0", "server.max_request_line: must be a positive integer, got 0"),
        ("max_header_size = -5", "server.max_header_size: must be a positive integer, got -5"),
        ("max_headers = 1.5", "server.max_headers: expected an integer, got a float 1.5"),
        ("max_body_size = false", "server.max_body_size: expected an integer, got a boolean"),
        (
            'request_id_header = "x-id"',
            "server.request_id_header: moved: request ids are the request_id module's,"
            " set [modules.request_id] header",
        ),
        ("lisen = 1", "server.lisen: unknown key; did you mean 'listen'?"),
    ],
)
def test_bad_server_key(snippet: str, expected: str) -> None:
    (issue,) = issues(f"# proxy\n[server]\n{snippet}\n\n{MINIMAL}")
    assert issue.startswith(f"proxy.toml:3: {expected}")


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ("connect_timeout = -0.5", "upstream.connect_timeout: must be a positive number, got -0.5"),
        ("max_connections = 0", "upstream.max_connections: must be between 1 and 64, got 0"),
        ("max_connections = 65", "upstream.max_connections: must be between 1 and 64, got 65"),
        (
            "max_frame_size = 1023",
            "upstream.max_frame_size: must be between 1024 and 268435456, got 1023",
        ),
        (
            "max_frame_size = 268435457",
            "upstream.max_frame_size: must be between 1024 and 268435456, got 268435457",
        ),
        ("connect_timout = 1", "upstream.connect_timout: unknown key; did you mean"),
    ],
)
def test_bad_upstream_key(snippet: str, expected: str) -> None:
    (issue,) = issues(f"\n[upstream]\n{snippet}\n\n{MINIMAL}")
    assert issue.startswith(f"proxy.toml:3: {expected}")


def test_wrong_table_types() -> None:
    assert issues(
        """\
        server = 5
        upstream = "fast"
        routes = [1]
        clusters = []
        """
    ) == [
        "proxy.toml:1: server: expected a table, got an integer 5",
        'proxy.toml:2: upstream: expected a table, got a string "fast"',
        "proxy.toml:3: routes[0]: expected a table, got an integer 1",
        "proxy.toml:4: clusters: expected a table, got an array",
    ]


def test_unknown_top_level_key() -> None:
    assert issues("[route]\nx = 1\n\n" + MINIMAL) == [
        "proxy.toml:1: route: unknown key; did you mean 'routes'?"
    ]


def test_routes_as_a_plain_table() -> None:
    assert issues(
        """\
        [routes]
        cluster = "c"
        """
    ) == ["proxy.toml:1: routes: expected an array of tables ([[routes]]), got a table"]


def test_no_routes_at_all() -> None:
    assert issues('[clusters.c]\nnodes = ["tcp://h:1"]\n') == [
        "proxy.toml: routes: missing required key (at least one [[routes]] table)"
    ]


def test_empty_routes_array() -> None:
    assert issues('\nroutes = []\n[clusters.c]\nnodes = ["tcp://h:1"]\n') == [
        "proxy.toml:2: routes: at least one route is required"
    ]


def test_missing_cluster_reports_the_route_header() -> None:
    assert issues(
        """\
        [[routes]]
        prefix = "/a/"
        cluster = "c"

        [[routes]]   # the second route forgot its cluster
        prefix = "/b/"

        [clusters.c]
        nodes = ["tcp://h:1"]
        """
    ) == ["proxy.toml:5: routes[1].cluster: missing required key (the cluster to forward to)"]


def test_unknown_cluster() -> None:
    assert issues(
        """\
        [[routes]]
        cluster = "echo_tc"

        [[routes]]
        prefix = "/x/"
        cluster = "zzz"

        [clusters.echo_tcp]
        nodes = ["tcp://h:1"]

        [clusters.other]
        nodes = ["tcp://h:2"]
        """
    ) == [
        'proxy.toml:2: routes[0].cluster: no cluster named "echo_tc"; did you mean "echo_tcp"?',
        'proxy.toml:6: routes[1].cluster: no cluster named "zzz" (defined: echo_tcp, other)',
    ]


def test_no_clusters_defined() -> None:
    assert issues('[[routes]]\ncluster = "c"\n') == [
        'proxy.toml:2: routes[0].cluster: no cluster named "c"; no clusters are defined'
    ]


def test_a_broken_cluster_is_reported_once_not_at_each_route() -> None:
    assert issues(
        """\
        [[routes]]
        cluster = "c"

        [clusters.c]
        nodes = []
        """
    ) == ["proxy.toml:5: clusters.c.nodes: a cluster needs at least one node"]


def test_duplicate_route_names() -> None:
    assert issues(
        """\
        [[routes]]
        name = "api"
        prefix = "/a/"
        cluster = "c"

        [[routes]]
        name = "api"
        prefix = "/b/"
        cluster = "c"

        [clusters.c]
        nodes = ["tcp://h:1"]
        """
    ) == ['proxy.toml:7: routes[1].name: route name "api" is already used by routes[0]']


def test_duplicate_host_and_prefix_is_reported_once() -> None:
    assert issues(
        """\
        [[routes]]
        prefix = "/a/"
        cluster = "c"

        [[routes]]
        host = "*"
        prefix = "/a/"
        cluster = "c"

        [[routes]]
        host = "API.example.com"
        cluster = "c"

        [[routes]]
        host = "api.example.com"
        prefix = "/"
        cluster = "c"

        [clusters.c]
        nodes = ["tcp://h:1"]
        """
    ) == [
        'proxy.toml:7: routes[1].prefix: host "*" with prefix "/a/" is already routed by routes[0]',
        'proxy.toml:16: routes[3].prefix: host "api.example.com" with prefix "/" '
        "is already routed by routes[2]",
    ]


def test_same_prefix_on_different_hosts_is_fine() -> None:
    config = parse_config(
        MINIMAL.replace("[[routes]]", '[[routes]]\nhost = "a.example.com"')
        + '\n[[routes]]\nhost = "b.example.com"\ncluster = "echo"\n'
    )
    assert [route.name for route in config.routes] == ["a.example.com/", "b.example.com/"]


@pytest.mark.parametrize(
    ("nodes", "expected"),
    [
        ('"tcp//h:1"', "clusters.c.nodes[1]: 'tcp//h:1' is not a URI (expected scheme://...)"),
        ('"tcp://h"', "clusters.c.nodes[1]: 'tcp://h' needs a host and a port"),
        ('"tcp://h:99999"', "clusters.c.nodes[1]: 'tcp://h:99999': Port out of range"),
        ('"tcp://h:1/path"', "clusters.c.nodes[1]: 'tcp://h:1/path' has a path or query"),
        ('"unix://"', "clusters.c.nodes[1]: 'unix://' has no socket path"),
        ('"carrier-pigeon://h:1"', "clusters.c.nodes[1]: no transport for scheme 'carrier-pigeon'"),
        ("42", "clusters.c.nodes[1]: expected a node URI or a table"),
        ('"tcp://h:1"', 'clusters.c.nodes[1]: duplicate node "tcp://h:1"'),
        (
            '{ uri = "tcp://h:2", weight = 0 }',
            "clusters.c.nodes[1].weight: must be between 1 and 1000, got 0",
        ),
        (
            '{ uri = "tcp://h:2", weight = 1001 }',
            "clusters.c.nodes[1].weight: must be between 1 and 1000",
        ),
        (
            '{ uri = "tcp://h:2", wieght = 2 }',
            "clusters.c.nodes[1].wieght: unknown key; did you mean 'weight'?",
        ),
        ("{ weight = 2 }", "clusters.c.nodes[1].uri: missing required key"),
        ('{ uri = "tcp//h:2" }', "clusters.c.nodes[1].uri: 'tcp//h:2' is not a URI"),
        ("{ uri = 5 }", "clusters.c.nodes[1].uri: expected a string, got an integer 5"),
    ],
)
def test_bad_node(nodes: str, expected: str) -> None:
    text = f"""\
[[routes]]
cluster = "c"

[clusters.c]
nodes = [
  "tcp://h:1",
  {nodes},
]
"""
    (issue,) = issues(text)
    assert issue.startswith(f"proxy.toml:7: {expected}")


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        (
            'balance = "random"',
            'proxy.toml:5: clusters.c.balance: must be one of "round_robin", "weighted", '
            'got "random"',
        ),
        (
            'balance = "wieghted"',
            'proxy.toml:5: clusters.c.balance: must be one of "round_robin", "weighted", '
            'got "wieghted"; did you mean "weighted"?',
        ),
        ("balance = 1", "proxy.toml:5: clusters.c.balance: expected a string, got an integer 1"),
        ("node = 1", "proxy.toml:5: clusters.c.node: unknown key; did you mean 'nodes'?"),
        ("nodes = []", "proxy.toml:5: clusters.c.nodes: a cluster needs at least one node"),
        (
            'nodes = "tcp://h:1"',
            'proxy.toml:5: clusters.c.nodes: expected an array of node URIs, got a string "tcp://h:1"',
        ),
        (
            "",
            "proxy.toml:4: clusters.c.nodes: missing required key "
            "(a cluster needs at least one node, or a [clusters.NAME.discovery] table)",
        ),
    ],
)
def test_bad_cluster(snippet: str, expected: str) -> None:
    text = f'[[routes]]\ncluster = "c"\n\n[clusters.c]\n{snippet}\n'
    if snippet.startswith(("balance", "node =")):
        text += 'nodes = ["tcp://h:1"]\n'
    assert issues(text) == [expected]


def test_bad_cluster_name() -> None:
    assert issues(
        """\
        [[routes]]
        cluster = "my cluster"

        [clusters."my cluster"]
        nodes = ["tcp://h:1"]
        """
    ) == [
        'proxy.toml:4: clusters."my cluster": a cluster name is letters, digits, '
        "'_', '-' and '.', not starting with '-'; got \"my cluster\""
    ]


def test_cluster_not_a_table() -> None:
    assert issues('[[routes]]\ncluster = "c"\n[clusters]\nc = "tcp://h:1"\n') == [
        'proxy.toml:4: clusters.c: expected a table, got a string "tcp://h:1"'
    ]


def test_bad_idempotent_methods_point_at_the_element_line() -> None:
    assert issues(
        """\
        [[routes]]
        cluster = "c"
        idempotent_methods = [
          "get",
          "NOT A METHOD",
          3,
        ]

        [clusters.c]
        nodes = ["tcp://h:1"]
        """
    ) == [
        "proxy.toml:5: routes[0].idempotent_methods[1]: must be an HTTP method name, "
        'got "NOT A METHOD"',
        "proxy.toml:6: routes[0].idempotent_methods[2]: expected an HTTP method name, "
        "got an integer 3",
    ]


def test_inline_route_tables_report_their_own_line() -> None:
    assert issues(
        """\
        routes = [
          { prefix = "/a/", cluster = "c" },
          { prefix = "/b/", cluster = "c", retries = 9 },
          { prefix = "/c/" },
        ]
        clusters.c.nodes = ["tcp://h:1"]
        """
    ) == [
        "proxy.toml:3: routes[1].retries: must be between 0 and 5, got 9",
        "proxy.toml:4: routes[2].cluster: missing required key (the cluster to forward to)",
    ]


def test_multiline_strings_do_not_shift_lines() -> None:
    assert issues(
        '''\
        [modules.request_id]
        header = """x-id"""
        echo = false

        [[routes]]
        name = """
        [[routes]]
        timeout = 1
        """
        cluster = "c"
        timeout = -1

        [clusters.c]
        nodes = ["tcp://h:1"]
        '''
    ) == ["proxy.toml:11: routes[0].timeout: must be a positive number, got -1"]


# -- many issues at once ---------------------------------------------------------


def test_all_issues_are_collected_and_ordered_by_line() -> None:
    text = """\
        [[routes]]
        prefix = "nope"
        cluster = "missing"
        timeout = -3

        [server]
        listen = "localhost"
        backlg = 10

        [clusters.c]
        balance = "random"
        nodes = ["tcp//h:1", { uri = "tcp://h:2", weight = 0 }]

        [upstream]
        max_connections = 100
        """
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text), source="proxy.toml")
    errors = info.value.errors
    assert [(issue.line, issue.key) for issue in errors] == [
        (2, "routes[0].prefix"),
        (3, "routes[0].cluster"),
        (4, "routes[0].timeout"),
        (7, "server.listen"),
        (8, "server.backlg"),
        (11, "clusters.c.balance"),
        (12, "clusters.c.nodes[0]"),
        (12, "clusters.c.nodes[1].weight"),
        (15, "upstream.max_connections"),
    ]
    assert all(isinstance(issue, ConfigIssue) and issue.source == "proxy.toml" for issue in errors)
    assert str(info.value).splitlines()[3] == (
        "proxy.toml:7: server.listen: expected 'host:port', '[v6-address]:port' "
        "or 'unix:///path', got \"localhost\""
    )


def test_issue_formatting() -> None:
    assert str(ConfigIssue("a.toml", 3, "routes[0].timeout", "bad")) == (
        "a.toml:3: routes[0].timeout: bad"
    )
    assert str(ConfigIssue("a.toml", None, "routes", "missing")) == "a.toml: routes: missing"
    assert str(ConfigIssue("a.toml", 1, "", "invalid TOML: x")) == "a.toml:1: invalid TOML: x"
    error = ConfigError([ConfigIssue("s", None, "k", "m"), ConfigIssue("s", 2, "k", "m")])
    assert [issue.line for issue in error.errors] == [2, None]


# -- TOML syntax errors ----------------------------------------------------------


def test_toml_syntax_error_carries_its_line() -> None:
    (issue,) = issues('[server]\nlisten = "127.0.0.1:8080"\nbacklog 10\n')
    assert issue.startswith("proxy.toml:3: invalid TOML: ")
    assert "(at line" not in issue


def test_toml_duplicate_key_is_a_syntax_error() -> None:
    (issue,) = issues('[[routes]]\ncluster = "a"\ncluster = "b"\n')
    assert issue.startswith("proxy.toml:3: invalid TOML: ")


def test_toml_error_at_end_of_document() -> None:
    (issue,) = issues('[server]\nlisten = "127.0.0.1:8080"\nname = [1,\n')
    assert issue.startswith("proxy.toml:3: invalid TOML: ")


def test_a_transport_that_fails_to_load_is_a_config_issue(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(scheme: str) -> object:
        raise ImportError("No module named 'pigeon'")

    monkeypatch.setattr(validate_module, "get_transport", broken)
    assert issues(MINIMAL) == [
        "proxy.toml:5: clusters.echo.nodes[0]: the transport for 'tcp' failed to load: "
        "ImportError(\"No module named 'pigeon'\")"
    ]


# -- files -----------------------------------------------------------------------


def test_load_config_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_bytes(FULL.replace("\n", "\r\n").encode())
    config = load_config(path)
    assert config.source == str(path)
    assert config.checksum == hashlib.sha256(path.read_bytes()).hexdigest()
    assert config == dataclasses.replace(
        parse_config(FULL), source=str(path), checksum=config.checksum
    )
    assert load_config(str(path)) == config


def test_load_config_reports_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(MINIMAL.replace('cluster = "echo"', "cluster = 1"), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}:2: routes[0].cluster: expected a string, got an integer 1"


def test_load_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: cannot read: No such file or directory"
    assert info.value.errors[0].line is None


def test_load_config_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read: Is a directory"):
        load_config(tmp_path)


def test_load_config_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_bytes(b'[server]\nlisten = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (issue,) = info.value.errors
    assert issue.line == 2
    assert str(issue).startswith(f"{path}:2: not valid UTF-8")


def test_a_mistyped_prefix_does_not_also_count_as_a_duplicate() -> None:
    assert issues(
        """\
        [[routes]]
        cluster = "c"

        [[routes]]
        prefix = 5
        cluster = "c"

        [clusters.c]
        nodes = ["tcp://h:1"]
        """
    ) == ["proxy.toml:5: routes[1].prefix: expected a string, got an integer 5"]


def test_an_explicit_name_may_clash_with_a_default_name() -> None:
    assert issues(
        """\
        [[routes]]
        prefix = "/a/"
        cluster = "c"

        [[routes]]
        name = "*/a/"
        prefix = "/b/"
        cluster = "c"

        [clusters.c]
        nodes = ["tcp://h:1"]
        """
    ) == ['proxy.toml:6: routes[1].name: route name "*/a/" is already used by routes[0]']
