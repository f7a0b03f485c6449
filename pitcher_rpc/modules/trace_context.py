"""W3C Trace Context: the ``traceparent`` and ``tracestate`` headers, without I/O.

Shared by the proxy's ``tracing`` module and the SDK (which sits above this
package); it imports nothing of OpenTelemetry.

``traceparent`` is ``VERSION-TRACE_ID-PARENT_ID-FLAGS`` in lower-case hex
(https://www.w3.org/TR/trace-context/, section 3.2). :func:`parse_traceparent`
follows the spec strictly: version ``00`` is exactly 55 characters; version
``ff`` is invalid; a later version is read for its first four fields, which
must then be followed by the end or a ``-`` (the spec's forward
compatibility); upper-case hex, an all-zero trace id or parent id, and
anything else malformed make the header invalid, and the receiver starts a
new trace. Two ``traceparent`` fields in one request are one invalid value
(they are joined with a comma before parsing, as HTTP joins repeated fields).

``tracestate`` (section 3.3) is a list of at most 32 ``key=value`` members
with distinct keys; one that breaks those rules is dropped whole, and it is
never kept without a valid ``traceparent``.

Sampling is OpenTelemetry's ``ParentBased(TraceIdRatioBased(ratio))``: the
sampled flag of a valid parent is followed; a new trace is sampled when the
low 64 bits of its id fall under ``ratio * 2**64``, the same test OpenTelemetry
SDKs make, so a service sampling by ratio agrees with the proxy.
"""

from __future__ import annotations

import random
import re

__all__ = [
    "RANDOM",
    "SAMPLED",
    "TraceParent",
    "format_traceparent",
    "new_span_id",
    "new_trace_id",
    "parse_traceparent",
    "ratio_bound",
    "sampled_at",
    "valid_tracestate",
]

# trace-flags bits: sampled (Level 1), random trace id (Level 2).
SAMPLED = 0x01
RANDOM = 0x02
_KNOWN_FLAGS = SAMPLED | RANDOM
_LOW_64 = (1 << 64) - 1

# version "-" trace-id "-" parent-id "-" trace-flags, lower-case hex only.
_FIELDS = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
# RFC-style grammar of a tracestate list member (section 3.3.1.3).
_KEY = r"(?:[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13})"
_VALUE = r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
_MEMBER = re.compile(rf"({_KEY})=({_VALUE})")
_MAX_MEMBERS = 32


class TraceParent:
    """A parsed ``traceparent``: ids as integers, ``flags`` the trace-flags byte."""

    __slots__ = ("flags", "parent_id", "trace_id")

    def __init__(self, trace_id: int, parent_id: int, flags: int) -> None:
        self.trace_id = trace_id
        self.parent_id = parent_id
        self.flags = flags

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, TraceParent)
            and self.trace_id == other.trace_id
            and self.parent_id == other.parent_id
            and self.flags == other.flags
        )

    def __hash__(self) -> int:
        return hash((self.trace_id, self.parent_id, self.flags))

    def __repr__(self) -> str:
        return format_traceparent(self.trace_id, self.parent_id, self.flags).decode()


def parse_traceparent(value: str | bytes) -> TraceParent | None:
    """The trace context a ``traceparent`` value carries; None if it is invalid."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if len(value) < 55:
        return None
    found = _FIELDS.match(value)
    if found is None:
        return None
    version, trace_hex, parent_hex, flags_hex = found.groups()
    if version == "00":
        if len(value) != 55:
            return None
    elif version == "ff" or (len(value) > 55 and value[55] != "-"):
        return None
    trace_id = int(trace_hex, 16)
    parent_id = int(parent_hex, 16)
    if not trace_id or not parent_id:
        return None
    return TraceParent(trace_id, parent_id, int(flags_hex, 16))


def format_traceparent(trace_id: int, span_id: int, flags: int) -> bytes:
    """A version-00 ``traceparent``; flags the proxy does not know are not passed on."""
    return b"00-%032x-%016x-%02x" % (trace_id, span_id, flags & _KNOWN_FLAGS)


def valid_tracestate(value: str | bytes) -> bool:
    """Whether ``value`` (every tracestate field joined by commas) is a valid list."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return False
    keys: set[str] = set()
    for member in value.split(","):
        member = member.strip(" \t")
        if not member:
            continue  # empty list elements are allowed (RFC 9110 section 5.6.1)
        found = _MEMBER.fullmatch(member)
        if found is None:
            return False
        key = found.group(1)
        if key in keys:
            return False
        keys.add(key)
    return len(keys) <= _MAX_MEMBERS


def new_trace_id() -> int:
    """A random, non-zero 128-bit trace id (``random`` is reseeded in each forked worker)."""
    trace_id = random.getrandbits(128)
    while not trace_id:
        trace_id = random.getrandbits(128)
    return trace_id


def new_span_id() -> int:
    """A random, non-zero 64-bit span id."""
    span_id = random.getrandbits(64)
    while not span_id:
        span_id = random.getrandbits(64)
    return span_id


def ratio_bound(ratio: float) -> int:
    """The bound under which a trace id's low 64 bits are sampled at ``ratio``."""
    return round(ratio * (1 << 64))


def sampled_at(trace_id: int, bound: int) -> bool:
    """The ratio sampler's verdict on a new trace (see :func:`ratio_bound`)."""
    return trace_id & _LOW_64 < bound
