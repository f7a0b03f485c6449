"""ZeroMQ carrier over real sockets: tcp on 127.0.0.1 and ipc in a short /tmp dir.

Every test runs one scenario on a fresh event loop under a hard time limit,
against a real ``ZmqServer``/``ZmqClient`` or a raw pyzmq socket that speaks
the wire format by hand, so each side is checked against the protocol rather
than only against the other side.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import uvloop
import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from tests.proxy.conftest import free_port
from transports.base import ClientOptions, ServerOptions
from transports.calls import FutureReceiver
from transports.control import ErrorInfo, GoAwayInfo
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
from transports.frame import (
    HEADER,
    HEADER_SIZE,
    Frame,
    FrameType,
    encode_frame,
    encode_request,
    encode_response,
)
from transports.registry import transport_for
from transports.zeromq import ZmqTransport, read_header, shared_context
from transports.zeromq_client import ZmqClient
from transports.zeromq_server import ZmqServer

# A guard against hangs only: scenarios take well under a second.
SCENARIO_LIMIT = 2.5
# How long a raw peer waits for the next message before failing.
FRAME_WAIT = 1.0

Scenario = Callable[[], Awaitable[None]]


async def echo(payload: bytes) -> bytes:
    return payload


def parse(data: bytes) -> Frame:
    frame_type, request_id, deadline_ms = read_header(data, 1 << 30)
    return Frame(frame_type, request_id, data[HEADER_SIZE:], deadline_ms)


def error_of(frame: Frame) -> ErrorInfo:
    assert frame.type == FrameType.ERROR, frame
    return ErrorInfo.decode(frame.payload)


def native_threads() -> int:
    """Threads of this process, ZeroMQ's native ones included."""
    return len(os.listdir("/proc/self/task"))


class Net:
    """Servers, clients and raw sockets of one scenario, torn down after it."""

    def __init__(self, carrier: str, socket_dir: str) -> None:
        self.carrier = carrier
        self.socket_dir = socket_dir
        self._names = 0
        self._servers: list[ZmqServer] = []
        self._clients: list[ZmqClient] = []
        self._raw: list[zmq.asyncio.Socket] = []
        self._context: zmq.asyncio.Context | None = None

    # addresses

    def fresh_address(self) -> str:
        if self.carrier == "tcp":
            return "zmq+tcp://127.0.0.1:0"
        self._names += 1
        return f"zmq+ipc://{self.socket_dir}/s{self._names}.sock"

    def unused_address(self) -> str:
        """An address nobody listens on (yet)."""
        if self.carrier == "ipc":
            return self.fresh_address()
        return f"zmq+tcp://127.0.0.1:{free_port()}"

    # real endpoints

    async def serve(
        self,
        handler: Callable[[bytes], Awaitable[bytes]],
        address: str | None = None,
        **options: Any,
    ) -> ZmqServer:
        server = ZmqServer(address or self.fresh_address(), handler, ServerOptions(**options))
        await server.start()
        self._servers.append(server)
        return server

    def client(self, address: str, **options: Any) -> ZmqClient:
        client = ZmqClient(address, ClientOptions(**options))
        self._clients.append(client)
        return client

    # raw endpoints, on a context of their own

    def raw_socket(self, socket_type: int, **options: int) -> zmq.asyncio.Socket:
        if self._context is None:
            self._context = zmq.asyncio.Context()
        raw = self._context.socket(socket_type)
        raw.setsockopt(zmq.LINGER, 0)
        for name, value in options.items():
            raw.setsockopt(getattr(zmq, name.upper()), value)
        self._raw.append(raw)
        return raw

    def raw_router(self, **options: int) -> tuple[zmq.asyncio.Socket, str]:
        """A bound ROUTER and the node address a client reaches it by."""
        router = self.raw_socket(zmq.ROUTER, **options)
        if self.carrier == "tcp":
            router.bind("tcp://127.0.0.1:*")
        else:
            router.bind(self.fresh_address().removeprefix("zmq+"))
        return router, "zmq+" + router.getsockopt_string(zmq.LAST_ENDPOINT)

    def raw_dealer(self, address: str, **options: int) -> zmq.asyncio.Socket:
        dealer = self.raw_socket(zmq.DEALER, **options)
        dealer.connect(address.removeprefix("zmq+"))
        return dealer

    # running

    def run(self, scenario: Scenario, *, loop: str = "asyncio") -> None:
        async def main() -> None:
            try:
                async with asyncio.timeout(SCENARIO_LIMIT):
                    await scenario()
            finally:
                self._teardown()

        if loop == "uvloop":
            uvloop.run(main())
        else:
            asyncio.run(main())

    def _teardown(self) -> None:
        for client in self._clients:
            client.abort()
        for server in self._servers:
            server.abort()
        for raw in self._raw:
            raw.close(linger=0)
        if self._context is not None:
            self._context.term()


