"""The UDP carrier: the datagram codec alone, then client and server over real sockets.

Scenarios run on a fresh event loop with a hard time limit, against a real
``UdpServer``/``UdpClient`` or a hand-driven socket (``RawSocket``) that sends
and receives datagrams byte by byte, so each side is checked against the wire
format (docs/wire.md, "UDP") and not only against the other side.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.proxy.conftest import free_port
from tests.transports.lossy_relay import LossyRelay
from transports.base import ClientOptions, ServerOptions
from transports.control import ErrorInfo, GoAwayInfo
from transports.datagram import (
    ANY_TYPE,
    CLIENT_ACCEPTS,
    DATAGRAM_HEADER_SIZE,
    SERVER_ACCEPTS,
    DatagramDropped,
    DropReason,
    crc32c,
    decode_datagram,
    encode_datagram,
    encode_request_datagram,
    encode_response_datagram,
)
from transports.errors import (
    CallError,
    Closed,
    ConnectError,
    ConnectionLost,
    DeadlineExceeded,
    ErrorCode,
    Overloaded,
    Rejected,
    RemoteError,
    RequestTooLarge,
)
from transports.frame import HEADER, Frame, FrameType
from transports.registry import AddressError, parse_address, transport_for
from transports.udp import UdpClient, UdpServer, UdpTransport

# A guard against hangs only: scenarios take well under it.
SCENARIO_LIMIT = 3.0
# How long a hand-driven socket waits for a datagram it expects.
DATAGRAM_WAIT = 1.0
# How long "nothing arrives" is watched for.
QUIET = 0.1


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


HAS_IPV6 = _ipv6_loopback()


def run(scenario: Callable[[], Awaitable[None]], loop_kind: str = "asyncio") -> None:
    async def main() -> None:
        async with asyncio.timeout(SCENARIO_LIMIT):
            await scenario()

    if loop_kind == "uvloop":
        uvloop.run(main())
    else:
        asyncio.run(main())


# ----------------------------------------------------------------------------- harness


class RawSocket(asyncio.DatagramProtocol):
    """A datagram socket driven by hand: bytes out, (bytes, sender) in."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue()
        # When each datagram came in, taken as it is read off the socket.
        self.arrivals: list[float] = []
        self.transport: asyncio.DatagramTransport | None = None
        self.address = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.arrivals.append(time.monotonic())
        self.received.put_nowait((data, addr))

    def drain(self) -> list[Frame]:
        """Every datagram received and not yet read, decoded."""
        frames = []
        while not self.received.empty():
            frames.append(decode_datagram(self.received.get_nowait()[0]))
        return frames

    def error_received(self, exc: Exception) -> None:
        pass

    def send(self, data: bytes, addr: Any) -> None:
        assert self.transport is not None
        self.transport.sendto(data, addr)

    async def receive(self, timeout: float = DATAGRAM_WAIT) -> tuple[bytes, Any]:
        async with asyncio.timeout(timeout):
            return await self.received.get()

    async def frame(self, timeout: float = DATAGRAM_WAIT) -> tuple[Frame, Any]:
        data, addr = await self.receive(timeout)
        return decode_datagram(data), addr

    async def nothing(self, seconds: float = QUIET) -> None:
        await asyncio.sleep(seconds)
        assert self.received.empty(), f"unexpected datagram {self.received.get_nowait()!r}"


class Net:
    """Servers, clients and raw sockets of one scenario, closed after it."""

    def __init__(self) -> None:
        self.servers: list[UdpServer] = []
        self.clients: list[UdpClient] = []
        self.raws: list[RawSocket] = []

    async def __aenter__(self) -> Net:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for client in self.clients:
            client.abort()
        for server in self.servers:
            server.abort()
        for raw in self.raws:
            if raw.transport is not None:
                raw.transport.abort()
        for _ in range(3):
            await asyncio.sleep(0)

    async def serve(
        self,
        handler: Callable[[bytes], Awaitable[bytes]],
        address: str = "udp://127.0.0.1:0",
        **options: Any,
    ) -> UdpServer:
        server = UdpServer(address, handler, ServerOptions(**options))
        await server.start()
        self.servers.append(server)
        return server

    def client(self, address: str, **options: Any) -> UdpClient:
        client = UdpClient(address, ClientOptions(**options))
        self.clients.append(client)
        return client

    async def raw(self, host: str = "127.0.0.1") -> RawSocket:
        raw = RawSocket()
        await asyncio.get_running_loop().create_datagram_endpoint(lambda: raw, local_addr=(host, 0))
        assert raw.transport is not None
        bound_host, port = raw.transport.get_extra_info("sockname")[:2]
        raw.address = f"udp://{f'[{bound_host}]' if ':' in bound_host else bound_host}:{port}"
        self.raws.append(raw)
        return raw


def server_addr(server: UdpServer) -> tuple[str, int]:
    parsed = parse_address(server.address)
    return parsed.host, parsed.port


def unused_port() -> int:
    return free_port(socket.SOCK_DGRAM)


