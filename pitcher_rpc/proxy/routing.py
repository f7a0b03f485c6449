"""Host and path-prefix routing: which route, hence which cluster, serves a request.

Host matching follows nginx's ``server_name`` order: an exact name first, then
the longest ``*.suffix`` wildcard, then ``*``. The chosen host owns the request
as a virtual host does in nginx and Envoy: within it the longest matching path
prefix wins, and a path none of its prefixes match is not routed (404), even
if a less specific host pattern would have matched it. Everything is precomputed when a snapshot
is built; a lookup is a dict hit and a short scan of prefixes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, Generic, Protocol, TypeVar


class _Routed(Protocol):
    @property
    def host(self) -> str: ...
    @property
    def prefix(self) -> str: ...


R = TypeVar("R", bound=_Routed)


def normalize_host(host: bytes) -> bytes:
    """Lower-case host without its port or a trailing root dot.

    ``Example.COM.:8080`` becomes ``example.com`` and ``[::1]:80`` becomes ``[::1]``.
    """
    host = host.lower()
    if host.startswith(b"["):
        end = host.find(b"]")
        return host[: end + 1] if end != -1 else host
    colon = host.rfind(b":")
    if colon != -1:
        host = host[:colon]
    # A fully qualified name with its root dot names the same host.
    return host[:-1] if host.endswith(b".") else host


_DOT_SEGMENTS: Final = frozenset((b".", b"%2e"))
_DOT_DOT_SEGMENTS: Final = frozenset((b"..", b".%2e", b"%2e.", b"%2e%2e"))


def normalize_path(path: bytes) -> bytes:
    """Remove ``.`` and ``..`` segments (RFC 3986 §5.2.4), percent-encoded ones too.

    Routing and the backend must see the same path, or ``/public/../admin``
    would be routed as ``/public/`` and served as ``/admin``. Other
    percent-encoding is left as it is. A path without a dot segment is
    returned unchanged, which is nearly every path, at the cost of two
    substring searches (find(): bytes `in` costs an exception on 3.11, see
    http/parser.py).
    """
    if path.find(b"/.") < 0 and path.find(b"%2") < 0:
        return path
    if not path.startswith(b"/"):
        return path  # "*" of OPTIONS
    kept: list[bytes] = []
    segments = path.split(b"/")[1:]
    for segment in segments:
        lowered = segment.lower()
        if lowered in _DOT_SEGMENTS:
            continue
        if lowered in _DOT_DOT_SEGMENTS:
            if kept:
                kept.pop()
            continue
        kept.append(segment)
    if segments[-1].lower() in _DOT_SEGMENTS | _DOT_DOT_SEGMENTS:
        kept.append(b"")  # "/a/b/.." is the directory "/a/", not the file "/a"
    return b"/" + b"/".join(kept)


class Router(Generic[R]):
    __slots__ = ("_any", "_cache", "_exact", "_wildcards")

    def __init__(self, routes: Iterable[R]) -> None:
        exact: dict[bytes, list[tuple[bytes, R]]] = {}
        wildcards: dict[bytes, list[tuple[bytes, R]]] = {}
        any_host: list[tuple[bytes, R]] = []
        for route in routes:
            entry = (route.prefix.encode(), route)
            host = route.host.lower()
            if host == "*":
                any_host.append(entry)
            elif host.startswith("*."):
                wildcards.setdefault(host[1:].encode(), []).append(entry)
            else:
                exact.setdefault(host.encode(), []).append(entry)

        def ordered(entries: list[tuple[bytes, R]]) -> tuple[tuple[bytes, R], ...]:
            return tuple(sorted(entries, key=lambda e: len(e[0]), reverse=True))

        self._any = ordered(any_host)
        self._wildcards = tuple(
            (suffix, ordered(entries))
            for suffix, entries in sorted(wildcards.items(), key=lambda i: len(i[0]), reverse=True)
        )
        self._exact = {host: ordered(entries) for host, entries in exact.items()}
        # Host -> its route list, memoised; bounded so hostile Host headers cannot grow it.
        self._cache: dict[bytes, tuple[tuple[bytes, R], ...]] = {}

    def _routes_for(self, raw_host: bytes) -> tuple[tuple[bytes, R], ...]:
        # Keyed by the Host header as received: a hit skips normalising it.
        cached = self._cache.get(raw_host)
        if cached is not None:
            return cached
        host = normalize_host(raw_host)
        result = self._exact.get(host)
        if result is None:
            for suffix, entries in self._wildcards:
                if host.endswith(suffix) and len(host) > len(suffix):
                    result = entries
                    break
            else:
                result = self._any
        if len(self._cache) < 1024:
            self._cache[raw_host] = result
        return result

    def match(self, host: bytes, path: bytes) -> R | None:
        for prefix, route in self._routes_for(host):
            if path.startswith(prefix):
                return route
        return None