async def from_router(router: zmq.asyncio.Socket) -> tuple[bytes, Frame]:
    identity, data = await asyncio.wait_for(router.recv_multipart(), FRAME_WAIT)
    return identity, parse(data)


async def from_dealer(dealer: zmq.asyncio.Socket) -> Frame:
    return parse(await asyncio.wait_for(dealer.recv(), FRAME_WAIT))


async def from_closing_server(dealer: zmq.asyncio.Socket) -> Frame:
    """The next frame that is not a repeated GOAWAY."""
    while (frame := await from_dealer(dealer)).type == FrameType.GOAWAY:
        pass
    return frame


async def until(predicate: Callable[[], bool], timeout: float = FRAME_WAIT) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


@pytest.fixture
def socket_dir() -> Iterator[str]:
    # Short: a Unix socket path must fit in 108 bytes.
    path = tempfile.mkdtemp(prefix="pz", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["tcp", "ipc"])
def net(request: pytest.FixtureRequest, socket_dir: str) -> Iterator[Net]:
    yield Net(request.param, socket_dir)
    # Every socket was released, so the shared context (and its threads) is gone.
    assert shared_context.users == 0


@pytest.fixture
def tcp(socket_dir: str) -> Iterator[Net]:
    yield Net("tcp", socket_dir)
    assert shared_context.users == 0


@pytest.fixture
def ipc(socket_dir: str) -> Iterator[Net]:
    yield Net("ipc", socket_dir)
    assert shared_context.users == 0


# ------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_round_trip(net: Net, loop: str) -> None:
    async def scenario() -> None:
        server = await net.serve(echo)
        client = net.client(server.address)
        assert await client.call(b"hello", 1.0) == b"hello"
        assert await client.call(b"", 1.0) == b""
        assert client.connection_count == 1
        assert client.in_flight == 0

    net.run(scenario, loop=loop)


def test_the_registry_maps_both_schemes_to_the_zeromq_transport(net: Net) -> None:
    async def scenario() -> None:
        transport = transport_for(net.fresh_address())
        assert transport is ZmqTransport
        server = await transport.serve(net.fresh_address(), echo)
        net._servers.append(server)
        client = transport.client(server.address)
        net._clients.append(client)
        assert await client.call(b"via the registry", 1.0) == b"via the registry"

    net.run(scenario)


def test_a_server_on_port_zero_reports_its_real_port(tcp: Net) -> None:
    async def scenario() -> None:
        server = await tcp.serve(echo, "zmq+tcp://127.0.0.1:0")
        host, port = server.address.removeprefix("zmq+tcp://").rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0

    tcp.run(scenario)


def test_ipv6_round_trip(tcp: Net) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")

    async def scenario() -> None:
        server = await tcp.serve(echo, "zmq+tcp://[::1]:0")
        assert server.address.startswith("zmq+tcp://[::1]:")
        client = tcp.client(server.address)
        assert await client.call(b"six", 1.0) == b"six"

    tcp.run(scenario)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_200_concurrent_calls_answered_in_shuffled_order_each_get_their_own(
    net: Net, loop: str
) -> None:
    count = 200

    async def scenario() -> None:
        waiting: list[asyncio.Future[None]] = []
        answered: list[bytes] = []

        async def handler(payload: bytes) -> bytes:
            release: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiting.append(release)
            if len(waiting) == count:
                # Everyone is in: let them go in random order.
                for future in random.sample(waiting, count):
                    future.set_result(None)
            await release
            answered.append(payload)
            return b"re:" + payload

        server = await net.serve(handler)
        client = net.client(server.address)
        payloads = [f"call {i}".encode() for i in range(count)]
        results = await asyncio.gather(*(client.call(p, 2.0) for p in payloads))
        assert results == [b"re:" + p for p in payloads]
        assert sorted(answered) == sorted(payloads)
        assert answered != payloads, "the answers were not reordered"
        assert client.in_flight == 0 and server.in_flight == 0

    net.run(scenario, loop=loop)