async def wait_until(condition: Callable[[], bool], timeout: float = 1.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.002)


async def echo(payload: bytes) -> bytes:
    return b"echo:" + payload


class Gate:
    """A handler that holds ``slow`` requests until released, and says what happened."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.runs = 0

    async def __call__(self, payload: bytes) -> bytes:
        self.runs += 1
        if payload != b"slow":
            return b"fast:" + payload
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return b"finished"


# ----------------------------------------------------------------------------- codec


def _reference_crc32c(data: bytes) -> int:
    """CRC-32C bit by bit, straight from its definition (reflected 0x1EDC6F41)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def test_the_checksum_is_crc32c() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the published check value
    for sample in (b"", b"\x00", b"pitcher" * 37, bytes(range(256))):
        assert crc32c(sample) == _reference_crc32c(sample)


def test_the_worked_example_in_the_spec() -> None:
    request = encode_request_datagram(1, bytes.fromhex("0a0347455412062f68656c6c6f"), 1000)
    assert request.hex(" ") == (
        "28 32 87 76 01 01 00 00 00 00 00 0d 00 00 00 00 00 00 00 01 00 00 03 e8"
        " 0a 03 47 45 54 12 06 2f 68 65 6c 6c 6f"
    )
    response = encode_response_datagram(1, bytes.fromhex("08c80122026869"))
    assert response.hex(" ") == (
        "71 9a fb 00 01 02 00 00 00 00 00 07 00 00 00 00 00 00 00 01 00 00 00 00"
        " 08 c8 01 22 02 68 69"
    )
    assert encode_datagram(FrameType.CANCEL, 1).hex(" ") == (
        "e5 99 5c b6 01 05 00 00 00 00 00 00 00 00 00 00 00 00 00 01 00 00 00 00"
    )
    goaway = encode_datagram(FrameType.GOAWAY, 0, GoAwayInfo(1, "server is shutting down").encode())
    assert goaway[:4].hex(" ") == "5f dc d7 f2"
    error = encode_datagram(
        FrameType.ERROR, 2, ErrorInfo(ErrorCode.UNAVAILABLE, "server is shutting down").encode()
    )
    assert error[:4].hex(" ") == "a4 c8 8b a7"
    assert encode_datagram(FrameType.PING, 0, b"12345678")[:4].hex(" ") == "33 63 26 c5"


def _check_decodes_or_refuses(data: bytes) -> None:
    try:
        frame = decode_datagram(data, ANY_TYPE)
    except DatagramDropped as exc:
        assert exc.reason in DropReason.__members__.values()
        return
    again = encode_datagram(
        frame.type, frame.request_id, frame.payload, frame.deadline_ms, frame.flags
    )
    assert again == data


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_decode_to_a_frame_that_reencodes_or_are_refused(data: bytes) -> None:
    _check_decodes_or_refuses(data)


_header_fields = st.tuples(
    st.integers(0, 255),  # version
    st.integers(0, 255),  # type
    st.integers(0, 0xFFFF),  # flags
    st.integers(0, 0xFFFFFFFF),  # deadline_ms
    st.one_of(st.just(0), st.integers(0, (1 << 64) - 1)),  # request id
)


@settings(max_examples=500, deadline=None)
@given(_header_fields, st.binary(max_size=300), st.integers(-3, 3))
def test_checksummed_datagrams_decode_to_a_frame_that_reencodes_or_are_refused(
    fields: tuple[int, int, int, int, int], payload: bytes, length_skew: int
) -> None:
    # Random bytes almost never carry a right CRC; these do, so every later
    # check (version, length, type, id, size) is reached as well.
    version, frame_type, flags, deadline_ms, request_id = fields
    length = max(0, len(payload) + length_skew)
    body = HEADER.pack(version, frame_type, flags, length, request_id, deadline_ms) + payload
    _check_decodes_or_refuses(crc32c(body).to_bytes(4, "big") + body)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=100), st.data())
def test_any_changed_byte_is_caught_by_the_checksum(payload: bytes, data: st.DataObject) -> None:
    datagram = encode_request_datagram(7, payload, 100)
    position = data.draw(st.integers(0, len(datagram) - 1))
    flip = data.draw(st.integers(1, 255))
    damaged = bytearray(datagram)
    damaged[position] ^= flip
    with pytest.raises(DatagramDropped) as refused:
        decode_datagram(bytes(damaged))
    assert refused.value.reason == DropReason.CHECKSUM


def _with_crc(body: bytes) -> bytes:
    return crc32c(body).to_bytes(4, "big") + body


def _header(
    frame_type: int, request_id: int, length: int, version: int = 1, deadline_ms: int = 0
) -> bytes:
    return HEADER.pack(version, frame_type, 0, length, request_id, deadline_ms)


