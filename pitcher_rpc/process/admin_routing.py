"""Method and path pattern to handler for the admin API, and the door in front of them.

A pattern is literal segments and ``{name}`` placeholders (one non-empty
segment each). A literal segment beats a placeholder in the same place, so
``/admin/modules/list`` wins over ``/admin/modules/{name}``; HEAD falls back
to a GET route.

The :class:`Door` decides, before any routing, whether a request may go on:
the bearer token, and the few reads that need none.
"""

from __future__ import annotations

import hmac
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["OPEN_PATHS", "READS", "Door", "Refusal", "Route", "Router", "is_open", "split_path"]

# What anyone who reaches the listener may read without the token (GET, and
# HEAD with it), as path segments: a supervisor's or load balancer's health
# check, Prometheus, and the status page's HTML shell (its data is guarded).
# Fixed here, not chosen per route, so that no new route is ever open by accident.
OPEN_PATHS: frozenset[tuple[str, ...]] = frozenset({("healthz",), ("metrics",), ()})
# The methods that change nothing: every route for any other is a change, and logged.
READS = ("GET", "HEAD")
_CHALLENGE = b'www-authenticate: Bearer realm="pitcher admin"'

# The token now, or None: read on every request, so a reload changes it at once.
TokenSource = Callable[[], "str | None"]

# Upper case only: methods are case-sensitive (RFC 9110 §9.1) and a route for
# "get" would never match what clients send.
_METHOD = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Z]+")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")

# Handlers are opaque here; admin.py gives them their type.
AdminHandler = Callable[..., Any]


# A pattern's segments: the literal text, or None for a {name} placeholder.
_Shape = tuple[str | None, ...]


@dataclass(frozen=True, slots=True)
class Route:
    names: tuple[str, ...]  # placeholder names, left to right
    handler: AdminHandler
    method: str = ""
    pattern: str = ""  # as registered, without a trailing slash
    description: str = ""  # one line, for the list GET /admin answers


def split_path(path: bytes) -> tuple[str, tuple[str, ...] | None]:
    """The path as text (no trailing slash) and its percent-decoded segments.

    Segments are split before decoding, so "%2F" stays inside its segment.
    The segments are None for a target that is not a path ("*").
    """
    if path != b"/" and path.endswith(b"/"):
        path = path[:-1]
    text = path.decode("utf-8", "replace")
    if path[:1] != b"/":
        return text, None
    if path == b"/":
        return text, ()
    return text, tuple(
        urllib.parse.unquote_to_bytes(segment).decode("utf-8", "replace")
        for segment in path[1:].split(b"/")
    )


def _parse_pattern(pattern: str) -> tuple[_Shape, tuple[str, ...]]:
    if not pattern.startswith("/"):
        raise ValueError(f"route pattern {pattern!r} must start with '/'")
    if pattern != "/" and pattern.endswith("/"):
        pattern = pattern[:-1]
    if pattern == "/":
        return (), ()
    shape: list[str | None] = []
    names: list[str] = []
    for segment in pattern[1:].split("/"):
        placeholder = _PLACEHOLDER.fullmatch(segment)
        if placeholder is not None:
            name = placeholder.group(1)
            if name in names:
                raise ValueError(f"route pattern {pattern!r} names {{{name}}} twice")
            names.append(name)
            shape.append(None)
        elif not segment or "{" in segment or "}" in segment:
            raise ValueError(f"route pattern {pattern!r} has an invalid segment {segment!r}")
        else:
            shape.append(segment)
    return tuple(shape), tuple(names)


def _specificity(shape: _Shape) -> tuple[bool, ...]:
    # Sorts literal segments before placeholders, leftmost first, so that
    # "/modules/list" wins over "/modules/{name}".
    return tuple(part is None for part in shape)


