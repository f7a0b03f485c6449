"""One contract, every carrier: the same cases over TCP, Unix sockets, UDP and ZeroMQ.

Everything a caller of a transport may rely on is here; what only one carrier
does (a preface, a CRC, a replay cache, socket options) is in its own test
file. Real sockets on loopback and in short /tmp paths; no mocks.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from transports.base import ClientOptions, ServerOptions, WithDeadline
from transports.errors import (
    CallError,
    DeadlineExceeded,
    RemoteError,
    RequestTooLarge,
    TransportError,
)
from transports.frame import PREFACE, FrameType, encode_frame
from transports.registry import parse_address, transport_for

CARRIERS = ["tcp", "unix", "udp", "zmq+tcp", "zmq+ipc"]
Handler = Callable[[bytes], Awaitable[bytes] | bytes]


@pytest.fixture(params=CARRIERS)
def carrier(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def directory() -> Iterator[str]:
    # Unix socket paths must stay short; pytest's tmp_path is too deep.
    path = tempfile.mkdtemp(prefix="pitcher-c-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def fresh_address(carrier: str, directory: str, name: str = "s") -> str:
    if carrier in ("unix", "zmq+ipc"):
        return f"{carrier}://{directory}/{name}.sock"
    return f"{carrier}://127.0.0.1:0"


async def echo(payload: bytes) -> bytes:
    return payload


def run(scenario: Callable[[], Awaitable[None]], timeout: float = 10.0) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(scenario(), timeout)

    asyncio.run(bounded())


class Endpoints:
    """Servers and clients of one test, all closed at its end."""

    def __init__(self, carrier: str, directory: str) -> None:
        self.carrier = carrier
        self.directory = directory
        self.servers: list[Any] = []
        self.clients: list[Any] = []

    async def serve(
        self, handler: Handler = echo, address: str | None = None, **options: Any
    ) -> Any:
        address = address or fresh_address(self.carrier, self.directory)
        server = await transport_for(address).serve(address, handler, ServerOptions(**options))
        self.servers.append(server)
        return server

    def client(self, address: str, **options: Any) -> Any:
        client = transport_for(address).client(address, ClientOptions(**options))
        self.clients.append(client)
        return client

    async def close(self) -> None:
        for client in self.clients:
            client.abort()
        for server in self.servers:
            server.abort()


def scenario(carrier: str, directory: str, body: Callable[[Endpoints], Awaitable[None]]) -> None:
    async def main() -> None:
        endpoints = Endpoints(carrier, directory)
        try:
            await body(endpoints)
        finally:
            await endpoints.close()

    run(main)


# ----------------------------------------------------------------------------- calls


def test_round_trip(carrier: str, directory: str) -> None:
    async def body(e: Endpoints) -> None:
        server = await e.serve()
        client = e.client(server.address)
        assert await client.call(b"hello", 2.0) == b"hello"
        assert await client.call(b"", 2.0) == b""
        assert await client.call(bytes(range(256)) * 10, 2.0) == bytes(range(256)) * 10

    scenario(carrier, directory, body)


def test_many_in_flight_each_caller_gets_its_own_answer(carrier: str, directory: str) -> None:
    async def body(e: Endpoints) -> None:
        server = await e.serve()
        client = e.client(server.address)
        await client.call(b"warm", 2.0)
        payloads = [b"call-%d" % n for n in range(500)]
        answers = await asyncio.gather(*(client.call(p, 5.0) for p in payloads))
        assert answers == payloads

    scenario(carrier, directory, body)


def test_answers_out_of_order_are_matched_by_id(carrier: str, directory: str) -> None:
    finished: list[bytes] = []

    async def shuffled(payload: bytes) -> bytes:
        await asyncio.sleep(random.Random(payload).uniform(0, 0.05))
        finished.append(payload)
        return payload + b"!"

    async def body(e: Endpoints) -> None:
        server = await e.serve(shuffled)
        client = e.client(server.address)
        payloads = [b"%d" % n for n in range(100)]
        answers = await asyncio.gather(*(client.call(p, 5.0) for p in payloads))
        assert answers == [p + b"!" for p in payloads]
        assert finished != payloads, "the handler finished in order; nothing was tested"

    scenario(carrier, directory, body)


def test_receivers_sending_their_next_call_from_on_response_each_get_their_own_answers(
    carrier: str, directory: str
) -> None:
    """The proxy's and the benchmark's way: send() with receivers, the next call made inside
    on_response while the client is still reading the answers that came with it."""

    async def body(e: Endpoints) -> None:
        server = await e.serve()
        client = e.client(server.address)
        await client.call(b"warm", 2.0)
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        chains_left = [32]

        class Chain:
            __slots__ = ("answers", "deadline", "idempotent", "name", "sent")

            def __init__(self, name: int) -> None:
                self.name = name
                self.deadline = loop.time() + 5.0
                self.idempotent = False
                self.sent = 0
                self.answers: list[bytes] = []

            def next(self) -> None:
                self.sent += 1
                client.send(b"%d/%d" % (self.name, self.sent), self)

            def on_response(self, payload: bytes) -> None:
                self.answers.append(payload)
                if self.sent < 20:
                    self.next()
                else:
                    chains_left[0] -= 1
                    if not chains_left[0]:
                        done.set_result(None)

            def on_error(self, error: TransportError) -> None:
                if not done.done():
                    done.set_exception(error)

        chains = [Chain(name) for name in range(32)]
        for chain in chains:
            chain.next()
        await asyncio.wait_for(done, 5.0)
        for chain in chains:
            assert chain.answers == [b"%d/%d" % (chain.name, n) for n in range(1, 21)]
        assert client.in_flight == 0

    scenario(carrier, directory, body)


def test_a_plain_function_handler_answers_at_once_or_returns_an_awaitable(
    carrier: str, directory: str
) -> None:
    async def body(e: Endpoints) -> None:
        waited = asyncio.Event()

        async def later(payload: bytes) -> bytes:
            await asyncio.sleep(0.01)
            waited.set()
            return payload + b" later"

        def plain(payload: bytes) -> Awaitable[bytes] | bytes:
            if payload.startswith(b"wait"):
                return later(payload)
            if payload == b"bad":
                raise ValueError("no")
            return payload + b" at once"

        server = await e.serve(plain)
        client = e.client(server.address)
        assert await client.call(b"now", 2.0) == b"now at once"
        assert await client.call(b"wait", 2.0) == b"wait later"
        assert waited.is_set()
        with pytest.raises(RemoteError):
            await client.call(b"bad", 2.0)
        answers = await asyncio.gather(*(client.call(b"%d" % n, 2.0) for n in range(50)))
        assert answers == [b"%d at once" % n for n in range(50)]

    scenario(carrier, directory, body)


def test_a_handler_error_fails_that_call_only(carrier: str, directory: str) -> None:
    async def picky(payload: bytes) -> bytes:
        if payload == b"bad":
            raise ValueError("no")
        return payload

    async def body(e: Endpoints) -> None:
        server = await e.serve(picky)
        client = e.client(server.address)
        with pytest.raises(RemoteError):
            await client.call(b"bad", 2.0)
        assert await client.call(b"good", 2.0) == b"good"

    scenario(carrier, directory, body)


def test_a_handler_marked_with_deadline_gets_the_callers_budget(
    carrier: str, directory: str
) -> None:
    async def body(e: Endpoints) -> None:
        budgets: list[int] = []

        def budget(payload: bytes, deadline_ms: int) -> bytes:
            budgets.append(deadline_ms)
            return b"%d" % deadline_ms

        server = await e.serve(WithDeadline(budget))
        client = e.client(server.address)
        assert 1900 <= int(await client.call(b"a", 2.0)) <= 2000
        assert 250 <= int(await client.call(b"b", 0.3)) <= 300
        # Beyond the header field: no deadline, which the handler sees as 0.
        assert await client.call(b"c", 10.0 * 365 * 86400) == b"0"
        assert len(budgets) == 3
        # A plain handler on the same carrier still gets the payload alone.
        plain = await e.serve(echo, fresh_address(e.carrier, e.directory, "plain"))
        assert await e.client(plain.address).call(b"plain", 2.0) == b"plain"

    scenario(carrier, directory, body)


# ----------------------------------------------------------------------- giving up


def test_deadline_exceeded_stops_the_handler(carrier: str, directory: str) -> None:
    async def body(e: Endpoints) -> None:
        cancelled = asyncio.Event()

        async def slow(payload: bytes) -> bytes:
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return payload

        server = await e.serve(slow)
        client = e.client(server.address)
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded) as caught:
            await client.call(b"slow", 0.3)
        assert 0.25 <= time.monotonic() - started < 1.0
        assert caught.value.sent is True
        # CANCEL, or the deadline carried in the request, stops the work.
        await asyncio.wait_for(cancelled.wait(), 2.0)

    scenario(carrier, directory, body)


def test_a_cancelled_caller_cancels_the_handler(carrier: str, directory: str) -> None:
    async def body(e: Endpoints) -> None:
        entered = asyncio.Event()
        cancelled = asyncio.Event()

        async def waiting(payload: bytes) -> bytes:
            if payload != b"wait":
                return payload
            entered.set()
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return payload

        server = await e.serve(waiting)
        client = e.client(server.address)
        call = asyncio.ensure_future(client.call(b"wait", 10.0))
        await asyncio.wait_for(entered.wait(), 2.0)
        call.cancel()
        await asyncio.wait_for(cancelled.wait(), 2.0)
        assert await client.call(b"after", 2.0) == b"after"

    scenario(carrier, directory, body)


# ----------------------------------------------------------------------- shutdown


def test_goaway_lets_in_flight_calls_finish(carrier: str, directory: str) -> None:
    async def body(e: Endpoints) -> None:
        release = asyncio.Event()
        entered = 0

        async def gated(payload: bytes) -> bytes:
            nonlocal entered
            entered += 1
            await release.wait()
            return payload

        server = await e.serve(gated)
        client = e.client(server.address)
        calls = [asyncio.ensure_future(client.call(b"%d" % n, 5.0)) for n in range(5)]
        while entered < 5:
            await asyncio.sleep(0.01)
        closing = asyncio.ensure_future(server.close(3.0))
        await asyncio.sleep(0.1)
        release.set()
        assert await asyncio.gather(*calls) == [b"%d" % n for n in range(5)]
        await asyncio.wait_for(closing, 4.0)
        with pytest.raises(TransportError):
            await client.call(b"late", 1.0)

    scenario(carrier, directory, body)


def test_a_restarted_server_is_reached_again(carrier: str, directory: str) -> None:
    async def body(e: Endpoints) -> None:
        first = await e.serve()
        address = first.address
        client = e.client(address, backoff_initial=0.01, backoff_max=0.05)
        assert await client.call(b"one", 2.0) == b"one"
        await first.close(0.5)
        await e.serve(address=address)
        deadline = time.monotonic() + 3.0
        while True:
            try:
                assert await client.call(b"two", 0.5) == b"two"
                break
            except CallError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)

    scenario(carrier, directory, body)


# ----------------------------------------------------------------------- bad input


def test_an_oversize_request_fails_at_once_and_alone(carrier: str, directory: str) -> None:
    async def body(e: Endpoints) -> None:
        # Both ends configured alike: a stream client also learns the server's
        # limit from SETTINGS; the datagram and message carriers have no handshake.
        server = await e.serve(max_frame_size=2048, max_datagram=2048)
        client = e.client(server.address, max_frame_size=2048, max_datagram=2048)
        assert await client.call(b"fits", 2.0) == b"fits"
        started = time.monotonic()
        with pytest.raises(RequestTooLarge) as caught:
            await client.call(b"x" * 100_000, 5.0)
        assert time.monotonic() - started < 0.5
        assert caught.value.sent is False
        assert await client.call(b"still fits", 2.0) == b"still fits"

    scenario(carrier, directory, body)


def _garbage_frame() -> bytes:
    # A header announcing an unknown frame type, then bytes that are no payload.
    return struct.pack(">BBHIQI", 1, 99, 0, 4, 7, 0) + b"\xff\xfe\xfd\xfc"


async def send_garbage(address: str) -> None:
    """Bytes that are not a valid frame, in the carrier's own envelope."""
    parsed = parse_address(address)
    if parsed.scheme in ("tcp", "unix"):
        if parsed.scheme == "unix":
            reader, writer = await asyncio.open_unix_connection(parsed.path)
        else:
            reader, writer = await asyncio.open_connection(parsed.host, parsed.port)
        writer.write(PREFACE + encode_frame(FrameType.SETTINGS, 0) + _garbage_frame())
        await asyncio.wait_for(reader.read(), 2.0)  # the server answers ERROR and closes
        writer.close()
    elif parsed.scheme == "udp":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for datagram in (b"", b"short", b"\x00" * 4 + _garbage_frame(), b"x" * 500):
                sock.sendto(datagram, (parsed.host, parsed.port))
        await asyncio.sleep(0.1)
    else:
        import zmq
        import zmq.asyncio

        context = zmq.asyncio.Context()
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(address.removeprefix("zmq+"))
        for message in (b"", b"short", _garbage_frame()):
            await dealer.send(message)
        await asyncio.sleep(0.2)
        dealer.close(0)
        context.term()


