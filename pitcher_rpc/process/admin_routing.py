"""Method and path pattern to handler, for the admin API.

A pattern is literal segments and ``{name}`` placeholders (one non-empty
segment each). A literal segment beats a placeholder in the same place, so
``/admin/modules/list`` wins over ``/admin/modules/{name}``; HEAD falls back
to a GET route.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Route", "Router", "split_path"]

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