class Router:
    """Method and path pattern to handler; the admin API has a few dozen routes at most."""

    __slots__ = ("_shapes", "routes")

    def __init__(self) -> None:
        # Keyed by segment count first: a path only ever matches shapes of its length.
        self._shapes: dict[int, dict[_Shape, dict[str, Route]]] = {}
        # Every route in the order registered: what GET /admin lists.
        self.routes: list[Route] = []

    def add(self, method: str, pattern: str, handler: AdminHandler, description: str = "") -> None:
        if not _METHOD.fullmatch(method):
            raise ValueError(f"{method!r} is not an upper-case HTTP method")
        if "\n" in description or "\r" in description:
            raise ValueError(f"the description of {method} {pattern} must be one line")
        shape, names = _parse_pattern(pattern)
        methods = self._shapes.setdefault(len(shape), {}).setdefault(shape, {})
        if method in methods:
            raise ValueError(f"a route for {method} {pattern} is already registered")
        if pattern != "/":
            pattern = pattern.rstrip("/")
        route = Route(names, handler, method, pattern, description.strip())
        methods[method] = route
        self.routes.append(route)

    def resolve(
        self, method: str, segments: tuple[str, ...]
    ) -> tuple[Route | None, dict[str, str], tuple[str, ...]]:
        """The route and its parameters, or None and the methods the path allows.

        No route and no methods means no pattern matches the path at all.
        """
        matching = [
            (shape, methods)
            for shape, methods in self._shapes.get(len(segments), {}).items()
            if _matches(shape, segments)
        ]
        if not matching:
            return None, {}, ()
        matching.sort(key=lambda item: _specificity(item[0]))
        # RFC 9110 §9.3.2: HEAD is GET without the content.
        wanted = ("HEAD", "GET") if method == "HEAD" else (method,)
        for shape, methods in matching:
            for name in wanted:
                route = methods.get(name)
                if route is not None:
                    values = [
                        seg for part, seg in zip(shape, segments, strict=True) if part is None
                    ]
                    return route, dict(zip(route.names, values, strict=True)), ()
        allowed = {name for _, methods in matching for name in methods}
        if "GET" in allowed:
            allowed.add("HEAD")
        return None, {}, tuple(sorted(allowed))


def _matches(shape: _Shape, segments: tuple[str, ...]) -> bool:
    for part, segment in zip(shape, segments, strict=True):
        if part is None:
            # A placeholder is one non-empty segment; a decoded "/" would let a
            # name smuggle a path into whatever the handler looks up.
            if not segment or "/" in segment:
                return False
        elif part != segment:
            return False
    return True


def is_open(method: str, segments: tuple[str, ...] | None) -> bool:
    """Whether a request needs no token whatever the door's settings."""
    return method in READS and segments in OPEN_PATHS


def _no_token() -> str | None:
    return None


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    message: str  # for the client
    fields: bytes  # header lines, each ending in CRLF
    reason: str  # for the log


_NO_CREDENTIALS = Refusal(
    401,
    "this call needs an Authorization: Bearer TOKEN header",
    _CHALLENGE + b"\r\n",
    "no token",
)
_WRONG_TOKEN = Refusal(
    401,
    "the bearer token is not the one set",
    _CHALLENGE + b', error="invalid_token"\r\n',
    "wrong token",
)
_NO_TOKEN_SET = Refusal(
    403,
    "this admin listener is reachable from other machines and no token is set:"
    " set [admin] token_file and reload",
    b"",
    "no token set on a non-loopback listener",
)


class Door:
    """Who gets past the admin listener.

    ``token`` gives the bearer token every request but the open reads must
    carry (None: no token asked). ``exposed`` says the listening socket is
    reachable from other machines: then a missing token refuses instead of
    opening (fail closed).
    """

    __slots__ = ("exposed", "token")

    def __init__(self) -> None:
        self.token: TokenSource = _no_token
        self.exposed = False

    @property
    def guarded(self) -> bool:
        """Whether the routes that are not open need something to get in now."""
        return self.exposed or self.token() is not None

    def check(self, authorization: list[bytes]) -> Refusal | None:
        """None to let a request in, given its Authorization values; else why not."""
        token = self.token()
        if token is None:
            return _NO_TOKEN_SET if self.exposed else None
        if not authorization:
            return _NO_CREDENTIALS
        scheme, _, offered = authorization[0].strip().partition(b" ")
        # compare_digest: the time taken says nothing of how much of the token matched.
        if (
            len(authorization) == 1
            and scheme.lower() == b"bearer"
            and hmac.compare_digest(offered.strip(), token.encode("ascii"))
        ):
            return None
        return _WRONG_TOKEN


class RefusalBudget:
    """At most ``burst`` refusal lines per ``window`` seconds; the rest are counted.

    Whoever can reach the listener can send refused calls as fast as it
    likes: one line each would let it fill the disk and bury the calls that
    matter. The count of those not logged is logged once the window ends.
    """

    __slots__ = ("_spent", "_start", "burst", "suppressed", "window")

    def __init__(self, burst: int = 20, window: float = 10.0) -> None:
        self.burst = burst
        self.window = window
        self.suppressed = 0
        self._start = float("-inf")
        self._spent = 0

    def spend(self, now: float) -> bool:
        """Whether the refusal seen at ``now`` gets its line; if not it is counted."""
        if now - self._start >= self.window:
            self._start = now
            self._spent = 0
        if self._spent < self.burst:
            self._spent += 1
            return True
        self.suppressed += 1
        return False

    def window_end(self) -> float:
        return self._start + self.window