DROP_CASES = [
    ("short", b"\x00" * 23, ANY_TYPE, DropReason.SHORT),
    ("empty", b"", ANY_TYPE, DropReason.SHORT),
    (
        "wrong crc",
        b"\x00\x00\x00\x00" + encode_request_datagram(1, b"x", 10)[4:],
        ANY_TYPE,
        DropReason.CHECKSUM,
    ),
    ("version", _with_crc(_header(1, 1, 0, version=2)), ANY_TYPE, DropReason.VERSION),
    ("length too big", _with_crc(_header(1, 1, 5) + b"abc"), ANY_TYPE, DropReason.LENGTH),
    ("length too small", _with_crc(_header(1, 1, 1) + b"abc"), ANY_TYPE, DropReason.LENGTH),
    ("unknown type 0", _with_crc(_header(0, 1, 0)), ANY_TYPE, DropReason.UNKNOWN_TYPE),
    ("unknown type 9", _with_crc(_header(9, 1, 0)), ANY_TYPE, DropReason.UNKNOWN_TYPE),
    ("request id 0", _with_crc(_header(1, 0, 0)), ANY_TYPE, DropReason.REQUEST_ID),
    ("cancel id 0", _with_crc(_header(5, 0, 0)), ANY_TYPE, DropReason.REQUEST_ID),
    ("error id 0", _with_crc(_header(7, 0, 0)), ANY_TYPE, DropReason.REQUEST_ID),
    ("ping with an id", _with_crc(_header(3, 4, 0)), ANY_TYPE, DropReason.REQUEST_ID),
    (
        "big goaway",
        _with_crc(_header(6, 0, 5000) + b"x" * 5000),
        ANY_TYPE,
        DropReason.TOO_LARGE,
    ),
    ("response at a server", encode_response_datagram(1, b""), SERVER_ACCEPTS, "unexpected_type"),
    ("request at a client", encode_request_datagram(1, b"", 0), CLIENT_ACCEPTS, "unexpected_type"),
    ("settings anywhere", _with_crc(_header(8, 0, 0)), SERVER_ACCEPTS, "unexpected_type"),
]


@pytest.mark.parametrize(
    ("data", "accepted", "reason"),
    [case[1:] for case in DROP_CASES],
    ids=[case[0] for case in DROP_CASES],
)
def test_each_drop_reason(data: bytes, accepted: frozenset[int], reason: str) -> None:
    with pytest.raises(DatagramDropped) as refused:
        decode_datagram(data, accepted)
    assert refused.value.reason == reason


def test_a_datagram_over_the_receivers_limit_is_refused() -> None:
    datagram = encode_request_datagram(1, b"x" * 100, 0)
    assert decode_datagram(datagram, max_size=len(datagram)).payload == b"x" * 100
    with pytest.raises(DatagramDropped) as refused:
        decode_datagram(datagram, max_size=len(datagram) - 1)
    assert refused.value.reason == DropReason.TOO_LARGE


# ----------------------------------------------------------------------------- calls


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_round_trip(loop_kind: str, host: str) -> None:
    if host == "::1" and not HAS_IPV6:
        pytest.skip("no IPv6 loopback")

    async def scenario() -> None:
        async with Net() as net:
            bracketed = f"[{host}]" if ":" in host else host
            server = await net.serve(echo, f"udp://{bracketed}:0")
            assert server.address.startswith(f"udp://{bracketed}:")
            assert not server.address.endswith(":0")
            client = net.client(server.address)
            assert client.connection_count == 0
            assert await client.call(b"hello", 1.0) == b"echo:hello"
            assert await client.call(b"again", 1.0, idempotent=True) == b"echo:again"
            assert client.connection_count == 1
            assert client.in_flight == 0
            assert server.in_flight == 0
            assert server.connection_count == 1
            await client.ping(1.0)
            assert not client.dropped and not server.dropped

    run(scenario, loop_kind)


def test_the_registry_finds_the_udp_transport() -> None:
    assert transport_for("udp://127.0.0.1:1") is UdpTransport

    async def scenario() -> None:
        server = await UdpTransport.serve("udp://127.0.0.1:0", echo)
        client = UdpTransport.client(server.address)
        try:
            assert await client.call(b"x", 1.0) == b"echo:x"
        finally:
            await client.close(0.5)
            await server.close(0.5)

    run(scenario)
    with pytest.raises(AddressError):
        UdpTransport.client("tcp://127.0.0.1:1")


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_many_concurrent_calls_each_get_their_own_answer(loop_kind: str) -> None:
    async def scenario() -> None:
        delays = random.Random(3)

        async def shuffled(payload: bytes) -> bytes:
            # Answers leave in a different order than the requests came.
            await asyncio.sleep(delays.uniform(0, 0.05))
            return b"answer:" + payload

        async with Net() as net:
            server = await net.serve(shuffled)
            client = net.client(server.address)
            payloads = [b"call-%d" % i for i in range(200)]
            futures = [client.start(payload, 2.0) for payload in payloads]
            assert client.in_flight == 200
            order: list[bytes] = []
            for future in futures:
                future.add_done_callback(lambda done: order.append(done.result()))
            answers = await asyncio.gather(*futures)
            assert answers == [b"answer:" + payload for payload in payloads]
            assert order != sorted(order, key=lambda a: int(a.split(b"-")[1]))
            assert client.late_responses == 0

    run(scenario, loop_kind)


