"""W3C Trace Context parsing: the spec's rules, and any header value at all (hypothesis)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pitcher_rpc.modules.trace_context import (
    RANDOM,
    SAMPLED,
    TraceParent,
    format_traceparent,
    new_span_id,
    new_trace_id,
    parse_traceparent,
    ratio_bound,
    sampled_at,
    valid_tracestate,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{PARENT}-01"
# What a strict parser of version 00 accepts, spelled as a regex.
STRICT_00 = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")


def test_a_valid_header_is_read() -> None:
    parent = parse_traceparent(VALID)
    assert parent == TraceParent(int(TRACE, 16), int(PARENT, 16), SAMPLED)
    assert parent is not None and parent.sampled
    assert parse_traceparent(VALID.encode()) == parent
    unsampled = parse_traceparent(VALID[:-2] + "00")
    assert unsampled is not None and not unsampled.sampled


@pytest.mark.parametrize(
    "value",
    [
        "",
        VALID[:-1],  # too short
        VALID + "-",  # version 00 is exactly 55 characters
        VALID + " ",
        " " + VALID,
        VALID.upper(),  # lower-case hex only
        f"00-{TRACE.upper()}-{PARENT}-01",
        f"00-{'0' * 32}-{PARENT}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"ff-{TRACE}-{PARENT}-01",  # version ff is forbidden
        f"0g-{TRACE}-{PARENT}-01",
        f"00-{TRACE}-{PARENT}-0x",
        f"00_{TRACE}-{PARENT}-01",
        f"00-{TRACE[:-1]}-{PARENT}0-01",  # a field's width off by one
        f"{VALID}, {VALID}",  # two traceparent fields joined
        f"01-{TRACE}-{PARENT}-01x",  # a later version: the fields end at 55 or a "-"
        VALID[:-1] + "\u00e9",
    ],
)
def test_malformed_headers_are_refused(value: str) -> None:
    assert parse_traceparent(value) is None


def test_a_later_version_is_read_for_its_known_fields() -> None:
    later = parse_traceparent(f"cc-{TRACE}-{PARENT}-01-what-the-future-adds")
    assert later == TraceParent(int(TRACE, 16), int(PARENT, 16), SAMPLED)
    assert parse_traceparent(f"cc-{TRACE}-{PARENT}-01") is not None


def test_what_is_sent_on_is_version_00_with_known_flags_only() -> None:
    sent = format_traceparent(int(TRACE, 16), int(PARENT, 16), 0xFF)
    assert sent == f"00-{TRACE}-{PARENT}-03".encode()
    assert format_traceparent(1, 2, SAMPLED) == b"00-" + b"0" * 31 + b"1-" + b"0" * 15 + b"2-01"


@given(st.text(max_size=80))
def test_any_text_is_refused_unless_it_is_a_strict_version_00_header(value: str) -> None:
    parent = parse_traceparent(value)
    if value.startswith("00"):
        assert (parent is not None) == bool(STRICT_00.fullmatch(value))
    if parent is not None:
        # What was read is written back the same (its flags as received).
        assert format_traceparent(parent.trace_id, parent.parent_id, parent.flags)[3:52] == (
            value[3:52].encode()
        )


@given(st.binary(max_size=80))
def test_any_bytes_are_read_or_refused_without_error(value: bytes) -> None:
    parent = parse_traceparent(value)
    if parent is not None:
        assert parent.trace_id and parent.parent_id
        assert value[:2] != b"ff"


@given(
    st.integers(1, 2**128 - 1),
    st.integers(1, 2**64 - 1),
    st.integers(0, 255),
)
def test_every_header_written_is_read_back(trace_id: int, span_id: int, flags: int) -> None:
    parent = parse_traceparent(format_traceparent(trace_id, span_id, flags))
    assert parent == TraceParent(trace_id, span_id, flags & (SAMPLED | RANDOM))


@pytest.mark.parametrize(
    "value",
    [
        "",
        "congo=t61rcWkgMzE",
        "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
        "rojo=00f067aa0ba902b7 , ,congo=t61rcWkgMzE",
        "tenant@system=value with spaces",
        " rojo=a \t",  # whitespace around a member is not part of it
        ",".join(f"k{i}=v" for i in range(32)),
    ],
)
def test_valid_tracestates(value: str) -> None:
    assert valid_tracestate(value)
    assert valid_tracestate(value.encode())


@pytest.mark.parametrize(
    "value",
    [
        "Rojo=1",  # keys are lower case
        "rojo",  # no value
        "rojo=",  # an empty value
        "rojo=a,rojo=b",  # a key twice
        "rojo=a=b",
        "1abc=x",  # a simple key starts with a letter
        "a@1sys=x",  # a system id starts with a letter
        ",".join(f"k{i}=v" for i in range(33)),  # at most 32 members
        "rojo=caf\u00e9",
    ],
)
def test_invalid_tracestates(value: str) -> None:
    assert not valid_tracestate(value)


@given(st.binary(max_size=120))
def test_any_tracestate_bytes_are_judged_without_error(value: bytes) -> None:
    assert valid_tracestate(value) in (True, False)


def test_new_ids_are_never_zero_and_differ() -> None:
    traces = {new_trace_id() for _ in range(1000)}
    spans = {new_span_id() for _ in range(1000)}
    assert len(traces) == 1000 and 0 not in traces and max(traces) < 2**128
    assert len(spans) == 1000 and 0 not in spans and max(spans) < 2**64


def test_the_ratio_sampler_is_opentelemetrys() -> None:
    sampling = pytest.importorskip("opentelemetry.sdk.trace.sampling")
    for ratio in (0.0, 0.001, 0.25, 0.5, 1.0):
        sampler = sampling.TraceIdRatioBased(ratio)
        bound = ratio_bound(ratio)
        assert bound == sampler.bound
        for _ in range(200):
            trace_id = new_trace_id()
            decision = sampler.should_sample(None, trace_id, "x").decision.is_sampled()
            assert sampled_at(trace_id, bound) == decision
    assert not sampled_at(new_trace_id(), ratio_bound(0.0))
    assert sampled_at(new_trace_id(), ratio_bound(1.0))