def test_request_ids_increase_and_the_deadline_rides_in_the_header(net: Net) -> None:
    async def scenario() -> None:
        router, address = net.raw_router()
        client = net.client(address)
        calls = [client.start(b"a", 1.0), client.start(b"b", 0.5)]
        seen = [await from_router(router), await from_router(router)]
        ids = [frame.request_id for _, frame in seen]
        assert ids == [1, 2]
        assert [frame.payload for _, frame in seen] == [b"a", b"b"]
        assert 900 <= seen[0][1].deadline_ms <= 1000
        assert 400 <= seen[1][1].deadline_ms <= 500
        # Answer out of order; each call gets its own.
        for identity, frame in reversed(seen):
            await router.send_multipart([identity, encode_response(frame.request_id, b"re")])
        assert await asyncio.gather(*calls) == [b"re", b"re"]
        third = client.start(b"c", 1.0)
        identity, frame = await from_router(router)
        assert frame.request_id == 3
        await router.send_multipart([identity, encode_response(3, b"three")])
        assert await third == b"three"

    net.run(scenario)


# ------------------------------------------------------------------ deadlines, cancel


def test_deadline_fails_the_call_sends_cancel_and_the_late_answer_is_dropped(net: Net) -> None:
    async def scenario() -> None:
        router, address = net.raw_router()
        client = net.client(address)
        loop = asyncio.get_running_loop()
        started = loop.time()
        call = client.start(b"slow", 0.1)
        identity, request = await from_router(router)
        with pytest.raises(DeadlineExceeded) as failure:
            await call
        assert failure.value.sent is True
        assert 0.09 <= loop.time() - started < 0.5
        _, cancel = await from_router(router)
        assert (cancel.type, cancel.request_id) == (FrameType.CANCEL, request.request_id)
        assert client.in_flight == 0
        # The node answers anyway, then answers the next call.
        await router.send_multipart([identity, encode_response(request.request_id, b"late")])
        following = client.start(b"next", 1.0)
        _, second = await from_router(router)
        await router.send_multipart([identity, encode_response(second.request_id, b"ok")])
        assert await following == b"ok"
        assert client.late_responses == 1

    net.run(scenario)


def test_deadline_cancels_the_handler_of_a_real_server(net: Net) -> None:
    async def scenario() -> None:
        cancelled = asyncio.Event()

        async def handler(payload: bytes) -> bytes:
            if payload == b"slow":
                try:
                    await asyncio.sleep(10)
                except asyncio.CancelledError:
                    cancelled.set()
                    raise
            return payload

        server = await net.serve(handler)
        client = net.client(server.address)
        with pytest.raises(DeadlineExceeded):
            await client.call(b"slow", 0.1)
        await asyncio.wait_for(cancelled.wait(), 0.5)
        await until(lambda: server.in_flight == 0)
        assert await client.call(b"fast", 1.0) == b"fast"

    net.run(scenario)


def test_caller_cancellation_sends_cancel_to_the_handler(net: Net) -> None:
    async def scenario() -> None:
        started = asyncio.Event()
        cancelled = asyncio.Event()

        async def handler(payload: bytes) -> bytes:
            started.set()
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return payload

        server = await net.serve(handler)
        client = net.client(server.address)
        call = client.start(b"x", 5.0)
        await asyncio.wait_for(started.wait(), FRAME_WAIT)
        call.cancel()
        await until(lambda: client.in_flight == 0)
        # Only a CANCEL frame can have stopped it: its deadline is 5 s away.
        await asyncio.wait_for(cancelled.wait(), FRAME_WAIT)
        await until(lambda: server.in_flight == 0)
        # A cancelled request is not answered at all.
        await asyncio.sleep(0.05)
        assert client.late_responses == 0

    net.run(scenario)


def test_cancel_through_the_receiver_api(tcp: Net) -> None:
    async def scenario() -> None:
        router, address = tcp.raw_router()
        client = tcp.client(address)
        loop = asyncio.get_running_loop()
        receiver = FutureReceiver(loop.create_future(), loop.time() + 5.0)
        client.send(b"x", receiver)
        _, request = await from_router(router)
        client.cancel(receiver)
        _, cancel = await from_router(router)
        assert (cancel.type, cancel.request_id) == (FrameType.CANCEL, request.request_id)
        assert not receiver.future.done()

    tcp.run(scenario)


# ------------------------------------------------------------------------- errors


def test_handler_exception_is_a_remote_internal_error(net: Net) -> None:
    async def scenario() -> None:
        async def handler(payload: bytes) -> bytes:
            if payload == b"boom":
                raise ValueError("no such thing")
            return payload

        server = await net.serve(handler)
        client = net.client(server.address)
        with pytest.raises(RemoteError) as failure:
            await client.call(b"boom", 1.0)
        assert failure.value.code == ErrorCode.INTERNAL
        assert "ValueError: no such thing" in failure.value.remote_message
        assert await client.call(b"fine", 1.0) == b"fine"

    net.run(scenario)


