"""Streamed bodies over real TCP and Unix sockets: DATA, credit, fallback, violations, cuts.

Real clients and servers, and hand-driven peers (``RawPeer``) where a side
must break the rules or speak only whole frames.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from pitcher_rpc.pb import pitcher_pb2
from tests.transports.test_stream import (  # noqa: F401 (fixtures)
    RAW_SERVER_SETTINGS,
    Net,
    RawPeer,
    error_of,
    socket_dir,
    wait_until,
)
from transports.base import ClientOptions, ServerCall, ServerOptions, StreamedAnswer, WithStreams
from transports.bodies import IncomingBody, OutgoingBody
from transports.control import ErrorInfo, Settings
from transports.errors import (
    CallError,
    ConnectionLost,
    DeadlineExceeded,
    ErrorCode,
    RequestTooLarge,
    StreamingUnsupported,
    TransportError,
)
from transports.frame import (
    FLAG_MORE,
    FLAG_STREAM_OK,
    HEADER,
    VERSION,
    FrameType,
    encode_data,
    encode_frame,
    encode_request,
    encode_response,
    encode_window_update,
)

MIB = 1024 * 1024
# A small window, so that "never more than the window" says something at 100 MiB.
WINDOW = 64 * 1024
PATTERN = os.urandom(MIB)


@pytest.fixture(params=["tcp", "unix"])
def carrier(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def net(carrier: str, socket_dir: str) -> Net:  # noqa: F811
    return Net(carrier, "uvloop", socket_dir)


class Call:
    """A receiver for one call, streamed answer allowed; the body's outcome collected."""

    def __init__(self, timeout: float = 5.0, consume: bool = True) -> None:
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + timeout
        self.timeout = timeout
        self.idempotent = False
        self.consume = consume
        self.outcome: asyncio.Future[tuple[str, Any]] = loop.create_future()
        self.body: IncomingBody | None = None
        self.received = 0
        self.digest = hashlib.sha256()
        self.end: asyncio.Future[TransportError | None] = loop.create_future()
        self.data_event = asyncio.Event()

    def on_response(self, payload: bytes) -> None:
        self.outcome.set_result(("whole", payload))

    def on_error(self, error: TransportError) -> None:
        self.outcome.set_result(("error", error))

    def on_response_head(self, payload: bytes, body: IncomingBody) -> None:
        self.body = body
        self.outcome.set_result(("head", payload))
        body.start(self._data, lambda: self.end.set_result(None), self.end.set_result)

    def _data(self, data: bytes) -> None:
        self.received += len(data)
        self.digest.update(data)
        self.data_event.set()
        if self.consume:
            assert self.body is not None
            self.body.consumed(len(data))


def pattern_chunks(total: int, size: int = 256 * 1024) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        piece = min(size, total - sent)
        offset = sent % MIB
        if offset + piece > MIB:
            piece = MIB - offset
        yield PATTERN[offset : offset + piece]
        sent += piece


def pattern_digest(total: int) -> str:
    digest = hashlib.sha256()
    for chunk in pattern_chunks(total):
        digest.update(chunk)
    return digest.hexdigest()


async def write_all(body: OutgoingBody, chunks: Iterator[bytes]) -> None:
    """Write like a well-behaved source: pause on False until on_writable."""
    writable = asyncio.Event()
    body.on_writable = writable.set
    for chunk in chunks:
        if not body.write(chunk):
            writable.clear()
            await writable.wait()
        if body.done:
            return
    body.end()


def streaming_server_options() -> dict[str, Any]:
    return {"initial_window": WINDOW}


# ----------------------------------------------------------------------------- both ways


def test_100_mib_each_way_held_within_the_window(net: Net) -> None:
    total = 100 * MIB
    seen: dict[str, Any] = {}

    async def handler(payload: bytes, deadline_ms: int, call: ServerCall) -> bytes | StreamedAnswer:
        if call.body is None:
            return b"whole"
        assert call.may_stream
        digest = hashlib.sha256()
        size = 0
        async for chunk in call.body:
            digest.update(chunk)
            size += len(chunk)
        seen["request"] = (size, digest.hexdigest(), call.body.window.max_held)  # type: ignore[attr-defined]

        async def chunks() -> AsyncIterator[bytes]:
            for chunk in pattern_chunks(total):
                yield chunk

        return StreamedAnswer(b"head:" + payload, chunks())

    async def scenario() -> None:
        server = await net.serve(WithStreams(handler), **streaming_server_options())
        client = net.client(server.address, initial_window=WINDOW)
        call = Call(timeout=30.0)
        body = client.send_stream(b"up", call)
        await write_all(body, pattern_chunks(total))
        assert await call.outcome == ("head", b"head:up")
        # Whole calls on the same connection while the body streams down: never
        # queued behind it (its DATA in flight is bounded by the window).
        loop = asyncio.get_running_loop()
        latencies: list[float] = []
        while not call.end.done() and len(latencies) < 200:
            start = loop.time()
            assert await client.call(b"", 2.0) == b"whole"
            latencies.append(loop.time() - start)
            await asyncio.sleep(0.002)
        assert await call.end is None
        assert len(latencies) >= 3 and max(latencies) < 1.0
        assert call.received == total
        assert call.digest.hexdigest() == pattern_digest(total)
        assert call.body is not None and 0 < call.body.window.max_held <= WINDOW
        size, digest, held = seen["request"]
        assert (size, digest) == (total, pattern_digest(total))
        assert 0 < held <= WINDOW
        assert client.connection_count == 1 and client.in_flight == 0
        await wait_until(lambda: server.in_flight == 0)

    net.run(scenario)


