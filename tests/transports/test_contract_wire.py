"""The contract, seen on the wire: what every carrier's client writes and server answers.

Each case runs over TCP, Unix sockets, UDP and ZeroMQ with a raw peer of the
carrier's own envelope on the other side (a listener that records, or a
sender that writes frames by hand), so a carrier that drifts from the others
shows in the bytes, not only in what its own client makes of them.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from tests.proxy.conftest import free_port
from tests.transports.test_contract import (
    CARRIERS,
    Endpoints,
    fresh_address,
    scenario,
)
from transports.calls import MAX_DEADLINE_MS
from transports.control import ErrorInfo, Settings
from transports.datagram import decode_datagram, encode_datagram, encode_request_datagram
from transports.errors import ErrorCode, Overloaded
from transports.frame import HEADER, HEADER_SIZE, PREFACE, FrameType, encode_frame, encode_request

# (type, request id, deadline_ms, payload) of one frame read off the wire.
Seen = tuple[int, int, int, bytes]


@pytest.fixture(params=CARRIERS)
def carrier(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def directory() -> Iterator[str]:
    # Unix socket paths must stay short; pytest's tmp_path is too deep.
    path = tempfile.mkdtemp(prefix="pitcher-w-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _parse(frame: bytes) -> Seen:
    _, kind, _, length, request_id, deadline_ms = HEADER.unpack_from(frame)
    return kind, request_id, deadline_ms, frame[HEADER_SIZE : HEADER_SIZE + length]


async def _read_frame(reader: asyncio.StreamReader) -> Seen:
    header = await reader.readexactly(HEADER_SIZE)
    length = HEADER.unpack(header)[3]
    return _parse(header + await reader.readexactly(length))


def _bound_address(carrier: str, directory: str) -> tuple[str, Any]:
    """An address for a raw listener of ``carrier``: (node URI, what to bind)."""
    address = fresh_address(carrier, directory, "raw")
    if carrier in ("unix", "zmq+ipc"):
        return address, address.split("://", 1)[1]
    kind = socket.SOCK_DGRAM if carrier == "udp" else socket.SOCK_STREAM
    port = free_port(kind)
    return f"{carrier}://127.0.0.1:{port}", ("127.0.0.1", port)


@asynccontextmanager
async def recording_node(carrier: str, directory: str) -> AsyncIterator[tuple[str, asyncio.Queue]]:
    """A node that answers nothing and queues every frame a client sends it."""
    address, where = _bound_address(carrier, directory)
    seen: asyncio.Queue[Seen] = asyncio.Queue()
    if carrier in ("tcp", "unix"):

        async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            settings = Settings(1 << 20, 100).encode()
            writer.write(PREFACE + encode_frame(FrameType.SETTINGS, 0, settings))
            try:
                await reader.readexactly(len(PREFACE))
                while True:
                    seen.put_nowait(await _read_frame(reader))
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()

        if carrier == "unix":
            server = await asyncio.start_unix_server(connected, where)
        else:
            server = await asyncio.start_server(connected, *where)
        try:
            yield address, seen
        finally:
            server.close()
    elif carrier == "udp":
        loop = asyncio.get_running_loop()

        class Recorder(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                frame = decode_datagram(data)
                seen.put_nowait((frame.type, frame.request_id, frame.deadline_ms, frame.payload))

        transport, _ = await loop.create_datagram_endpoint(Recorder, local_addr=where)
        try:
            yield address, seen
        finally:
            transport.close()
    else:
        import zmq
        import zmq.asyncio

        context = zmq.asyncio.Context()
        router = context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.bind(address.removeprefix("zmq+"))

        async def receive() -> None:
            while True:
                _, frame = await router.recv_multipart()
                seen.put_nowait(_parse(frame))

        reader = asyncio.get_running_loop().create_task(receive(), name="zmq recorder")
        try:
            yield address, seen
        finally:
            reader.cancel()
            await asyncio.wait((reader,))
            router.close(0)
            context.term()


async def _next_request(seen: asyncio.Queue) -> Seen:
    while True:
        frame: Seen = await asyncio.wait_for(seen.get(), 2.0)
        if frame[0] == FrameType.REQUEST:
            return frame


# Budgets in seconds, and the deadline_ms each must be written as: whole
# milliseconds left (a little less than the budget by the time it is
# written), and 0, "no deadline", for every budget the uint32 cannot hold.
_LAST_FITTING = (MAX_DEADLINE_MS - 1000) / 1000  # ~49.7 days, less one second
_BUDGETS: list[tuple[float, range | int]] = [
    (0.3, range(250, 301)),
    (_LAST_FITTING, range(MAX_DEADLINE_MS - 1100, MAX_DEADLINE_MS - 999)),
    ((MAX_DEADLINE_MS + 1000) / 1000, 0),
    (10.0 * 365 * 86400, 0),
]


def test_every_carrier_writes_a_budget_the_same_way_and_none_beyond_the_field(
    carrier: str, directory: str
) -> None:
    async def body(e: Endpoints) -> None:
        async with recording_node(carrier, directory) as (address, seen):
            client = e.client(address)
            for budget, expected in _BUDGETS:
                call = client.start(b"budget", budget)
                _, _, deadline_ms, payload = await _next_request(seen)
                assert payload == b"budget"
                if isinstance(expected, range):
                    assert deadline_ms in expected, (budget, deadline_ms)
                else:
                    assert deadline_ms == expected, (budget, deadline_ms)
                call.cancel()
                # The given-up call is told to the node, by id, on every carrier.
                while (await asyncio.wait_for(seen.get(), 2.0))[0] != FrameType.CANCEL:
                    pass
            assert client.in_flight == 0

    scenario(carrier, directory, body)


# ------------------------------------------------------------------- too many in flight


@asynccontextmanager
async def raw_sender(address: str) -> AsyncIterator[tuple[Any, Any]]:
    """(send(frame), receive() -> Seen) over the carrier's envelope, with no client logic."""
    scheme, rest = address.split("://", 1)
    if scheme in ("tcp", "unix"):
        if scheme == "unix":
            reader, writer = await asyncio.open_unix_connection(rest)
        else:
            host, port = rest.rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(PREFACE + encode_frame(FrameType.SETTINGS, 0))
        await reader.readexactly(len(PREFACE))

        async def receive_stream() -> Seen:
            while True:
                frame = await asyncio.wait_for(_read_frame(reader), 2.0)
                if frame[0] != FrameType.SETTINGS:
                    return frame

        try:
            yield writer.write, receive_stream
        finally:
            writer.close()
    elif scheme == "udp":
        host, port = rest.rsplit(":", 1)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.connect((host, int(port)))
        loop = asyncio.get_running_loop()

        def send_datagram(frame: bytes) -> None:
            kind, request_id, deadline_ms, payload = _parse(frame)
            if kind == FrameType.REQUEST:
                sock.send(encode_request_datagram(request_id, payload, deadline_ms))
            else:
                sock.send(encode_datagram(kind, request_id, payload))

        async def receive_datagram() -> Seen:
            data = await asyncio.wait_for(loop.sock_recv(sock, 65536), 2.0)
            frame = decode_datagram(data)
            return frame.type, frame.request_id, frame.deadline_ms, frame.payload

        try:
            yield send_datagram, receive_datagram
        finally:
            sock.close()
    else:
        import zmq
        import zmq.asyncio

        context = zmq.asyncio.Context()
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(address.removeprefix("zmq+"))

        async def receive_message() -> Seen:
            return _parse(await asyncio.wait_for(dealer.recv(), 2.0))

        try:
            yield dealer.send, receive_message
        finally:
            dealer.close(0)
            context.term()


