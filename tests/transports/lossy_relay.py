"""A loopback UDP relay that misbehaves on purpose, for testing datagram carriers.

Placed between a client and a server, it forwards datagrams both ways and, at
configurable rates, drops, duplicates, reorders (holds back for a short random
delay) and corrupts (flips one byte of) them. Every decision comes from one
seeded ``random.Random``, so a run can be repeated, and every action is
counted so a test can check that the trouble really happened.

It is bounded: at most ``max_held`` datagrams are held back at once (beyond
that, a datagram chosen for reordering is forwarded at once) and at most
``max_clients`` client addresses get their own upstream socket.

    relay = LossyRelay(server_host, server_port, drop=0.1, seed=7)
    address = await relay.start()      # "udp://127.0.0.1:PORT": point the client here
    ...
    relay.close()
    relay.counts["dropped"], relay.counts["corrupted"], ...
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

# What the relay counts, per action. "forwarded" counts every datagram sent
# on, copies included.
ACTIONS = ("received", "forwarded", "dropped", "duplicated", "reordered", "corrupted")


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Any) -> None:
        self.on_datagram = on_datagram
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        # The far side is not listening (yet): a relay just loses the datagram.
        pass


class LossyRelay:
    def __init__(
        self,
        server_host: str,
        server_port: int,
        *,
        drop: float = 0.0,
        duplicate: float = 0.0,
        reorder: float = 0.0,
        corrupt: float = 0.0,
        max_delay: float = 0.02,
        seed: int = 0,
        max_held: int = 1000,
        max_clients: int = 16,
        listen_host: str = "127.0.0.1",
    ) -> None:
        self.server = (server_host, server_port)
        self.drop = drop
        self.duplicate = duplicate
        self.reorder = reorder
        self.corrupt = corrupt
        self.max_delay = max_delay
        self.random = random.Random(seed)
        self.max_held = max_held
        self.max_clients = max_clients
        self.listen_host = listen_host
        self.counts: Counter[str] = Counter()
        self._front: _Endpoint | None = None
        # client address -> the socket that speaks for it to the server
        self._upstreams: dict[Any, _Endpoint] = {}
        self._opening: dict[Any, asyncio.Task[None]] = {}
        self._held: set[asyncio.TimerHandle] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> str:
        """Listen; the address clients should use instead of the server's."""
        self._loop = asyncio.get_running_loop()
        front = self._front = _Endpoint(self._from_client)
        await self._loop.create_datagram_endpoint(lambda: front, local_addr=(self.listen_host, 0))
        assert front.transport is not None
        host, port = front.transport.get_extra_info("sockname")[:2]
        return f"udp://{f'[{host}]' if ':' in host else host}:{port}"

    def close(self) -> None:
        for handle in self._held:
            handle.cancel()
        self._held.clear()
        for task in self._opening.values():
            task.cancel()
        for endpoint in [self._front, *self._upstreams.values()]:
            if endpoint is not None and endpoint.transport is not None:
                endpoint.transport.abort()

    # forwarding ---------------------------------------------------------------------

    def _from_client(self, data: bytes, addr: Any) -> None:
        upstream = self._upstreams.get(addr)
        if upstream is None or upstream.transport is None:
            self._open_upstream(addr, data)
            return
        transport = upstream.transport
        self._relay(data, lambda out: transport.sendto(out))

    def _from_server(self, client: Any, data: bytes) -> None:
        front = self._front
        if front is None or front.transport is None:
            return
        transport = front.transport
        self._relay(data, lambda out: transport.sendto(out, client))

    def _open_upstream(self, client: Any, first: bytes) -> None:
        if client in self._opening or len(self._upstreams) >= self.max_clients:
            self.counts["received"] += 1
            self.counts["dropped"] += 1
            return
        assert self._loop is not None

        async def open_upstream() -> None:
            assert self._loop is not None
            endpoint = _Endpoint(lambda data, _addr: self._from_server(client, data))
            try:
                await self._loop.create_datagram_endpoint(lambda: endpoint, remote_addr=self.server)
            except OSError:
                self.counts["received"] += 1
                self.counts["dropped"] += 1
                return
            finally:
                del self._opening[client]
            self._upstreams[client] = endpoint
            self._from_client(first, client)

        self._opening[client] = self._loop.create_task(open_upstream(), name="relay upstream")

    def _relay(self, data: bytes, send: Any) -> None:
        counts = self.counts
        counts["received"] += 1
        chance = self.random.random
        if chance() < self.drop:
            counts["dropped"] += 1
            return
        if chance() < self.corrupt and data:
            position = self.random.randrange(len(data))
            flipped = bytearray(data)
            flipped[position] ^= self.random.randrange(1, 256)
            data = bytes(flipped)
            counts["corrupted"] += 1
        copies = 1
        if chance() < self.duplicate:
            copies = 2
            counts["duplicated"] += 1
        for _ in range(copies):
            if chance() < self.reorder and len(self._held) < self.max_held:
                counts["reordered"] += 1
                self._hold(data, send)
            else:
                counts["forwarded"] += 1
                send(data)

    def _hold(self, data: bytes, send: Any) -> None:
        assert self._loop is not None

        def release() -> None:
            self._held.discard(handle)
            self.counts["forwarded"] += 1
            send(data)

        handle = self._loop.call_later(self.random.uniform(0.001, self.max_delay), release)
        self._held.add(handle)