def test_whole_calls_still_work_beside_a_streaming_handler(net: Net) -> None:
    async def handler(payload: bytes, deadline_ms: int, call: ServerCall) -> bytes:
        assert call.body is None
        return b"may_stream=%d:" % call.may_stream + payload

    async def scenario() -> None:
        server = await net.serve(WithStreams(handler))
        client = net.client(server.address)
        assert await client.call(b"x", 2.0) == b"may_stream=0:x"
        call = Call()
        client.send(b"y", call, stream_response=True)
        assert await call.outcome == ("whole", b"may_stream=1:y")

    net.run(scenario)


# ----------------------------------------------------------------------------- back pressure


def test_a_slow_response_consumer_holds_the_server_back(net: Net) -> None:
    produced = 0

    async def handler(payload: bytes, deadline_ms: int, call: ServerCall) -> StreamedAnswer:
        async def chunks() -> AsyncIterator[bytes]:
            nonlocal produced
            for _ in range(1000):
                produced += 1
                yield b"z" * 16384

        return StreamedAnswer(b"", chunks())

    async def scenario() -> None:
        server = await net.serve(WithStreams(handler))
        client = net.client(server.address, initial_window=WINDOW)
        call = Call(consume=False)
        client.send(b"go", call, stream_response=True)
        await call.outcome
        await wait_until(lambda: call.received == WINDOW)
        await asyncio.sleep(0.1)
        # One window delivered, and the generator is held at the next chunk.
        assert call.received == WINDOW
        assert produced <= WINDOW // 16384 + 1
        # A whole call on the same connection is not held behind it.
        start = asyncio.get_running_loop().time()
        whole = Call()
        client.send(b"quick", whole)
        assert (await whole.outcome)[0] in ("whole", "head")
        assert asyncio.get_running_loop().time() - start < 0.5
        assert client.connection_count == 1
        assert call.body is not None
        # Credit back: the stream goes on to its end.
        call.consume = True
        call.body.consumed(call.received)
        assert await call.end is None
        assert call.received == 1000 * 16384
        assert call.body.window.max_held <= WINDOW

    net.run(scenario)


def test_a_handler_that_does_not_read_holds_the_client_back(net: Net) -> None:
    release = asyncio.Event()

    async def handler(payload: bytes, deadline_ms: int, call: ServerCall) -> bytes:
        assert call.body is not None
        await release.wait()
        size = 0
        async for chunk in call.body:
            size += len(chunk)
        return b"%d" % size

    async def scenario() -> None:
        server = await net.serve(WithStreams(handler), initial_window=WINDOW)
        client = net.client(server.address)
        await client.ping()
        call = Call()
        body = client.send_stream(b"", call)
        writable = asyncio.Event()
        body.on_writable = writable.set
        accepted = 0
        while body.write(b"u" * 8192):
            accepted += 8192
        # The window went out; the write that found no credit is queued, no more.
        assert accepted + 8192 >= WINDOW
        assert body.queued <= 8192
        await asyncio.sleep(0.1)
        assert not writable.is_set()
        release.set()
        await asyncio.wait_for(writable.wait(), 2.0)
        body.end()
        assert await call.outcome == ("whole", b"%d" % (accepted + 8192))

    net.run(scenario)


def test_an_early_answer_stops_the_request_body(net: Net) -> None:
    async def handler(payload: bytes, deadline_ms: int, call: ServerCall) -> bytes:
        return b"too large, say"

    async def scenario() -> None:
        server = await net.serve(WithStreams(handler), initial_window=WINDOW)
        client = net.client(server.address)
        await client.ping()
        call = Call()
        body = client.send_stream(b"", call)
        woken = asyncio.Event()
        body.on_writable = woken.set
        while body.write(b"v" * 16384):
            pass
        assert await call.outcome == ("whole", b"too large, say")
        await asyncio.wait_for(woken.wait(), 1.0)
        assert body.done
        assert body.write(b"more")  # dropped
        body.end()
        assert await client.call(b"", 1.0) == b"too large, say"
        assert client.in_flight == 0

    net.run(scenario)