def test_per_request_error_frames_become_call_errors(tcp: Net) -> None:
    async def scenario() -> None:
        router, address = tcp.raw_router()
        client = tcp.client(address)
        cases = [
            (ErrorCode.UNAVAILABLE, Rejected, False),
            (ErrorCode.DEADLINE_EXCEEDED, DeadlineExceeded, True),
            (ErrorCode.BAD_PAYLOAD, RemoteError, True),
            (ErrorCode.TOO_MANY_IN_FLIGHT, Overloaded, False),
        ]
        for code, kind, sent in cases:
            call = client.start(b"x", 1.0)
            identity, request = await from_router(router)
            error = ErrorInfo(code, "because").encode()
            await router.send_multipart(
                [identity, encode_frame(FrameType.ERROR, request.request_id, error)]
            )
            with pytest.raises(kind) as failure:
                await call
            assert failure.value.sent is sent, code

    tcp.run(scenario)


def test_over_max_in_flight_a_request_is_refused_alone(net: Net) -> None:
    async def scenario() -> None:
        release = asyncio.Event()

        async def handler(payload: bytes) -> bytes:
            await release.wait()
            return payload

        server = await net.serve(handler, max_in_flight=2)
        client = net.client(server.address)
        first, second = client.start(b"1", 1.0), client.start(b"2", 1.0)
        await until(lambda: server.in_flight == 2)
        with pytest.raises(Overloaded) as failure:
            await client.call(b"3", 1.0)
        assert failure.value.code == ErrorCode.TOO_MANY_IN_FLIGHT
        assert failure.value.sent is False
        release.set()
        assert await asyncio.gather(first, second) == [b"1", b"2"]
        assert await client.call(b"4", 1.0) == b"4"

    net.run(scenario)


def test_an_oversize_request_fails_at_once_unsent(net: Net) -> None:
    async def scenario() -> None:
        server = await net.serve(echo)
        client = net.client(server.address, max_frame_size=1024)
        call = client.start(b"x" * 1025, 1.0)
        assert call.done()
        with pytest.raises(RequestTooLarge) as failure:
            await call
        assert failure.value.sent is False
        assert await client.call(b"x" * 1024, 1.0) == b"x" * 1024

    net.run(scenario)


def test_a_response_over_the_servers_frame_limit_is_a_remote_error(net: Net) -> None:
    async def scenario() -> None:
        async def handler(payload: bytes) -> bytes:
            return b"y" * 2048

        server = await net.serve(handler, max_frame_size=1024)
        client = net.client(server.address)
        with pytest.raises(RemoteError) as failure:
            await client.call(b"x", 1.0)
        assert failure.value.code == ErrorCode.INTERNAL
        assert "exceeds the frame limit of 1024" in failure.value.remote_message

    net.run(scenario)


# --------------------------------------------------------------- malformed input


def garbage_messages() -> list[list[bytes]]:
    def header(version: int, frame_type: int, length: int, request_id: int) -> bytes:
        return HEADER.pack(version, frame_type, 0, length, request_id, 0)

    return [
        [b"short"],
        [header(2, 1, 1, 7) + b"x"],  # another protocol version
        [header(1, 1, 10, 7) + b"12345"],  # announces 10 bytes, carries 5
        [header(1, 1, 2, 7) + b"12345"],  # announces 2 bytes, carries 5
        [header(1, 42, 0, 7)],  # unknown frame type
        [header(1, 1, 0, 0)],  # a REQUEST without a request id
        [header(1, 3, 0, 9)],  # a PING with a request id
        [encode_request(7, b"a", 100), b"second part"],  # two parts
    ]


def test_garbage_from_a_raw_dealer_is_dropped_and_counted(net: Net) -> None:
    async def scenario() -> None:
        calls: list[bytes] = []

        async def handler(payload: bytes) -> bytes:
            calls.append(payload)
            return payload

        server = await net.serve(handler)
        dealer = net.raw_dealer(server.address)
        garbage = [*garbage_messages(), [encode_response(3, b"a server does not take these")]]
        for message in garbage:
            await dealer.send_multipart(message)
        await until(lambda: server.dropped == len(garbage))
        assert calls == []
        # The sender is told once why, with a connection-level ERROR, and no more.
        refusal = await from_dealer(dealer)
        assert refusal.request_id == 0
        assert error_of(refusal).code == ErrorCode.PROTOCOL_ERROR
        # The server keeps serving everyone, the sender of the garbage too.
        await dealer.send(encode_request(8, b"still here", 1000))
        answer = await from_dealer(dealer)
        assert (answer.type, answer.request_id, answer.payload) == (
            FrameType.RESPONSE,
            8,
            b"still here",
        )
        client = net.client(server.address)
        assert await client.call(b"others too", 1.0) == b"others too"
        assert server.dropped == len(garbage)

    net.run(scenario)


