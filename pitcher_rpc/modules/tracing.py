"""``tracing``: W3C Trace Context through the proxy, and its span over OTLP.

    [modules.tracing]
    sample_ratio = 0.1                 # new traces sampled (default 1.0)
    exporter = "otlp"                  # or "none": only pass traceparent on (default "otlp")
    endpoint = "http://collector:4318/v1/traces"   # OTLP/HTTP (default: OTEL_* variables)
    service_name = "pitcher"           # the spans' service.name (default)

Every request the module sees carries a ``traceparent`` to the service: the
client's trace continued when its ``traceparent`` is valid (its ``tracestate``
kept), else a new trace (and the ``tracestate`` dropped), as the W3C spec
says (see :mod:`.trace_context`). The parent id sent on is the proxy's own
span id, so the service's span is a child of the proxy's. A valid parent's
sampled flag is followed; a new trace is sampled at ``sample_ratio``
(OpenTelemetry's ``ParentBased(TraceIdRatioBased)``).

With ``exporter = "otlp"`` (needs ``pip install 'pitcher-rpc[tracing]'``;
without it the configuration is refused) each sampled request is one span
of kind SERVER, recorded when the response has been written (REQUEST_FINISH),
from the time the request was read: ``http.request.method``, ``url.path``,
``url.scheme``, ``http.route`` (the route's prefix), ``http.response.status_code``,
``client.address``, ``server.address`` / ``server.port`` (the node of the last
attempt), and ``pitcher.route``, ``pitcher.cluster``, ``pitcher.node`` (its
URI), ``pitcher.attempts``, ``pitcher.residence_time`` (seconds in the proxy
itself: the whole time less the last attempt's wait at the backend),
``pitcher.backend_time`` and ``pitcher.request_id``. A 5xx sets the span's status to
error. Spans go through a batch processor (its own thread) to the OTLP/HTTP
exporter; a full queue drops spans rather than slowing requests down.

Nothing of OpenTelemetry is imported while the module is not configured,
nor with ``exporter = "none"``; the tracer provider and the batch processor's
thread are made when a worker records its first span.
The module runs at AFTER_CLUSTER after ``headers`` (priority 50), whose edits
it extends rather than replaces; a route that lists its own modules should
list ``tracing`` after ``headers``. A request answered before routing (a 404,
a throttle's 429) sends nothing on, and is still recorded.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import logging
import random
import time
from collections.abc import Mapping
from typing import Any

from ..http.headers import HeaderChanges, HeaderEdits, is_valid_name, is_valid_value
from .base import AnyRecord, Module
from .trace_context import (
    RANDOM,
    SAMPLED,
    format_traceparent,
    parse_traceparent,
    ratio_bound,
    valid_tracestate,
)

log = logging.getLogger("pitcher.tracing")

# The global generator: reseeded in each forked worker, so workers never share ids.
_random_bits = random.getrandbits
_LOW_64 = (1 << 64) - 1

TRACEPARENT = b"traceparent"
TRACESTATE = b"tracestate"
_DEFAULTS: dict[str, Any] = {
    "sample_ratio": 1.0,
    "exporter": "otlp",
    "endpoint": "",
    "headers": {},
    "service_name": "pitcher",
    "max_queue_size": 2048,
    "max_export_batch_size": 512,
    "schedule_delay": 5.0,
}
_EXPORTERS = ("otlp", "none")
_EXTRA = (
    "opentelemetry.sdk.trace",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
)
_NO_EXTRA = (
    "exporter = \"otlp\" needs OpenTelemetry: pip install 'pitcher-rpc[tracing]'"
    ' (or exporter = "none" to pass traceparent on without recording spans)'
)
_EMPTY = HeaderChanges()
_STATE = "tracing"
# How long aclose() waits for the last spans to be exported.
_CLOSE_TIMEOUT = 2.0


def extra_installed() -> bool:
    """Whether the ``tracing`` extra (OpenTelemetry's SDK and OTLP exporter) is importable."""
    try:
        return all(importlib.util.find_spec(name) is not None for name in _EXTRA)
    except ImportError:
        return False


class Trace:
    """One request's trace: what the proxy sent on, and what its span is."""

    __slots__ = ("flags", "parent_id", "span_id", "trace_id", "tracestate")

    def __init__(
        self, trace_id: int, parent_id: int, span_id: int, flags: int, tracestate: str
    ) -> None:
        self.trace_id = trace_id
        # The client's span (0 for a new trace): the proxy's span's parent.
        self.parent_id = parent_id
        self.span_id = span_id
        self.flags = flags
        self.tracestate = tracestate

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)