# ----------------------------------------------------------------------------- fallback


def test_a_peer_without_a_window_gets_one_whole_request(net: Net) -> None:
    async def node(peer: RawPeer, number: int) -> None:
        assert peer.settings is not None and peer.settings.initial_window > 0
        frame = await peer.expect(FrameType.REQUEST)
        assert frame.flags == FLAG_STREAM_OK  # no MORE: the body is in this frame
        request = pitcher_pb2.Request.FromString(frame.payload)
        peer.send(encode_response(frame.request_id, request.method + b":" + request.body))
        await peer.next_frame(1.0)

    async def scenario() -> None:
        address = await net.raw_server(node)  # SETTINGS without initial_window
        client = net.client(address)
        call = Call()
        head = pitcher_pb2.Request(method=b"PUT", body=b"first-", body_size=16).SerializeToString()
        body = client.send_stream(head, call)
        assert not body.write(b"0123")  # no connection yet: queued, pause
        writable = asyncio.Event()
        body.on_writable = writable.set
        await asyncio.wait_for(writable.wait(), 2.0)
        assert body.write(b"456789")
        body.end()
        assert await call.outcome == ("whole", b"PUT:first-0123456789")

    net.run(scenario)


def test_the_fallback_refuses_a_body_over_the_frame_limit(net: Net) -> None:
    settings = Settings(max_frame_size=1000, max_in_flight=8)

    async def node(peer: RawPeer, number: int) -> None:
        # The call was refused before anything was sent.
        try:
            frame = await peer.next_frame(0.6)
        except TimeoutError:
            return
        assert frame is None or frame.type != FrameType.REQUEST, frame

    async def scenario() -> None:
        address = await net.raw_server(node, settings=settings)
        client = net.client(address)
        await client.ping()
        call = Call()
        body = client.send_stream(b"h", call)
        assert body.write(b"x" * 600)
        body.write(b"x" * 600)
        kind, error = await call.outcome
        assert kind == "error" and isinstance(error, RequestTooLarge) and not error.sent
        assert body.done
        body.end()
        await asyncio.sleep(0.7)

    net.run(scenario)


def test_a_client_without_a_window_is_answered_whole(net: Net) -> None:
    async def handler(payload: bytes, deadline_ms: int, call: ServerCall) -> StreamedAnswer:
        assert not call.may_stream

        async def chunks() -> AsyncIterator[bytes]:
            yield b"abc"
            yield b"def"

        # Against the rules (may_stream is False): the server gathers it.
        return StreamedAnswer(
            pitcher_pb2.Response(status=200, body=b"0").SerializeToString(), chunks()
        )

    async def scenario() -> None:
        server = await net.serve(WithStreams(handler))
        peer = await net.raw_client(server.address)
        assert peer.settings is not None and peer.settings.initial_window > 0
        peer.send(encode_frame(FrameType.SETTINGS, 0, Settings(1 << 20).encode()))
        peer.send(encode_request(1, b"q", 1000, FLAG_STREAM_OK))
        frame = await peer.expect(FrameType.RESPONSE)
        assert frame.flags == 0
        assert pitcher_pb2.Response.FromString(frame.payload).body == b"0abcdef"

    net.run(scenario)


def test_a_plain_handler_announces_no_window(net: Net) -> None:
    async def scenario() -> None:
        server = await net.serve(lambda payload: payload)
        peer = await net.raw_client(server.address)
        assert peer.settings is not None and peer.settings.initial_window == 0
        peer.send(encode_frame(FrameType.SETTINGS, 0, Settings(1 << 20, 0, WINDOW).encode()))
        # A streamed request to it breaks the protocol.
        peer.send(encode_request(1, b"h", 1000, FLAG_MORE))
        assert error_of(await peer.next_frame()).code == ErrorCode.PROTOCOL_ERROR
        assert await peer.next_frame() is None

    net.run(scenario)


# ----------------------------------------------------------------------------- violations