def test_a_reused_request_id_is_dropped_while_the_first_runs(net: Net) -> None:
    async def scenario() -> None:
        release = asyncio.Event()
        calls: list[bytes] = []

        async def handler(payload: bytes) -> bytes:
            calls.append(payload)
            await release.wait()
            return payload

        server = await net.serve(handler)
        dealer = net.raw_dealer(server.address)
        await dealer.send(encode_request(5, b"first", 1000))
        await until(lambda: server.in_flight == 1)
        await dealer.send(encode_request(5, b"again", 1000))
        await until(lambda: server.dropped == 1)
        release.set()
        frames = [await from_dealer(dealer), await from_dealer(dealer)]
        assert [(f.type, f.request_id) for f in frames] == [
            (FrameType.ERROR, 0),
            (FrameType.RESPONSE, 5),
        ]
        assert frames[1].payload == b"first"
        assert calls == [b"first"]

    net.run(scenario)


def test_garbage_from_a_raw_router_is_dropped_by_the_client(net: Net) -> None:
    async def scenario() -> None:
        router, address = net.raw_router()
        client = net.client(address)
        call = client.start(b"x", 1.0)
        identity, request = await from_router(router)
        garbage = [
            *garbage_messages(),
            [encode_request(request.request_id, b"a client does not take these", 100)],
            [encode_frame(FrameType.CANCEL, request.request_id)],
        ]
        for message in garbage:
            await router.send_multipart([identity, *message])
        await until(lambda: client.dropped == len(garbage))
        assert not call.done()
        await router.send_multipart([identity, encode_response(request.request_id, b"fine")])
        assert await call == b"fine"
        assert client.late_responses == 0

    net.run(scenario)


def test_a_message_over_maxmsgsize_disconnects_its_sender_only(net: Net) -> None:
    async def scenario() -> None:
        calls: list[bytes] = []

        async def handler(payload: bytes) -> bytes:
            calls.append(payload)
            return payload

        server = await net.serve(handler, max_frame_size=1024)
        dealer = net.raw_socket(zmq.DEALER)
        # The monitor must exist before the connect, or a quick connection's
        # CONNECTED event is gone before anyone listens for it.
        monitor = dealer.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        net._raw.append(monitor)
        dealer.connect(server.address.removeprefix("zmq+"))

        async def next_event() -> int:
            message = await asyncio.wait_for(recv_monitor_message(monitor), FRAME_WAIT)
            return int(message["event"])

        assert await next_event() == zmq.EVENT_CONNECTED
        # Exactly at the limit passes; one byte more is refused by ZeroMQ itself.
        await dealer.send(encode_request(1, b"x" * 1024, 1000))
        assert (await from_dealer(dealer)).payload == b"x" * 1024
        await dealer.send(encode_request(2, b"x" * 1025, 1000))
        assert await next_event() == zmq.EVENT_DISCONNECTED
        assert calls == [b"x" * 1024]
        assert server.dropped == 0  # it never reached the server's code
        client = net.client(server.address)
        assert await client.call(b"others are served", 1.0) == b"others are served"

    net.run(scenario)


# ------------------------------------------------------------- goaway, restarts


def test_goaway_on_server_close_finishes_in_flight_calls_and_refuses_new_ones(
    net: Net,
) -> None:
    async def scenario() -> None:
        started = asyncio.Event()
        release = asyncio.Event()

        async def handler(payload: bytes) -> bytes:
            started.set()
            await release.wait()
            return b"done:" + payload

        server = await net.serve(handler)
        client = net.client(server.address)
        first = client.start(b"a", 2.0)
        await asyncio.wait_for(started.wait(), FRAME_WAIT)
        closing = asyncio.ensure_future(server.close(grace=2.0))
        await asyncio.sleep(0.05)
        with pytest.raises(Rejected) as refused:
            await client.call(b"b", 1.0)
        assert refused.value.sent is False
        assert not first.done()
        release.set()
        assert await first == b"done:a"
        await asyncio.wait_for(closing, 1.0)
        assert server.connection_count == 0

    net.run(scenario)


