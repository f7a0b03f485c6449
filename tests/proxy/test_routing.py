"""Router and balancers as pure objects: no sockets, no configuration files."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from pitcher_rpc.config import BALANCE_POLICIES
from pitcher_rpc.proxy.balance import BALANCERS, RoundRobin, SmoothWeighted
from pitcher_rpc.proxy.routing import Router, normalize_host, normalize_path


@dataclass(frozen=True)
class R:
    name: str
    host: str = "*"
    prefix: str = "/"


# eq=False: nodes are told apart by identity, as the proxy's Node objects are.
@dataclass(eq=False)
class N:
    name: str
    weight: int = 1

    def __repr__(self) -> str:
        return self.name


def route_name(router: Router[R], host: bytes, path: bytes = b"/") -> str | None:
    route = router.match(host, path)
    return None if route is None else route.name


# ------------------------------------------------------------------ hosts


HOSTS = Router(
    [
        R("any", "*", "/"),
        R("wild", "*.example.com", "/"),
        R("wild-deep", "*.api.example.com", "/"),
        R("exact", "www.example.com", "/"),
        R("bare", "example.com", "/"),
    ]
)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        (b"www.example.com", "exact"),
        (b"shop.example.com", "wild"),
        (b"a.b.example.com", "wild"),
        (b"v1.api.example.com", "wild-deep"),
        (b"api.example.com", "wild"),
        (b"example.com", "bare"),
        (b"badexample.com", "any"),
        (b"example.com.evil.test", "any"),
        (b"other.test", "any"),
        (b"", "any"),
        (b".example.com", "any"),
    ],
)
def test_exact_beats_longest_wildcard_beats_any(host: bytes, expected: str) -> None:
    assert route_name(HOSTS, host) == expected


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        (b"WWW.Example.COM", "exact"),
        (b"Shop.EXAMPLE.com", "wild"),
        (b"www.example.com:8080", "exact"),
        (b"shop.example.com:443", "wild"),
        (b"EXAMPLE.com:1", "bare"),
        (b"www.example.com:", "exact"),
    ],
)
def test_host_case_and_port_do_not_matter(host: bytes, expected: str) -> None:
    assert route_name(HOSTS, host) == expected


def test_route_hosts_are_case_insensitive_too() -> None:
    router = Router([R("upper", "API.Example.Com"), R("wild", "*.EXAMPLE.org")])
    assert route_name(router, b"api.example.com") == "upper"
    assert route_name(router, b"x.example.org") == "wild"


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        (b"[::1]", "v6"),
        (b"[::1]:8080", "v6"),
        (b"[::1]:", "v6"),
        (b"[2001:DB8::1]:80", "v6-doc"),
        (b"[::2]:8080", "any"),
        (b"127.0.0.1:8080", "v4"),
        (b"127.0.0.1", "v4"),
    ],
)
def test_ip_literal_hosts(host: bytes, expected: str) -> None:
    router = Router(
        [R("any", "*"), R("v6", "[::1]"), R("v6-doc", "[2001:db8::1]"), R("v4", "127.0.0.1")]
    )
    assert route_name(router, host) == expected


@pytest.mark.parametrize(
    ("host", "normalized"),
    [
        (b"Example.COM:8080", b"example.com"),
        (b"example.com", b"example.com"),
        (b"[::1]:80", b"[::1]"),
        (b"[::1]", b"[::1]"),
        (b"[2001:DB8::1]", b"[2001:db8::1]"),
        (b"[::1", b"[::1"),
        (b"10.0.0.1:0", b"10.0.0.1"),
        (b"", b""),
    ],
)
def test_normalize_host(host: bytes, normalized: bytes) -> None:
    assert normalize_host(host) == normalized


# ------------------------------------------------------------------ prefixes


def test_longest_prefix_wins_whatever_the_order() -> None:
    routes = [R("root", prefix="/"), R("api", prefix="/api/"), R("v2", prefix="/api/v2/")]
    for ordering in itertools.permutations(routes):
        router = Router(ordering)
        assert route_name(router, b"x", b"/api/v2/users") == "v2"
        assert route_name(router, b"x", b"/api/v1/users") == "api"
        assert route_name(router, b"x", b"/api/") == "api"
        assert route_name(router, b"x", b"/api") == "root"
        assert route_name(router, b"x", b"/other") == "root"


def test_prefixes_match_bytes_not_segments() -> None:
    # Like nginx's prefix locations: "/api" also takes "/apiary".
    router = Router([R("api", prefix="/api"), R("slash", prefix="/api/")])
    assert route_name(router, b"x", b"/apiary") == "api"
    assert route_name(router, b"x", b"/api/x") == "slash"


def test_no_prefix_matches_gives_none() -> None:
    router = Router([R("api", prefix="/api/"), R("static", prefix="/static/")])
    assert router.match(b"x", b"/") is None
    assert router.match(b"x", b"/API/") is None
    assert Router([]).match(b"x", b"/") is None


# ------------------------------------------------------------------ a host owns its paths


def test_exact_host_owns_its_paths_without_falling_back() -> None:
    router = Router([R("any", "*", "/"), R("exact-api", "api.test", "/api/")])
    assert route_name(router, b"api.test", b"/api/x") == "exact-api"
    assert router.match(b"api.test", b"/other") is None
    assert route_name(router, b"other.test", b"/other") == "any"


def test_wildcard_host_owns_its_paths_without_falling_back() -> None:
    router = Router(
        [R("any", "*", "/"), R("wild-api", "*.test", "/api/"), R("exact", "www.test", "/")]
    )
    assert route_name(router, b"x.test", b"/api/") == "wild-api"
    assert router.match(b"x.test", b"/") is None
    assert route_name(router, b"www.test", b"/api/") == "exact"


def test_shorter_wildcard_is_not_consulted_when_a_longer_one_owns_the_host() -> None:
    router = Router([R("short", "*.test", "/"), R("long", "*.api.test", "/v1/")])
    assert route_name(router, b"x.api.test", b"/v1/a") == "long"
    assert router.match(b"x.api.test", b"/v2/a") is None
    assert route_name(router, b"x.test", b"/v2/a") == "short"


def test_many_distinct_hosts_keep_routing_correctly() -> None:
    # Hostile Host headers fill the lookup memo; answers must not change once it is full.
    router = Router([R("any", "*", "/"), R("wild", "*.example.com", "/")])
    for index in range(3000):
        assert route_name(router, b"h%d.example.com" % index) == "wild"
        assert route_name(router, b"h%d.other" % index) == "any"
    assert route_name(router, b"late.example.com:1") == "wild"


# ------------------------------------------------------------------ balancers


def picks(balancer: RoundRobin[N] | SmoothWeighted[N], count: int, exclude=()) -> str:
    return "".join(str(balancer.pick(exclude)) for _ in range(count))


def test_round_robin_walks_the_nodes_in_order() -> None:
    a, b, c = N("a"), N("b"), N("c")
    assert picks(RoundRobin([a, b, c]), 7) == "abcabca"


def test_round_robin_ignores_weights() -> None:
    assert picks(RoundRobin([N("a", 5), N("b", 1)]), 4) == "abab"


def test_round_robin_skips_excluded_nodes() -> None:
    a, b, c = N("a"), N("b"), N("c")
    balancer = RoundRobin([a, b, c])
    assert picks(balancer, 4, exclude=[b]) == "acac"
    assert balancer.pick([a, b, c]) is None
    assert balancer.pick([a, c]) is b


def test_round_robin_excluding_the_next_node_gives_the_one_after() -> None:
    a, b, c = N("a"), N("b"), N("c")
    balancer = RoundRobin([a, b, c])
    assert balancer.pick() is a
    # A retry that excludes what it tried must still land on a node.
    assert balancer.pick([b]) is c
    assert balancer.pick() is a


def test_smooth_weighted_five_one_one() -> None:
    a, b, c = N("a", 5), N("b", 1), N("c", 1)
    balancer = SmoothWeighted([a, b, c])
    assert picks(balancer, 7) == "aabacaa"
    assert picks(balancer, 14) == "aabacaa" * 2


@pytest.mark.parametrize("weights", [(1, 1), (2, 1), (3, 1, 1), (7, 3, 2, 1), (1000, 1)])
def test_smooth_weighted_shares_match_the_weights(weights: tuple[int, ...]) -> None:
    nodes = [N(chr(ord("a") + i), w) for i, w in enumerate(weights)]
    balancer = SmoothWeighted(nodes)
    cycle = sum(weights)
    sequence = picks(balancer, cycle * 3)
    for node in nodes:
        assert sequence.count(node.name) == node.weight * 3
    # Smooth: no node waits much longer than its fair gap between two turns.
    for node in nodes:
        positions = [i for i, name in enumerate(sequence) if name == node.name]
        gaps = [later - earlier for earlier, later in itertools.pairwise(positions)]
        assert max(gaps, default=0) <= 2 * cycle / node.weight + 1


def test_smooth_weighted_exclusion() -> None:
    a, b, c = N("a", 5), N("b", 1), N("c", 1)
    balancer = SmoothWeighted([a, b, c])
    assert picks(balancer, 4, exclude=[a]) == "bcbc"
    assert balancer.pick([a, b, c]) is None
    assert balancer.pick([b, c]) is a


def test_smooth_weighted_scores_stay_balanced_through_exclusions() -> None:
    a, b, c = N("a", 5), N("b", 1), N("c", 1)
    balancer = SmoothWeighted([a, b, c])
    for step in range(50):
        balancer.pick([(a, b, c)[step % 3]] if step % 2 else [])
        # nginx's invariant: the running scores always sum to zero, so
        # excluding nodes for a while cannot skew the shares afterwards.
        assert sum(balancer._scores) == 0
    assert set(picks(balancer, 70)) == {"a", "b", "c"}


def test_empty_balancers_pick_nothing() -> None:
    assert RoundRobin([]).pick() is None
    assert SmoothWeighted([]).pick() is None


def test_every_balance_policy_the_config_accepts_has_a_balancer() -> None:
    assert set(BALANCERS) == set(BALANCE_POLICIES)
    assert BALANCERS["round_robin"] is RoundRobin
    assert BALANCERS["weighted"] is SmoothWeighted


@pytest.mark.parametrize(
    ("path", "normalized"),
    [
        (b"/a/b", b"/a/b"),
        (b"/", b"/"),
        (b"/public/../admin", b"/admin"),
        (b"/public/%2e%2e/admin", b"/admin"),
        (b"/public/%2E./admin", b"/admin"),
        (b"/a/./b/.", b"/a/b/"),
        (b"/a/b/..", b"/a/"),
        (b"/../../etc/passwd", b"/etc/passwd"),
        (b"/a/.hidden/b", b"/a/.hidden/b"),
        (b"/a/..b/c", b"/a/..b/c"),
        (b"/a%2fb/../c", b"/c"),
        (b"*", b"*"),
    ],
)
def test_normalize_path_removes_dot_segments(path: bytes, normalized: bytes) -> None:
    assert normalize_path(path) == normalized


def test_a_dot_segment_cannot_route_around_a_prefix() -> None:
    router = Router([R("public", prefix="/public/"), R("admin", prefix="/admin/")])
    assert route_name(router, b"x", normalize_path(b"/public/../admin/secret")) == "admin"


def test_a_trailing_root_dot_names_the_same_host() -> None:
    router = Router([R("www", host="www.example.com")])
    assert route_name(router, b"www.example.com.") == "www"
    assert route_name(router, b"WWW.example.com.:8080") == "www"
