"""The master's tick: proxy-wide limits split by demand, node health judged once.

Every ``TICK`` seconds the master sends each worker its shares of every
proxy-wide limit (the modules' limits, and the connection cap,
``server.max_connections``) and the node weight factors of the health book,
and gets back the demand the worker saw since the last tick (see
pitcher_rpc.degrade.shares) and its requests' outcomes per node. The
outcomes of all workers are added up and judged in one book, so an ejection
holds for the whole proxy. A worker that does not answer within the tick
drops out of the split until it does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ..degrade.book import HealthBook
from ..degrade.scale import ScaleRunner
from ..degrade.shares import ShareBook
from .control import ControlError

log = logging.getLogger("pitcher.master")

TICK = 0.1
# The connection cap's key in the share book: no module's name is empty.
_CONNECTIONS = "\0connections"


class _Link(Protocol):
    async def command(self, op: str, **arguments: Any) -> dict[str, Any]: ...


class Coordination:
    def __init__(self, links: Callable[[], Sequence[tuple[int, _Link | None]]]) -> None:
        self._links = links
        self._book = ShareBook()
        self.health = HealthBook()
        self.scaler = ScaleRunner()
        self.verdicts: dict[str, dict[str, float]] = {}
        self._hurry = asyncio.Event()
        self.shares: dict[int, dict[str, dict[str, float]]] = {}
        # Each worker's share of the connection cap.
        self.connection_shares: dict[int, float] = {}
        self.ticks = 0

    def hurry(self) -> None:
        """Tick now: a worker saw a node fail several requests in a row."""
        self._hurry.set()

    async def run(self) -> None:
        while True:
            hurried = False
            # asyncio.timeout, not wait_for: no task is made per tick.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK):
                    await self._hurry.wait()
                hurried = True
            self._hurry.clear()
            # A hurried tick judges at once; a second one delivers the verdict
            # (each tick carries the verdicts of the one before).
            for _ in range(2 if hurried else 1):
                try:
                    await self.tick()
                except Exception:  # never let one bad tick stop the loop
                    log.exception("coordination tick failed")

    async def tick(self) -> None:
        links = [(index, link) for index, link in self._links() if link is not None]
        if len(links) == 1:
            answers = [await self._ask(*links[0])]  # no task for the one worker
        else:
            answers = await asyncio.gather(*(self._ask(index, link) for index, link in links))
        reports: dict[int, dict[str, tuple[float, float]]] = {}
        outcomes: dict[str, list[int]] = {}
        for (index, _), answer in zip(links, answers, strict=True):
            if answer is None:
                continue
            for uri, (successes, failures, trailing) in (answer.get("outcomes") or {}).items():
                merged = outcomes.setdefault(uri, [0, 0, 0])
                merged[0] += successes
                merged[1] += failures
                # Failures in a row: the longest run any worker ends its batch with
                # (all of them if no worker saw a success).
                merged[2] = max(merged[2], trailing)
            flat: dict[str, tuple[float, float]] = {}
            for module, demand in (answer.get("demand") or {}).items():
                for key, (wanted, capacity) in demand.items():
                    flat[f"{module}\0{key}"] = (float(wanted), float(capacity))
            connections = answer.get("connections")
            if connections:
                flat[_CONNECTIONS] = (float(connections[0]), float(connections[1]))
            reports[index] = flat
        shares: dict[int, dict[str, dict[str, float]]] = {}
        connection_shares: dict[int, float] = {}
        for index, flat_shares in self._book.update(reports).items():
            nested: dict[str, dict[str, float]] = {}
            for flat_key, share in flat_shares.items():
                if flat_key == _CONNECTIONS:
                    connection_shares[index] = share
                    continue
                module, _, key = flat_key.partition("\0")
                nested.setdefault(module, {})[key] = share
            shares[index] = nested
        self.shares = shares
        self.connection_shares = connection_shares
        for merged in outcomes.values():
            if merged[0] == 0:
                merged[2] = merged[1]
        now = time.monotonic()
        self.verdicts = self.health.tick(outcomes, now)
        for request in self.health.scale_outs(now):
            self.scaler.start(request)
        self.ticks += 1

    async def _ask(self, index: int, link: _Link) -> dict[str, Any] | None:
        arguments: dict[str, Any] = {"shares": self.shares.get(index, {}), "health": self.verdicts}
        connections = self.connection_shares.get(index)
        if connections is not None:
            arguments["connections"] = connections
        with contextlib.suppress(ControlError, TimeoutError, ConnectionError):
            async with asyncio.timeout(TICK * 5):
                return await link.command("tick", **arguments)
        return None