def test_goaway_on_the_wire(net: Net) -> None:
    async def scenario() -> None:
        release = asyncio.Event()

        async def handler(payload: bytes) -> bytes:
            await release.wait()
            return payload

        server = await net.serve(handler)
        dealer = net.raw_dealer(server.address)
        await dealer.send(encode_request(5, b"running", 1000))
        await until(lambda: server.in_flight == 1)
        closing = asyncio.ensure_future(server.close(grace=2.0))
        goaway = await from_dealer(dealer)
        assert goaway.type == FrameType.GOAWAY and goaway.request_id == 0
        assert GoAwayInfo.decode(goaway.payload) == GoAwayInfo(5, "server is shutting down")
        await dealer.send(encode_request(6, b"too late", 1000))
        refused = await from_closing_server(dealer)
        assert refused.request_id == 6
        assert error_of(refused).code == ErrorCode.UNAVAILABLE
        release.set()
        answer = await from_closing_server(dealer)
        assert (answer.type, answer.request_id) == (FrameType.RESPONSE, 5)
        # The socket stays open until the client says it has read its answers,
        # and the server repeats its GOAWAY meanwhile.
        reminder = await from_dealer(dealer)
        assert reminder.type == FrameType.GOAWAY
        assert GoAwayInfo.decode(reminder.payload).last_request_id == 5
        assert not closing.done()
        await dealer.send(encode_frame(FrameType.GOAWAY, 0, GoAwayInfo(0, "done").encode()))
        await asyncio.wait_for(closing, 1.0)

    net.run(scenario)


def test_a_closing_server_does_not_wait_for_a_peer_that_has_gone(net: Net) -> None:
    async def scenario() -> None:
        server = await net.serve(echo)
        dealer = net.raw_dealer(server.address)
        await dealer.send(encode_request(1, b"x", 1000))
        assert (await from_dealer(dealer)).type == FrameType.RESPONSE
        dealer.close(linger=0)
        await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(server.close(grace=2.0), 1.0)
        assert loop.time() - started < 0.5

    net.run(scenario)


def test_a_request_to_a_closing_server_is_refused_and_goaway_repeated(net: Net) -> None:
    async def scenario() -> None:
        release = asyncio.Event()

        async def handler(payload: bytes) -> bytes:
            await release.wait()
            return payload

        server = await net.serve(handler)
        running = net.client(server.address)
        call = running.start(b"keeps it open", 2.0)
        await until(lambda: server.in_flight == 1)
        closing = asyncio.ensure_future(server.close(grace=2.0))
        # A peer the server has never seen, arriving during the close.
        dealer = net.raw_dealer(server.address)
        await dealer.send(encode_request(1, b"late", 1000))
        refused = await from_dealer(dealer)
        assert (refused.request_id, error_of(refused).code) == (1, ErrorCode.UNAVAILABLE)
        goaway = await from_dealer(dealer)
        assert goaway.type == FrameType.GOAWAY
        await dealer.send(encode_frame(FrameType.GOAWAY, 0, b""))
        release.set()
        assert await call == b"keeps it open"
        await asyncio.wait_for(closing, 1.0)

    net.run(scenario)


def test_goaway_rejects_calls_past_the_last_request_id_at_once(tcp: Net) -> None:
    async def scenario() -> None:
        router, address = tcp.raw_router()
        client = tcp.client(address)
        calls = [client.start(str(i).encode(), 2.0) for i in range(3)]
        requests = [await from_router(router) for _ in calls]
        identity = requests[0][0]
        goaway = GoAwayInfo(requests[0][1].request_id, "restart").encode()
        await router.send_multipart([identity, encode_frame(FrameType.GOAWAY, 0, goaway)])
        for call in calls[1:]:
            with pytest.raises(Rejected) as refused:
                await call
            assert refused.value.sent is False
        assert not calls[0].done()
        await router.send_multipart([identity, encode_response(1, b"kept")])
        assert await calls[0] == b"kept"
        # Nothing left unanswered: the client says so with a GOAWAY of its own.
        _, done = await from_router(router)
        assert (done.type, done.request_id) == (FrameType.GOAWAY, 0)
        # Later calls still go out: a restarted node answers them.
        later = client.start(b"later", 1.0)
        _, request = await from_router(router)
        await router.send_multipart([identity, encode_response(request.request_id, b"yes")])
        assert await later == b"yes"

    tcp.run(scenario)


