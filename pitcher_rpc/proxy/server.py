"""The HTTP/1.1 frontend: connections, pipelining, timeouts, and the proxy's lifetime.

:class:`HttpConnection` is thin glue between a socket and the sans-IO
parser: it queues complete requests, answers them strictly in order (HTTP/1.1
pipelining), and closes where RFC 9112 says to. Timeouts are enforced by one
periodic sweep over all connections instead of a timer per request.

The connection cap (``server.max_connections``, for the whole proxy; this
process holds its share of it, at least 1): when a new connection takes the
last place, the proxy stops accepting and the kernel's backlog holds the
clients that come next; accepting resumes as soon as a connection closes.
While it is paused and a client waits, the connections idle longest
between two requests are closed to make room (nginx's reusable
connections). docs/degradation.md says why it pauses rather than answering
503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import select
import socket
import time
from collections import deque
from typing import Any

from ..config import Config
from ..degrade.book import HealthBook
from ..degrade.overload import Shedder
from ..degrade.scale import ScaleRunner
from ..modules.chain import HookChains
from .frontend import HttpConnection
from .glue import Refusal
from .module_host import ModuleHost
from .snapshot import Snapshot
from .tls import TlsAccept, log_handshake_failure
from .upstream import Upstreams

log = logging.getLogger("pitcher.proxy")

# While draining, an idle keep-alive connection is closed once it has been
# quiet this long.
_DRAIN_QUIET = 0.5
# How often outcomes are judged and weights moved (single-process proxy).
HEALTH_TICK = 0.1
# Event-loop lag is sampled this often and averaged over this many samples.
_LAG_INTERVAL = 0.05
_LAG_SAMPLES = 4
# At the cap, a waiting client is looked at again after this long before idle
# connections are closed for it: another worker with room may take it first.
_ROOM_CHECK_DELAY = 0.02
# At most this many idle connections are closed at once to make room, and at
# least one, an eighth of those idle in between (nginx's drain of reusable ones).
_EVICT_MOST = 32
# The least time between two warnings that the cap is reached.
_CAP_WARN_EVERY = 60.0


def local_cap(max_connections: int, share: float) -> int:
    """This process's part of the proxy-wide connection cap: never below 1."""
    return max(1, math.floor(max_connections * share + 1e-9))


class _Parked(asyncio.Protocol):
    """A connection accepted beyond the cap, held as if still in the backlog.

    The event loop accepts every connection waiting when the listening
    socket turns readable, before the proxy can stop it: those beyond the cap
    are parked here, unread (what arrives before reading stops is kept), and
    handed back to their :class:`HttpConnection` when a place frees.
    """

    __slots__ = ("buffered", "connection", "eof", "waiting")

    def __init__(self, connection: HttpConnection, waiting: deque[_Parked]) -> None:
        self.connection = connection
        self.buffered = bytearray()
        self.eof = False
        # The server's queue of parked connections, which this one leaves if it closes.
        self.waiting = waiting

    def data_received(self, data: bytes) -> None:
        self.buffered += data
        transport = self.connection.transport
        if transport is not None:
            transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        return True  # answered when its turn comes, as RFC 9112 §9.6 allows

    def connection_lost(self, exc: Exception | None) -> None:
        with contextlib.suppress(ValueError):
            self.waiting.remove(self)  # the client gave up waiting
        self.connection.connection_lost(exc)


