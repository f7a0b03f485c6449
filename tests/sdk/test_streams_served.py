"""Streamed bodies between the transports' client and a service served on a real Unix socket.

The service runs in the test's event loop (``serve``) except where its
memory is measured: there it is ``pitcher backend`` in a process of its own.
The caller is the transports' StreamClient, streaming (``send_stream``,
``stream_response=True``) or not (``client.call``, as a proxy from before
streams).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop

from pitcher_rpc.pb import pitcher_pb2
from pitcher_rpc.sdk import Service
from pitcher_rpc.sdk.asgi import AsgiService
from tests.sdk import stream_apps
from tests.sdk.streaming import Body, _Receiver, request_payload, streamed_call
from tests.sdk.test_streams import parse_event_stream
from transports.base import ServerOptions
from transports.errors import ErrorCode, RemoteError, TransportError
from transports.stream import StreamClient

MIB = 1024 * 1024

Scenario = Callable[[Any], Awaitable[None]]


def serve(
    app: Any, scenario: Scenario, options: ServerOptions | None = None, timeout: float = 20.0
) -> None:
    """Run ``scenario(client)`` against ``app`` served on a Unix socket in this loop."""

    async def main() -> None:
        with tempfile.TemporaryDirectory() as directory:
            address = f"unix://{os.path.join(directory, 's.sock')}"
            server = await app.serve(address, options)
            client = StreamClient(address)
            try:
                await scenario(client)
            finally:
                await client.close(1)
                await server.close(1)

    uvloop.run(asyncio.wait_for(main(), timeout))


async def whole(client: Any, path: bytes, query: bytes = b"") -> pitcher_pb2.Response:
    return pitcher_pb2.Response.FromString(await client.call(request_payload(path, query), 5))


# ----------------------------------------------------------------------------- whole callers


def test_a_caller_without_streams_gets_a_streamed_answer_whole() -> None:
    async def scenario(client: Any) -> None:
        answer = await whole(client, b"/big", b"mib=1&size=1")
        assert answer.status == 200 and len(answer.body) == MIB
        assert answer.body[:256] == bytes(range(256))
        assert not answer.HasField("body_size")
        events = await whole(client, b"/events")
        assert [event["data"] for event in parse_event_stream(events.body)] == [
            "hello\nworld",
            '{"n":2}',
            "bye",
        ]
        assert events.body.count(b": ping\n\n") >= 1

    serve(stream_apps.service, scenario)


def test_a_collected_answer_over_the_frame_limit_fails_as_a_too_large_one() -> None:
    async def scenario(client: Any) -> None:
        with pytest.raises(RemoteError) as failed:
            await whole(client, b"/big", b"mib=1")
        assert failed.value.code == ErrorCode.INTERNAL
        assert "exceeds the frame limit of 524288" in failed.value.remote_message
        # The next call on the same connection is served.
        assert (await whole(client, b"/buffered")).status == 200

    serve(stream_apps.service, scenario, ServerOptions(max_frame_size=512 * 1024))


def test_starlette_streaming_responses_reach_a_whole_caller_gathered() -> None:
    async def scenario(client: Any) -> None:
        answer = await whole(client, b"/numbers")
        assert answer.status == 200 and answer.body == b"0\n1\n2\n3\n4\n"
        with pytest.raises(RemoteError) as failed:
            await whole(client, b"/broken")
        assert failed.value.code == ErrorCode.INTERNAL

    serve(AsgiService(stream_apps.starlette_app), scenario)


def test_fastapi_event_streams_reach_a_whole_caller_gathered() -> None:
    if stream_apps.fastapi_app is None:
        pytest.skip("needs FastAPI with fastapi.sse")

    async def events(client: Any) -> None:
        answer = await whole(client, b"/events")
        assert answer.status == 200
        assert [(e["type"], e["data"]) for e in parse_event_stream(answer.body)] == [
            ("note", "first"),
            ("message", json.dumps({"n": 2}, separators=(",", ":"))),
        ]

    serve(AsgiService(stream_apps.fastapi_app), events)


# ----------------------------------------------------------------------------- streamed answers

WINDOW = 256 * 1024  # the transports' default initial_window
PIECE = stream_apps.PIECE


async def read_body(body: bytes | Body) -> bytes:
    return body if isinstance(body, bytes) else await body.read()


async def streamed(client: Any, path: bytes, query: bytes = b"", **kwargs: Any) -> Any:
    return await streamed_call(client, request_payload(path, query), **kwargs)


def test_a_streamed_answer_comes_in_pieces_paced_by_the_reader() -> None:
    async def scenario(client: Any) -> None:
        head, body = await streamed(client, b"/big", b"mib=16&size=1")
        assert head.status == 200 and isinstance(body, Body)
        assert head.body_size == 16 * MIB
        # Nothing read: the service stops at the caller's window.
        await asyncio.sleep(0.3)
        assert body.received <= WINDOW
        data = await body.read()
        assert len(data) == 16 * MIB and data[:256] == bytes(range(256))
        head, body = await streamed(client, b"/big", b"mib=1")
        assert not head.HasField("body_size") and len(await body.read()) == MIB

    serve(stream_apps.service, scenario)


def test_an_exception_midway_cuts_the_stream() -> None:
    async def scenario(client: Any) -> None:
        head, body = await streamed(client, b"/fail")
        assert head.status == 200 and isinstance(body, Body)
        pieces = []
        with pytest.raises(TransportError):
            async for piece in body:
                pieces.append(piece)
        assert b"".join(pieces) == b"a" * 1000 + b"b" * 1000
        # A declared size the body does not keep is cut as well.
        head, body = await streamed(client, b"/short")
        assert head.body_size == 10
        with pytest.raises(TransportError):
            await body.read()

    app = stream_apps.service
    serve(app, scenario)


def test_server_sent_events_arrive_as_they_are_made() -> None:
    async def scenario(client: Any) -> None:
        head, body = await streamed(client, b"/events")
        assert head.status == 200 and isinstance(body, Body)
        headers = dict(zip(head.header_names, head.header_values, strict=True))
        assert headers[b"content-type"] == b"text/event-stream; charset=utf-8"
        assert headers[b"cache-control"] == b"no-cache"
        pieces = body.__aiter__()
        first = await anext(pieces)
        first_at = time.monotonic()
        assert parse_event_stream(first) == [
            {"type": "greeting", "data": "hello\nworld", "id": "1", "retry": None}
        ]
        rest = b"".join([piece async for piece in pieces])
        # The first event came while the handler still paused (0.3 s), not with the rest.
        assert time.monotonic() - first_at >= 0.15
        assert rest.count(b": ping\n\n") >= 1
        events = parse_event_stream(first + rest)
        assert [(e["type"], e["data"], e["id"]) for e in events] == [
            ("greeting", "hello\nworld", "1"),
            ("message", '{"n":2}', "1"),
            ("message", "bye", "1"),
        ]
        assert events[-1]["retry"] == 2500

    serve(stream_apps.service, scenario)


# ----------------------------------------------------------------------------- streamed requests


def pieces_of(data: bytes, size: int = PIECE) -> list[bytes]:
    return [data[at : at + size] for at in range(0, len(data), size)]


def test_an_upload_is_read_as_a_stream_or_whole() -> None:
    data = os.urandom(3 * MIB + 1234)
    digest = hashlib.sha256(data).hexdigest()

    async def scenario(client: Any) -> None:
        head, body = await streamed_call(
            client, request_payload(b"/upload", method=b"PUT"), pieces_of(data)
        )
        answer = json.loads(await read_body(body))
        assert head.status == 200 and answer["size"] == len(data)
        assert answer["sha256"] == digest and answer["pieces"] > 1
        # A route that did not ask for a stream gets the body whole in request.body.
        _, body = await streamed_call(client, request_payload(b"/buffered"), pieces_of(data))
        assert json.loads(await read_body(body)) == {"size": len(data), "sha256": digest}
        # read(): the declared size is known before the body.
        _, body = await streamed_call(
            client, request_payload(b"/read", body_size=len(data)), pieces_of(data)
        )
        assert json.loads(await read_body(body)) == {"size": len(data), "declared": len(data)}

    serve(stream_apps.service, scenario)


def test_a_body_over_max_body_size_is_refused_with_413_unread() -> None:
    app = Service("small", max_body_size=MIB)
    app.route("/")(stream_apps.buffered)
    app.route("/read", stream=True)(stream_apps.read_whole)
    app.route("/stream", stream=True)(stream_apps.upload)
    data = os.urandom(2 * MIB)

    async def scenario(client: Any) -> None:
        for path in (b"/", b"/read"):
            head, body = await streamed_call(client, request_payload(path), pieces_of(data))
            assert head.status == 413 and await read_body(body) == b"request body too large\n"
        # Declared too large: refused before anything is read.
        head, _ = await streamed_call(
            client, request_payload(b"/read", body_size=len(data)), pieces_of(data)
        )
        assert head.status == 413
        # A stream has no limit.
        head, body = await streamed_call(client, request_payload(b"/stream"), pieces_of(data))
        assert json.loads(await read_body(body))["size"] == len(data)

    serve(app, scenario)


def test_a_slow_reader_holds_the_sender_back() -> None:
    stream_apps.slow_reads.clear()
    data = b"s" * (2 * MIB)

    async def scenario(client: Any) -> None:
        loop = asyncio.get_running_loop()
        receiver_head = loop.create_future()

        class Receiver:
            deadline = loop.time() + 30
            timeout = 30.0
            idempotent = False

            def on_response(self, payload: bytes) -> None:
                receiver_head.set_result(payload)

            def on_error(self, error: Exception) -> None:
                receiver_head.set_exception(error)

            def on_response_head(self, payload: bytes, body: Any) -> None:
                receiver_head.set_result(payload)

        outgoing = client.send_stream(request_payload(b"/slow"), Receiver(), False)
        written = 0
        most_ahead = 0
        writable = asyncio.Event()
        outgoing.on_writable = writable.set
        for piece in pieces_of(data):
            writable.clear()
            accepted = outgoing.write(piece)
            written += len(piece)
            read = stream_apps.slow_reads[-1] if stream_apps.slow_reads else 0
            most_ahead = max(most_ahead, written - read)
            if not accepted:
                await writable.wait()
        outgoing.end()
        answer = pitcher_pb2.Response.FromString(await receiver_head)
        assert json.loads(answer.body) == {"size": len(data)}
        print(f"sender ahead of the slow reader by at most {most_ahead} bytes")
        # The sender never got further ahead than the window (and the piece in hand).
        assert most_ahead <= WINDOW + 2 * PIECE
        assert len(stream_apps.slow_reads) >= len(data) // (WINDOW + PIECE)

    serve(stream_apps.service, scenario)


def test_an_early_answer_stops_the_upload() -> None:
    async def scenario(client: Any) -> None:
        head, body = await streamed_call(
            client, request_payload(b"/early"), pieces_of(b"e" * (8 * MIB))
        )
        assert head.status == 403 and await read_body(body) == b"no\n"
        # The connection still serves.
        assert (await whole(client, b"/buffered")).status == 200

    serve(stream_apps.service, scenario)


# ----------------------------------------------------------------------------- ASGI


def test_starlette_apps_stream_both_ways() -> None:
    data = os.urandom(MIB + 7)

    async def scenario(client: Any) -> None:
        head, body = await streamed(client, b"/numbers", b"count=50")
        assert head.status == 200 and isinstance(body, Body)
        assert await body.read() == b"".join(b"%d\n" % n for n in range(50))
        head, body = await streamed(client, b"/big", b"mib=8")
        assert isinstance(body, Body)
        await asyncio.sleep(0.2)
        assert body.received <= WINDOW  # the app is held back by the reader
        assert len(await body.read()) == 8 * MIB
        head, body = await streamed(client, b"/broken")
        with pytest.raises(TransportError):
            await body.read()
        head, body = await streamed_call(
            client,
            request_payload(b"/upload", method=b"POST", body_size=len(data)),
            pieces_of(data),
        )
        answer = json.loads(await read_body(body))
        assert answer["size"] == len(data) and answer["pieces"] > 1
        assert answer["sha256"] == hashlib.sha256(data).hexdigest()
        assert answer["content_length"] == str(len(data))
        head, body = await streamed_call(
            client, request_payload(b"/whole", method=b"POST"), pieces_of(data)
        )
        assert json.loads(await read_body(body)) == {"size": len(data)}

    serve(AsgiService(stream_apps.starlette_app), scenario)


def test_fastapi_event_source_response_streams() -> None:
    if stream_apps.fastapi_app is None:
        pytest.skip("needs FastAPI with fastapi.sse")

    async def events(client: Any) -> None:
        head, body = await streamed(client, b"/events")
        assert head.status == 200
        parsed = parse_event_stream(await read_body(body))
        assert [(e["type"], e["data"], e["id"]) for e in parsed] == [
            ("note", "first", "a1"),
            ("message", '{"n":2}', "a1"),
        ]

    serve(AsgiService(stream_apps.fastapi_app), events)


# ----------------------------------------------------------------------------- memory


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_100_mib_streamed_answer_keeps_the_service_small() -> None:
    from tests.proxy.conftest import Process, pitcher_command, wait_until

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with tempfile.TemporaryDirectory() as directory:
        address = f"unix://{os.path.join(directory, 'big.sock')}"
        backend = Process(
            [*pitcher_command(), "backend", "tests.sdk.stream_apps:service", "--listen", address],
            env={"STREAM_APPS_NO_ASGI": "1"},
            cwd=root,
        )
        try:
            wait_until(lambda: os.path.exists(address[len("unix://") :]), 15, "the backend")

            async def scenario() -> tuple[int, int, int]:
                client = StreamClient(address)
                try:
                    # A first answer warms the service up (imports, buffers).
                    _, body = await streamed(client, b"/big", b"mib=1")
                    await read_body(body)
                    before = peak = rss_kib(backend.pid)
                    head, body = await streamed(client, b"/big", b"mib=100&size=1", timeout=30)
                    assert head.body_size == 100 * MIB and isinstance(body, Body)
                    received = 0
                    async for piece in body:
                        received += len(piece)
                        if received % (4 * MIB) < len(piece):
                            peak = max(peak, rss_kib(backend.pid))
                    return before, peak, received
                finally:
                    await client.close(1)

            before, peak, received = uvloop.run(asyncio.wait_for(scenario(), 60))
        finally:
            backend.stop()
    growth = peak - before
    print(f"100 MiB streamed: service RSS {before} KiB before, peak {peak} KiB (+{growth} KiB)")
    assert received == 100 * MIB
    assert growth < 16 * 1024, f"the service grew by {growth} KiB for a streamed 100 MiB"


# ----------------------------------------------------------------------------- callers going away


def test_a_caller_going_away_closes_the_answer_and_stops_the_reader() -> None:
    stream_apps.ended.clear()

    async def scenario(client: Any) -> None:
        _, body = await streamed(client, b"/endless")
        assert isinstance(body, Body)
        pieces = body.__aiter__()
        for _ in range(3):
            await anext(pieces)
        body.incoming.abort()  # CANCEL: the handler's generator is closed
        await wait_for(lambda: "answer closed" in stream_apps.ended)
        loop = asyncio.get_running_loop()
        receiver = _Receiver(loop)
        outgoing = client.send_stream(request_payload(b"/reader"), receiver, False)
        outgoing.write(b"r" * PIECE)
        await asyncio.sleep(0.05)
        outgoing.abort()  # the upload's client went away
        await wait_for(lambda: any(e.startswith("reader") for e in stream_apps.ended))
        assert not receiver.head.done()  # nothing is answered to a cancelled call
        # The connection serves on.
        assert (await whole(client, b"/buffered")).status == 200

    serve(stream_apps.service, scenario)
    assert stream_apps.ended[0] == "answer closed"
    assert stream_apps.ended[1] in ("reader cancelled", "reader failed: ConnectionLost")


def test_an_asgi_stream_stops_when_its_caller_goes_away() -> None:
    stream_apps.ended.clear()

    async def scenario(client: Any) -> None:
        _, body = await streamed(client, b"/endless")
        assert isinstance(body, Body)
        pieces = body.__aiter__()
        for _ in range(3):
            await anext(pieces)
        body.incoming.abort()
        await wait_for(lambda: "asgi answer closed" in stream_apps.ended)
        assert (await whole(client, b"/numbers")).status == 200

    serve(AsgiService(stream_apps.starlette_app), scenario)


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


# ----------------------------------------------------------------------------- other paths


def test_a_traced_service_streams_and_its_span_ends_with_the_head() -> None:
    pytest.importorskip("opentelemetry.sdk.trace")
    from tests.tracing.spans import service_exporter

    exporter = service_exporter()
    app = Service("traced-streams", tracing=True)
    app.route("/big")(stream_apps.big)
    app.route("/upload", stream=True)(stream_apps.upload)
    data = os.urandom(MIB)

    async def scenario(client: Any) -> None:
        head, body = await streamed(client, b"/big", b"mib=2")
        assert head.status == 200 and isinstance(body, Body)
        assert len(await body.read()) == 2 * MIB
        # A traced stream route reads its body as it comes (in the request's span).
        _, answer = await streamed_call(client, request_payload(b"/upload"), pieces_of(data))
        assert json.loads(await read_body(answer))["size"] == len(data)
        collected = await whole(client, b"/big", b"mib=1")
        assert len(collected.body) == MIB

    serve(app, scenario)
    names = [span.name for span in exporter.get_finished_spans()]
    assert names.count("GET /big") == 2 and names.count("GET /upload") == 1


def test_a_datagram_carrier_gets_streamed_answers_whole() -> None:
    from transports.registry import transport_for

    async def main() -> None:
        server = await stream_apps.service.serve("udp://127.0.0.1:0")
        client = transport_for(server.address).client(server.address)
        try:
            answer = pitcher_pb2.Response.FromString(
                await client.call(request_payload(b"/small"), 5)
            )
            assert answer.status == 200 and answer.body == b"one two"
            # Over a datagram's frame limit: the too-large error, not a cut datagram.
            with pytest.raises(RemoteError) as failed:
                await client.call(request_payload(b"/big", b"mib=1"), 5)
            assert "exceeds the frame limit" in failed.value.remote_message
        finally:
            await client.close(1)
            await server.close(1)

    uvloop.run(asyncio.wait_for(main(), 10))


def test_zeromq_streams_both_ways() -> None:
    pytest.importorskip("zmq")
    from transports.registry import transport_for

    data = os.urandom(MIB)

    async def main() -> None:
        with tempfile.TemporaryDirectory() as directory:
            address = f"zmq+ipc://{os.path.join(directory, 'z.sock')}"
            server = await stream_apps.service.serve(address)
            client = transport_for(address).client(address)
            try:
                # The node's SETTINGS (its window) reach the client with its first answer.
                assert (await whole(client, b"/buffered")).status == 200
                head, body = await streamed(client, b"/big", b"mib=4&size=1")
                assert head.body_size == 4 * MIB and isinstance(body, Body)
                assert len(await body.read()) == 4 * MIB
                _, answer = await streamed_call(
                    client, request_payload(b"/upload"), pieces_of(data)
                )
                assert json.loads(await read_body(answer))["size"] == len(data)
            finally:
                await client.close(1)
                await server.close(1)

    uvloop.run(asyncio.wait_for(main(), 15))


def test_a_streamed_upload_s_deadline_counts_from_its_end() -> None:
    # docs/wire.md 6.3: a REQUEST with MORE has its deadline_ms counted from
    # the body's last DATA, and context.remaining() says so.
    app = Service("deadline")
    seen: dict[str, Any] = {}

    @app.route("/up", methods=["PUT"], stream=True)
    async def up(request: Any, context: Any) -> dict[str, Any]:
        size = 0
        async for chunk in request.stream():
            if not size:
                seen["first"] = context.remaining()
            size += len(chunk)
        seen["end"] = context.remaining()
        return {"size": size}

    data = os.urandom(2 * MIB)  # well over the window: the handler reads before the end

    async def scenario(client: Any) -> None:
        head, body = await streamed_call(
            client, request_payload(b"/up", method=b"PUT"), pieces_of(data), timeout=10.0
        )
        assert head.status == 200
        assert json.loads(await read_body(body)) == {"size": len(data)}

    serve(app, scenario)
    assert seen["first"] is None, seen  # no deadline while the body is still coming
    assert seen["end"] is not None and 8.0 < seen["end"] <= 10.0, seen
