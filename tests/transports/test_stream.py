"""TCP and Unix-socket carriers over real sockets, on both event loops.

Every test runs a scenario on a fresh loop with a hard time limit, against a
real ``StreamServer``/``StreamClient`` or a hand-driven peer (``RawPeer``)
that speaks the wire protocol byte by byte, so each side is checked against
the protocol rather than only against the other side.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import shutil
import tempfile
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import uvloop

from tests.proxy.conftest import free_port
from transports.base import ClientOptions, ServerOptions
from transports.control import ErrorInfo, GoAwayInfo, Settings
from transports.decoder import FrameDecoder
from transports.errors import (
    CallError,
    Closed,
    ConnectError,
    ConnectionLost,
    DeadlineExceeded,
    ErrorCode,
    Rejected,
    RemoteError,
)
from transports.frame import (
    HEADER,
    MAX_FRAME_SIZE_LIMIT,
    PREFACE,
    VERSION,
    Frame,
    FrameType,
    encode_frame,
    encode_request,
    encode_response,
)
from transports.registry import parse_address
from transports.stream import StreamClient, StreamServer

# A guard against hangs only: scenarios take well under a second.
SCENARIO_LIMIT = 8.0
# How long a hand-driven peer waits for the next frame before failing.
FRAME_WAIT = 2.0

RAW_SERVER_SETTINGS = Settings(max_frame_size=1024 * 1024, max_in_flight=64)

Scenario = Callable[[], Awaitable[None]]


# ----------------------------------------------------------------------------- harness


class RawPeer:
    """One end of a real connection, driven by hand: frames out, frames in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        # Both sides of a connection open with a preface.
        self.decoder = FrameDecoder(MAX_FRAME_SIZE_LIMIT)
        self.frames: deque[Frame] = deque()
        self.at_eof = False
        self.settings: Settings | None = None

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def next_frame(self, timeout: float = FRAME_WAIT) -> Frame | None:
        """The next frame, or None once the other side has closed."""
        async with asyncio.timeout(timeout):
            while not self.frames:
                if self.at_eof:
                    return None
                try:
                    data = await self.reader.read(65536)
                except ConnectionError:
                    data = b""
                if not data:
                    self.at_eof = True
                    continue
                self.frames.extend(self.decoder.feed(data))
        return self.frames.popleft()

    async def expect(self, frame_type: FrameType, timeout: float = FRAME_WAIT) -> Frame:
        frame = await self.next_frame(timeout)
        assert frame is not None, f"connection closed while waiting for {frame_type.name}"
        assert frame.type == frame_type, f"wanted {frame_type.name}, got {frame}"
        return frame

    async def frames_until_eof(self, timeout: float = FRAME_WAIT) -> list[Frame]:
        frames = []
        while (frame := await self.next_frame(timeout)) is not None:
            frames.append(frame)
        return frames


def error_of(frame: Frame | None) -> ErrorInfo:
    assert frame is not None and frame.type == FrameType.ERROR, frame
    return ErrorInfo.decode(frame.payload)