class ProxyServer:
    """One proxy: a listening socket, its connections, the current snapshot."""

    def __init__(
        self,
        config: Config,
        loop: asyncio.AbstractEventLoop | None = None,
        modules: HookChains | None = None,
        default_share: float = 1.0,
        local_health: bool = True,
    ) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.upstreams = Upstreams(config.upstream)
        # This process's part of the proxy (1/N with N workers): of each
        # proxy-wide limit until the master says more, and of a ramping
        # node's in-flight cap.
        self.upstreams.share = default_share
        # Overload shedding of non-essential modules (pitcher_rpc.degrade.overload).
        self.shedder = Shedder(config.overload)
        self.lag = 0.0
        self._lags: deque[float] = deque(maxlen=_LAG_SAMPLES)
        self._overload_timer: asyncio.TimerHandle | None = None
        self._overload_due = 0.0
        # Module instances across snapshots.
        self.modules = ModuleHost(self.loop, self.shedder, default_share, fixed=modules)
        self.snapshot = Snapshot(
            config, self.upstreams, generation=1, modules=self.modules.chains_for(config)
        )
        # Node health: judged here when this process is the whole proxy; with
        # workers the master keeps the book and sends its verdicts.
        self.health: HealthBook | None = None
        if local_health:
            self.health = HealthBook()
            self.health.configure(config, time.monotonic())
            self.upstreams.alarm = self._health_alarm
        self._health_timer: asyncio.Handle | None = None
        self.scaler = ScaleRunner()
        self._health_hurried = False
        self.connections: set[HttpConnection] = set()
        self.requests_served = 0
        self.draining = False
        # The connection cap: this process's share of max_connections.
        self.connection_share = default_share
        self.connection_limit = local_cap(config.server.max_connections, default_share)
        self.accept_paused = False
        self.accept_pauses = 0  # times the cap stopped accepting
        self.idle_evicted = 0  # idle connections closed to make room
        self.paused_seconds = 0.0  # time spent not accepting, before the current pause
        self.peak_connections = 0  # since the last demand report
        self._paused_at = 0.0
        self._pauses_reported = 0
        self._cap_warned_at = -_CAP_WARN_EVERY
        # The listening sockets, kept open (dups) so that accepting can stop
        # and start again: closing an asyncio server closes its socket.
        self._listeners: list[socket.socket] = []
        self._listen_address = ""
        self._servers: list[asyncio.Server] = []
        self._resuming: asyncio.Task[None] | None = None
        self._parked: deque[_Parked] = deque()
        self._watching = False
        self._room_check: asyncio.TimerHandle | None = None
        # Modules told of refusals, and the default chains they were found in.
        self._refusal_handlers: tuple[tuple[Any, Any], ...] = ()
        self._refusal_source: object = None
        self._sweeper: asyncio.TimerHandle | None = None
        # TLS: handshakes under way (cancelled by stop) and failed ones by reason.
        self.handshakes: set[asyncio.Task[None]] = set()
        self.handshake_failures: dict[str, int] = {}
        # What X-Forwarded-Proto says for this listener's requests (bytes, for the hot path).
        self.forwarded_proto = config.server.scheme.encode()

    @property
    def address(self) -> str:
        """Where the proxy listens, with the real port when 0 was asked for."""
        assert self._listen_address, "not started"
        return self._listen_address

    async def start(self, sock: socket.socket | None = None) -> None:
        config = self.snapshot.config.server
        if sock is not None:
            server = await self.loop.create_server(
                self._new_connection, sock=sock, backlog=config.backlog
            )
        else:
            listen = config.listen_address
            if listen.is_unix:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(listen.path)
                server = await self.loop.create_unix_server(
                    self._new_connection, listen.path, backlog=config.backlog
                )
            else:
                server = await self.loop.create_server(
                    self._new_connection,
                    listen.host,
                    listen.port,
                    backlog=config.backlog,
                    reuse_address=True,
                )
        self._servers = [server]
        self._listeners = [socket.socket(fileno=os.dup(s.fileno())) for s in server.sockets]
        name = self._listeners[0].getsockname()
        if isinstance(name, str):
            self._listen_address = f"unix://{name}"
        else:
            host, port = name[:2]
            self._listen_address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._schedule_sweep()
        self._schedule_overload_check()
        if self.health is not None:
            self._health_timer = self.loop.call_later(HEALTH_TICK, self._health_tick)

    def _new_connection(self) -> asyncio.Protocol:
        """What serves a connection just accepted: HTTP at once, or a TLS handshake first.

        Decided per connection by the configuration current now, so a reload
        that changes the certificates serves the next handshake with the new
        ones (each snapshot has its own SSLContext), and the connections open
        keep the session they have.
        """
        tls = self.snapshot.config.server.tls
        if tls is None or tls.context is None:
            return HttpConnection(self)
        return TlsAccept(self, tls.context)

    @property
    def scheme(self) -> str:
        """ "https" when the listener speaks TLS now, else "http"."""
        return self.snapshot.config.server.scheme

    def handshake_started(self, task: asyncio.Task[None]) -> None:
        """A TLS handshake began: it holds a place under the connection cap until it ends."""
        self.handshakes.add(task)
        task.add_done_callback(self._handshake_ended)
        if len(self.connections) + len(self.handshakes) >= self.connection_limit:
            self._pause_accepting()

    def _handshake_ended(self, task: asyncio.Task[None]) -> None:
        self.handshakes.discard(task)
        if self.accept_paused:
            self.connection_gone()

    def handshake_failed(self, peer: str, reason: str, logged: bool = True) -> None:
        """A TLS handshake failed: counted by reason, and logged (a line a second per reason)."""
        failures = self.handshake_failures
        failures[reason] = failures.get(reason, 0) + 1
        if logged:
            log_handshake_failure(peer, reason)

    def tls_status(self) -> dict[str, Any]:
        """For the worker's status: whether TLS is on, handshakes under way, failures by reason."""
        tls = self.snapshot.config.server.tls
        return {
            "enabled": tls is not None,
            "handshaking": len(self.handshakes),
            "handshake_failures": dict(self.handshake_failures),
        }

    def reload(self, config: Config) -> Snapshot:
        """Swap in a new snapshot; requests already running keep theirs."""
        self.shedder.configure(config.overload)
        if self.health is not None:
            self.health.configure(config, time.monotonic())
        chains = self.modules.chains_for(config, self.snapshot.config.routes)
        snapshot = Snapshot(config, self.upstreams, self.snapshot.generation + 1, chains)
        self.snapshot = snapshot
        self.forwarded_proto = config.server.scheme.encode()
        clusters = snapshot.clusters.values()
        self.upstreams.retain_only(
            snapshot.node_uris(),
            in_use=[node.client for cluster in clusters for node in cluster.nodes],
        )
        self._apply_connection_limit()
        return snapshot

    def reopen_modules(self) -> None:
        """SIGUSR1: every loaded module reopens its files (after a log rotation)."""
        self.modules.reopen(self.snapshot.modules)

    def module_stats(self) -> dict[str, dict[str, Any]]:
        """The numbers each loaded module reports, by module name."""
        return self.modules.stats(self.snapshot.modules)

    def module_demand(self) -> dict[str, dict[str, tuple[float, float]]]:
        """Each module's demand on its proxy-wide limits since the last call."""
        return self.modules.demand(self.snapshot.modules)

    def apply_shares(self, shares: dict[str, dict[str, float]]) -> None:
        """Take this process's shares of the proxy-wide limits, by module and limit."""
        self.modules.apply_shares(shares, self.snapshot.modules)

    def set_module(self, name: str, enabled: bool) -> None:
        """Switch a module on or off now and for every later snapshot; KeyError if unknown."""
        self.modules.switch(self.snapshot.modules, name, enabled)

    # refusals ---------------------------------------------------------------------------

    def report_refusal(self, refusal: Refusal) -> None:
        """Tell the modules on now that define ``request_refused(refusal)`` (metrics, access_log).

        A refusal has no exchange and no route: the default chains' modules
        are told, highest priority first, isolated as any handler is.
        """
        modules = self.snapshot.modules
        if modules.default is not self._refusal_source:
            # Found again whenever the chains are rebuilt (a module switched,
            # shed, or a reload): a refusal does not pay for the search.
            self._refusal_source = modules.default
            self._refusal_handlers = tuple(
                (module, module.request_refused)  # type: ignore[attr-defined]
                for module in sorted(modules.modules.values(), key=lambda m: -m.priority)
                if module.name not in modules.disabled
                and module.name not in modules.shed
                and callable(getattr(module, "request_refused", None))
            )
        if self._refusal_handlers:
            modules.run(self._refusal_handlers, refusal)

    # the connection cap -----------------------------------------------------------------

    def set_connection_share(self, share: float) -> None:
        """This process's share (0-1] of the proxy-wide connection cap, from the master."""
        if share > 0 and share != self.connection_share:
            self.connection_share = share
            self._apply_connection_limit()

    def connection_demand(self) -> tuple[float, float]:
        """(peak open connections plus pauses since the last call, max_connections)."""
        pauses = self.accept_pauses - self._pauses_reported
        self._pauses_reported = self.accept_pauses
        demand = float(self.peak_connections + pauses)
        self.peak_connections = len(self.connections)
        return demand, float(self.snapshot.config.server.max_connections)

    def connection_status(self) -> dict[str, Any]:
        paused = self.paused_seconds
        if self.accept_paused:
            paused += self.loop.time() - self._paused_at
        return {
            "open": len(self.connections),
            "waiting": len(self._parked),
            "limit": self.connection_limit,
            "share": round(self.connection_share, 4),
            "paused": self.accept_paused,
            "pauses": self.accept_pauses,
            "paused_seconds": round(paused, 3),
            "idle_closed": self.idle_evicted,
        }

    def _apply_connection_limit(self) -> None:
        limit = local_cap(self.snapshot.config.server.max_connections, self.connection_share)
        self.connection_limit = limit
        if self.accept_paused:
            self.connection_gone()
        elif len(self.connections) >= limit and self._servers:
            self._pause_accepting()

    def at_connection_cap(self, connection: HttpConnection) -> None:
        """A new connection took the last place, or one beyond it came in the same accept.

        Accepting stops until a place frees; a connection beyond the cap is
        parked unread until then.
        """
        if len(self.connections) - len(self._parked) > self.connection_limit and (
            connection.transport is not None
        ):
            parked = _Parked(connection, self._parked)
            connection.transport.set_protocol(parked)
            self._parked.append(parked)
        self._pause_accepting()
        if self._parked:
            self._make_room()

    def _pause_accepting(self) -> None:
        if self.accept_paused or self.draining or not self._listeners:
            return
        self.accept_paused = True
        self.accept_pauses += 1
        self._paused_at = self.loop.time()
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        now = time.monotonic()
        if now - self._cap_warned_at >= _CAP_WARN_EVERY:
            self._cap_warned_at = now
            log.warning(
                "%d connections open, this process's cap (its share of max_connections %d):"
                " not accepting until one closes; waiting clients stay in the backlog",
                len(self.connections),
                self.snapshot.config.server.max_connections,
            )
        self._watch_listeners()

    def connection_gone(self) -> None:
        """A connection closed while accepting is paused: serve a parked one, or resume."""
        parked = self._parked
        limit = self.connection_limit
        while parked and len(self.connections) - len(parked) < limit:
            self._unpark(parked.popleft())
        # A TLS handshake under way holds its place too, as nginx counts it.
        if (
            self.accept_paused
            and not parked
            and len(self.connections) + len(self.handshakes) < limit
        ):
            self._resume_accepting()

    def _unpark(self, parked: _Parked) -> None:
        connection = parked.connection
        transport = connection.transport
        if connection.closed or transport is None or transport.is_closing():
            return
        transport.set_protocol(connection)
        # Its deadlines count from now, not from the accept.
        connection.http.last_activity = self.loop.time()
        if parked.buffered:
            connection.data_received(bytes(parked.buffered))
        if parked.eof and not connection.eof_received():
            connection.close()
            return
        if not connection.closed and not connection.read_paused:
            transport.resume_reading()

    def _resume_accepting(self) -> None:
        if not self.accept_paused or self.draining:
            return
        self.accept_paused = False
        self.paused_seconds += self.loop.time() - self._paused_at
        self._unwatch_listeners()
        if self._resuming is None:
            self._resuming = self.loop.create_task(self._listen_again(), name="pitcher-accept")

    async def _listen_again(self) -> None:
        backlog = self.snapshot.config.server.backlog
        failed = False
        try:
            for listener in self._listeners:
                if self.accept_paused or self.draining:
                    return
                server = await self.loop.create_server(
                    self._new_connection, sock=listener.dup(), backlog=backlog
                )
                if self.accept_paused or self.draining:
                    server.close()  # paused again (or stopping) meanwhile
                    return
                self._servers.append(server)
        except OSError:
            failed = True
            log.exception("cannot accept again on the listening socket")
        finally:
            self._resuming = None
            # Paused, then given room again while this ran: serve every listener.
            if not (failed or self.accept_paused or self.draining or self._servers):
                self._resuming = self.loop.create_task(self._listen_again(), name="pitcher-accept")

    def _watch_listeners(self) -> None:
        # While paused, a listener that turns readable means a client waits.
        if self._watching or not self.accept_paused:
            return
        self._watching = True
        for listener in self._listeners:
            self.loop.add_reader(listener.fileno(), self._client_waiting)

    def _unwatch_listeners(self) -> None:
        if self._room_check is not None:
            self._room_check.cancel()
            self._room_check = None
        if self._watching:
            self._watching = False
            for listener in self._listeners:
                self.loop.remove_reader(listener.fileno())

    def _client_waiting(self) -> None:
        self._unwatch_listeners()
        self._room_check = self.loop.call_later(_ROOM_CHECK_DELAY, self._make_room)

    def _make_room(self) -> None:
        """A client waits at the cap: close the longest-idle connections for it.

        Waiting means parked here, or still in the backlog a moment after the
        listening socket turned readable (so no other worker took it).
        """
        self._room_check = None
        if not self.accept_paused or self.draining:
            return
        if not self._parked:
            try:
                readable, _, _ = select.select(self._listeners, (), (), 0)
            except (OSError, ValueError):
                return
            if not readable:
                self._watch_listeners()  # taken by another worker: nobody waits here
                return
        idle = [connection for connection in self.connections if connection.idle_between_requests]
        if not idle:
            return  # every place is busy: the sweep looks again, or a close resumes
        idle.sort(key=lambda connection: connection.http.last_activity)
        count = max(1, min(_EVICT_MOST, len(idle) // 8))
        for connection in idle[:count]:
            connection.close()
        self.idle_evicted += count

    # node health --------------------------------------------------------------------------

    def _health_alarm(self, uri: str) -> None:
        # A node failed several requests in a row: judge now, not at the tick.
        if self._health_timer is not None and not self._health_hurried:
            self._health_hurried = True
            self._health_timer.cancel()
            self._health_timer = self.loop.call_soon(self._health_tick)

    def _health_tick(self) -> None:
        assert self.health is not None
        self._health_hurried = False
        self._health_timer = self.loop.call_later(HEALTH_TICK, self._health_tick)
        now = time.monotonic()
        try:
            verdicts = self.health.tick(self.upstreams.take_outcomes(), now)
            scale_outs = self.health.scale_outs(now)
        except Exception:
            log.exception("node health tick failed")
            return
        self.apply_health(verdicts)
        for request in scale_outs:
            self.scaler.start(request)

    def apply_health(self, verdicts: dict[str, dict[str, float]]) -> None:
        """Weight factors per cluster and node URI, from the health book."""
        self.upstreams.verdicts = verdicts
        for name, cluster in self.snapshot.clusters.items():
            factors = verdicts.get(name)
            if factors is not None:
                cluster.apply(factors, self.upstreams.share)

    # overload ---------------------------------------------------------------------------

    def _schedule_overload_check(self) -> None:
        self._overload_due = time.monotonic() + _LAG_INTERVAL
        self._overload_timer = self.loop.call_later(_LAG_INTERVAL, self._check_overload)

    def _check_overload(self) -> None:
        now = time.monotonic()
        # How late this timer fired: the time a ready callback waits for the loop.
        self._lags.append(max(0.0, now - self._overload_due))
        self.lag = sum(self._lags) / len(self._lags)
        self._schedule_overload_check()
        shedder = self.shedder
        if shedder.config.mode == "off":
            return
        chains = self.snapshot.modules
        # Counting walks every connection: only when a limit on it is set
        # (10,000 idle keep-alive connections cost that walk 20 times a second).
        counted = shedder.config.in_flight_high > 0
        in_flight = self._in_flight() if counted else 0
        step = shedder.sample(now, self.lag, in_flight, chains.sheddable())
        if step is None:
            return
        if not counted:
            in_flight = self._in_flight()  # for the log line
        lag_ms = step.lag * 1000
        if shedder.config.mode == "detect":
            log.warning(
                "overload (detect mode): would %s module %s (event-loop lag %.0f ms, %d in flight)",
                step.action,
                step.module,
                lag_ms,
                in_flight,
            )
            return
        chains.set_shed(shedder.shed)
        if step.action == "shed":
            log.warning(
                "overload: event-loop lag %.0f ms, %d in flight: module %s switched off",
                lag_ms,
                in_flight,
                step.module,
            )
        else:
            log.warning(
                "load is normal again (lag %.0f ms, %d in flight): module %s back on",
                lag_ms,
                in_flight,
                step.module,
            )

    def _in_flight(self) -> int:
        return sum(1 for connection in self.connections if connection.current is not None)

    def overload_status(self) -> dict[str, Any]:
        shedder = self.shedder
        enforced = shedder.config.mode == "enforce"
        return {
            "mode": shedder.config.mode,
            "overloaded": shedder.overloaded,
            "lag": round(self.lag, 4),
            "shed": list(shedder.shed) if enforced else [],
            "would_shed": [] if enforced else list(shedder.shed),
        }

    def _schedule_sweep(self) -> None:
        snapshot = self.snapshot
        shortest = min(
            snapshot.header_timeout, snapshot.keepalive_timeout, snapshot.limits.body_timeout
        )
        interval = min(1.0, max(0.05, shortest / 4))
        self._sweeper = self.loop.call_later(interval, self._sweep)

    def _sweep(self) -> None:
        now = self.loop.time()
        snapshot = self.snapshot
        # Parked connections wait as if in the backlog: no deadline runs for them.
        parked = {waiting.connection for waiting in self._parked} if self._parked else ()
        for connection in list(self.connections):
            if connection not in parked:
                connection.sweep(now, snapshot)
        if self.accept_paused and self._room_check is None:
            # Clients that waited when no connection was idle: look again.
            if self._parked:
                self._make_room()
            else:
                self._watch_listeners()
        self._schedule_sweep()

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, finish in-flight requests (at most ``grace``), close everything."""
        self.draining = True
        self._unwatch_listeners()
        if self._resuming is not None:
            self._resuming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._resuming
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        for handshake in list(self.handshakes):
            handshake.cancel()
        for connection in self.connections:
            connection.drain()
        # A busy keep-alive client gets its next answer with "connection: close"
        # and goes elsewhere; only a connection that has been quiet for a moment
        # is closed under it, since a request may be on its way on one that just
        # answered (closing then would reset it).
        deadline = self.loop.time() + grace
        while self.connections and self.loop.time() < deadline:
            now = self.loop.time()
            for connection in list(self.connections):
                connection.close_if_idle(now, _DRAIN_QUIET)
            await asyncio.sleep(0.01)
        for connection in list(self.connections):
            connection.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._overload_timer is not None:
            self._overload_timer.cancel()
        if self._health_timer is not None:
            self._health_timer.cancel()
        await self.scaler.close()
        await self.upstreams.close(timeout=1.0)
        await self.modules.close(self.snapshot.modules)
        for server in servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        for listener in self._listeners:
            listener.close()
