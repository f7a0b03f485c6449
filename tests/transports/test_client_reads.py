"""How the clients read answers: the inline path for plain answers and the full decoder.

The stream client reads whole RESPONSE frames straight from the bytes it
receives and hands everything else (a control frame, a frame cut across two
reads, a header that fails a check) to the decoder; the UDP client and server
check a plain RESPONSE or REQUEST inline and leave the rest to
``decode_datagram``. These tests drive both paths against a hand-driven peer
on real sockets, so that whichever path a byte takes, the outcome is the same.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import uvloop

from transports.base import ServerOptions
from transports.control import ErrorInfo, Settings
from transports.datagram import (
    DATAGRAM_HEADER_SIZE,
    crc32c,
    decode_datagram,
    encode_datagram,
    encode_request_datagram,
    encode_response_datagram,
)
from transports.decoder import FrameDecoder
from transports.errors import ConnectionLost, ErrorCode
from transports.frame import (
    HEADER,
    MAX_FRAME_SIZE_LIMIT,
    PREFACE,
    Frame,
    FrameType,
    encode_frame,
    encode_response,
)
from transports.stream import StreamClient
from transports.udp import UdpClient, UdpServer

LIMIT = 8.0


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["tcp", "unix"])
def carrier(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def directory() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="pitcher-r-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run(loop_kind: str, scenario: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(scenario(), LIMIT)

    if loop_kind == "uvloop":
        uvloop.run(bounded())
    else:
        asyncio.run(bounded())


class RawNode:
    """A node driven by hand over a stream socket: it reads frames and writes chosen bytes."""

    def __init__(self) -> None:
        self.connections: asyncio.Queue[RawConnection] = asyncio.Queue()
        self.server: asyncio.AbstractServer | None = None
        self.address = ""

    async def start(self, carrier: str, directory: str) -> str:
        def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections.put_nowait(RawConnection(reader, writer))

        if carrier == "unix":
            path = f"{directory}/node.sock"
            self.server = await asyncio.start_unix_server(accepted, path)
            self.address = f"unix://{path}"
        else:
            self.server = await asyncio.start_server(accepted, "127.0.0.1", 0)
            port = self.server.sockets[0].getsockname()[1]
            self.address = f"tcp://127.0.0.1:{port}"
        return self.address

    async def accept(self) -> RawConnection:
        connection = await self.connections.get()
        connection.writer.write(
            PREFACE + encode_frame(FrameType.SETTINGS, 0, Settings(1 << 20, 64).encode())
        )
        settings = await connection.expect(FrameType.SETTINGS)
        assert settings.request_id == 0
        return connection

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


class RawConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder(MAX_FRAME_SIZE_LIMIT)
        self.frames: list[Frame] = []

    async def next_frame(self) -> Frame | None:
        while not self.frames:
            data = await self.reader.read(65536)
            if not data:
                return None
            self.frames.extend(self.decoder.feed(data))
        return self.frames.pop(0)

    async def expect(self, frame_type: FrameType) -> Frame:
        frame = await self.next_frame()
        assert frame is not None and frame.type == frame_type, frame
        return frame

    async def write_in_pieces(self, data: bytes, cuts: list[int]) -> None:
        """``data`` in separate writes, cut at ``cuts``: each piece is its own read."""
        start = 0
        for cut in [*sorted(cuts), len(data)]:
            self.writer.write(data[start:cut])
            await self.writer.drain()
            await asyncio.sleep(0.005)
            start = cut


def test_answers_in_one_read_cut_anywhere_and_mixed_with_control_frames_reach_their_callers(
    carrier: str, directory: str, loop_kind: str
) -> None:
    async def scenario() -> None:
        node = RawNode()
        client = StreamClient(await node.start(carrier, directory))
        try:
            payloads = [b"call-%d" % n * (n + 1) for n in range(6)]
            calls = [client.start(payload, 5.0) for payload in payloads]
            connection = await node.accept()
            requests = [await connection.expect(FrameType.REQUEST) for _ in payloads]
            by_payload = {frame.payload: frame.request_id for frame in requests}
            order = list(payloads)
            random.Random(7).shuffle(order)
            answers = [encode_response(by_payload[p], b"answer:" + p) for p in order]
            # A PING in the middle of the answers, and one answer cut inside its header.
            stream = b"".join(answers[:3]) + encode_frame(FrameType.PING, 0, b"12345678")
            cut_in_header = len(stream) + len(answers[3]) + 7
            stream += b"".join(answers[3:])
            await connection.write_in_pieces(stream, [cut_in_header, cut_in_header + 30])
            assert await asyncio.gather(*calls) == [b"answer:" + p for p in payloads]
            pong = await connection.expect(FrameType.PONG)
            assert pong.payload == b"12345678"
            # Back on the inline path: the next answer in one piece.
            call = client.start(b"after", 5.0)
            request = await connection.expect(FrameType.REQUEST)
            connection.writer.write(encode_response(request.request_id, b"later"))
            assert await call == b"later"
        finally:
            client.abort()
            node.close()

    run(loop_kind, scenario)


def test_every_way_of_cutting_two_answers_gives_the_same_outcome(
    carrier: str, directory: str
) -> None:
    async def scenario() -> None:
        node = RawNode()
        client = StreamClient(await node.start(carrier, directory))
        try:
            await_first = client.start(b"0", 5.0)
            connection = await node.accept()
            first = await connection.expect(FrameType.REQUEST)
            connection.writer.write(encode_response(first.request_id, b"0"))
            assert await await_first == b"0"
            two = len(encode_response(1, b"a")) * 2
            for cut in range(1, two):
                calls = [client.start(b"a", 5.0), client.start(b"b", 5.0)]
                ids = [(await connection.expect(FrameType.REQUEST)).request_id for _ in calls]
                data = encode_response(ids[0], b"a") + encode_response(ids[1], b"b")
                await connection.write_in_pieces(data, [cut])
                assert await asyncio.gather(*calls) == [b"a", b"b"], cut
        finally:
            client.abort()
            node.close()

    run("uvloop", scenario)


def test_a_bad_frame_after_good_answers_in_the_same_read(
    carrier: str, directory: str, loop_kind: str
) -> None:
    async def scenario() -> None:
        node = RawNode()
        client = StreamClient(await node.start(carrier, directory))
        try:
            calls = [client.start(b"%d" % n, 5.0) for n in range(3)]
            connection = await node.accept()
            ids = [(await connection.expect(FrameType.REQUEST)).request_id for _ in calls]
            # Version 9: the inline path leaves it to the decoder, which refuses it.
            bad = HEADER.pack(9, FrameType.RESPONSE, 0, 1, ids[2], 0) + b"x"
            connection.writer.write(
                encode_response(ids[0], b"zero") + encode_response(ids[1], b"one") + bad
            )
            assert await calls[0] == b"zero"
            assert await calls[1] == b"one"
            with pytest.raises(ConnectionLost):
                await calls[2]
            error = await connection.expect(FrameType.ERROR)
            assert error.request_id == 0
            assert ErrorInfo.decode(error.payload).code == ErrorCode.PROTOCOL_ERROR
            # A new connection for the next call.
            call = client.start(b"again", 5.0)
            second = await node.accept()
            request = await second.expect(FrameType.REQUEST)
            second.writer.write(encode_response(request.request_id, b"again"))
            assert await call == b"again"
        finally:
            client.abort()
            node.close()

    run(loop_kind, scenario)


def test_an_answer_nobody_waits_for_is_dropped_between_others(
    carrier: str, directory: str, loop_kind: str
) -> None:
    async def scenario() -> None:
        node = RawNode()
        client = StreamClient(await node.start(carrier, directory))
        try:
            calls = [client.start(b"%d" % n, 5.0) for n in range(2)]
            connection = await node.accept()
            ids = [(await connection.expect(FrameType.REQUEST)).request_id for _ in calls]
            connection.writer.write(
                encode_response(ids[0], b"zero")
                + encode_response(ids[1] + 100, b"stray")
                + encode_response(ids[1], b"one")
            )
            assert await asyncio.gather(*calls) == [b"zero", b"one"]
            assert client.late_responses == 1
        finally:
            client.abort()
            node.close()

    run(loop_kind, scenario)


def test_a_receiver_that_sends_from_on_response_reads_every_answer_of_one_read(
    carrier: str, directory: str, loop_kind: str
) -> None:
    """Answers delivered inline while the receivers send new calls from inside them."""

    async def scenario() -> None:
        node = RawNode()
        client = StreamClient(await node.start(carrier, directory))
        loop = asyncio.get_running_loop()
        got: list[bytes] = []
        finished = loop.create_future()

        class Chained:
            __slots__ = ("deadline", "idempotent", "left")

            def __init__(self) -> None:
                self.deadline = loop.time() + 5.0
                self.idempotent = False
                self.left = 3

            def on_response(self, payload: bytes) -> None:
                got.append(payload)
                self.left -= 1
                if self.left:
                    client.send(b"next", self)
                elif all(not chain.left for chain in chains) and not finished.done():
                    finished.set_result(None)

            def on_error(self, error: Any) -> None:
                if not finished.done():
                    finished.set_exception(error)

        chains = [Chained() for _ in range(4)]
        try:
            for chain in chains:
                client.send(b"first", chain)
            connection = await node.accept()
            for _ in range(3):
                ids = [(await connection.expect(FrameType.REQUEST)).request_id for _ in chains]
                connection.writer.write(b"".join(encode_response(rid, b"%d" % rid) for rid in ids))
            await finished
            assert sorted(got, key=int) == [b"%d" % rid for rid in range(1, 13)]
        finally:
            client.abort()
            node.close()

    run(loop_kind, scenario)


# ----------------------------------------------------------------------------- UDP


class _RawUdp(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue()
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.put_nowait((data, addr))


def _corrupt(datagram: bytes, how: str) -> bytes:
    """A copy of ``datagram`` failing one check, its CRC recomputed unless the CRC is the fault."""
    body = bytearray(datagram[4:])
    if how == "checksum":
        return datagram[:-1] + bytes((datagram[-1] ^ 1,))
    if how == "version":
        body[0] = 2
    elif how == "length":
        body[4:8] = (int.from_bytes(body[4:8], "big") + 1).to_bytes(4, "big")
    elif how == "request_id":
        body[8:16] = bytes(8)
    return crc32c(bytes(body)).to_bytes(4, "big") + bytes(body)


@pytest.mark.parametrize("how", ["checksum", "version", "length", "request_id"])
def test_a_udp_answer_that_fails_a_check_is_counted_and_the_right_one_still_counts(
    how: str, loop_kind: str
) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        transport, raw = await loop.create_datagram_endpoint(_RawUdp, local_addr=("127.0.0.1", 0))
        port = transport.get_extra_info("sockname")[1]
        client = UdpClient(f"udp://127.0.0.1:{port}")
        try:
            call = client.start(b"question", 5.0)
            data, peer = await raw.received.get()
            request = decode_datagram(data)
            answer = encode_response_datagram(request.request_id, b"answer")
            transport.sendto(_corrupt(answer, how), peer)
            transport.sendto(answer, peer)
            assert await call == b"answer"
            assert dict(client.dropped) == {how: 1}
        finally:
            client.abort()
            transport.close()

    run(loop_kind, scenario)


@pytest.mark.parametrize("how", ["checksum", "version", "length", "request_id"])
def test_a_udp_request_that_fails_a_check_is_counted_and_never_run(
    how: str, loop_kind: str
) -> None:
    async def scenario() -> None:
        ran: list[bytes] = []

        async def handler(payload: bytes) -> bytes:
            ran.append(payload)
            return payload

        server = UdpServer("udp://127.0.0.1:0", handler, ServerOptions())
        await server.start()
        loop = asyncio.get_running_loop()
        port = int(server.address.rsplit(":", 1)[1])
        transport, raw = await loop.create_datagram_endpoint(
            _RawUdp, remote_addr=("127.0.0.1", port)
        )
        try:
            request = encode_request_datagram(5, b"payload", 1000)
            transport.sendto(_corrupt(request, how))
            transport.sendto(request)
            data, _ = await raw.received.get()
            frame = decode_datagram(data)
            assert (frame.type, frame.request_id, frame.payload) == (
                FrameType.RESPONSE,
                5,
                b"payload",
            )
            assert ran == [b"payload"]
            assert dict(server.dropped) == {how: 1}
            # And a PING, which the inline path leaves to the decoder, is answered.
            transport.sendto(encode_datagram(FrameType.PING, 0, b"p" * 8))
            pong, _ = await raw.received.get()
            assert decode_datagram(pong).type == FrameType.PONG
            assert len(pong) == DATAGRAM_HEADER_SIZE + 8
        finally:
            transport.close()
            await server.close(0.5)

    run(loop_kind, scenario)