class Net:
    """Servers, clients and raw peers of one scenario, torn down after it."""

    def __init__(self, carrier: str, loop_kind: str, socket_dir: str) -> None:
        self.carrier = carrier
        self.loop_kind = loop_kind
        self.socket_dir = socket_dir
        self._names = 0
        self._servers: list[StreamServer] = []
        self._clients: list[StreamClient] = []
        self._raw_servers: list[asyncio.AbstractServer] = []
        self._writers: list[asyncio.StreamWriter] = []
        self._raw_tasks: set[asyncio.Task[None]] = set()
        self._spawned: list[asyncio.Future[Any]] = []
        self.errors: list[BaseException] = []

    # addresses

    def fresh_address(self) -> str:
        if self.carrier == "tcp":
            return "tcp://127.0.0.1:0"
        self._names += 1
        return f"unix://{self.socket_dir}/s{self._names}.sock"

    def unused_address(self) -> str:
        """An address nobody listens on (yet)."""
        if self.carrier == "unix":
            return self.fresh_address()
        return f"tcp://127.0.0.1:{free_port()}"

    # real endpoints

    async def serve(
        self,
        handler: Callable[[bytes], Awaitable[bytes]],
        address: str | None = None,
        **options: Any,
    ) -> StreamServer:
        server = StreamServer(address or self.fresh_address(), handler, ServerOptions(**options))
        await server.start()
        self._servers.append(server)
        return server

    def client(self, address: str, **options: Any) -> StreamClient:
        client = StreamClient(address, ClientOptions(**options))
        self._clients.append(client)
        return client

    # hand-driven endpoints

    async def raw_server(
        self,
        node: Callable[[RawPeer, int], Awaitable[None]],
        *,
        handshake: bool = True,
        settings: Settings = RAW_SERVER_SETTINGS,
    ) -> str:
        """Listen; run ``node(peer, n)`` for the n-th accepted connection (from 0)."""
        accepted = 0

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal accepted
            number, accepted = accepted, accepted + 1
            self._writers.append(writer)
            peer = RawPeer(reader, writer)
            task = asyncio.current_task()
            assert task is not None
            self._raw_tasks.add(task)
            try:
                if handshake:
                    peer.send(PREFACE + encode_frame(FrameType.SETTINGS, 0, settings.encode()))
                    # A client opens with its preface and then its own SETTINGS.
                    peer.settings = Settings.decode((await peer.expect(FrameType.SETTINGS)).payload)
                await node(peer, number)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                self.errors.append(exc)
            finally:
                self._raw_tasks.discard(task)

        address = self.fresh_address()
        parsed = parse_address(address)
        if parsed.scheme == "unix":
            server = await asyncio.start_unix_server(on_connect, parsed.path)
        else:
            server = await asyncio.start_server(on_connect, parsed.host, parsed.port)
            address = f"tcp://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        self._raw_servers.append(server)
        return address

    async def raw_client(self, address: str, *, preface: bytes | None = PREFACE) -> RawPeer:
        parsed = parse_address(address)
        if parsed.scheme == "unix":
            reader, writer = await asyncio.open_unix_connection(parsed.path)
        else:
            reader, writer = await asyncio.open_connection(parsed.host, parsed.port)
        self._writers.append(writer)
        peer = RawPeer(reader, writer)
        if preface is not None:
            peer.send(preface)
        # A server speaks first and at once: preface, then SETTINGS.
        peer.settings = Settings.decode((await peer.expect(FrameType.SETTINGS)).payload)
        return peer

    # running

    def spawn(self, awaitable: Awaitable[Any]) -> asyncio.Future[Any]:
        """Run concurrently; whatever a failed scenario leaves behind is reaped."""
        future = asyncio.ensure_future(awaitable)
        self._spawned.append(future)
        return future

    def run(self, scenario: Scenario) -> None:
        async def main() -> None:
            try:
                async with asyncio.timeout(SCENARIO_LIMIT):
                    await scenario()
            finally:
                await self._teardown()
            if self.errors:
                raise self.errors[0]

        try:
            if self.loop_kind == "uvloop":
                uvloop.run(main())
            else:
                asyncio.run(main())
        finally:
            # Collect the loop's leftovers now rather than at a random later
            # point, where CPython 3.11.7 can trip over a __del__ that logs.
            gc.collect()

    async def _teardown(self) -> None:
        for client in self._clients:
            client.abort()
        for server in self._servers:
            server.abort()
        for raw in self._raw_servers:
            raw.close()
        for writer in self._writers:
            writer.close()
        for task in list(self._raw_tasks):
            task.cancel()
        for future in self._spawned:
            future.cancel()
        await asyncio.gather(*self._spawned, return_exceptions=True)
        # Let close callbacks run before the loop goes away.
        for _ in range(3):
            await asyncio.sleep(0)


