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

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from socket import AF_INET, AF_INET6, inet_ntop, inet_pton
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
    (the client's), ``client_ip`` (who the client really is, see below),
    ``status`` and ``response_bytes`` once answered, and the
    ``perf_counter()`` times ``started`` (the request was read and begins),
    ``backend_started`` / ``backend_ended`` (the last attempt was sent / its
    answer or error came; 0.0 if no backend was called) and ``finished``
    (the response was handed to the socket). The times are taken only when
    a module that runs at REQUEST_FINISH is on (``HookChains.timed``).
    Modules write ``request_id`` / ``id_header`` / ``echo_id`` (request_id),
    ``edits`` (header changes, see HeaderEdits) and ``module_state``
    (per-request state by module name; None until a module keeps some).

    ``attempts`` counts the times the request was sent to a node (0 if it
    never was; 2 after one retry). ``failure`` says why the proxy could not
    get an answer from a backend, one of a few fixed names
    (:data:`FAILURES`), "" when it did (or no backend was called: a 404, a
    module's answer, a client gone). It is set
    with the error answer (502, 503, 504, 413): ``connect`` (no connection
    to the node), ``timeout`` (no answer within the route's timeout),
    ``reset`` (the connection was lost), ``error`` (the node failed the
    request), ``overloaded`` (no node could take it: each at its in-flight
    limit or ejected, or the cluster has none), ``rejected`` (the node is
    shutting down), ``too_large`` (the request or the answer over the frame
    limit), ``bad_answer`` (an answer that is not a valid HTTP response) and
    ``shutdown`` (the proxy itself is stopping); ``cut``: a streamed answer
    ended before its end (the node failed or went away midway, or its body
    broke its stated size), so the client got an incomplete response. A
    request retried after a failed attempt and answered on the next has none.

    ``client_ip`` is the client's address as bytes (``b"unix"`` on a Unix
    socket), set once when the request begins: the connection's peer, unless
    the peer is one of ``[server] trusted_proxies``. Then it is taken from
    X-Forwarded-For as nginx's ``real_ip_recursive on`` does (see
    :func:`real_client`). When no trusted proxy named a client it is the very
    object ``connection.client_ip``: ``record.client_ip is
    record.connection.client_ip`` is a cheap test for that.

    A handler of a compiled module declares its argument as ``AnyRecord`` and
    reads these as fields; the proxy's types fill in the parameters.
    """

    __slots__ = (
        "attempts",
        "backend_ended",
        "backend_started",
        "client_ip",
        "connection",
        "echo_id",
        "edits",
        "failure",
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
    client_ip: bytes
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
    attempts: int
    failure: str


AnyRecord: TypeAlias = Record[Any, Any, Any]

# Every value of ``Record.failure`` but "": a small fixed set (a metrics label, a log field).
FAILURES = (
    "connect",
    "timeout",
    "reset",
    "error",
    "overloaded",
    "rejected",
    "too_large",
    "bad_answer",
    "shutdown",
    "cut",
)


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


# ----------------------------------------------------------------------------- addresses
#
# Who the client is when a trusted proxy says so, and address rules (ip_filter).
# An address is one integer: IPv4 in [0, 2**32), IPv6 offset by 2**128 so the
# families never meet, and an IPv4-mapped IPv6 address (::ffff:a.b.c.d, how a
# dual-stack listener reports an IPv4 peer) is its IPv4 address. Read with
# inet_pton (C) rather than the ipaddress module's Python parser (~1 us).

_V6 = 1 << 128
_MAPPED_FIRST = 0xFFFF << 32  # ::ffff:0.0.0.0
_MAPPED_LAST = _MAPPED_FIRST | 0xFFFFFFFF
# Verdicts by address text; bounded so that a scan of many addresses cannot grow it.
_VERDICTS_SIZE = 4096


def address_key(text: str) -> int:
    """``text`` as one integer (see above); -1 if it is not an IP address.

    An IPv6 zone (``fe80::1%eth0``) is ignored.
    """
    try:
        if ":" not in text:
            return int.from_bytes(inet_pton(AF_INET, text), "big")
        value = int.from_bytes(inet_pton(AF_INET6, text.partition("%")[0]), "big")
    except (OSError, ValueError):
        return -1
    if _MAPPED_FIRST <= value <= _MAPPED_LAST:
        return value & 0xFFFFFFFF
    return value | _V6


def key_text(key: int) -> bytes:
    """The canonical text of an address key (``2001:db8::1``, ``192.0.2.1``)."""
    if key < _V6:
        return inet_ntop(AF_INET, key.to_bytes(4, "big")).encode()
    return inet_ntop(AF_INET6, (key ^ _V6).to_bytes(16, "big")).encode()


def forwarded_key(element: bytes) -> int:
    """The address of one X-Forwarded-For element; -1 if it is not one.

    The element may carry a port, as some proxies write it: ``192.0.2.1:8080``,
    ``[2001:db8::1]:8080`` (and ``[2001:db8::1]``). Anything else that is not
    an address (``unknown``, an obfuscated name) is -1.
    """
    text = element.decode("latin-1")
    if text.startswith("["):
        inside, bracket, rest = text[1:].partition("]")
        if not bracket or ":" not in inside or (rest and not _is_port(rest)):
            return -1
        return address_key(inside)
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return address_key(host) if port.isascii() and port.isdigit() else -1
    return address_key(text)


def _is_port(text: str) -> bool:
    port = text[1:]
    return text[0] == ":" and port.isascii() and port.isdigit()


class AddressSet:
    """CIDR networks, matched as integer ranges; ``unix`` among them holds Unix-socket peers."""

    __slots__ = ("_ranges", "_verdicts", "empty", "unix")

    def __init__(self, networks: Iterable[str]) -> None:
        ranges: list[tuple[int, int]] = []
        unix = False
        for text in networks:
            if text == "unix":
                unix = True
                continue
            network = ipaddress.ip_network(text, strict=False)
            first = int(network.network_address)
            last = int(network.broadcast_address)
            if network.version == 4:
                ranges.append((first, last))
                continue
            if first >= _MAPPED_FIRST and last <= _MAPPED_LAST:
                ranges.append((first & 0xFFFFFFFF, last & 0xFFFFFFFF))
                continue
            if first <= _MAPPED_FIRST and last >= _MAPPED_LAST:
                ranges.append((0, 0xFFFFFFFF))  # ::/0 covers IPv4 peers of a dual-stack socket
            ranges.append((first | _V6, last | _V6))
        self._ranges = tuple(ranges)
        self.unix = unix
        self.empty = not ranges and not unix
        self._verdicts: dict[bytes, bool] = {}

    def holds_key(self, key: int) -> bool:
        """Whether the address ``key`` (from :func:`address_key`) is in one of the networks."""
        if key < 0:
            return False
        return any(first <= key <= last for first, last in self._ranges)

    def holds(self, address: bytes) -> bool:
        """Whether ``address`` (a peer's, as bytes; ``b"unix"`` for a Unix socket's) is held."""
        if address == b"unix":
            return self.unix
        verdict = self._verdicts.get(address)
        if verdict is None:
            verdict = self.holds_key(address_key(address.decode("latin-1")))
            if len(self._verdicts) >= _VERDICTS_SIZE:
                self._verdicts.clear()
            self._verdicts[address] = verdict
        return verdict


_TRUSTED: dict[tuple[str, ...], AddressSet] = {}


def trusted_proxies(networks: tuple[str, ...]) -> AddressSet | None:
    """The set of ``[server] trusted_proxies`` (normalised CIDRs); None if there are none.

    Made once per distinct setting and kept, so a request or a connection only looks it up.
    """
    if not networks:
        return None
    found = _TRUSTED.get(networks)
    if found is None:
        if len(_TRUSTED) >= 16:
            _TRUSTED.clear()  # settings that came and went over many reloads
        found = _TRUSTED[networks] = AddressSet(networks)
    return found


def real_client(peer: bytes, forwarded_for: bytes, trusted: AddressSet) -> bytes:
    """The client a trusted proxy (``peer``) forwards for: nginx's ``real_ip_recursive on``.

    ``forwarded_for`` is the request's X-Forwarded-For, every field of it
    joined by commas. It is walked from the right: an address in ``trusted``
    is one more proxy, and the first one that is not is the client. An
    element that is not an address stops the walk: the client is then the
    last address read, or the peer. If every element is trusted, the leftmost
    is the client. The address is returned in its canonical text.
    """
    client = peer
    for element in reversed(forwarded_for.split(b",")):
        element = element.strip(b" \t")
        if not element:
            continue  # an empty list element (RFC 9110 section 5.6.1)
        key = forwarded_key(element)
        if key < 0:
            break
        client = key_text(key)
        if not trusted.holds_key(key):
            break
    return client