def test_request_ids_start_anywhere_and_only_grow() -> None:
    async def scenario() -> None:
        async with Net() as net:
            raw = await net.raw()
            client = net.client(raw.address)
            ids = []
            for n in range(3):
                future = client.start(b"%d" % n, 1.0)
                frame, peer = await raw.frame()
                assert frame.type == FrameType.REQUEST
                ids.append(frame.request_id)
                raw.send(encode_response_datagram(frame.request_id, b"ok"), peer)
                assert await future == b"ok"
            assert ids == [ids[0], ids[0] + 1, ids[0] + 2]
            # Another client (a restarted proxy) starts elsewhere, so the
            # server's replay cache never takes its calls for the old ones.
            other = net.client(raw.address)
            unanswered = other.start(b"x", 1.0)
            frame, _ = await raw.frame()
            assert frame.request_id not in ids
            unanswered.cancel()

    run(scenario)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_deadline_fails_the_call_and_cancels_the_handler(loop_kind: str) -> None:
    async def scenario() -> None:
        gate = Gate()
        async with Net() as net:
            server = await net.serve(gate)
            client = net.client(server.address)
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded) as failed:
                await client.call(b"slow", 0.15)
            assert 0.14 <= time.monotonic() - started < 0.5
            assert failed.value.sent
            await asyncio.wait_for(gate.cancelled.wait(), 1.0)
            await wait_until(lambda: server.in_flight == 0)
            assert client.in_flight == 0

    run(scenario, loop_kind)


def test_the_client_sends_cancel_at_the_deadline_and_drops_the_late_answer() -> None:
    async def scenario() -> None:
        async with Net() as net:
            raw = await net.raw()
            client = net.client(raw.address)
            with pytest.raises(DeadlineExceeded):
                await client.call(b"never answered", 0.1)
            request, peer = await raw.frame()
            cancel, _ = await raw.frame()
            assert request.type == FrameType.REQUEST
            assert 1 <= request.deadline_ms <= 100
            assert cancel.type == FrameType.CANCEL
            assert cancel.request_id == request.request_id
            # Another call is waiting when the late answer comes: not its answer.
            waiting = client.start(b"second", 1.0)
            second, _ = await raw.frame()
            raw.send(encode_response_datagram(request.request_id, b"too late"), peer)
            await wait_until(lambda: client.late_responses == 1)
            assert not waiting.done()
            raw.send(encode_response_datagram(second.request_id, b"yours"), peer)
            assert await waiting == b"yours"
            # A second copy of an answer is late too, never anyone else's.
            raw.send(encode_response_datagram(second.request_id, b"yours"), peer)
            await wait_until(lambda: client.late_responses == 2)

    run(scenario)


def test_an_oversize_request_fails_at_once_naming_the_limit() -> None:
    async def scenario() -> None:
        async with Net() as net:
            raw = await net.raw()
            client = net.client(raw.address, max_datagram=1000)
            future = client.start(b"x" * (1000 - DATAGRAM_HEADER_SIZE + 1), 1.0)
            assert future.done()
            with pytest.raises(RequestTooLarge) as failed:
                future.result()
            assert "1000" in str(failed.value)
            assert not failed.value.sent
            await raw.nothing()
            # The largest that fits goes out whole.
            fits = client.start(b"y" * (1000 - DATAGRAM_HEADER_SIZE), 1.0)
            frame, peer = await raw.frame()
            assert frame.payload == b"y" * (1000 - DATAGRAM_HEADER_SIZE)
            raw.send(encode_response_datagram(frame.request_id, b"ok"), peer)
            assert await fits == b"ok"

    run(scenario)


def test_an_oversize_response_becomes_an_internal_error() -> None:
    async def scenario() -> None:
        async def big(payload: bytes) -> bytes:
            return b"z" * int(payload)

        async with Net() as net:
            server = await net.serve(big, max_datagram=1000)
            client = net.client(server.address)
            assert len(await client.call(b"976", 1.0)) == 976
            with pytest.raises(RemoteError) as failed:
                await client.call(b"977", 1.0)
            assert failed.value.code == ErrorCode.INTERNAL
            assert "1000" in failed.value.remote_message

    run(scenario)


def test_a_handler_that_fails_becomes_an_internal_error() -> None:
    async def scenario() -> None:
        async def broken(payload: bytes) -> bytes:
            raise KeyError("missing")

        async with Net() as net:
            server = await net.serve(broken)
            client = net.client(server.address)
            with pytest.raises(RemoteError) as failed:
                await client.call(b"x", 1.0)
            assert failed.value.code == ErrorCode.INTERNAL
            assert "KeyError" in failed.value.remote_message

    run(scenario)