def test_a_restarted_server_on_the_same_address_serves_again_within_a_second(
    net: Net,
) -> None:
    async def scenario() -> None:
        server = await net.serve(echo)
        address = server.address
        client = net.client(address)
        assert await client.call(b"before", 1.0) == b"before"
        await server.close()
        await net.serve(echo, address=address)
        loop = asyncio.get_running_loop()
        restarted_at = loop.time()
        # A request written in the instant between the old server's close and
        # the client's ZeroMQ noticing it is lost (see docs/wire.md), so try
        # again with a short budget until one goes through.
        while True:
            try:
                assert await client.call(b"after", 0.2) == b"after"
                break
            except CallError:
                assert loop.time() - restarted_at < 1.0
        assert loop.time() - restarted_at < 1.0

    net.run(scenario)


def test_a_call_made_while_no_node_is_connected_waits_for_one(net: Net) -> None:
    async def scenario() -> None:
        address = net.unused_address()
        client = net.client(address, connect_timeout=1.0)
        call = client.start(b"early", 1.5)
        await asyncio.sleep(0.2)
        assert not call.done()
        await net.serve(echo, address=address)
        assert await call == b"early"

    net.run(scenario)


def test_a_request_that_expired_unsent_never_reaches_a_node_that_comes_up_later(
    net: Net,
) -> None:
    async def scenario() -> None:
        calls: list[bytes] = []

        async def handler(payload: bytes) -> bytes:
            calls.append(payload)
            return payload

        address = net.unused_address()
        client = net.client(address)
        with pytest.raises(DeadlineExceeded) as expired:
            await client.call(b"stale", 0.1)
        assert expired.value.sent is False
        await net.serve(handler, address=address)
        assert await client.call(b"fresh", 1.5) == b"fresh"
        assert calls == [b"fresh"]

    net.run(scenario)


def test_an_unreachable_node_fails_calls_fast_after_connect_timeout(net: Net) -> None:
    async def scenario() -> None:
        address = net.unused_address()
        client = net.client(address, connect_timeout=0.2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ConnectError) as failure:
            await client.call(b"x", 2.0)
        assert failure.value.sent is False
        assert 0.15 < loop.time() - started < 0.5
        # Now known unreachable: the next call fails at once, unsent.
        call = client.start(b"y", 2.0)
        assert call.done()
        with pytest.raises(ConnectError):
            await call
        # Once a node is there, calls go through again.
        await net.serve(echo, address=address)
        while True:
            try:
                assert await client.call(b"z", 0.5) == b"z"
                break
            except ConnectError:
                await asyncio.sleep(0.02)

    net.run(scenario)


def test_ping(net: Net) -> None:
    async def scenario() -> None:
        server = await net.serve(echo)
        client = net.client(server.address)
        await client.ping(1.0)
        nowhere = net.client(net.unused_address())
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ConnectError):
            await nowhere.ping(0.2)
        assert 0.15 < loop.time() - started < 0.5

    net.run(scenario)


def test_ping_is_answered_on_the_wire(net: Net) -> None:
    async def scenario() -> None:
        server = await net.serve(echo)
        dealer = net.raw_dealer(server.address)
        await dealer.send(encode_frame(FrameType.PING, 0, b"12345678"))
        pong = await from_dealer(dealer)
        assert (pong.type, pong.request_id, pong.payload) == (FrameType.PONG, 0, b"12345678")
        # The client answers a node's PING too.
        router, address = net.raw_router()
        client = net.client(address)
        call = client.start(b"x", 1.0)
        identity, request = await from_router(router)
        await router.send_multipart([identity, encode_frame(FrameType.PING, 0, b"abc")])
        _, pong = await from_router(router)
        assert (pong.type, pong.payload) == (FrameType.PONG, b"abc")
        await router.send_multipart([identity, encode_response(request.request_id, b"y")])
        assert await call == b"y"

    net.run(scenario)


# ------------------------------------------------------------------------- closing


def test_client_close_lets_calls_finish_then_refuses_new_ones(net: Net) -> None:
    async def scenario() -> None:
        async def handler(payload: bytes) -> bytes:
            await asyncio.sleep(0.1)
            return payload

        server = await net.serve(handler)
        client = net.client(server.address)
        call = client.start(b"x", 1.0)
        await until(lambda: server.in_flight == 1)
        await asyncio.wait_for(client.close(timeout=1.0), 1.0)
        assert await call == b"x"
        assert client.connection_count == 0
        with pytest.raises(Closed):
            await client.call(b"y", 1.0)

    net.run(scenario)