@pytest.fixture(params=["tcp", "unix"])
def carrier(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def socket_dir() -> Iterator[str]:
    # pytest's tmp_path can pass the ~104-byte limit of a Unix socket path.
    path = tempfile.mkdtemp(prefix="pt-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def net(carrier: str, loop_kind: str, socket_dir: str) -> Net:
    return Net(carrier, loop_kind, socket_dir)


async def wait_until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


def now() -> float:
    return asyncio.get_running_loop().time()


async def echo(payload: bytes) -> bytes:
    return b"echo:" + payload


class Gate:
    """A handler that holds ``slow`` requests until released, and says what happened."""

    def __init__(self, answer: bytes = b"finished") -> None:
        self.answer = answer
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.cancel_count = 0

    async def __call__(self, payload: bytes) -> bytes:
        if payload != b"slow":
            return b"fast:" + payload
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancel_count += 1
            self.cancelled.set()
            raise
        return self.answer


# ----------------------------------------------------------------------------- calls


def test_round_trip(net: Net) -> None:
    async def scenario() -> None:
        server = await net.serve(echo)
        assert not server.address.endswith(":0"), "the kernel-chosen port is reported"
        client = net.client(server.address)
        assert await client.call(b"hello", 2) == b"echo:hello"
        assert await client.call(b"", 2) == b"echo:"
        big = os.urandom(1 << 20)
        assert await client.call(big, 2) == b"echo:" + big
        assert client.connection_count == 1
        assert server.connection_count == 1
        assert client.in_flight == 0
        assert server.in_flight == 0

    net.run(scenario)


def test_many_concurrent_calls_share_one_connection_and_get_their_own_answers(net: Net) -> None:
    calls = 200

    async def scenario() -> None:
        rng = random.Random(20240501)
        arrived: list[bytes] = []
        answered: list[bytes] = []
        running = 0
        peak = 0
        pool_sizes: set[int] = set()

        async def handler(payload: bytes) -> bytes:
            nonlocal running, peak
            arrived.append(payload)
            running += 1
            peak = max(peak, running)
            pool_sizes.add(client.connection_count)
            await asyncio.sleep(rng.random() * 0.05)
            running -= 1
            answered.append(payload)
            return b"re:" + payload

        server = await net.serve(handler)
        client = net.client(server.address)
        payloads = [b"%d" % n for n in range(calls)]
        results = await asyncio.gather(*(client.call(p, 5) for p in payloads))
        assert results == [b"re:" + p for p in payloads]
        assert sorted(arrived) == sorted(payloads)
        assert answered != arrived, "answers were expected out of request order"
        assert peak > calls // 2, f"only {peak} calls ran at once"
        assert pool_sizes == {1}
        assert client.connection_count == 1
        assert server.connection_count == 1

    net.run(scenario)


def test_request_ids_start_at_one_and_increase_per_connection(net: Net) -> None:
    async def scenario() -> None:
        seen: dict[int, list[Frame]] = {0: [], 1: []}

        async def node(peer: RawPeer, number: int) -> None:
            while (frame := await peer.next_frame()) is not None:
                seen[number].append(frame)
                if frame.type == FrameType.REQUEST:
                    peer.send(encode_response(frame.request_id, frame.payload))

        address = await net.raw_server(node)
        client = net.client(address)
        for n in range(3):
            assert await client.call(b"%d" % n, 2) == b"%d" % n
        assert await asyncio.gather(*(client.call(b"c%d" % n, 2) for n in range(5))) == [
            b"c%d" % n for n in range(5)
        ]
        client.abort()
        await wait_until(lambda: client.connection_count == 0)
        second = net.client(address)
        assert await second.call(b"again", 2) == b"again"
        await wait_until(lambda: len(seen[1]) == 1)
        assert [f.request_id for f in seen[0]] == list(range(1, 9))
        assert [f.type for f in seen[0]] == [FrameType.REQUEST] * 8
        assert all(0 < f.deadline_ms <= 2000 for f in seen[0])
        assert seen[1][0].request_id == 1

    net.run(scenario)


# ----------------------------------------------------------------------------- deadlines


def test_deadline_exceeded_cancels_the_handler_and_keeps_the_connection(net: Net) -> None:
    async def scenario() -> None:
        gate = Gate()
        server = await net.serve(gate)
        client = net.client(server.address)
        await client.ping()
        started = now()
        with pytest.raises(DeadlineExceeded) as caught:
            await client.call(b"slow", 0.2)
        assert 0.19 <= now() - started < 1.0
        assert caught.value.sent is True
        await asyncio.wait_for(gate.cancelled.wait(), 1)
        await wait_until(lambda: server.in_flight == 0)
        assert await client.call(b"next", 1) == b"fast:next"
        assert client.connection_count == 1
        assert client.in_flight == 0

    net.run(scenario)


def test_caller_cancellation_cancels_the_handler(net: Net) -> None:
    async def scenario() -> None:
        gate = Gate()
        server = await net.serve(gate)
        client = net.client(server.address)
        call = net.spawn(client.call(b"slow", 30))
        await asyncio.wait_for(gate.started.wait(), 2)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        # Far sooner than the request's own 30 s deadline: a CANCEL frame did it.
        await asyncio.wait_for(gate.cancelled.wait(), 1)
        await wait_until(lambda: server.in_flight == 0)
        assert client.in_flight == 0
        assert await client.call(b"next", 1) == b"fast:next"

    net.run(scenario)


@pytest.mark.parametrize("give_up", ["deadline", "cancel"])
def test_a_given_up_call_sends_cancel_and_its_late_answer_is_dropped(
    net: Net, give_up: str
) -> None:
    async def scenario() -> None:
        received: list[Frame] = []
        first_arrived = asyncio.Event()

        async def node(peer: RawPeer, number: int) -> None:
            first = await peer.expect(FrameType.REQUEST)
            first_arrived.set()
            # A caller may start its next call before the CANCEL of the one it
            # dropped is written: both orders are fine.
            by_type: dict[int, Frame] = {}
            while len(by_type) < 2:
                frame = await peer.next_frame()
                assert frame is not None and frame.type not in by_type, frame
                by_type[frame.type] = frame
            second = by_type[FrameType.REQUEST]
            received.extend([first, by_type[FrameType.CANCEL], second])
            # This node ignores CANCEL: the abandoned call's answer comes
            # first, in the same write as the real one.
            peer.send(
                encode_response(first.request_id, b"late")
                + encode_response(second.request_id, b"on time")
            )
            await peer.frames_until_eof()

        address = await net.raw_server(node)
        client = net.client(address)
        if give_up == "deadline":
            with pytest.raises(DeadlineExceeded):
                await client.call(b"one", 0.15)
        else:
            call = net.spawn(client.call(b"one", 30))
            await asyncio.wait_for(first_arrived.wait(), 2)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
        assert await client.call(b"two", 2) == b"on time"
        assert client.late_responses == 1
        assert client.in_flight == 0
        first, cancel, second = received
        assert first.payload == b"one"
        assert cancel.request_id == first.request_id
        assert cancel.payload == b""
        assert second.payload == b"two"
        assert second.request_id > first.request_id
        if give_up == "deadline":
            assert 0 < first.deadline_ms <= 150
        else:
            assert 29_000 < first.deadline_ms <= 30_000

    net.run(scenario)


# ----------------------------------------------------------------------------- handler errors


def test_handler_exception_is_a_remote_internal_error_and_the_connection_lives(
    net: Net,
) -> None:
    async def scenario() -> None:
        async def handler(payload: bytes) -> bytes:
            if payload == b"boom":
                raise RuntimeError("kaput")
            if payload == b"text":
                return "not bytes"  # type: ignore[return-value]
            return payload

        server = await net.serve(handler)
        client = net.client(server.address)
        with pytest.raises(RemoteError) as caught:
            await client.call(b"boom", 2)
        assert caught.value.code == ErrorCode.INTERNAL
        assert caught.value.sent is True
        assert "kaput" in str(caught.value)
        with pytest.raises(RemoteError) as caught:
            await client.call(b"text", 2)
        assert caught.value.code == ErrorCode.INTERNAL
        assert await client.call(b"fine", 2) == b"fine"
        assert client.connection_count == 1
        assert server.connection_count == 1

    net.run(scenario)


def test_a_response_over_the_servers_frame_limit_is_a_remote_error(net: Net) -> None:
    async def scenario() -> None:
        async def handler(payload: bytes) -> bytes:
            return b"x" * 2000 if payload == b"big" else payload

        server = await net.serve(handler, max_frame_size=1024)
        client = net.client(server.address)
        with pytest.raises(RemoteError) as caught:
            await client.call(b"big", 2)
        assert caught.value.code == ErrorCode.INTERNAL
        assert "exceeds" in str(caught.value)
        assert await client.call(b"small", 2) == b"small"
        assert client.connection_count == 1

    net.run(scenario)


def test_a_response_over_the_clients_frame_limit_fails_alone(net: Net) -> None:
    async def scenario() -> None:
        async def handler(payload: bytes) -> bytes:
            return b"x" * 5000 if payload == b"big" else payload

        server = await net.serve(handler)
        # The client announces its limit in SETTINGS, so the server refuses to
        # send the oversized answer and fails that one call instead.
        client = net.client(server.address, max_frame_size=1024)
        started = now()
        with pytest.raises(RemoteError) as caught:
            await client.call(b"big", 5)
        assert caught.value.code == ErrorCode.INTERNAL
        assert "frame limit" in caught.value.remote_message
        assert now() - started < 1.0
        assert await client.call(b"small", 2) == b"small"
        assert client.connection_count == 1

    net.run(scenario)


@pytest.mark.parametrize(
    ("code", "message", "expected"),
    [
        (ErrorCode.UNAVAILABLE, "draining", Rejected),
        (ErrorCode.BAD_PAYLOAD, "cannot parse", RemoteError),
        # The node's deadline fired before the caller's own timer: same outcome.
        (ErrorCode.DEADLINE_EXCEEDED, "too late", DeadlineExceeded),
    ],
)
def test_per_request_error_frames_become_call_errors(
    net: Net, code: ErrorCode, message: str, expected: type[CallError]
) -> None:
    async def scenario() -> None:
        async def node(peer: RawPeer, number: int) -> None:
            while (frame := await peer.next_frame()) is not None:
                if frame.type == FrameType.REQUEST:
                    if frame.payload == b"fail":
                        error = ErrorInfo(code, message).encode()
                        peer.send(encode_frame(FrameType.ERROR, frame.request_id, error))
                    else:
                        peer.send(encode_response(frame.request_id, b"ok"))

        address = await net.raw_server(node)
        client = net.client(address)
        with pytest.raises(expected) as caught:
            await client.call(b"fail", 2)
        assert message in str(caught.value)
        assert caught.value.sent is (expected is not Rejected)
        if isinstance(caught.value, RemoteError):
            assert caught.value.code == code
        assert await client.call(b"then", 2) == b"ok"
        assert client.connection_count == 1

    net.run(scenario)


# ----------------------------------------------------------------------------- shutdown


def test_graceful_close_finishes_in_flight_calls_and_refuses_new_ones(net: Net) -> None:
    async def scenario() -> None:
        gate = Gate()
        server = await net.serve(gate)
        client = net.client(server.address)
        first = net.spawn(client.call(b"slow", 5))
        await asyncio.wait_for(gate.started.wait(), 2)
        closing = net.spawn(server.close(grace=5))
        # GOAWAY crosses loopback in microseconds; this is ample.
        await asyncio.sleep(0.1)
        with pytest.raises(ConnectError) as caught:
            await client.call(b"new", 1)
        assert caught.value.sent is False
        assert not first.done()
        assert not closing.done()
        gate.release.set()
        assert await asyncio.wait_for(first, 1) == b"finished"
        # The client hangs up once its last call is answered; close() sees it.
        await asyncio.wait_for(closing, 1)
        assert gate.cancel_count == 0
        assert server.connection_count == 0
        await wait_until(lambda: client.connection_count == 0)
        if net.carrier == "unix":
            assert not os.path.exists(parse_address(server.address).path)

    net.run(scenario)


def test_goaway_on_the_wire(net: Net) -> None:
    async def scenario() -> None:
        gate = Gate()
        server = await net.serve(gate)
        peer = await net.raw_client(server.address)
        peer.send(encode_request(1, b"slow", 5000))
        await asyncio.wait_for(gate.started.wait(), 2)
        closing = net.spawn(server.close(grace=5))
        goaway = await peer.expect(FrameType.GOAWAY)
        assert goaway.request_id == 0
        assert GoAwayInfo.decode(goaway.payload).last_request_id == 1
        # A request that crosses the GOAWAY is refused, not run.
        peer.send(encode_request(2, b"slow", 5000))
        refused = await peer.expect(FrameType.ERROR)
        assert refused.request_id == 2
        assert error_of(refused).code == ErrorCode.UNAVAILABLE
        gate.release.set()
        answer = await peer.expect(FrameType.RESPONSE)
        assert (answer.request_id, answer.payload) == (1, b"finished")
        # Everything is answered, but the server waits for the client to hang up.
        await asyncio.sleep(0.05)
        assert not closing.done()
        peer.writer.write_eof()
        assert await peer.frames_until_eof() == []
        await asyncio.wait_for(closing, 1)

    net.run(scenario)


def test_goaway_from_the_client_side_ends_the_connection_after_its_calls(net: Net) -> None:
    async def scenario() -> None:
        gate = Gate()
        server = await net.serve(gate)
        peer = await net.raw_client(server.address)
        peer.send(encode_request(1, b"slow", 5000))
        await asyncio.wait_for(gate.started.wait(), 2)
        peer.send(encode_frame(FrameType.GOAWAY, 0, GoAwayInfo(0, "bye").encode()))
        await asyncio.sleep(0.05)
        gate.release.set()
        frames = await peer.frames_until_eof()
        assert [(f.type, f.request_id, f.payload) for f in frames] == [
            (FrameType.RESPONSE, 1, b"finished")
        ]
        await wait_until(lambda: server.connection_count == 0)

    net.run(scenario)


def test_a_new_server_takes_over_the_address_while_the_old_one_drains(net: Net) -> None:
    async def scenario() -> None:
        gate = Gate(answer=b"old")
        old = await net.serve(gate)
        address = old.address
        client = net.client(address)
        first = net.spawn(client.call(b"slow", 5))
        await asyncio.wait_for(gate.started.wait(), 2)
        closing = net.spawn(old.close(grace=5))
        await asyncio.sleep(0.1)

        async def successor(payload: bytes) -> bytes:
            return b"new:" + payload

        await net.serve(successor, address=address)
        assert await client.call(b"a", 2) == b"new:a"
        gate.release.set()
        assert await asyncio.wait_for(first, 1) == b"old"
        await asyncio.wait_for(closing, 1)
        # The old server's exit must leave its successor reachable.
        newcomer = net.client(address)
        assert await newcomer.call(b"b", 2) == b"new:b"

    net.run(scenario)


def test_a_killed_server_fails_in_flight_calls_at_once(net: Net) -> None:
    async def scenario() -> None:
        gate = Gate()
        server = await net.serve(gate)
        client = net.client(server.address, backoff_initial=0.05)
        first = net.spawn(client.call(b"slow", 5))
        await asyncio.wait_for(gate.started.wait(), 2)
        started = now()
        server.abort()
        with pytest.raises(ConnectionLost) as caught:
            await asyncio.wait_for(first, 1)
        assert now() - started < 0.5
        assert caught.value.sent is True
        await asyncio.wait_for(gate.cancelled.wait(), 1)
        started = now()
        with pytest.raises(ConnectError) as refused:
            await client.call(b"again", 2)
        assert refused.value.sent is False
        assert now() - started < 0.5

    net.run(scenario)


def test_client_close_lets_calls_finish_then_refuses_new_ones(net: Net) -> None:
    async def scenario() -> None:
        gate = Gate()
        server = await net.serve(gate)
        client = net.client(server.address)
        first = net.spawn(client.call(b"slow", 5))
        await asyncio.wait_for(gate.started.wait(), 2)
        closing = net.spawn(client.close(timeout=2))
        await asyncio.sleep(0.05)
        gate.release.set()
        assert await asyncio.wait_for(first, 1) == b"finished"
        await asyncio.wait_for(closing, 1)
        with pytest.raises(Closed):
            await client.call(b"after", 1)
        await wait_until(lambda: server.connection_count == 0)

    net.run(scenario)


def test_client_close_still_sends_a_call_waiting_for_its_connection(net: Net) -> None:
    # A reload that drops a node closes its client; a request routed there just
    # before, whose connection was still being made, must be sent, not failed.
    async def late_handshake(peer: RawPeer, number: int) -> None:
        await asyncio.sleep(0.3)
        peer.send(PREFACE + encode_frame(FrameType.SETTINGS, 0, RAW_SERVER_SETTINGS.encode()))
        await peer.expect(FrameType.SETTINGS)
        request = await peer.expect(FrameType.REQUEST)
        peer.send(encode_frame(FrameType.RESPONSE, request.request_id, b"answered"))
        await peer.frames_until_eof(timeout=5)

    async def scenario() -> None:
        address = await net.raw_server(late_handshake, handshake=False)
        client = net.client(address, connect_timeout=3)
        call = net.spawn(client.call(b"x", 3))
        await asyncio.sleep(0.05)
        closing = net.spawn(client.close(timeout=2))
        assert await asyncio.wait_for(call, 2) == b"answered"
        await asyncio.wait_for(closing, 2)
        with pytest.raises(Closed):
            await client.call(b"after", 1)

    net.run(scenario)


def test_client_close_fails_a_call_still_waiting_for_its_connection(net: Net) -> None:
    async def scenario() -> None:
        async def silent(peer: RawPeer, number: int) -> None:
            await peer.frames_until_eof(timeout=5)

        address = await net.raw_server(silent, handshake=False)
        client = net.client(address, connect_timeout=3)
        call = net.spawn(client.call(b"x", 3))
        await asyncio.sleep(0.05)
        await asyncio.wait_for(client.close(timeout=1), 1.5)
        # Whatever the error, the caller must hear about it, not wait forever.
        done, _ = await asyncio.wait([call], timeout=0.5)
        assert done, "a call was left waiting forever by client.close()"
        with pytest.raises((Closed, CallError)):
            call.result()

    net.run(scenario)


# ----------------------------------------------------------------------------- connecting


def test_unreachable_node_backs_off_then_reconnects(net: Net) -> None:
    async def scenario() -> None:
        address = net.unused_address()
        client = net.client(address, connect_timeout=1, backoff_initial=0.3, backoff_max=0.3)
        started = now()
        with pytest.raises(ConnectError) as first:
            await client.call(b"x", 2)
        assert first.value.sent is False
        assert now() - started < 0.5
        # Inside the backoff window the client does not even try.
        started = now()
        with pytest.raises(ConnectError) as second:
            await client.call(b"x", 2)
        assert now() - started < 0.1
        assert second.value.sent is False
        assert "next try" in str(second.value)
        await net.serve(echo, address=address)
        with pytest.raises(ConnectError):
            await client.call(b"x", 2)
        await asyncio.sleep(0.35)
        assert await client.call(b"x", 2) == b"echo:x"
        assert client.connection_count == 1

    net.run(scenario)


def test_a_non_pitcher_server_is_refused_at_once(net: Net) -> None:
    async def scenario() -> None:
        async def http_server(peer: RawPeer, number: int) -> None:
            peer.send(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            await peer.frames_until_eof(timeout=5)

        address = await net.raw_server(http_server, handshake=False)
        client = net.client(address, connect_timeout=3)
        started = now()
        with pytest.raises(ConnectError) as caught:
            await client.call(b"x", 5)
        assert now() - started < 0.5
        assert caught.value.sent is False

    net.run(scenario)


def test_a_silent_server_fails_the_handshake_after_connect_timeout(net: Net) -> None:
    async def scenario() -> None:
        async def silent(peer: RawPeer, number: int) -> None:
            await peer.frames_until_eof(timeout=5)

        address = await net.raw_server(silent, handshake=False)
        client = net.client(address, connect_timeout=0.2)
        started = now()
        with pytest.raises(ConnectError) as caught:
            await client.call(b"x", 5)
        assert 0.19 <= now() - started < 1.0
        assert caught.value.sent is False

    net.run(scenario)


def test_a_server_refusing_with_an_error_frame_is_a_connect_error(net: Net) -> None:
    async def refusing(peer: RawPeer, number: int) -> None:
        error = ErrorInfo(ErrorCode.UNAVAILABLE, "full").encode()
        peer.send(PREFACE + encode_frame(FrameType.ERROR, 0, error))
        await peer.frames_until_eof(timeout=5)

    async def scenario() -> None:
        address = await net.raw_server(refusing, handshake=False)
        client = net.client(address, connect_timeout=3)
        started = now()
        with pytest.raises(ConnectError):
            await client.call(b"x", 5)
        assert now() - started < 0.5

    net.run(scenario)


# ----------------------------------------------------------------------------- limits


def test_the_client_keeps_within_the_servers_max_in_flight(net: Net) -> None:
    async def scenario() -> None:
        running = 0
        peak = 0

        async def handler(payload: bytes) -> bytes:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.01)
            running -= 1
            return payload

        server = await net.serve(handler, max_in_flight=2)
        client = net.client(server.address, max_connections=2)
        payloads = [b"%d" % n for n in range(12)]
        assert await asyncio.gather(*(client.call(p, 3) for p in payloads)) == payloads
        assert client.connection_count == 2
        assert peak <= 4

    net.run(scenario)


def test_a_slot_freed_by_cancelling_a_call_is_used_by_a_waiting_call(net: Net) -> None:
    async def scenario() -> None:
        gate = Gate()
        server = await net.serve(gate, max_in_flight=1)
        client = net.client(server.address, max_connections=1)
        first = net.spawn(client.call(b"slow", 30))
        await asyncio.wait_for(gate.started.wait(), 2)
        waiting = net.spawn(client.call(b"quick", 1))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        started = now()
        first.cancel()
        assert await waiting == b"fast:quick"
        assert now() - started < 0.5, "the waiting call sat idle beside a free slot"

    net.run(scenario)


def test_an_oversized_request_fails_alone(net: Net) -> None:
    async def scenario() -> None:
        gate = Gate()
        server = await net.serve(gate, max_frame_size=1024)
        client = net.client(server.address)
        first = net.spawn(client.call(b"slow", 5))
        await asyncio.wait_for(gate.started.wait(), 2)
        # The server said max_frame_size=1024 in its SETTINGS; sending more
        # anyway would get the whole connection closed under the other call.
        with pytest.raises(CallError) as caught:
            await client.call(b"y" * 2000, 2)
        assert caught.value.sent is False
        gate.release.set()
        assert await asyncio.wait_for(first, 1) == b"finished"

    net.run(scenario)


def test_settings_announce_the_servers_limits(net: Net) -> None:
    async def scenario() -> None:
        server = await net.serve(echo, max_frame_size=5000, max_in_flight=7)
        peer = await net.raw_client(server.address)
        assert peer.settings == Settings(5000, 7)

    net.run(scenario)


def test_too_many_in_flight_closes_the_connection_with_an_error(net: Net) -> None:
    async def scenario() -> None:
        gate = Gate()
        server = await net.serve(gate, max_in_flight=2)
        peer = await net.raw_client(server.address)
        peer.send(encode_request(1, b"slow", 5000) + encode_request(2, b"slow", 5000))
        await asyncio.wait_for(gate.started.wait(), 2)
        await wait_until(lambda: server.in_flight == 2)
        peer.send(encode_request(3, b"slow", 5000))
        frames = await peer.frames_until_eof()
        assert len(frames) == 1
        error = error_of(frames[0])
        assert frames[0].request_id == 0
        assert error.code == ErrorCode.TOO_MANY_IN_FLIGHT
        # The connection's running calls die with it.
        await wait_until(lambda: gate.cancel_count == 2)
        await wait_until(lambda: server.connection_count == 0)

    net.run(scenario)


# ----------------------------------------------------------------------------- violations


@pytest.mark.parametrize(
    ("preface", "complaint"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "bad preface"),
        (b"PITCHER" + bytes((VERSION + 1,)), "unsupported protocol version"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01", "bad preface"),
    ],
    ids=["http", "next-version", "tls"],
)
def test_a_wrong_preface_gets_an_error_frame_and_the_server_keeps_serving(
    net: Net, preface: bytes, complaint: str
) -> None:
    async def scenario() -> None:
        server = await net.serve(echo)
        peer = await net.raw_client(server.address, preface=preface)
        frames = await peer.frames_until_eof()
        assert len(frames) == 1 and frames[0].request_id == 0
        error = error_of(frames[0])
        assert error.code == ErrorCode.PROTOCOL_ERROR
        assert complaint in error.message
        client = net.client(server.address)
        assert await client.call(b"still here", 2) == b"echo:still here"
        await wait_until(lambda: server.connection_count == 1)

    net.run(scenario)


def header(frame_type: int, request_id: int, length: int = 0, *, version: int = VERSION) -> bytes:
    return HEADER.pack(version, frame_type, 0, length, request_id, 0)


MALFORMED = {
    "unknown type": (header(99, 1), ErrorCode.PROTOCOL_ERROR),
    "request id 0": (header(FrameType.REQUEST, 0), ErrorCode.PROTOCOL_ERROR),
    "cancel id 0": (header(FrameType.CANCEL, 0), ErrorCode.PROTOCOL_ERROR),
    "frame version": (header(FrameType.REQUEST, 1, version=2), ErrorCode.PROTOCOL_ERROR),
    "ping with id": (header(FrameType.PING, 4), ErrorCode.PROTOCOL_ERROR),
    "too large": (header(FrameType.REQUEST, 1, 5000), ErrorCode.FRAME_TOO_LARGE),
    "control too large": (header(FrameType.PING, 0, 5000), ErrorCode.FRAME_TOO_LARGE),
    "response to server": (encode_response(1, b"?"), ErrorCode.PROTOCOL_ERROR),
    "settings payload": (
        encode_frame(FrameType.SETTINGS, 0, b"\x08"),  # a varint cut short
        ErrorCode.PROTOCOL_ERROR,
    ),
    "reused id": (encode_request(5, b"a", 100) * 2, ErrorCode.PROTOCOL_ERROR),
    "id going down": (
        encode_request(5, b"a", 100) + encode_request(3, b"b", 100),
        ErrorCode.PROTOCOL_ERROR,
    ),
}


@pytest.mark.parametrize(("data", "code"), MALFORMED.values(), ids=MALFORMED.keys())
def test_a_bad_frame_after_a_good_preface_gets_an_error_frame_and_a_close(
    net: Net, data: bytes, code: ErrorCode
) -> None:
    async def scenario() -> None:
        server = await net.serve(echo, max_frame_size=4096)
        peer = await net.raw_client(server.address)
        peer.send(data)
        frames = await peer.frames_until_eof()
        assert frames, "closed without an ERROR frame"
        last = frames[-1]
        assert last.request_id == 0
        assert error_of(last).code == code
        # Only answers to the good requests before the bad one may precede it.
        assert all(f.type == FrameType.RESPONSE for f in frames[:-1])
        await wait_until(lambda: server.connection_count == 0)

    net.run(scenario)


def test_ping_is_answered_with_pong_by_both_sides(net: Net) -> None:
    async def scenario() -> None:
        server = await net.serve(echo)
        peer = await net.raw_client(server.address)
        peer.send(encode_frame(FrameType.PING, 0, b"12345678"))
        pong = await peer.expect(FrameType.PONG)
        assert (pong.request_id, pong.payload) == (0, b"12345678")

        pongs: list[Frame] = []

        async def pinging(raw: RawPeer, number: int) -> None:
            request = await raw.expect(FrameType.REQUEST)
            raw.send(encode_frame(FrameType.PING, 0, b"abc"))
            pongs.append(await raw.expect(FrameType.PONG))
            raw.send(encode_response(request.request_id, b"done"))
            await raw.frames_until_eof()

        address = await net.raw_server(pinging)
        client = net.client(address)
        assert await client.call(b"x", 2) == b"done"
        assert [(f.request_id, f.payload) for f in pongs] == [(0, b"abc")]

    net.run(scenario)


def test_half_closed_client_still_gets_its_answer(net: Net) -> None:
    async def scenario() -> None:
        server = await net.serve(echo)
        peer = await net.raw_client(server.address)
        peer.send(encode_request(1, b"last words", 1000))
        peer.writer.write_eof()
        frames = await peer.frames_until_eof()
        assert [(f.type, f.request_id, f.payload) for f in frames] == [
            (FrameType.RESPONSE, 1, b"echo:last words")
        ]

    net.run(scenario)


def test_a_malformed_frame_from_the_server_fails_pending_calls_and_the_client_reconnects(
    net: Net,
) -> None:
    async def scenario() -> None:
        from_client: list[Frame] = []

        async def node(peer: RawPeer, number: int) -> None:
            request = await peer.expect(FrameType.REQUEST)
            if number == 0:
                peer.send(header(99, request.request_id))
                from_client.extend(await peer.frames_until_eof())
            else:
                peer.send(encode_response(request.request_id, b"recovered"))
                await peer.frames_until_eof()

        address = await net.raw_server(node)
        client = net.client(address)
        started = now()
        with pytest.raises(ConnectionLost) as caught:
            await client.call(b"x", 5)
        assert now() - started < 0.5
        assert caught.value.sent is True
        assert await client.call(b"y", 2) == b"recovered"
        assert client.connection_count == 1
        await wait_until(lambda: bool(from_client))
        assert [f.request_id for f in from_client] == [0]
        assert error_of(from_client[0]).code == ErrorCode.PROTOCOL_ERROR

    net.run(scenario)


@pytest.mark.parametrize("when", ["handshake", "mid-call"])
def test_a_malformed_control_payload_from_the_server_is_a_protocol_error(
    net: Net, when: str
) -> None:
    async def scenario() -> None:
        from_client: list[Frame] = []
        hung_up = asyncio.Event()
        # A truncated varint: a header that is fine around a payload that is not.
        broken = b"\x08"

        async def node(peer: RawPeer, number: int) -> None:
            if when == "handshake":
                peer.send(PREFACE + encode_frame(FrameType.SETTINGS, 0, broken))
            else:
                peer.send(PREFACE + encode_frame(FrameType.SETTINGS, 0))
                await peer.expect(FrameType.SETTINGS)
                await peer.expect(FrameType.REQUEST)
                peer.send(encode_frame(FrameType.GOAWAY, 0, broken))
            from_client.extend(await peer.frames_until_eof())
            hung_up.set()

        address = await net.raw_server(node, handshake=False)
        client = net.client(address, connect_timeout=3)
        started = now()
        with pytest.raises(ConnectError if when == "handshake" else ConnectionLost):
            await client.call(b"x", 5)
        assert now() - started < 0.5
        await wait_until(lambda: client.connection_count == 0)
        # Like any other violation: an ERROR frame, then the close.
        await asyncio.wait_for(hung_up.wait(), 1)
        assert from_client, "the client hung up without an ERROR frame"
        assert from_client[-1].type == FrameType.ERROR
        assert error_of(from_client[-1]).code == ErrorCode.PROTOCOL_ERROR

    net.run(scenario)