def test_malformed_input_never_reaches_the_handler_nor_stops_the_server(
    carrier: str, directory: str
) -> None:
    async def body(e: Endpoints) -> None:
        seen: list[bytes] = []

        async def recording(payload: bytes) -> bytes:
            seen.append(payload)
            return payload

        server = await e.serve(recording)
        client = e.client(server.address)
        assert await client.call(b"before", 2.0) == b"before"
        await send_garbage(server.address)
        assert await client.call(b"after", 2.0) == b"after"
        assert seen == [b"before", b"after"]

    scenario(carrier, directory, body)


def test_an_oversize_answer_fails_that_call_only(carrier: str, directory: str) -> None:
    async def big(payload: bytes) -> bytes:
        return b"y" * 100_000 if payload == b"big" else payload

    async def body(e: Endpoints) -> None:
        server = await e.serve(big, max_frame_size=4096, max_datagram=4096)
        client = e.client(server.address)
        with pytest.raises(RemoteError):
            await client.call(b"big", 2.0)
        assert await client.call(b"small", 2.0) == b"small"

    scenario(carrier, directory, body)


def test_a_budget_beyond_the_header_field_is_sent_as_no_deadline(
    carrier: str, directory: str
) -> None:
    # deadline_ms is a uint32 (~49.7 days); a longer budget must not break the call.
    async def body(e: Endpoints) -> None:
        server = await e.serve()
        client = e.client(server.address)
        assert await client.call(b"patient", 10.0 * 365 * 86400) == b"patient"
        assert client.in_flight == 0

    scenario(carrier, directory, body)
