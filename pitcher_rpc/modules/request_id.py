"""``request_id``: every request carries an id, from the client or made here.

    [modules.request_id]
    header = "x-request-id"     # the header that carries it (default)
    trust_incoming = true       # keep a valid id the client sent (default)
    echo = true                 # send it back to the client too (default)

The id goes to the backend in ``header`` and back to the client in the
response (unless the backend set that header itself). An incoming id is kept
only if it is short and plainly printable (1-128 of ``A-Z a-z 0-9 . _ : + / = -``),
so it is safe in logs and in the header it is echoed in; any other value is
replaced. A made id is a per-process random prefix and a counter: unique
across workers and restarts, and cheap.

This module is loaded even without a ``[modules.request_id]`` table; write
``enabled = false`` there to start with it off. When it is off the proxy
neither makes nor reads ids and passes the client's header through as it is.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Mapping
from typing import Any, Final

from ..http.headers import is_valid_name
from .base import AnyRecord, Module

_VALID_ID: Final = re.compile(rb"[A-Za-z0-9._:+/=-]{1,128}").fullmatch
_PREFIX: Final = os.urandom(6).hex().encode() + b"-"
_counter: Final = itertools.count(1)
# The proxy frames messages and forwards hops itself: no id may ride on those.
_RESERVED: Final = frozenset(
    {
        "connection",
        "content-length",
        "host",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "x-forwarded-for",
        "x-forwarded-proto",
    }
)
_DEFAULTS: dict[str, Any] = {"header": "x-request-id", "trust_incoming": True, "echo": True}


def new_request_id() -> bytes:
    return _PREFIX + b"%x" % next(_counter)


def valid_request_id(value: bytes) -> bool:
    return _VALID_ID(value) is not None


class RequestId(Module):
    name = "request_id"
    # First of all: every later module and log line can use the id.
    priority = 1000
    essential = True

    @classmethod
    def validate(cls, settings: Mapping[str, Any]) -> Mapping[str, Any]:
        unknown = set(settings) - set(_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown key {sorted(unknown)[0]!r}")
        checked = dict(_DEFAULTS)
        header = settings.get("header", checked["header"])
        if not isinstance(header, str) or not is_valid_name(header.encode("latin-1", "replace")):
            raise ValueError(f"header: {header!r} is not an HTTP header name")
        if header.lower() in _RESERVED:
            raise ValueError(f"header: {header!r} is managed by the proxy itself")
        checked["header"] = header.lower()
        for key in ("trust_incoming", "echo"):
            value = settings.get(key, checked[key])
            if not isinstance(value, bool):
                raise ValueError(f"{key} must be true or false, got {value!r}")
            checked[key] = value
        return checked

    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__(settings)
        checked = self.validate(settings)
        self.header = checked["header"].encode("latin-1")
        self.trust_incoming = checked["trust_incoming"]
        self.echo = checked["echo"]
        # Read the client's header only on requests that carry it; it is
        # dropped from what is forwarded whether it is kept or replaced.
        self.watch = frozenset({self.header})

    def before_cluster(self, exchange: AnyRecord) -> None:
        request = exchange.request
        request_id = b""
        if request.watched and self.trust_incoming:
            names = request.names
            if self.header in names:
                # The first one counts; a later duplicate is dropped with it.
                value = request.values[names.index(self.header)]
                if _VALID_ID(value):
                    request_id = value
        exchange.request_id = request_id or _PREFIX + b"%x" % next(_counter)
        exchange.id_header = self.header
        exchange.echo_id = self.echo