@pytest.mark.parametrize(
    ("code", "error_type", "sent"),
    [
        (ErrorCode.UNAVAILABLE, Rejected, False),
        (ErrorCode.DEADLINE_EXCEEDED, DeadlineExceeded, True),
        (ErrorCode.BAD_PAYLOAD, RemoteError, True),
    ],
)
def test_error_datagrams_map_to_call_errors(
    code: int, error_type: type[CallError], sent: bool
) -> None:
    async def scenario() -> None:
        async with Net() as net:
            raw = await net.raw()
            client = net.client(raw.address)
            future = client.start(b"x", 1.0)
            request, peer = await raw.frame()
            raw.send(
                encode_datagram(
                    FrameType.ERROR, request.request_id, ErrorInfo(code, "because").encode()
                ),
                peer,
            )
            with pytest.raises(error_type) as failed:
                await future
            assert failed.value.sent is sent

    run(scenario)


# ----------------------------------------------------------------------------- garbage


def _garbage(request_id: int) -> dict[str, bytes]:
    good = encode_request_datagram(request_id, b"payload", 500)
    return {
        DropReason.CHECKSUM: good[:4] + good[4:-1] + b"!",
        DropReason.SHORT: good[:10],
        DropReason.LENGTH: _with_crc(_header(1, request_id, 50) + b"payload"),
        DropReason.UNKNOWN_TYPE: _with_crc(_header(42, request_id, 0)),
        DropReason.VERSION: _with_crc(_header(1, request_id, 0, version=9)),
        DropReason.REQUEST_ID: _with_crc(_header(1, 0, 0)),
        DropReason.UNEXPECTED_TYPE: encode_response_datagram(request_id, b"wrong way"),
    }


