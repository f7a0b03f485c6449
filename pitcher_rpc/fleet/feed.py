"""The discovery sources of one proxy, and the task that hands their node sets on.

The master (or the single process of a proxy without workers) owns one
:class:`NodeFeed`. Its ``publish`` coroutine is awaited after every change,
bursts of changes coalesced into one call; it reads :meth:`NodeFeed.found`
and lays the nodes over the file (pitcher_rpc.config.overlay).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..config.model import Config, NodeConfig

if TYPE_CHECKING:
    from .discovery import Discovery

log = logging.getLogger("pitcher.discovery")


class NodeFeed:
    def __init__(self, publish: Callable[[], Awaitable[None]]) -> None:
        self._publish = publish
        self.discovery: Discovery | None = None
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def configure(self, config: Config) -> None:
        """Start or stop sources as ``config`` names them (at start, at each reload)."""
        # Loaded only by a proxy whose file names a discovery source.
        from .discovery import Discovery

        if self.discovery is None:
            if not Discovery.wanted(config):
                return
            self.discovery = Discovery(self._changed.set)
            self._task = asyncio.get_running_loop().create_task(
                self._follow(), name="pitcher-discovery"
            )
        closed = self.discovery.configure(config)
        if closed:
            await Discovery.close_sources(closed)

    async def settle(self, timeout: float) -> None:
        """At start-up: wait for every source's first answer (or failure), at most ``timeout``.

        What they found is then the caller's to take with found(): no publish follows.
        """
        if self.discovery is not None:
            await self.discovery.settle(timeout)
            self._changed.clear()

    def found(self, config: Config) -> dict[str, tuple[NodeConfig, ...]]:
        """The discovered nodes of each cluster of ``config`` that has sources."""
        if self.discovery is None:
            return {}
        return {k: v for k, v in self.discovery.all_nodes().items() if k in config.clusters}

    def describe(self) -> dict[str, list[dict[str, Any]]]:
        return self.discovery.describe() if self.discovery is not None else {}

    async def _follow(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            try:
                await self._publish()
            except Exception:  # a bug must not stop every later change
                log.exception("could not hand discovered nodes on")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.discovery is not None:
            await self.discovery.close()