async def _server_sees(net: Net, frames: bytes) -> tuple[int, str]:
    async def handler(payload: bytes, deadline_ms: int, call: ServerCall) -> bytes:
        if call.body is not None:
            await asyncio.sleep(5)
        return b""

    server = await net.serve(WithStreams(handler), initial_window=WINDOW)
    peer = await net.raw_client(server.address)
    peer.send(encode_frame(FrameType.SETTINGS, 0, Settings(1 << 20, 0, WINDOW).encode()))
    peer.send(frames)
    frame = await peer.next_frame()
    while frame is not None and frame.type != FrameType.ERROR:
        frame = await peer.next_frame()
    info = error_of(frame)
    assert frame is not None and frame.request_id == 0
    assert await peer.next_frame() is None  # and the connection is closed
    return info.code, info.message


@pytest.mark.parametrize(
    ("frames", "code", "words"),
    [
        (
            encode_request(1, b"h", 1000, FLAG_MORE) + encode_data(1, b"d" * (WINDOW + 1), True),
            ErrorCode.FLOW_CONTROL,
            "beyond the window",
        ),
        (
            encode_request(1, b"h", 1000, FLAG_MORE)
            + encode_data(1, b"d" * WINDOW, True)
            + encode_data(1, b"d", True),
            ErrorCode.FLOW_CONTROL,
            "beyond the window",
        ),
        (
            HEADER.pack(VERSION, FrameType.WINDOW_UPDATE, 0, 2, 1, 0) + b"\0\1",
            ErrorCode.PROTOCOL_ERROR,
            "must be 4",
        ),
        (encode_window_update(1, 0)[:-4] + bytes(4), ErrorCode.PROTOCOL_ERROR, "increment of 0"),
        (encode_data(0, b"d", False), ErrorCode.PROTOCOL_ERROR, "request id 0"),
        (encode_data(7, b"d", False), ErrorCode.PROTOCOL_ERROR, "never started"),
    ],
    ids=[
        "data-over-window",
        "data-over-window-later",
        "update-size",
        "update-zero",
        "id-0",
        "idle-id",
    ],
)
def test_server_closes_on_violations(net: Net, frames: bytes, code: int, words: str) -> None:
    async def scenario() -> None:
        got, message = await _server_sees(net, frames)
        assert got == code and words in message

    net.run(scenario)


def test_client_closes_on_data_beyond_its_window(net: Net) -> None:
    async def node(peer: RawPeer, number: int) -> None:
        assert peer.settings is not None
        window = peer.settings.initial_window
        frame = await peer.expect(FrameType.REQUEST)
        assert frame.flags & FLAG_STREAM_OK
        peer.send(encode_response(frame.request_id, b"head", FLAG_MORE))
        peer.send(encode_data(frame.request_id, b"d" * (window + 1), True))
        info = error_of(await peer.next_frame())
        assert info.code == ErrorCode.FLOW_CONTROL
        assert await peer.next_frame() is None

    async def scenario() -> None:
        address = await net.raw_server(node)
        client = net.client(address, initial_window=WINDOW)
        call = Call()
        client.send(b"q", call, stream_response=True)
        assert await call.outcome == ("head", b"head")
        error = await call.end
        assert isinstance(error, ConnectionLost) and "beyond the window" in str(error)

    net.run(scenario)


def test_client_refuses_an_unasked_stream_and_data_before_a_head(net: Net) -> None:
    async def node(peer: RawPeer, number: int) -> None:
        first = await peer.expect(FrameType.REQUEST)
        assert not first.flags
        # A streamed answer nobody asked for: that call fails, and is cancelled.
        peer.send(encode_response(first.request_id, b"h", FLAG_MORE))
        assert (await peer.expect(FrameType.CANCEL)).request_id == first.request_id
        second = await peer.expect(FrameType.REQUEST)
        peer.send(encode_data(second.request_id, b"d", False))
        assert error_of(await peer.next_frame()).code == ErrorCode.PROTOCOL_ERROR

    async def scenario() -> None:
        address = await net.raw_server(node)
        client = net.client(address)
        # A receiver that takes no streamed answer (no on_response_head).
        with pytest.raises(CallError, match="nobody asked"):
            await client.call(b"1", 2.0)
        second = Call()
        client.send(b"2", second, stream_response=True)
        kind, error = await second.outcome
        assert kind == "error" and isinstance(error, ConnectionLost)

    net.run(scenario)


# ----------------------------------------------------------------------------- cancel, cuts


def test_client_aborts_a_response_body_midway(net: Net) -> None:
    closed = asyncio.Event()

    async def handler(payload: bytes, deadline_ms: int, call: ServerCall) -> StreamedAnswer:
        async def chunks() -> AsyncIterator[bytes]:
            try:
                while True:
                    yield b"w" * 4096
            finally:
                closed.set()

        return StreamedAnswer(b"", chunks())

    async def scenario() -> None:
        server = await net.serve(WithStreams(handler))
        client = net.client(server.address, initial_window=WINDOW)
        call = Call()
        client.send(b"", call, stream_response=True)
        await call.data_event.wait()
        assert call.body is not None
        call.body.abort()
        await asyncio.wait_for(closed.wait(), 2.0)
        await wait_until(lambda: server.in_flight == 0)
        assert client.in_flight == 0
        assert not call.end.done()  # nothing is delivered after abort

    net.run(scenario)


