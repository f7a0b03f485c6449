"""The HTTP/1.1 frontend: connections, pipelining, timeouts, and the proxy's lifetime.

:class:`HttpConnection` is thin glue between a socket and the sans-IO
parser: it queues complete requests, answers them strictly in order (HTTP/1.1
pipelining), and closes where RFC 9112 says to. Timeouts are enforced by one
periodic sweep over all connections instead of a timer per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
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
from .module_host import ModuleHost
from .snapshot import Snapshot
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
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def address(self) -> str:
        """Where the proxy listens, with the real port when 0 was asked for."""
        assert self._server is not None
        name = self._server.sockets[0].getsockname()
        if isinstance(name, str):
            return f"unix://{name}"
        host, port = name[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def start(self, sock: socket.socket | None = None) -> None:
        config = self.snapshot.config.server
        if sock is not None:
            self._server = await self.loop.create_server(
                lambda: HttpConnection(self), sock=sock, backlog=config.backlog
            )
        else:
            listen = config.listen_address
            if listen.is_unix:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(listen.path)
                self._server = await self.loop.create_unix_server(
                    lambda: HttpConnection(self), listen.path, backlog=config.backlog
                )
            else:
                self._server = await self.loop.create_server(
                    lambda: HttpConnection(self),
                    listen.host,
                    listen.port,
                    backlog=config.backlog,
                    reuse_address=True,
                )
        self._schedule_sweep()
        self._schedule_overload_check()
        if self.health is not None:
            self._health_timer = self.loop.call_later(HEALTH_TICK, self._health_tick)

    def reload(self, config: Config) -> Snapshot:
        """Swap in a new snapshot; requests already running keep theirs."""
        self.shedder.configure(config.overload)
        if self.health is not None:
            self.health.configure(config, time.monotonic())
        chains = self.modules.chains_for(config, self.snapshot.config.routes)
        snapshot = Snapshot(config, self.upstreams, self.snapshot.generation + 1, chains)
        self.snapshot = snapshot
        self.upstreams.retain_only(snapshot.node_uris())
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
        in_flight = sum(1 for connection in self.connections if connection.current is not None)
        step = shedder.sample(now, self.lag, in_flight, chains.sheddable())
        if step is None:
            return
        lag_ms = step.lag * 1000
        if shedder.config.mode == "detect":
            log.warning(
                "overload (detect mode): would %s module %s (event-loop lag %.0f ms, %d in flight)",
                step.action,
                step.module,
                lag_ms,
                step.in_flight,
            )
            return
        chains.set_shed(shedder.shed)
        if step.action == "shed":
            log.warning(
                "overload: event-loop lag %.0f ms, %d in flight: module %s switched off",
                lag_ms,
                step.in_flight,
                step.module,
            )
        else:
            log.warning(
                "load is normal again (lag %.0f ms, %d in flight): module %s back on",
                lag_ms,
                step.in_flight,
                step.module,
            )

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
        interval = min(1.0, max(0.05, min(snapshot.header_timeout, snapshot.keepalive_timeout) / 4))
        self._sweeper = self.loop.call_later(interval, self._sweep)

    def _sweep(self) -> None:
        now = self.loop.time()
        snapshot = self.snapshot
        for connection in list(self.connections):
            connection.sweep(now, snapshot)
        self._schedule_sweep()

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, finish in-flight requests (at most ``grace``), close everything."""
        self.draining = True
        if self._server is not None:
            self._server.close()
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
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
