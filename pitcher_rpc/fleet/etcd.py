"""etcd v3 through its JSON gateway (``/v3/...`` over HTTP), driven by aiohttp.

etcd serves every gRPC call of its v3 API as JSON on the client port too
(the grpc-gateway, on by default since etcd 3.3 and stable at ``/v3/``
since 3.4): a unary call is one POST; a watch is one POST whose answer is
a stream of JSON objects, one per line, for as long as the connection
lives. Keys and values travel base64-encoded; 64-bit integers as strings;
fields at their default value (a PUT event's type, a TTL of 0) are left
out. That is everything this module knows of etcd: docs/fleet.md says why
this and not a gRPC client.

Several endpoints may be given (the members of one cluster): a call that
cannot reach one tries the next, and the one that answered is tried first
next time. :class:`EtcdUnavailable` says none answered; :class:`EtcdError`
that one answered with an error.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

__all__ = [
    "EtcdClient",
    "EtcdCompacted",
    "EtcdError",
    "EtcdUnavailable",
    "KeyValue",
    "WatchEvent",
    "prefix_end",
]


# etcd's own limit on a request is 1.5 MiB; a watch message may hold many of them.
MAX_WATCH_MESSAGE = 64 * 1024 * 1024


class EtcdError(Exception):
    """etcd answered, with an error (the message is etcd's)."""


class EtcdUnavailable(EtcdError):
    """No endpoint could be reached, or a connection broke mid-call."""


class EtcdCompacted(EtcdError):
    """A watch asked for a revision etcd no longer keeps: read the prefix again."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted (etcd keeps revisions from {compact_revision})")
        self.compact_revision = compact_revision


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int


@dataclass(frozen=True, slots=True)
class WatchEvent:
    # "put", "delete", or "created": the watch is in place (revision: etcd's now).
    kind: str
    key: str
    value: bytes  # b"" for a delete
    revision: int


def _b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: Any) -> bytes:
    return base64.b64decode(text) if isinstance(text, str) and text else b""


def prefix_end(prefix: str) -> bytes:
    """The first key after every key starting with ``prefix`` (etcd's ``range_end``)."""
    raw = bytearray(prefix.encode())
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return bytes(raw)
        raw.pop()
    return b"\0"  # every key


def _kv(item: dict[str, Any]) -> KeyValue:
    return KeyValue(
        _unb64(item.get("key")).decode("utf-8", "replace"),
        _unb64(item.get("value")),
        int(item.get("mod_revision", 0)),
    )


class EtcdClient:
    """The v3 calls the fleet needs: range, put, delete, watch, leases."""

    def __init__(
        self, endpoints: Sequence[str], timeout: float = 3.0, connect_timeout: float = 1.0
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self.endpoints = [endpoint.rstrip("/") for endpoint in endpoints]
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=connect_timeout)
        # A watch lives as long as etcd does: only connecting is bounded.
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_connect=connect_timeout
        )
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(raise_for_status=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        errors: list[str] = []
        for index, endpoint in enumerate(self.endpoints):
            try:
                async with self._http().post(
                    endpoint + path, json=body, timeout=self._timeout
                ) as answer:
                    data = await answer.read()
                    status = answer.status
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                errors.append(f"{endpoint}: {_describe(exc)}")
                continue
            if index:
                # The member that answered goes first next time.
                self.endpoints.insert(0, self.endpoints.pop(index))
            return _decode(status, data, path)
        raise EtcdUnavailable("; ".join(errors))

    # -- keys ---------------------------------------------------------------------

    async def range_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix`` and the revision they were read at."""
        answer = await self._post(
            "/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))}
        )
        revision = int(answer.get("header", {}).get("revision", 0))
        return [_kv(item) for item in answer.get("kvs", ())], revision

    async def count_prefix(self, prefix: str) -> int:
        """How many keys are under ``prefix`` (none is sent back)."""
        answer = await self._post(
            "/v3/kv/range",
            {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix)), "count_only": True},
        )
        return int(answer.get("count", 0))

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Write ``key``; the revision of the write."""
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        answer = await self._post("/v3/kv/put", body)
        return int(answer.get("header", {}).get("revision", 0))

    async def delete(self, key: str) -> int:
        """Delete ``key``; how many keys went (0 or 1)."""
        answer = await self._post("/v3/kv/deleterange", {"key": _b64(key)})
        return int(answer.get("deleted", 0))

    # -- leases -------------------------------------------------------------------

    async def grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; its id."""
        answer = await self._post("/v3/lease/grant", {"TTL": str(ttl)})
        if answer.get("error"):
            raise EtcdError(str(answer["error"]))
        return int(answer["ID"])

    async def keep_alive(self, lease: int) -> int:
        """Renew ``lease`` once; the seconds it has now (0: it had expired, and is gone)."""
        answer = await self._post("/v3/lease/keepalive", {"ID": str(lease)})
        result = answer.get("result", answer)
        return int(result.get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        """End ``lease`` now: its keys are deleted with it."""
        await self._post("/v3/lease/revoke", {"ID": str(lease)})

    # -- watch --------------------------------------------------------------------

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        """Every change under ``prefix`` from ``start_revision`` on, until the stream breaks.

        The first event is "created", once etcd has the watch in place.

        Raises EtcdCompacted when that revision is gone, EtcdUnavailable when
        no endpoint answers or the stream ends (etcd went away).
        """
        request = {
            "create_request": {
                "key": _b64(prefix),
                "range_end": _b64(prefix_end(prefix)),
                "start_revision": str(start_revision),
            }
        }
        errors: list[str] = []
        for endpoint in list(self.endpoints):
            try:
                async with self._http().post(
                    endpoint + "/v3/watch", json=request, timeout=self._stream_timeout
                ) as answer:
                    if answer.status != 200:
                        _decode(answer.status, await answer.read(), "/v3/watch")
                    # One JSON message a line, split here with a bound of our own:
                    # aiohttp's line reader has had a 64 KiB limit on a line in some
                    # versions, and one revision deleting many keys is more than that.
                    pending = bytearray()
                    async for chunk in answer.content.iter_any():
                        pending += chunk
                        while (end := pending.find(b"\n")) >= 0:
                            line = bytes(pending[:end])
                            del pending[: end + 1]
                            for event in _watch_events(line):
                                yield event
                        if len(pending) > MAX_WATCH_MESSAGE:
                            raise EtcdError(f"a watch message over {MAX_WATCH_MESSAGE} bytes")
                errors.append(f"{endpoint}: the watch stream ended")
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                errors.append(f"{endpoint}: {_describe(exc)}")
            # A stream that ended or broke: the caller resumes from its last revision.
            raise EtcdUnavailable("; ".join(errors))
        raise EtcdUnavailable("; ".join(errors) or "no endpoint")


def _watch_events(line: bytes) -> list[WatchEvent]:
    line = line.strip()
    if not line:
        return []
    try:
        message = json.loads(line)
    except ValueError:
        raise EtcdError(f"unreadable watch message: {line[:200]!r}") from None
    if "error" in message:
        error = message["error"]
        text = error.get("message") if isinstance(error, dict) else error
        raise EtcdUnavailable(f"the watch failed: {text}")
    result = message.get("result", {})
    compacted = int(result.get("compact_revision", 0))
    if compacted:
        raise EtcdCompacted(compacted)
    if result.get("canceled"):
        raise EtcdUnavailable(f"etcd cancelled the watch: {result.get('cancel_reason', '')}")
    events: list[WatchEvent] = []
    if result.get("created"):
        revision = int(result.get("header", {}).get("revision", 0))
        events.append(WatchEvent("created", "", b"", revision))
    for item in result.get("events", ()):
        kv = _kv(item.get("kv", {}))
        # A PUT is type 0, left out of the JSON as a default.
        kind = "delete" if item.get("type") == "DELETE" else "put"
        events.append(WatchEvent(kind, kv.key, kv.value, kv.mod_revision))
    return events


def _decode(status: int, data: bytes, path: str) -> dict[str, Any]:
    try:
        answer = json.loads(data) if data else {}
    except ValueError:
        answer = {"error": data.decode("utf-8", "replace")[:200]}
    if not isinstance(answer, dict):
        answer = {"error": str(answer)[:200]}
    if status >= 300:
        text = answer.get("message") or answer.get("error") or f"HTTP {status}"
        if status in (502, 503, 504):
            raise EtcdUnavailable(f"{path}: {text}")
        raise EtcdError(f"{path}: {text}")
    return answer


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
