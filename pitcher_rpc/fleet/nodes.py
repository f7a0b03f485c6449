"""What a registry holds for a node, read leniently: a bad entry is skipped and named.

An etcd value is a JSON object ``{"uri": "tcp://10.0.0.5:7001", "weight": 2,
"metadata": {...}}`` (weight 1 by default, metadata any JSON object, other
keys ignored), or a bare node URI. Whatever cannot be read so is skipped and
reported with its key; it never stops the other nodes from being taken.
"""

from __future__ import annotations

import json
from typing import Any

from ..config.model import NodeConfig
from ..config.overlay import MAX_WEIGHT, check_uri

# A registry entry bigger than this is not a node description.
MAX_VALUE = 64 * 1024


def parse_node(value: bytes) -> tuple[NodeConfig, dict[str, Any]]:
    """The node a registry value describes, and its metadata; ValueError says what is wrong."""
    if len(value) > MAX_VALUE:
        raise ValueError(f"{len(value)} bytes, more than {MAX_VALUE}")
    try:
        text = value.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    if not text.startswith("{"):
        check_uri(text)
        return NodeConfig(text), {}
    try:
        item = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    uri = item.get("uri")
    if not isinstance(uri, str) or not uri:
        raise ValueError('no "uri": expected {"uri": "tcp://host:port", "weight": 1}')
    check_uri(uri)
    weight = item.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT:
        raise ValueError(f"weight must be a whole number in 1..{MAX_WEIGHT}, got {weight!r}")
    metadata = item.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata must be a JSON object, got {type(metadata).__name__}")
    return NodeConfig(uri, weight), metadata


class NodeEntries:
    """The entries of one source by name (an etcd key below the prefix, a DNS answer)."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        # name -> (node, metadata) or (None, why it was skipped)
        self._entries: dict[str, tuple[NodeConfig | None, Any]] = {}

    def put(self, name: str, value: bytes | None, node: NodeConfig | None = None) -> None:
        if node is not None:
            self._entries[name] = (node, {})
            return
        try:
            self._entries[name] = parse_node(value or b"")
        except ValueError as exc:
            self._entries[name] = (None, str(exc))

    def delete(self, name: str) -> None:
        self._entries.pop(name, None)

    def _walk(self) -> tuple[list[tuple[str, NodeConfig, Any]], dict[str, str]]:
        taken: list[tuple[str, NodeConfig, Any]] = []
        skipped: dict[str, str] = {}
        owner: dict[str, str] = {}
        for name in sorted(self._entries):
            node, extra = self._entries[name]
            if node is None:
                skipped[name] = str(extra)
            elif node.uri in owner:
                skipped[name] = f"{node.uri} is already the node of {owner[node.uri]}"
            else:
                owner[node.uri] = name
                taken.append((name, node, extra))
        return taken, skipped

    def nodes(self) -> tuple[NodeConfig, ...]:
        return tuple(node for _, node, _ in self._walk()[0])

    def metadata(self) -> dict[str, Any]:
        """By node URI, the metadata its entry carries (nodes without any left out)."""
        return {node.uri: extra for _, node, extra in self._walk()[0] if extra}

    @property
    def skipped(self) -> dict[str, str]:
        return self._walk()[1]
