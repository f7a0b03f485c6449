"""The master's tick: proxy-wide limits split between workers by demand.

Every ``TICK`` seconds the master sends each worker its shares of every
proxy-wide limit and gets back the demand the worker saw since the last tick
(see pitcher_rpc.degrade.shares). A worker that does not answer within the
tick drops out of the split until it does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ..degrade.shares import ShareBook
from .control import ControlError

log = logging.getLogger("pitcher.master")

TICK = 0.1


class _Link(Protocol):
    async def command(self, op: str, **arguments: Any) -> dict[str, Any]: ...


class Coordination:
    def __init__(self, links: Callable[[], Sequence[tuple[int, _Link | None]]]) -> None:
        self._links = links
        self._book = ShareBook()
        self.shares: dict[int, dict[str, dict[str, float]]] = {}
        self.ticks = 0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            try:
                await self.tick()
            except Exception:  # never let one bad tick stop the loop
                log.exception("coordination tick failed")

    async def tick(self) -> None:
        links = [(index, link) for index, link in self._links() if link is not None]
        answers = await asyncio.gather(*(self._ask(index, link) for index, link in links))
        reports: dict[int, dict[str, float]] = {}
        for (index, _), answer in zip(links, answers, strict=True):
            if answer is None:
                continue
            flat: dict[str, float] = {}
            for module, demand in (answer.get("demand") or {}).items():
                for key, value in demand.items():
                    flat[f"{module}\0{key}"] = float(value)
            reports[index] = flat
        shares: dict[int, dict[str, dict[str, float]]] = {}
        for index, flat_shares in self._book.update(reports).items():
            nested: dict[str, dict[str, float]] = {}
            for flat_key, share in flat_shares.items():
                module, _, key = flat_key.partition("\0")
                nested.setdefault(module, {})[key] = share
            shares[index] = nested
        self.shares = shares
        self.ticks += 1

    async def _ask(self, index: int, link: _Link) -> dict[str, Any] | None:
        with contextlib.suppress(ControlError, TimeoutError, ConnectionError):
            return await asyncio.wait_for(
                link.command("tick", shares=self.shares.get(index, {})), TICK * 5
            )
        return None