def test_client_close_returns_quickly_with_undeliverable_messages_queued(net: Net) -> None:
    async def scenario() -> None:
        # A node that never reads: ZeroMQ's queues and the kernel's fill up,
        # then requests wait in the client's own queue.
        _never_reads, address = net.raw_router(rcvhwm=1)
        client = net.client(address, high_water_mark=1, max_frame_size=1 << 20)
        calls = [client.start(b"x" * (1 << 20), 5.0) for _ in range(40)]
        await asyncio.sleep(0.2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(client.close(timeout=0.2), 1.0)
        assert loop.time() - started < 0.5
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(o, (ConnectionLost, Closed)) for o in outcomes), outcomes
        assert any(isinstance(o, Closed) for o in outcomes), "nothing was left unsent"

    net.run(scenario)


def test_server_close_returns_quickly_with_undeliverable_answers(net: Net) -> None:
    async def scenario() -> None:
        async def handler(payload: bytes) -> bytes:
            return b"y" * (1 << 20)

        server = await net.serve(handler, high_water_mark=1, max_frame_size=1 << 20)
        # A client that sends and never reads.
        dealer = net.raw_dealer(server.address, rcvhwm=1)
        for request_id in range(1, 41):
            await dealer.send(encode_request(request_id, b"x", 5000))
        await until(lambda: server.undeliverable > 0)
        loop = asyncio.get_running_loop()
        started = loop.time()
        # It never answers the GOAWAY either: the grace period bounds the wait.
        await asyncio.wait_for(server.close(grace=0.3), 1.0)
        assert loop.time() - started < 0.6

    net.run(scenario)


def test_server_abort_cancels_running_handlers(net: Net) -> None:
    async def scenario() -> None:
        cancelled = asyncio.Event()

        async def handler(payload: bytes) -> bytes:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return payload

        server = await net.serve(handler)
        client = net.client(server.address)
        call = client.start(b"x", 0.3)
        await until(lambda: server.in_flight == 1)
        server.abort()
        await asyncio.wait_for(cancelled.wait(), FRAME_WAIT)
        # ZeroMQ does not say the node went; the call ends at its deadline.
        with pytest.raises(DeadlineExceeded):
            await call

    net.run(scenario)


def test_closing_everything_leaves_no_zeromq_thread_behind(tcp: Net) -> None:
    before = native_threads()

    async def scenario() -> None:
        server = await tcp.serve(echo)
        client = tcp.client(server.address)
        assert await client.call(b"x", 1.0) == b"x"
        assert native_threads() > before
        assert shared_context.users == 2
        await client.close()
        await server.close()
        assert shared_context.users == 0

    tcp.run(scenario)
    assert native_threads() == before


# --------------------------------------------------------------------------- ipc


def test_an_ipc_server_refuses_a_path_in_use_and_removes_its_file(ipc: Net) -> None:
    async def scenario() -> None:
        address = ipc.fresh_address()
        path = address.removeprefix("zmq+ipc://")
        server = await ipc.serve(echo, address=address)
        # ZeroMQ alone would unlink the live server's socket and take its path.
        with pytest.raises(ConnectError, match="in use"):
            await ipc.serve(echo, address=address)
        client = ipc.client(address)
        assert await client.call(b"still the first", 1.0) == b"still the first"
        await server.close()
        assert not os.path.exists(path)

    ipc.run(scenario)


def test_an_ipc_server_leaves_a_successors_socket_file_alone(ipc: Net) -> None:
    async def scenario() -> None:
        address = ipc.fresh_address()
        path = address.removeprefix("zmq+ipc://")
        old = await ipc.serve(echo, address=address)
        os.unlink(path)  # moved out of the way, as a deployment might
        new = await ipc.serve(echo, address=address)
        await old.close()
        assert os.path.exists(path)
        client = ipc.client(address)
        assert await client.call(b"the new one", 1.0) == b"the new one"
        await new.close()
        assert not os.path.exists(path)

    ipc.run(scenario)


def test_a_stale_ipc_socket_file_is_replaced(ipc: Net) -> None:
    async def scenario() -> None:
        address = ipc.fresh_address()
        path = address.removeprefix("zmq+ipc://")
        with socket.socket(socket.AF_UNIX) as dead:
            dead.bind(path)  # bound, never listening: what a crashed server leaves
        server = await ipc.serve(echo, address=address)
        client = ipc.client(server.address)
        assert await client.call(b"x", 1.0) == b"x"

    ipc.run(scenario)
