"""The module contract: hook points, priorities, answers.

A module is a class. It declares a unique ``name``, an explicit integer
``priority`` (handlers run highest first; two modules of the same priority
on one hook are refused at load, so order is never accidental), whether it
is ``essential`` (only non-essential modules are shed under overload; a
configuration can say otherwise with ``essential = true|false`` in the
module's table) and its
``failure_policy``: when a handler raises, "skip" logs, counts and goes on
without it, "fail" answers 500.

It subscribes to a hook by defining the method of that hook's name:

=================  ==============================  ==================================
hook               runs                            handler
=================  ==============================  ==================================
ACCEPT             a connection is accepted        ``on_accept(connection)``
BEFORE_CLUSTER     request parsed, before routing  ``before_cluster(exchange)``
AFTER_CLUSTER      route and cluster chosen        ``after_cluster(exchange)``
BACKEND_RESPONSE   the backend answered or failed  ``backend_response(exchange)``
REQUEST_FINISH     the response was written        ``request_finish(exchange)``
FINISH             the connection closed           ``on_finish(connection)``
=================  ==============================  ==================================

A module may also keep state and background work: ``reopen()`` is called on
SIGUSR1 (log rotation), ``stats()`` reports its numbers to the admin API and
metrics, and ``aclose()`` is awaited when a reload drops the instance (its
settings changed, or its table is gone) and when the proxy stops.

A request handler returns None to let the request go on, or an
:class:`Answer` to end it there (a 403, a 429 ...). ACCEPT may refuse a
connection the same way (it is answered and closed).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, Generic, TypeAlias, TypeVar

from mypy_extensions import mypyc_attr

from ..http.headers import HeaderEdits
from ..http.request import HttpRequest


class Hook(Enum):
    ACCEPT = "on_accept"
    BEFORE_CLUSTER = "before_cluster"
    AFTER_CLUSTER = "after_cluster"
    BACKEND_RESPONSE = "backend_response"
    REQUEST_FINISH = "request_finish"
    FINISH = "on_finish"

    @property
    def method(self) -> str:
        """The name of the handler method a module defines to subscribe."""
        return self.value


RouteT = TypeVar("RouteT")
NodeT = TypeVar("NodeT")
ConnectionT = TypeVar("ConnectionT")


class Record(Generic[RouteT, NodeT, ConnectionT]):
    """What a module reads and writes of one request: the proxy's exchange is one.

    ``request`` (the parsed request), ``route`` and ``node`` (the route taken
    and the node of the last attempt, None until there is one), ``connection``
    (the client's: ``client_ip``), ``status`` and ``response_bytes`` once
    answered, and the ``perf_counter()`` times ``started`` (the request was
    read and begins), ``backend_started`` / ``backend_ended`` (the last
    attempt was sent / its answer or error came; 0.0 if no backend was called)
    and ``finished`` (the response was handed to the socket). The times are
    taken only when a module that runs at REQUEST_FINISH is on
    (``HookChains.timed``). Modules write ``request_id`` / ``id_header`` /
    ``echo_id`` (request_id), ``edits`` (header changes, see HeaderEdits) and
    ``module_state`` (per-request state by module name; None until a module
    keeps some).

    A handler of a compiled module declares its argument as ``AnyRecord`` and
    reads these as fields; the proxy's types fill in the parameters.
    """

    __slots__ = (
        "backend_ended",
        "backend_started",
        "connection",
        "echo_id",
        "edits",
        "finished",
        "id_header",
        "module_state",
        "node",
        "request",
        "request_id",
        "response_bytes",
        "route",
        "started",
        "status",
    )

    request: HttpRequest
    route: RouteT | None
    node: NodeT | None
    connection: ConnectionT
    status: int
    response_bytes: int
    request_id: bytes
    id_header: bytes
    echo_id: bool
    edits: HeaderEdits | None
    started: float
    backend_started: float
    backend_ended: float
    finished: float
    module_state: dict[str, Any] | None


AnyRecord: TypeAlias = Record[Any, Any, Any]


@dataclass(frozen=True, slots=True)
class Answer:
    """A response a module gives instead of forwarding the request."""

    status: int
    message: str = ""
    headers: tuple[tuple[bytes, bytes], ...] = ()


# Compiled, so that the built-in modules' own attributes are read as fields;
# a module written in Python subclasses it as any class.
@mypyc_attr(allow_interpreted_subclasses=True)
class Module:
    """Base of every module; subclasses set the class attributes and define handlers."""

    name: ClassVar[str] = ""
    priority: ClassVar[int] = 0
    essential: ClassVar[bool] = False
    failure_policy: ClassVar[str] = "skip"  # or "fail"

    # Lower-case request header names this module reads: a request carrying
    # one of them is flagged by the parser (HttpRequest.watched), so a module
    # can skip looking through the headers of every other request.
    watch: frozenset[bytes] = frozenset()

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self.settings = settings

    @classmethod
    def validate(cls, settings: Mapping[str, Any]) -> Mapping[str, Any]:
        """Check this module's config section; raise ValueError naming the key if it is wrong."""
        if settings:
            raise ValueError(f"unknown key {next(iter(settings))!r}")
        return settings

    def reopen(self) -> None:
        """Reopen files the module writes (SIGUSR1, after a log rotation)."""

    def stats(self) -> dict[str, Any]:
        """Numbers worth reporting (counters, histograms); JSON-serialisable."""
        return {}

    def demand(self) -> dict[str, tuple[float, float]]:
        """For limits that hold for the whole proxy: (demand, capacity) per limit.

        Demand since the last call and the proxy-wide capacity, in the limit's
        own unit (requests per second for a rate, requests in flight for a
        concurrency limit). With several workers the master collects this
        every tick and answers with :meth:`set_shares` (see
        pitcher_rpc.degrade.shares).
        """
        return {}

    def set_shares(self, shares: Mapping[str, float]) -> None:
        """This process's share (0-1] of each proxy-wide limit, by the keys of demand().

        The key ``"*"``, when present, is the share of every limit not named.
        """

    async def aclose(self) -> None:
        """Release what the module holds: flush buffers, close files, stop tasks."""

    @classmethod
    def hooks(cls) -> tuple[Hook, ...]:
        """The hooks this module subscribes to: the handler methods it defines."""
        return tuple(hook for hook in Hook if callable(getattr(cls, hook.method, None)))
