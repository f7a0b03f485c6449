"""The control plane between the master and its workers.

One Unix stream socket, owned by the master; each worker connects once at
start-up and says who it is. Messages are JSON objects, each preceded by its
length as a 4-byte big-endian integer. The master sends commands
``{"id": N, "op": "..."}``; a worker answers ``{"id": N, "ok": true,
"result": {...}}`` or ``{"id": N, "ok": false, "error": "..."}``.

Commands: ``status`` (generation, config checksum, counters), ``reload``
(``path`` and the ``checksum`` the master validated: the worker builds the
same snapshot and swaps it), ``drain`` (stop accepting, finish, exit).
A worker whose control connection closes drains and exits: a worker never
outlives its master.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Callable
from typing import Any

_LENGTH = struct.Struct(">I")
# Commands and answers are small; a bigger one is a bug or an attack.
MAX_MESSAGE = 1 << 20


class ControlError(Exception):
    """A control message that could not be read or was refused."""


async def read_message(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, or None at end of stream."""
    try:
        header = await reader.readexactly(_LENGTH.size)
    except asyncio.IncompleteReadError:
        return None
    (size,) = _LENGTH.unpack(header)
    if size > MAX_MESSAGE:
        raise ControlError(f"control message of {size} bytes")
    try:
        message = json.loads(await reader.readexactly(size))
    except (asyncio.IncompleteReadError, ValueError) as exc:
        raise ControlError(f"unreadable control message: {exc}") from None
    if not isinstance(message, dict):
        raise ControlError("a control message must be a JSON object")
    return message


def encode_message(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return _LENGTH.pack(len(body)) + body


class WorkerLink:
    """The master's side of one worker's control connection."""

    def __init__(
        self, index: int, pid: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.index = index
        self.pid = pid
        self._reader = reader
        self._writer = writer
        self._next_id = 1
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        # Called with a message the worker sends on its own (one with "event").
        self.on_event: Callable[[dict[str, Any]], None] | None = None
        self._reading = asyncio.get_running_loop().create_task(
            self._read_answers(), name=f"pitcher-control-{index}"
        )

    async def _read_answers(self) -> None:
        try:
            while (message := await read_message(self._reader)) is not None:
                if "event" in message:
                    if self.on_event is not None:
                        self.on_event(message)
                    continue
                waiter = self._waiting.pop(int(message.get("id", 0)), None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(message)
        except (ControlError, ConnectionError):
            pass
        finally:
            for waiter in self._waiting.values():
                if not waiter.done():
                    waiter.set_exception(ControlError(f"worker {self.index} went away"))
            self._waiting.clear()

    async def command(self, op: str, timeout: float = 10.0, **arguments: Any) -> dict[str, Any]:
        """Send one command and wait for its answer's result; ControlError if it failed."""
        request_id = self._next_id
        self._next_id += 1
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = waiter
        try:
            if not self.alive or self._writer.is_closing():
                raise ConnectionError("its control connection is closed")
            self._writer.write(encode_message({"id": request_id, "op": op, **arguments}))
            await self._writer.drain()
            async with asyncio.timeout(timeout):
                answer = await waiter
        except (OSError, RuntimeError, TimeoutError) as exc:
            # OSError covers ConnectionError; uvloop raises RuntimeError when
            # writing to a transport whose worker has just died.
            raise ControlError(f"worker {self.index}: {op} failed: {exc or 'timeout'}") from None
        finally:
            self._waiting.pop(request_id, None)
        if not answer.get("ok"):
            raise ControlError(f"worker {self.index}: {answer.get('error', 'refused')}")
        result = answer.get("result", {})
        return result if isinstance(result, dict) else {}

    @property
    def alive(self) -> bool:
        return not self._reading.done()

    async def close(self) -> None:
        self._reading.cancel()
        self._writer.close()