def test_client_aborts_a_request_body_midway(net: Net) -> None:
    cancelled = asyncio.Event()
    reading = asyncio.Event()

    async def handler(payload: bytes, deadline_ms: int, call: ServerCall) -> bytes:
        assert call.body is not None
        try:
            async for _ in call.body:
                reading.set()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return b"complete"

    async def scenario() -> None:
        server = await net.serve(WithStreams(handler), initial_window=WINDOW)
        client = net.client(server.address)
        call = Call()
        body = client.send_stream(b"", call)
        body.write(b"a" * 1000)
        await asyncio.wait_for(reading.wait(), 2.0)
        body.abort()
        await asyncio.wait_for(cancelled.wait(), 2.0)
        await wait_until(lambda: server.in_flight == 0)
        assert body.done and client.in_flight == 0
        await asyncio.sleep(0.05)
        assert not call.outcome.done()

    net.run(scenario)


def test_a_failing_stream_is_cut_with_an_error(net: Net) -> None:
    async def handler(payload: bytes, deadline_ms: int, call: ServerCall) -> StreamedAnswer:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"part"
            raise RuntimeError("disk gone")

        return StreamedAnswer(b"", chunks())

    async def scenario() -> None:
        server = await net.serve(WithStreams(handler))
        client = net.client(server.address)
        call = Call()
        client.send(b"", call, stream_response=True)
        error = await call.end
        assert isinstance(error, ConnectionLost) and "disk gone" in str(error)
        assert call.received == 4
        assert client.in_flight == 0 and client.connection_count == 1

    net.run(scenario)


def test_a_server_gone_midway_is_an_error_never_an_end(net: Net) -> None:
    async def node(peer: RawPeer, number: int) -> None:
        frame = await peer.expect(FrameType.REQUEST)
        peer.send(encode_response(frame.request_id, b"", FLAG_MORE))
        peer.send(encode_data(frame.request_id, b"some", True))
        await peer.writer.drain()
        peer.writer.close()

    async def scenario() -> None:
        address = await net.raw_server(node)
        client = net.client(address)
        call = Call()
        client.send(b"", call, stream_response=True)
        error = await call.end
        assert isinstance(error, ConnectionLost)
        assert call.received == 4

    net.run(scenario)


def test_an_idle_stream_times_out_but_not_while_the_consumer_holds_it(net: Net) -> None:
    async def node(peer: RawPeer, number: int) -> None:
        assert peer.settings is not None
        window = peer.settings.initial_window
        for _ in range(2):
            frame = await peer.expect(FrameType.REQUEST)
            peer.send(encode_response(frame.request_id, b"", FLAG_MORE))
            if frame.payload == b"idle":
                peer.send(encode_data(frame.request_id, b"x", True))
                assert (await peer.expect(FrameType.CANCEL)).request_id == frame.request_id
            else:
                # The whole window, then nothing: the consumer holds it, not us.
                peer.send(encode_data(frame.request_id, b"x" * window, True))
                await peer.expect(FrameType.WINDOW_UPDATE, 2.0)
                peer.send(encode_data(frame.request_id, b"", False))

    async def scenario() -> None:
        address = await net.raw_server(node)
        client = net.client(address, initial_window=WINDOW)
        loop = asyncio.get_running_loop()
        idle = Call(timeout=0.2)
        start = loop.time()
        client.send(b"idle", idle, stream_response=True)
        error = await idle.end
        assert isinstance(error, DeadlineExceeded) and "0.2s" in str(error)
        assert 0.18 <= loop.time() - start < 1.0
        held = Call(timeout=0.2, consume=False)
        client.send(b"held", held, stream_response=True)
        await wait_until(lambda: held.received == WINDOW)
        await asyncio.sleep(0.4)  # twice the idle limit, with the node out of credit
        assert not held.end.done()
        assert held.body is not None
        held.body.consumed(WINDOW)
        assert await held.end is None

    net.run(scenario)