class Tracing(Module):
    name = "tracing"
    # After headers (100) at AFTER_CLUSTER: its edits are extended, not replaced.
    priority = 50

    @classmethod
    def validate(cls, settings: Mapping[str, Any]) -> Mapping[str, Any]:
        unknown = set(settings) - set(_DEFAULTS)
        if unknown:
            expected = ", ".join(sorted(_DEFAULTS))
            raise ValueError(f"unknown key {sorted(unknown)[0]!r} (expected {expected})")
        checked = {**_DEFAULTS, **settings}
        ratio = checked["sample_ratio"]
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio <= 1:
            raise ValueError(f"sample_ratio must be a number from 0 to 1, got {ratio!r}")
        checked["sample_ratio"] = float(ratio)
        if checked["exporter"] not in _EXPORTERS:
            raise ValueError(f"exporter must be one of {', '.join(_EXPORTERS)}")
        endpoint = checked["endpoint"]
        if not isinstance(endpoint, str) or (
            endpoint and not endpoint.startswith(("http://", "https://"))
        ):
            raise ValueError(f"endpoint must be an http:// or https:// URL, got {endpoint!r}")
        headers = checked["headers"]
        if not isinstance(headers, Mapping) or not all(
            isinstance(name, str)
            and is_valid_name(name.encode("latin-1", "replace"))
            and isinstance(value, str)
            and is_valid_value(value.encode("latin-1", "replace"))
            for name, value in headers.items()
        ):
            raise ValueError("headers must be a table of HTTP header names to values")
        checked["headers"] = dict(headers)
        if not isinstance(checked["service_name"], str) or not checked["service_name"]:
            raise ValueError("service_name must be a non-empty string")
        for key in ("max_queue_size", "max_export_batch_size"):
            value = checked[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if checked["max_export_batch_size"] > checked["max_queue_size"]:
            raise ValueError("max_export_batch_size must not be over max_queue_size")
        delay = checked["schedule_delay"]
        if isinstance(delay, bool) or not isinstance(delay, int | float) or delay <= 0:
            raise ValueError(f"schedule_delay must be a positive number of seconds, got {delay!r}")
        if checked["exporter"] == "otlp" and not extra_installed():
            raise ValueError(_NO_EXTRA)
        return checked

    def __init__(self, settings: Mapping[str, Any]) -> None:
        super().__init__(settings)
        checked = self.validate(settings)
        self.checked = checked
        self.bound = ratio_bound(checked["sample_ratio"])
        self.recording = checked["exporter"] != "none"
        # Only a request carrying one of these is looked through for them.
        self.watch = frozenset({TRACEPARENT, TRACESTATE})
        self._recorder: _Recorder | None = None
        if self.recording:
            # Imported now, while the configuration loads: on the first
            # sampled request it would stall the event loop for ~0.2 s. The
            # SDK's objects (and the batch processor's thread) are made then,
            # in the worker that records.
            for name in _EXTRA:
                importlib.import_module(name)
        self.continued = 0
        self.started = 0
        self.malformed = 0
        self.sampled = 0
        self.recorded = 0

    # the request path ---------------------------------------------------------------

    def trace_of(self, exchange: AnyRecord) -> Trace:
        """The trace of ``exchange``: made from its headers once, then kept in its state."""
        state = exchange.module_state
        if state is None:
            state = exchange.module_state = {}
        else:
            found = state.get(_STATE)
            if found is not None:
                return found
        parent = None
        tracestate = ""
        request = exchange.request
        if request.watched and TRACEPARENT in request.names:
            names = request.names
            values = request.values
            parent = parse_traceparent(
                b", ".join([values[i] for i, name in enumerate(names) if name == TRACEPARENT])
            )
            if parent is None:
                self.malformed += 1
            elif TRACESTATE in names:
                joined = b",".join(
                    [values[i] for i, name in enumerate(names) if name == TRACESTATE]
                )
                if valid_tracestate(joined):
                    tracestate = joined.decode("ascii")
        # Ids inline rather than by new_trace_id() / new_span_id(): every
        # request makes them. A zero id is invalid; its odds are 2**-64 at most.
        span_id = _random_bits(64) or 1
        if parent is not None:
            self.continued += 1
            trace = Trace(parent.trace_id, parent.parent_id, span_id, parent.flags, tracestate)
        else:
            self.started += 1
            trace_id = _random_bits(128) or 1
            flags = RANDOM | SAMPLED if trace_id & _LOW_64 < self.bound else RANDOM
            trace = Trace(trace_id, 0, span_id, flags, "")
        if trace.flags & SAMPLED:
            self.sampled += 1
        state[_STATE] = trace
        return trace

    def after_cluster(self, exchange: AnyRecord) -> None:
        trace = self.trace_of(exchange)
        value = format_traceparent(trace.trace_id, trace.span_id, trace.flags)
        request = exchange.request
        edits = exchange.edits
        if not request.watched or not (TRACEPARENT in request.names or TRACESTATE in request.names):
            # Nothing of the client's to remove: an append only.
            ours = HeaderChanges(add=((TRACEPARENT, value),))
        elif trace.tracestate:
            ours = HeaderChanges(set=((TRACEPARENT, value),))
        else:
            # A replaced parent's tracestate (or an invalid one) goes too.
            ours = HeaderChanges(set=((TRACEPARENT, value),), remove=frozenset({TRACESTATE}))
        if edits is not None:
            theirs = edits.request
            # The proxy owns traceparent: a headers rule for it gives way.
            ours = HeaderChanges(
                tuple(pair for pair in theirs.add if pair[0] != TRACEPARENT) + ours.add,
                tuple(pair for pair in theirs.set if pair[0] != TRACEPARENT) + ours.set,
                theirs.remove | ours.remove,
            )
            exchange.edits = HeaderEdits(ours, edits.response)
        else:
            exchange.edits = HeaderEdits(ours, _EMPTY)

    def request_finish(self, exchange: AnyRecord) -> None:
        if not self.recording:
            return
        trace = self.trace_of(exchange)
        if not trace.flags & SAMPLED:
            return
        recorder = self._recorder
        if recorder is None:
            recorder = self._recorder = self._make_recorder()
        recorder.record(exchange, trace)
        self.recorded += 1

    # exporting ---------------------------------------------------------------------

    def _make_recorder(self) -> _Recorder:
        return _Recorder(self.checked, self._span_exporter())

    def _span_exporter(self) -> Any:
        """The OTLP/HTTP span exporter of the settings (tests give another)."""
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        checked = self.checked
        return OTLPSpanExporter(
            endpoint=checked["endpoint"] or None, headers=checked["headers"] or None
        )

    def stats(self) -> dict[str, Any]:
        return {
            "continued": self.continued,
            "started": self.started,
            "malformed": self.malformed,
            "sampled": self.sampled,
            "recorded": self.recorded,
        }

    async def aclose(self) -> None:
        recorder = self._recorder
        if recorder is None:
            return
        self._recorder = None
        self.recording = False
        loop = asyncio.get_running_loop()
        try:
            # The batch processor's thread exports what is queued; a collector
            # that does not answer must not hold the proxy's stop.
            await asyncio.wait_for(
                loop.run_in_executor(None, recorder.shutdown), _CLOSE_TIMEOUT + 1.0
            )
        except TimeoutError:
            log.warning("tracing: spans still queued after %.0fs were dropped", _CLOSE_TIMEOUT)


class _Recorder:
    """OpenTelemetry's SDK, made when the first span is recorded (in the worker that records it).

    The proxy chooses its span's ids itself (the span id was sent to the
    service before the span is recorded), so the tracer provider is given an
    id generator that hands out the ids of the span being recorded. Spans are
    recorded one at a time on the event loop's thread.
    """

    def __init__(self, checked: Mapping[str, Any], exporter: Any) -> None:
        from opentelemetry import trace as trace_api
        from opentelemetry.context import Context
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.id_generator import IdGenerator
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON
        from opentelemetry.trace import Status, StatusCode
        from opentelemetry.trace.span import TraceState

        class _ChosenIds(IdGenerator):
            def __init__(self) -> None:
                self.trace_id = 0
                self.span_id = 0

            def generate_trace_id(self) -> int:
                return self.trace_id

            def generate_span_id(self) -> int:
                return self.span_id

            def is_trace_id_random(self) -> bool:
                return True

        self._ids = ids = _ChosenIds()
        resource = Resource.create({"service.name": checked["service_name"]})
        # The sampling decision is the module's (made before the request went
        # on); every span handed to the SDK is one to record.
        self._provider = provider = TracerProvider(
            sampler=ALWAYS_ON, resource=resource, id_generator=ids
        )
        provider.add_span_processor(
            BatchSpanProcessor(
                exporter,
                max_queue_size=checked["max_queue_size"],
                max_export_batch_size=checked["max_export_batch_size"],
                schedule_delay_millis=checked["schedule_delay"] * 1000,
            )
        )
        self._tracer = provider.get_tracer("pitcher_rpc.proxy")
        self._api = trace_api
        self._server = trace_api.SpanKind.SERVER
        self._error = Status(StatusCode.ERROR)
        self._trace_state = TraceState.from_header
        self._root = Context()
        # Attributes that depend on the route and node only, made once per pair.
        self._where: dict[tuple[Any, Any], dict[str, Any]] = {}

    def record(self, exchange: AnyRecord, trace: Trace) -> None:
        api = self._api
        ids = self._ids
        ids.trace_id = trace.trace_id
        ids.span_id = trace.span_id
        if trace.parent_id:
            parent = api.SpanContext(
                trace.trace_id,
                trace.parent_id,
                is_remote=True,
                trace_flags=api.TraceFlags(trace.flags),
                trace_state=self._trace_state([trace.tracestate]) if trace.tracestate else None,
            )
            context = api.set_span_in_context(api.NonRecordingSpan(parent), self._root)
        else:
            # A root span, whatever context the event loop's callback runs in.
            context = self._root
        request = exchange.request
        route = exchange.route
        method = request.method.decode("latin-1")
        wall = time.time_ns()
        now = time.perf_counter()
        total = exchange.finished - exchange.started if exchange.started else 0.0
        attributes: dict[str, Any] = {
            "http.request.method": method,
            "url.path": request.path.decode("latin-1"),
            "url.scheme": exchange.connection.server.forwarded_proto.decode(),
            "http.response.status_code": exchange.status,
            "client.address": exchange.client_ip.decode("latin-1"),
            "pitcher.attempts": getattr(exchange, "attempts", 0),
        }
        if exchange.request_id:
            attributes["pitcher.request_id"] = exchange.request_id.decode("latin-1")
        where = self._where.get((route, exchange.node))
        if where is None:
            where = self._where_of(route, exchange.node)
        attributes.update(where)
        sent = exchange.backend_started
        residence = total
        if sent and exchange.backend_ended >= sent:
            backend = exchange.backend_ended - sent
            residence -= backend
            attributes["pitcher.backend_time"] = backend
        attributes["pitcher.residence_time"] = max(residence, 0.0)
        # perf_counter() times as wall-clock nanoseconds, from now backwards.
        started = wall - int((now - exchange.started) * 1e9) if exchange.started else wall
        ended = wall - int((now - exchange.finished) * 1e9) if exchange.finished else wall
        name = f"{method} {route.prefix}" if route is not None else method
        span = self._tracer.start_span(
            name, context, kind=self._server, attributes=attributes, start_time=started
        )
        if exchange.status >= 500:
            span.set_status(self._error)
        span.end(end_time=max(ended, started))

    def _where_of(self, route: Any, node: Any) -> dict[str, Any]:
        where: dict[str, Any] = {}
        if route is not None:
            where["http.route"] = route.prefix
            where["pitcher.route"] = route.name
            where["pitcher.cluster"] = route.cluster.name
        if node is not None:
            uri: str = node.uri
            where["pitcher.node"] = uri
            scheme, _, rest = uri.partition("://")
            if scheme in ("unix", "zmq+ipc"):
                where["server.address"] = rest
            else:
                host, _, port = rest.rpartition(":")
                where["server.address"] = host.strip("[]")
                if port.isdigit():
                    where["server.port"] = int(port)
        if len(self._where) >= 4096:
            self._where.clear()  # routes and nodes of old snapshots
        self._where[(route, node)] = where
        return where

    def shutdown(self) -> None:
        self._provider.force_flush(int(_CLOSE_TIMEOUT * 1000))
        self._provider.shutdown()