def test_a_request_beyond_max_in_flight_is_refused_with_one_code_everywhere(
    carrier: str, directory: str
) -> None:
    # TOO_MANY_IN_FLIGHT on every carrier: the stream server closes the
    # connection that broke its SETTINGS (id 0), the connectionless ones
    # refuse that request alone (its id). Never UNAVAILABLE, which means
    # "shutting down" and which the proxy answers as such.
    async def body(e: Endpoints) -> None:
        release = asyncio.Event()
        started: list[bytes] = []

        async def held(payload: bytes) -> bytes:
            started.append(payload)
            await release.wait()
            return payload

        server = await e.serve(held, max_in_flight=1)
        async with raw_sender(server.address) as (send, receive):
            send(encode_request(1, b"first", 2000))
            for _ in range(100):
                if started:
                    break
                await asyncio.sleep(0.01)
            send(encode_request(2, b"second", 2000))
            kind, request_id, _, payload = await receive()
        assert kind == FrameType.ERROR
        assert ErrorInfo.decode(payload).code == ErrorCode.TOO_MANY_IN_FLIGHT
        assert request_id == (0 if carrier in ("tcp", "unix") else 2)
        assert started == [b"first"]
        release.set()

    scenario(carrier, directory, body)


def test_a_call_refused_as_too_many_fails_alone_and_unsent(carrier: str, directory: str) -> None:
    # What a caller sees: a stream client keeps to the SETTINGS it was given
    # and waits for a slot; a connectionless client learns of the limit from
    # the refusal, a RemoteError that the caller may send elsewhere.
    async def body(e: Endpoints) -> None:
        release = asyncio.Event()

        async def held(payload: bytes) -> bytes:
            await release.wait()
            return payload

        server = await e.serve(held, max_in_flight=1)
        client = e.client(server.address)
        if carrier in ("udp", "zmq+tcp", "zmq+ipc"):
            await client.ping(2.0)
        first = client.start(b"first", 3.0)
        await asyncio.sleep(0.1)
        second = client.start(b"second", 3.0)
        if carrier in ("tcp", "unix"):
            await asyncio.sleep(0.1)
            assert not second.done()
            release.set()
            assert await second == b"second"
        else:
            with pytest.raises(Overloaded) as refused:
                await second
            assert refused.value.code == ErrorCode.TOO_MANY_IN_FLIGHT
            assert refused.value.sent is False
            release.set()
        assert await first == b"first"

    scenario(carrier, directory, body)