def test_close_lets_streams_finish_within_grace_then_cuts_them(net: Net) -> None:
    async def handler(payload: bytes, deadline_ms: int, call: ServerCall) -> StreamedAnswer:
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(10 if payload == b"short" else 10_000):
                await asyncio.sleep(0.001 if payload == b"short" else 0.01)
                yield b"s" * 100

        return StreamedAnswer(b"", chunks())

    async def scenario() -> None:
        server = await net.serve(WithStreams(handler))
        client = net.client(server.address)
        short, long = Call(), Call()
        client.send(b"short", short, stream_response=True)
        client.send(b"long", long, stream_response=True)
        await short.outcome
        await long.outcome
        loop = asyncio.get_running_loop()
        start = loop.time()
        await server.close(grace=0.3)
        assert await short.end is None and short.received == 1000
        error = await long.end
        assert isinstance(error, ConnectionLost)
        assert 0.25 <= loop.time() - start < 2.0

    net.run(scenario)


# ----------------------------------------------------------------------------- other carriers


def test_udp_refuses_a_streamed_request_and_answers_whole() -> None:
    from transports.udp import UdpClient, UdpServer

    async def handler(payload: bytes, deadline_ms: int, call: ServerCall) -> bytes:
        return b"may_stream=%d" % call.may_stream

    async def scenario() -> None:
        server = UdpServer("udp://127.0.0.1:0", WithStreams(handler))
        await server.start()
        client = UdpClient(server.address)
        try:
            assert not client.supports_streaming
            call = Call()
            body = client.send_stream(b"head", call)
            kind, error = await call.outcome
            assert kind == "error" and isinstance(error, StreamingUnsupported)
            assert not error.sent and "UDP" in str(error)
            assert body.done and body.write(b"x")
            whole = Call()
            client.send(b"q", whole, stream_response=True)
            assert await whole.outcome == ("whole", b"may_stream=0")
        finally:
            client.abort()
            server.abort()

    asyncio.run(asyncio.wait_for(scenario(), 5.0))


def test_zeromq_streams_both_ways_within_the_window(socket_dir: str) -> None:  # noqa: F811
    from transports.zeromq import ZmqClient, ZmqServer

    total = 20 * MIB
    seen: dict[str, Any] = {}

    async def handler(payload: bytes, deadline_ms: int, call: ServerCall) -> bytes | StreamedAnswer:
        if call.body is None:
            return b"whole"
        size = 0
        async for chunk in call.body:
            size += len(chunk)
        seen["request"] = (size, call.body.window.max_held)  # type: ignore[attr-defined]

        async def chunks() -> AsyncIterator[bytes]:
            for chunk in pattern_chunks(total):
                yield chunk

        assert call.may_stream
        return StreamedAnswer(b"head", chunks())

    async def scenario() -> None:
        server = ZmqServer(
            f"zmq+ipc://{socket_dir}/z.sock",
            WithStreams(handler),
            ServerOptions(initial_window=WINDOW),
        )
        await server.start()
        client = ZmqClient(server.address, ClientOptions(initial_window=WINDOW))
        try:
            # The node greets a new connection with its SETTINGS: the client learns its window.
            assert await client.call(b"", 2.0) == b"whole"
            await wait_until(lambda: client.node_window == WINDOW)
            call = Call(timeout=10.0)
            body = client.send_stream(b"up", call)
            await write_all(body, pattern_chunks(total))
            assert await call.outcome == ("head", b"head")
            assert await call.end is None
            assert call.received == total and call.digest.hexdigest() == pattern_digest(total)
            assert call.body is not None and 0 < call.body.window.max_held <= WINDOW
            size, held = seen["request"]
            assert size == total and 0 < held <= WINDOW
            assert client.in_flight == 0
            await wait_until(lambda: server.in_flight == 0)
            # Aborted midway: the node stops (its chunks are closed), nothing more arrives.
            aborted = Call(consume=False)
            client.send_stream(b"", aborted).end()
            await aborted.outcome
            await wait_until(lambda: aborted.received == WINDOW)
            assert aborted.body is not None
            aborted.body.abort()
            await wait_until(lambda: server.in_flight == 0)
            assert client.in_flight == 0 and not aborted.end.done()
        finally:
            client.abort()
            server.abort()

    asyncio.run(asyncio.wait_for(scenario(), 10.0))