def test_garbage_at_the_server_is_dropped_counted_and_never_answered() -> None:
    async def scenario() -> None:
        async with Net() as net:
            server = await net.serve(echo)
            raw = await net.raw()
            garbage = _garbage(5)
            for data in garbage.values():
                raw.send(data, server_addr(server))
            raw.send(bytes(random.Random(1).randbytes(70000 // 2)), server_addr(server))
            await raw.nothing()
            assert server.dropped == Counter({reason: 1 for reason in garbage}) + Counter(
                {DropReason.CHECKSUM: 1}
            )
            assert server.in_flight == 0 and server.replay_entries == 0
            # Still serving, the same peer included.
            raw.send(encode_request_datagram(5, b"fine", 500), server_addr(server))
            frame, _ = await raw.frame()
            assert (frame.type, frame.request_id, frame.payload) == (2, 5, b"echo:fine")

    run(scenario)


def test_garbage_at_the_client_is_dropped_and_counted() -> None:
    async def scenario() -> None:
        async with Net() as net:
            raw = await net.raw()
            client = net.client(raw.address)
            future = client.start(b"x", 1.0)
            request, peer = await raw.frame()
            garbage = _garbage(request.request_id)
            # A REQUEST is what a client does not accept; the server-side
            # "unexpected" sample (a RESPONSE) would be a valid answer here.
            garbage[DropReason.UNEXPECTED_TYPE] = encode_request_datagram(1, b"", 0)
            garbage[DropReason.REQUEST_ID] = _with_crc(_header(FrameType.ERROR, 0, 0))
            garbage[DropReason.BAD_PAYLOAD] = encode_datagram(FrameType.GOAWAY, 0, b"\xff\xff\xff")
            for data in garbage.values():
                raw.send(data, peer)
            await asyncio.sleep(QUIET)
            assert not future.done()
            assert client.dropped == Counter({reason: 1 for reason in garbage})
            raw.send(encode_response_datagram(request.request_id, b"the answer"), peer)
            assert await future == b"the answer"
            assert client.late_responses == 0

    run(scenario)


# ----------------------------------------------------------------------------- replay


def test_a_repeated_request_runs_once_and_is_answered_identically() -> None:
    async def scenario() -> None:
        runs: Counter[bytes] = Counter()

        async def counting(payload: bytes) -> bytes:
            runs[payload] += 1
            return b"ran:" + payload

        async with Net() as net:
            server = await net.serve(counting)
            raw = await net.raw()
            request = encode_request_datagram(77, b"charge", 1000)
            raw.send(request, server_addr(server))
            first, _ = await raw.receive()
            raw.send(request, server_addr(server))
            second, _ = await raw.receive()
            assert first == second == encode_response_datagram(77, b"ran:charge")
            assert runs == Counter({b"charge": 1})
            assert server.replayed == 1
            # The same id from another peer is another request.
            other = await net.raw()
            other.send(request, server_addr(server))
            await other.receive()
            assert runs == Counter({b"charge": 2})

    run(scenario)


def test_a_copy_of_a_running_request_is_ignored_and_one_answer_comes() -> None:
    async def scenario() -> None:
        gate = Gate()
        async with Net() as net:
            server = await net.serve(gate)
            raw = await net.raw()
            request = encode_request_datagram(9, b"slow", 0)
            raw.send(request, server_addr(server))
            await gate.started.wait()
            raw.send(request, server_addr(server))
            await raw.nothing()
            assert server.duplicates_ignored == 1
            gate.release.set()
            frame, _ = await raw.frame()
            assert frame.payload == b"finished"
            await raw.nothing()
            assert gate.runs == 1

    run(scenario)


def test_cancel_stops_the_handler_and_nothing_is_sent() -> None:
    async def scenario() -> None:
        gate = Gate()
        async with Net() as net:
            server = await net.serve(gate)
            raw = await net.raw()
            raw.send(encode_request_datagram(3, b"slow", 0), server_addr(server))
            await gate.started.wait()
            raw.send(encode_datagram(FrameType.CANCEL, 3), server_addr(server))
            await asyncio.wait_for(gate.cancelled.wait(), 1.0)
            await raw.nothing()
            assert server.in_flight == 0
            # A CANCEL that overtook its REQUEST keeps the REQUEST from running.
            raw.send(encode_datagram(FrameType.CANCEL, 4), server_addr(server))
            raw.send(encode_request_datagram(4, b"slow", 0), server_addr(server))
            await raw.nothing()
            assert gate.runs == 1

    run(scenario)


def test_the_replay_cache_stays_within_its_size_and_ttl() -> None:
    async def scenario() -> None:
        async with Net() as net:
            server = await net.serve(echo, replay_cache_size=50, replay_ttl=0.2)
            raw = await net.raw()
            for request_id in range(1, 501):
                raw.send(encode_request_datagram(request_id, b"x", 0), server_addr(server))
            for _ in range(500):
                await raw.receive()
            assert server.replay_entries == 50
            # The newest are the ones kept: a copy of the last is answered
            # from the cache, a copy of the first runs again.
            raw.send(encode_request_datagram(500, b"x", 0), server_addr(server))
            await raw.receive()
            assert server.replayed == 1
            await wait_until(lambda: server.replay_entries == 0, 1.0)

    run(scenario)


# ----------------------------------------------------------------------------- loss


def test_a_call_that_is_not_idempotent_is_sent_once() -> None:
    async def scenario() -> None:
        async with Net() as net:
            raw = await net.raw()
            client = net.client(raw.address, retries=5, retry_interval=0.01)
            with pytest.raises(DeadlineExceeded):
                await client.call(b"pay", 0.2)
            await asyncio.sleep(0.05)
            assert [frame.type for frame in raw.drain()] == [FrameType.REQUEST, FrameType.CANCEL]

    run(scenario)


def test_an_idempotent_call_is_sent_again_with_the_same_id() -> None:
    async def scenario() -> None:
        async with Net() as net:
            raw = await net.raw()
            client = net.client(raw.address, retries=3, retry_interval=0.02)
            future = client.start(b"read", 1.0, idempotent=True)
            copies = []
            for _ in range(4):
                data, peer = await raw.receive()
                copies.append(data)
            # The very same datagram each time, after 20, 40 and 80 ms. Arrivals
            # are stamped when the receiving side reads them: one read late on a
            # busy machine makes the gap after it short, so allow 5 ms.
            assert len(set(copies)) == 1
            gaps = [later - earlier for earlier, later in itertools.pairwise(raw.arrivals)]
            assert gaps[0] >= 0.015 and gaps[1] >= 0.035 and gaps[2] >= 0.075, gaps
            assert gaps[0] < gaps[1] < gaps[2], gaps
            await raw.nothing(0.2)  # no more than ``retries`` copies
            frame = decode_datagram(copies[0])
            raw.send(encode_response_datagram(frame.request_id, b"data"), peer)
            assert await future == b"data"

    run(scenario)


def test_retries_stay_within_the_deadline() -> None:
    async def scenario() -> None:
        async with Net() as net:
            raw = await net.raw()
            client = net.client(raw.address, retries=10, retry_interval=0.05)
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                await client.call(b"read", 0.2, idempotent=True)
            await asyncio.sleep(0.05)
            kinds = [frame.type for frame in raw.drain()]
            # Sent at 0, 50 and 150 ms; the next would be at 350 ms, past the
            # deadline. (A loop slowed down by 50 ms leaves room for two only.)
            assert kinds in (
                [FrameType.REQUEST] * 3 + [FrameType.CANCEL],
                [FrameType.REQUEST] * 2 + [FrameType.CANCEL],
            ), kinds
            assert all(arrival < started + 0.2 for arrival in raw.arrivals[:-1])

    run(scenario)


def test_through_a_lossy_relay_every_call_is_answered_once_or_times_out_cleanly() -> None:
    async def scenario() -> None:
        executions: Counter[bytes] = Counter()
        delays = random.Random(11)

        async def recording(payload: bytes) -> bytes:
            executions[payload] += 1
            if delays.random() < 0.3:
                await asyncio.sleep(delays.uniform(0, 0.01))
            return b"done:" + payload

        async with Net() as net:
            server = await net.serve(recording)
            relay = LossyRelay(
                *server_addr(server),
                drop=0.1,
                duplicate=0.1,
                reorder=0.1,
                corrupt=0.1,
                max_delay=0.03,
                seed=2024,
            )
            try:
                client = net.client(await relay.start(), retries=6, retry_interval=0.02)
                payloads = [b"call-%d" % i for i in range(400)]
                outcomes = await asyncio.gather(
                    *(client.call(payload, 1.5, idempotent=True) for payload in payloads),
                    return_exceptions=True,
                )
            finally:
                relay.close()
            answered = 0
            for payload, outcome in zip(payloads, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    assert isinstance(outcome, DeadlineExceeded), repr(outcome)
                else:
                    assert outcome == b"done:" + payload
                    answered += 1
            assert answered >= 380, answered
            assert max(executions.values()) == 1, executions.most_common(3)
            for action in ("dropped", "duplicated", "reordered", "corrupted"):
                assert relay.counts[action] >= 40, relay.counts
            # Corrupted datagrams were caught on both sides, copies were
            # answered from the replay cache or dropped as late.
            assert client.dropped[DropReason.CHECKSUM] + server.dropped[DropReason.CHECKSUM] > 0
            assert server.replayed + server.duplicates_ignored > 0
            assert client.late_responses > 0

    async def bounded() -> None:
        async with asyncio.timeout(9.0):
            await scenario()

    asyncio.run(bounded())


# ----------------------------------------------------------------------------- goaway


def test_close_sends_goaway_finishes_in_flight_and_refuses_new_requests() -> None:
    async def scenario() -> None:
        gate = Gate()
        async with Net() as net:
            server = await net.serve(gate)
            client = net.client(server.address)
            assert await client.call(b"warm", 1.0) == b"fast:warm"
            slow = client.start(b"slow", 2.0)
            await gate.started.wait()
            raw = await net.raw()
            raw.send(encode_request_datagram(1, b"seen", 0), server_addr(server))
            await raw.receive()
            closing = asyncio.ensure_future(server.close(2.0))
            goaway, _ = await raw.frame()
            assert goaway.type == FrameType.GOAWAY
            assert GoAwayInfo.decode(goaway.payload).last_request_id == 1
            with pytest.raises(Rejected) as refused:
                await client.call(b"new", 1.0)
            assert not refused.value.sent
            assert "shutting down" in str(refused.value)
            assert not slow.done() and not closing.done()
            gate.release.set()
            assert await slow == b"finished"
            await asyncio.wait_for(closing, 1.0)
            # The port is closed now. The node said it would run nothing new,
            # so a call that meets the closed port certainly did not run.
            with pytest.raises(ConnectError) as unreachable:
                await client.call(b"after", 1.0)
            assert not unreachable.value.sent

    run(scenario)


def test_goaway_refuses_only_the_calls_the_server_did_not_take() -> None:
    async def scenario() -> None:
        async with Net() as net:
            raw = await net.raw()
            client = net.client(raw.address)
            first = client.start(b"first", 1.0)
            second = client.start(b"second", 1.0)
            taken, peer = await raw.frame()
            await raw.frame()
            goaway = GoAwayInfo(taken.request_id, "restarting").encode()
            raw.send(encode_datagram(FrameType.GOAWAY, 0, goaway), peer)
            with pytest.raises(Rejected) as refused:
                await second
            assert not refused.value.sent and "restarting" in str(refused.value)
            assert not first.done()
            raw.send(encode_response_datagram(taken.request_id, b"one"), peer)
            assert await first == b"one"
            # The client goes on working: there is no connection to reopen.
            third = client.start(b"third", 1.0)
            frame, _ = await raw.frame()
            raw.send(encode_response_datagram(frame.request_id, b"three"), peer)
            assert await third == b"three"

    run(scenario)


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_restarted_server_on_the_same_port_is_reachable_again(loop_kind: str) -> None:
    async def scenario() -> None:
        async with Net() as net:
            server = await net.serve(echo)
            client = net.client(server.address)
            assert await client.call(b"one", 1.0) == b"echo:one"
            await server.close(0.5)
            started = time.monotonic()
            with pytest.raises(ConnectError) as refused:
                await client.call(b"down", 2.0)
            assert not refused.value.sent
            assert time.monotonic() - started < 0.5
            again = await net.serve(echo, server.address)
            assert again.address == server.address
            assert await client.call(b"two", 1.0) == b"echo:two"
            assert client.connection_count == 1

    run(scenario, loop_kind)


# ----------------------------------------------------------------------------- unreachable


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_port_where_nothing_listens_fails_fast(loop_kind: str) -> None:
    async def scenario() -> None:
        async with Net() as net:
            client = net.client(f"udp://127.0.0.1:{unused_port()}")
            started = time.monotonic()
            with pytest.raises(ConnectError) as refused:
                await client.call(b"anyone?", 2.0, idempotent=True)
            assert time.monotonic() - started < 0.5
            assert not refused.value.sent
            with pytest.raises(ConnectError):
                await client.ping(1.0)

    run(scenario, loop_kind)


def test_a_server_that_vanishes_fails_its_pending_calls_as_lost() -> None:
    async def scenario() -> None:
        gate = Gate()
        async with Net() as net:
            server = await net.serve(gate)
            client = net.client(server.address)
            assert await client.call(b"warm", 1.0) == b"fast:warm"
            pending = client.start(b"slow", 2.0)
            await gate.started.wait()
            server.abort()
            await asyncio.sleep(0.01)
            started = time.monotonic()
            # The next call meets the closed port; the pending one may have run.
            with pytest.raises(ConnectionLost) as lost:
                await client.call(b"next", 2.0)
            assert time.monotonic() - started < 0.5
            with pytest.raises(ConnectionLost):
                await pending
            assert lost.value.sent
            # Now known to be absent: later calls were certainly not delivered.
            with pytest.raises(ConnectError) as refused:
                await client.call(b"later", 2.0)
            assert not refused.value.sent

    run(scenario)


def test_ping_repeats_until_a_pong_comes_and_gives_up_in_time() -> None:
    async def scenario() -> None:
        async with Net() as net:
            raw = await net.raw()
            client = net.client(raw.address, retry_interval=0.02)
            started = time.monotonic()
            with pytest.raises(ConnectError):
                await client.ping(0.2)
            assert 0.19 <= time.monotonic() - started < 0.5
            await asyncio.sleep(0.01)
            pings = raw.drain()
            assert len(pings) >= 3
            assert {(frame.type, frame.request_id) for frame in pings} == {(FrameType.PING, 0)}
            answering = asyncio.ensure_future(client.ping(1.0))
            frame, peer = await raw.frame()
            raw.send(encode_datagram(FrameType.PONG, 0, b"not the token"), peer)
            await asyncio.sleep(0.005)
            assert not answering.done()
            raw.send(encode_datagram(FrameType.PONG, 0, frame.payload), peer)
            await asyncio.wait_for(answering, 1.0)

    run(scenario)


def test_a_name_that_does_not_resolve_fails_the_call() -> None:
    async def scenario() -> None:
        async with Net() as net:
            client = net.client("udp://no-such-host.invalid:9")
            with pytest.raises(ConnectError) as failed:
                await client.call(b"x", 2.0)
            assert not failed.value.sent
            # Backing off: the next call fails at once, without a new lookup.
            future = client.start(b"y", 2.0)
            assert future.done()
            with pytest.raises(ConnectError):
                future.result()

    run(scenario)


# ----------------------------------------------------------------------------- limits, close


def test_the_server_refuses_requests_beyond_its_in_flight_limit() -> None:
    async def scenario() -> None:
        gate = Gate()
        async with Net() as net:
            server = await net.serve(gate, max_in_flight=2)
            client = net.client(server.address)
            held = [client.start(b"slow", 2.0) for _ in range(2)]
            await wait_until(lambda: server.in_flight == 2)
            # The stream and ZeroMQ carriers' code, not "shutting down" (UNAVAILABLE).
            with pytest.raises(Overloaded) as refused:
                await client.call(b"slow", 1.0)
            assert refused.value.code == ErrorCode.TOO_MANY_IN_FLIGHT
            assert not refused.value.sent
            gate.release.set()
            assert await asyncio.gather(*held) == [b"finished", b"finished"]

    run(scenario)


def test_client_close_waits_for_calls_then_refuses_new_ones() -> None:
    async def scenario() -> None:
        gate = Gate()
        async with Net() as net:
            server = await net.serve(gate)
            client = net.client(server.address)
            slow = client.start(b"slow", 2.0)
            await gate.started.wait()
            closing = asyncio.ensure_future(client.close(2.0))
            await asyncio.sleep(0.02)
            with pytest.raises(Closed):
                await client.call(b"late", 1.0)
            assert not closing.done()
            gate.release.set()
            assert await slow == b"finished"
            await asyncio.wait_for(closing, 1.0)
            assert client.connection_count == 0

    run(scenario)


def test_abort_fails_what_is_in_flight() -> None:
    async def scenario() -> None:
        gate = Gate()
        async with Net() as net:
            server = await net.serve(gate)
            client = net.client(server.address)
            slow = client.start(b"slow", 2.0)
            await gate.started.wait()
            client.abort()
            with pytest.raises(ConnectionLost):
                await slow
            assert client.connection_count == 0
            # The server hears of it: there is no connection whose end it could see.
            await asyncio.wait_for(gate.cancelled.wait(), 1.0)
            with pytest.raises(Closed):
                await client.call(b"more", 1.0)

    run(scenario)


def test_cancelling_the_future_tells_the_server() -> None:
    async def scenario() -> None:
        gate = Gate()
        async with Net() as net:
            server = await net.serve(gate)
            client = net.client(server.address)
            future = client.start(b"slow", 2.0)
            await gate.started.wait()
            future.cancel()
            await asyncio.wait_for(gate.cancelled.wait(), 1.0)
            assert client.in_flight == 0
            await wait_until(lambda: server.in_flight == 0)

    run(scenario)