def test_zeromq_refuses_a_streamed_request_before_settings(socket_dir: str) -> None:  # noqa: F811
    import zmq
    import zmq.asyncio

    from transports.zeromq import ZmqServer

    async def handler(payload: bytes, deadline_ms: int, call: ServerCall) -> bytes:
        return b"ran"

    async def scenario() -> None:
        server = ZmqServer(f"zmq+ipc://{socket_dir}/z.sock", WithStreams(handler))
        await server.start()
        context = zmq.asyncio.Context()
        dealer = context.socket(zmq.DEALER)
        try:
            dealer.connect(server.address.removeprefix("zmq+"))
            # A client that streamed to an earlier server: this one never told it its window.
            await dealer.send(encode_request(1, b"h", 1000, FLAG_MORE))
            settings = await asyncio.wait_for(dealer.recv(), 2.0)
            assert settings[1] == FrameType.SETTINGS
            assert Settings.decode(settings[20:]).initial_window > 0
            refusal = await asyncio.wait_for(dealer.recv(), 2.0)
            assert refusal[1] == FrameType.ERROR
            info = ErrorInfo.decode(refusal[20:])
            assert info.code == ErrorCode.UNAVAILABLE and "SETTINGS" in info.message
            assert server.in_flight == 0
            # After its SETTINGS, the same identity may stream.
            dealer.send(encode_frame(FrameType.SETTINGS, 0, Settings(1 << 20, 0, WINDOW).encode()))
            await dealer.send(encode_request(2, b"h", 1000, FLAG_MORE) + b"")
            await dealer.send(encode_data(2, b"body", False))
            answer = await asyncio.wait_for(dealer.recv(), 2.0)
            assert answer[1] == FrameType.RESPONSE and answer[20:] == b"ran"
        finally:
            dealer.close(linger=0)
            context.term()
            server.abort()

    asyncio.run(asyncio.wait_for(scenario(), 5.0))


def test_zeromq_gathers_a_body_for_a_node_without_streams(socket_dir: str) -> None:  # noqa: F811
    from transports.zeromq import ZmqClient, ZmqServer

    def handler(payload: bytes) -> bytes:
        return pitcher_pb2.Request.FromString(payload).body

    async def scenario() -> None:
        server = ZmqServer(f"zmq+ipc://{socket_dir}/z.sock", handler)
        await server.start()
        client = ZmqClient(server.address)
        try:
            assert await client.call(b"", 2.0) == b""
            await asyncio.sleep(0.05)
            assert client.node_window == 0
            call = Call()
            head = pitcher_pb2.Request(method=b"POST", body=b"a").SerializeToString()
            body = client.send_stream(head, call)
            assert body.write(b"b" * 1000) and body.write(b"c")
            body.end()
            kind, payload = await call.outcome
            assert (kind, payload) == ("whole", b"a" + b"b" * 1000 + b"c")
            too_big = Call()
            body = client.send_stream(b"", too_big)
            body.write(b"x" * (4 * MIB + 1))
            kind, error = await too_big.outcome
            assert kind == "error" and isinstance(error, RequestTooLarge)
        finally:
            client.abort()
            server.abort()

    asyncio.run(asyncio.wait_for(scenario(), 5.0))


def test_request_body_idle_limit_and_deadline(net: Net) -> None:
    outcomes: list[str] = []

    async def handler(payload: bytes, deadline_ms: int, call: ServerCall) -> bytes:
        assert call.body is not None
        try:
            async for _ in call.body:
                pass
        except DeadlineExceeded as exc:
            outcomes.append(f"idle: {exc}")
            raise
        except asyncio.CancelledError:
            outcomes.append("cancelled")
            raise
        return b"read it all"

    async def scenario() -> None:
        server = await net.serve(WithStreams(handler), stream_idle_timeout=0.2)
        client = net.client(server.address)
        await client.ping()
        # The caller stops sending (its deadline is far): the server's idle limit ends it.
        stalled = Call(timeout=5.0)
        body = client.send_stream(b"", stalled)
        body.write(b"x")
        kind, error = await stalled.outcome
        assert kind == "error" and "DeadlineExceeded" in str(error)
        assert outcomes and outcomes[0].startswith("idle: no request body data")
        # A caller that keeps its deadline over the upload (it moves none): the client
        # gives up at it, the server is told (CANCEL).
        patient = await net.serve(WithStreams(handler), stream_idle_timeout=5.0)
        client = net.client(patient.address)
        await client.ping()
        slow = Call(timeout=0.15)
        body = client.send_stream(b"", slow)
        body.write(b"y")
        kind, error = await slow.outcome
        assert kind == "error" and isinstance(error, DeadlineExceeded)
        assert body.done
        await wait_until(lambda: "cancelled" in outcomes)
        await wait_until(lambda: patient.in_flight == 0 and server.in_flight == 0)

    net.run(scenario)


def test_credit_past_the_largest_window_closes_the_connection(net: Net) -> None:
    async def handler(payload: bytes, deadline_ms: int, call: ServerCall) -> StreamedAnswer:
        async def chunks() -> AsyncIterator[bytes]:
            while True:
                yield b"c" * WINDOW

        return StreamedAnswer(b"", chunks())

    async def scenario() -> None:
        server = await net.serve(WithStreams(handler))
        peer = await net.raw_client(server.address)
        peer.send(encode_frame(FrameType.SETTINGS, 0, Settings(1 << 20, 0, WINDOW).encode()))
        peer.send(encode_request(1, b"", 1000, FLAG_STREAM_OK))
        assert (await peer.expect(FrameType.RESPONSE)).flags == FLAG_MORE
        received = 0
        while received < WINDOW:
            received += len((await peer.expect(FrameType.DATA)).payload)
        assert received == WINDOW  # and no more without credit
        # Credit 2^31 - 1 is allowed; the second increment takes it past that, however
        # much of the first the server spent in between (it cannot have spent 2 GiB).
        peer.send(encode_window_update(1, 0x7FFFFFFF) + encode_window_update(1, 0x7FFFFFFF))
        frame = await peer.next_frame()
        while frame is not None and frame.type == FrameType.DATA:
            frame = await peer.next_frame()
        info = error_of(frame)
        assert frame is not None and frame.request_id == 0
        assert info.code == ErrorCode.FLOW_CONTROL and "exceeds" in info.message
        await wait_until(lambda: server.in_flight == 0)

    net.run(scenario)


# ----------------------------------------------------------- a streamed request's deadline


def _deadline_handler(seen: dict[str, Any]) -> WithStreams:
    """Reads the whole body, then works far past any deadline; says what it saw."""

    async def handler(payload: bytes, deadline_ms: int, call: ServerCall) -> bytes:
        if call.body is None:
            return b"whole"
        loop = asyncio.get_running_loop()
        size = 0
        async for chunk in call.body:
            size += len(chunk)
        seen.update(
            size=size,
            ended=loop.time(),
            deadline_ms=deadline_ms,
            deadline=call.body.deadline,  # type: ignore[attr-defined]
            monotonic=time.monotonic(),
        )
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen["cancelled"] = loop.time()
            raise
        return b"too late"

    return WithStreams(handler)


async def _upload_past_the_deadline(client: Any, seen: dict[str, Any]) -> None:
    """A REQUEST with deadline_ms 400, its body sent over 0.8 s: the server's timer
    starts at the body's last DATA, not at the REQUEST."""
    loop = asyncio.get_running_loop()
    call = Call(timeout=0.4)
    body = client.send_stream(b"", call)
    # The caller bounds the upload itself (as the proxy does): no deadline of its own.
    body.move_deadline(math.inf)
    for _ in range(4):
        assert body.write(b"z" * 1000)
        await asyncio.sleep(0.2)
    body.end()
    ended = loop.time()
    body.move_deadline(ended + 5.0)  # the caller waits longer than the server's deadline
    kind, error = await call.outcome
    answered = loop.time()
    assert kind == "error" and isinstance(error, DeadlineExceeded), (kind, error)
    assert seen["size"] == 4000  # the handler was not stopped while it read
    assert 300 <= seen["deadline_ms"] <= 400
    # Its deadline counted from the end: after 0.4 s of work, not 0.8 s into the upload.
    assert 0.3 <= answered - ended < 1.5, answered - ended
    assert 0.3 <= seen["cancelled"] - seen["ended"] < 1.5
    # What an SDK's context.remaining() reads: the body's end plus deadline_ms.
    assert abs(seen["deadline"] - (seen["monotonic"] + seen["deadline_ms"] / 1000)) < 0.1


def test_a_streamed_requests_deadline_counts_from_its_bodys_end(net: Net) -> None:
    seen: dict[str, Any] = {}

    async def scenario() -> None:
        server = await net.serve(_deadline_handler(seen), initial_window=WINDOW)
        client = net.client(server.address)
        await client.ping()
        await _upload_past_the_deadline(client, seen)
        await wait_until(lambda: server.in_flight == 0)

    net.run(scenario)


def test_zeromq_streamed_requests_deadline_counts_from_its_bodys_end(
    socket_dir: str,  # noqa: F811
) -> None:
    from transports.zeromq import ZmqClient, ZmqServer

    seen: dict[str, Any] = {}

    async def scenario() -> None:
        server = ZmqServer(
            f"zmq+ipc://{socket_dir}/d.sock",
            _deadline_handler(seen),
            ServerOptions(initial_window=WINDOW),
        )
        await server.start()
        client = ZmqClient(server.address, ClientOptions(initial_window=WINDOW))
        try:
            # A whole call first: the node greets the connection with its SETTINGS.
            assert await client.call(b"", 2.0) == b"whole"
            await wait_until(lambda: client.node_window == WINDOW)
            await _upload_past_the_deadline(client, seen)
            await wait_until(lambda: server.in_flight == 0)
        finally:
            client.abort()
            server.abort()

    asyncio.run(asyncio.wait_for(scenario(), 10.0))
