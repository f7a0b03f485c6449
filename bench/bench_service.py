"""CPU cost of a split service's own code per request, without sockets.

Request frames are fed into the stream server's connection protocol
(``_ServerConnection.data_received``) in batches of 1 and of 16 frames, one
batch per event-loop turn as a socket would deliver them; the transport is a
sink that keeps what is written, and the answers are counted afterwards. So
what is timed is Python work only (CPU time of this process), not system
calls. Four variants, interleaved, in the same run:

* ``minimal``: the yardstick, a bare asyncio protocol that cuts frames with
  ``struct``, decodes the Request with the generated protobuf class, builds
  the SDK echo's JSON dict, ``json.dumps``, encodes a Response with the
  generated class, frames it and writes once per batch;
* ``server+raw``: the same handler as a plain transport handler behind the
  real stream server connection (what the transport costs on its own);
* ``sdk echo``: ``pitcher_rpc.sdk.echo:app``, as ``pitcher backend`` runs it;
* ``minimal+sdk codecs``: the yardstick with the SDK's JSON encoder and its
  Response written by hand, to tell what of the SDK's figure is encoders and
  what is the framework around them.

All of them must answer byte-identical payloads; the script checks it first.

``--codec`` times instead each function of ``pitcher_rpc.codec`` against the
other way of doing the same work (generated upb classes, or bytes by hand),
for a request of 5 and of 20 headers: the numbers in codec.py's docstring.

``--live`` measures real processes instead: the SDK echo as ``pitcher
backend`` runs it (from each ``--roots`` source tree, e.g. a checkout of the
code before a change and this one) and the minimal echo above, each on a Unix
socket, loaded in turn by one StreamClient connection from this process
keeping 64 calls in flight; a server's CPU time (utime + stime from
/proc/PID/stat) over a 5-second window, divided by the answers in it. Run it
on a machine doing nothing else.

    python bench/bench_service.py [--requests 20000] [--rounds 5] [--profile VARIANT]
    python bench/bench_service.py --codec [--rounds 15]
    python bench/bench_service.py --live [--roots DIR,DIR] [--rounds 3] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import cProfile
import json
import os
import pstats
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pitcher_rpc import codec  # noqa: E402
from pitcher_rpc.pb import pitcher_pb2  # noqa: E402
from pitcher_rpc.sdk.echo import app as echo_app  # noqa: E402
from pitcher_rpc.sdk.service import json_bytes  # noqa: E402
from transports.base import ClientOptions, ServerOptions  # noqa: E402
from transports.control import Settings  # noqa: E402
from transports.errors import TransportError  # noqa: E402
from transports.frame import HEADER, PREFACE, FrameType, encode_frame, encode_request  # noqa: E402
from transports.stream_server import StreamServer, _ServerConnection  # noqa: E402

HEADERS_5 = [
    (b"host", b"bench.example"),
    (b"user-agent", b"bench/1.0"),
    (b"accept", b"*/*"),
    (b"x-forwarded-for", b"127.0.0.1"),
    (b"x-request-id", b"3f9c2a71d0b4-1"),
]
HEADERS_20 = [
    *HEADERS_5,
    (b"accept-encoding", b"gzip, deflate, br"),
    (b"accept-language", b"en-GB,en;q=0.9,fr;q=0.8"),
    (b"cache-control", b"no-cache"),
    (b"cookie", b"session=8a7d6c5b4e3f2a1b; theme=dark; lang=en"),
    (b"referer", b"https://bench.example/catalogue/items?page=2"),
    (b"x-forwarded-proto", b"http"),
    (b"x-tenant", b"shop"),
    (b"x-trace", b"abc123def456"),
    (b"sec-fetch-mode", b"navigate"),
    (b"sec-fetch-site", b"same-origin"),
    (b"sec-fetch-dest", b"document"),
    (b"upgrade-insecure-requests", b"1"),
    (b"dnt", b"1"),
    (b"pragma", b"no-cache"),
    (b"x-client-version", b"4.2.1"),
]


def request_payload(headers: list[tuple[bytes, bytes]]) -> bytes:
    message = pitcher_pb2.Request(
        method=b"GET",
        path=b"/hello",
        query=b"name=world",
        header_names=[name for name, _ in headers],
        header_values=[value for _, value in headers],
        route="echo",
        client="127.0.0.1:40000",
    )
    return message.SerializeToString()


class SinkTransport:
    """Keeps every write; answers the questions asyncio protocols ask."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def close(self) -> None:
        raise AssertionError("the benchmark connection must stay open")

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def take_frames(self) -> list[tuple[int, int, bytes]]:
        """(type, request id, payload) of every frame written since the last call."""
        data = b"".join(self.chunks)
        self.chunks = []
        frames = []
        pos = 0
        while pos < len(data):
            _, kind, _, length, request_id, _ = HEADER.unpack_from(data, pos)
            pos += HEADER.size
            frames.append((kind, request_id, data[pos : pos + length]))
            pos += length
        assert pos == len(data), "a frame was cut short"
        return frames


# ----------------------------------------------------------------------------- the yardstick

_Request = pitcher_pb2.Request
_Response = pitcher_pb2.Response
_pack = HEADER.pack
_unpack = HEADER.unpack_from
_HEADER_SIZE = HEADER.size
_dumps = json.dumps


def minimal_answer(payload: bytes) -> bytes:
    """The SDK echo's answer, written as directly as the generated classes allow."""
    request = _Request.FromString(payload)
    raw = request.body
    try:
        body = raw.decode("utf-8")
        encoding = "utf-8"
    except UnicodeDecodeError:
        body = base64.b64encode(raw).decode()
        encoding = "base64"
    document = {
        "method": request.method.decode("latin-1"),
        "path": request.path.decode("latin-1"),
        "query": request.query.decode("latin-1"),
        "headers": [
            (n.decode("latin-1"), v.decode("latin-1"))
            for n, v in zip(request.header_names, request.header_values, strict=True)
        ],
        "body": body,
        "body_encoding": encoding,
        "route": request.route,
        "client": request.client,
    }
    response = _Response(
        status=200,
        header_names=[b"content-type"],
        header_values=[b"application/json"],
        body=_dumps(document).encode(),
    )
    return response.SerializeToString()


_JSON_HEAD = codec.response_head(200, [b"content-type"], [b"application/json"])


def minimal_fast_answer(payload: bytes) -> bytes:
    """minimal_answer with the SDK's encoders: its C JSON encoder, a Response head made once."""
    request = _Request.FromString(payload)
    raw = request.body
    try:
        body = raw.decode("utf-8")
        encoding = "utf-8"
    except UnicodeDecodeError:
        body = base64.b64encode(raw).decode()
        encoding = "base64"
    document = {
        "method": request.method.decode("latin-1"),
        "path": request.path.decode("latin-1"),
        "query": request.query.decode("latin-1"),
        "headers": [
            (n.decode("latin-1"), v.decode("latin-1"))
            for n, v in zip(request.header_names, request.header_values, strict=True)
        ],
        "body": body,
        "body_encoding": encoding,
        "route": request.route,
        "client": request.client,
    }
    return codec.with_body(_JSON_HEAD, json_bytes(document))


class MinimalEcho(asyncio.Protocol):
    """A frame echo with nothing but the work: no limits, no tasks, no control frames."""

    def __init__(self, answer: Callable[[bytes], bytes] = minimal_answer) -> None:
        self.answer = answer
        self.transport: Any = None
        self.buffer = b""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.buffer:
            data = self.buffer + data
        out = []
        pos = 0
        end = len(data)
        while end - pos >= _HEADER_SIZE:
            _, kind, _, length, request_id, _ = _unpack(data, pos)
            stop = pos + _HEADER_SIZE + length
            if stop > end:
                break
            if kind == 1:
                answer = self.answer(data[pos + _HEADER_SIZE : stop])
                out.append(_pack(1, 2, 0, len(answer), request_id, 0))
                out.append(answer)
            pos = stop
        self.buffer = data[pos:]
        if out:
            self.transport.write(b"".join(out))


async def raw_handler(payload: bytes) -> bytes:
    return minimal_answer(payload)


# ----------------------------------------------------------------------------- the run


def make_connection(variant: str, loop: asyncio.AbstractEventLoop) -> tuple[Any, SinkTransport]:
    sink = SinkTransport()
    if variant.startswith("minimal"):
        protocol: Any = MinimalEcho(minimal_answer if variant == "minimal" else minimal_fast_answer)
        protocol.connection_made(sink)
        return protocol, sink
    # The SDK's transport handler, as Service.serve passes it. It may answer bytes
    # at once, which HandlerRunner takes but transports.base.Handler does not say yet.
    handler: Any = raw_handler if variant == "server+raw" else echo_app.respond
    server = StreamServer("unix:///tmp/pitcher-bench-service-never-bound.sock", handler)
    server.options = ServerOptions(max_in_flight=1_000_000)
    protocol = _ServerConnection(server, loop)
    protocol.connection_made(sink)
    protocol.data_received(PREFACE)
    sink.chunks.clear()  # the server's preface and SETTINGS
    return protocol, sink


async def measure(variant: str, payload: bytes, batch: int, requests: int, profile: bool) -> float:
    """CPU µs per request for ``requests`` requests fed ``batch`` frames at a time."""
    loop = asyncio.get_running_loop()
    protocol, sink = make_connection(variant, loop)
    batches = max(1, requests // batch)
    # Request ids must grow on a connection: every batch is built before the clock starts.
    chunks = [
        b"".join(encode_request(n * batch + k + 1, payload, 0) for k in range(batch))
        for n in range(batches)
    ]
    feed = protocol.data_received
    sleep = asyncio.sleep
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        profiler.enable()
    start = time.process_time()
    for chunk in chunks:
        feed(chunk)
        await sleep(0)  # the loop turn ends: batched writes go out
    elapsed = time.process_time() - start
    if profiler is not None:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    frames = sink.take_frames()
    assert len(frames) == batches * batch, (variant, len(frames), batches * batch)
    assert all(kind == 2 for kind, _, _ in frames), variant
    return elapsed / (batches * batch) * 1e6


async def check_same_answers(payload: bytes) -> None:
    answers = {}
    for variant in VARIANTS:
        protocol, sink = make_connection(variant, asyncio.get_running_loop())
        protocol.data_received(encode_request(1, payload, 0))
        await asyncio.sleep(0)
        (frame,) = sink.take_frames()
        answers[variant] = _Response.FromString(frame[2])
    first = answers["minimal"]
    for variant, answer in answers.items():
        assert answer == first, f"{variant} answers differently:\n{answer}\n{first}"
    assert json.loads(first.body)["path"] == "/hello"


VARIANTS = ("minimal", "server+raw", "sdk echo", "minimal+sdk codecs")


async def compare(requests: int, rounds: int, profile: str | None) -> None:
    payloads = {5: request_payload(HEADERS_5), 20: request_payload(HEADERS_20)}
    for payload in payloads.values():
        await check_same_answers(payload)
    if profile:
        for headers, payload in payloads.items():
            print(f"--- {profile}, {headers} headers, batches of 16")
            await measure(profile, payload, 16, requests, True)
        return
    cases = [(headers, batch) for headers in payloads for batch in (1, 16)]
    results: dict[tuple[int, int, str], list[float]] = {}
    for _ in range(rounds):
        for headers, batch in cases:
            for variant in VARIANTS:
                value = await measure(variant, payloads[headers], batch, requests, False)
                results.setdefault((headers, batch, variant), []).append(value)
    print(
        f"split service, CPU µs per request (median of {rounds} rounds of {requests} requests);"
        " ratio to minimal"
    )
    print(f"  {'headers':>7} {'batch':>5}  " + "  ".join(f"{v:>16}" for v in VARIANTS))
    for headers, batch in cases:
        base = statistics.median(results[(headers, batch, "minimal")])
        cells = []
        for variant in VARIANTS:
            median = statistics.median(results[(headers, batch, variant)])
            cells.append(f"{median:7.2f} ({median / base:4.2f}x)")
        print(f"  {headers:>7} {batch:>5}  " + "  ".join(f"{c:>16}" for c in cells))


# ----------------------------------------------------------------------------- the codec


def upb_encode_request(
    method: bytes,
    path: bytes,
    query: bytes,
    names: list[bytes],
    values: list[bytes],
    body: bytes,
    route: str,
    client: str,
) -> bytes:
    return codec._encode_request_upb(method, path, query, names, values, body, route, client)


def hand_encode_request(
    method: bytes,
    path: bytes,
    query: bytes,
    names: list[bytes],
    values: list[bytes],
    body: bytes,
    route: str,
    client: str,
) -> bytes:
    # A tuple of names is always written by hand (see codec.HAND_MAX_HEADERS).
    return codec.encode_request(method, path, query, tuple(names), values, body, route, client)


def upb_decode_request_fields(payload: bytes) -> tuple[Any, ...]:
    """What a service reads of every request: the plain fields; headers stay undecoded."""
    message = codec.decode_request(payload)
    return (message.method, message.path, message.query, message.body, message.route,
            message.client)  # fmt: skip


def hand_decode_request_fields(payload: bytes) -> tuple[Any, ...]:
    """A Request read by hand in Python, as strict as codec.decode_response."""
    method = path = query = body = route = client = b""
    names: list[bytes] = []
    values: list[bytes] = []
    pos = 0
    end = len(payload)
    while pos < end:
        key = payload[pos]
        size = payload[pos + 1]
        if key >= 0x80 or key & 7 != 2 or size >= 0x80:
            raise ValueError("only the short fields of this benchmark are read here")
        pos += 2
        stop = pos + size
        if stop > end:
            raise ValueError("cut short")
        value = payload[pos:stop]
        pos = stop
        if key == 0x22:
            names.append(value)
        elif key == 0x2A:
            values.append(value)
        elif key == 0x0A:
            method = value
        elif key == 0x12:
            path = value
        elif key == 0x1A:
            query = value
        elif key == 0x32:
            body = value
        elif key == 0x3A:
            route = value
        elif key == 0x42:
            client = value
    if len(names) != len(values):
        raise ValueError("unpaired headers")
    return (method, path, query, body, route.decode(), client.decode())


def upb_encode_response(status: int, names: list[bytes], values: list[bytes], body: bytes) -> bytes:
    message = _Response()
    message.status = status
    message.header_names.extend(names)
    message.header_values.extend(values)
    if body:
        message.body = body
    return message.SerializeToString()


def upb_list_decode_response_fields(payload: bytes) -> tuple[Any, ...]:
    """What the proxy read of every response before: the generated class, lists by iteration."""
    message = _Response.FromString(payload)
    if len(message.header_names) != len(message.header_values):
        raise ValueError("unpaired headers")
    return (message.status, list(message.header_names), list(message.header_values),
            message.body)  # fmt: skip


def codec_decode_response_fields(payload: bytes) -> tuple[Any, ...]:
    message = codec.decode_response(payload)
    return (message.status, message.header_names, message.header_values, message.body)


def hand_decode_response_fields(payload: bytes) -> tuple[Any, ...]:
    """A Response read in Python: the fast path of a strict reader (short fields only)."""
    status = 0
    names: list[bytes] = []
    values: list[bytes] = []
    body = b""
    pos = 0
    end = len(payload)
    while pos < end:
        key = payload[pos]
        pos += 1
        if key == 0x08:
            status = payload[pos]
            pos += 1
            if status >= 0x80:
                status = (status & 0x7F) | payload[pos] << 7
                pos += 1
            continue
        if key & 7 != 2:
            raise ValueError("only the fields of this benchmark are read here")
        size = payload[pos]
        pos += 1
        if size >= 0x80:
            size = (size & 0x7F) | payload[pos] << 7
            pos += 1
        stop = pos + size
        if stop > end:
            raise ValueError("cut short")
        if key == 0x12:
            names.append(payload[pos:stop])
        elif key == 0x1A:
            values.append(payload[pos:stop])
        elif key == 0x22:
            body = payload[pos:stop]
        pos = stop
    if len(names) != len(values):
        raise ValueError("unpaired headers")
    return (status, names, values, body)


def time_codec(rounds: int) -> None:
    json_body = json.dumps({"hello": "world", "items": list(range(60))}).encode()
    response_names = [b"content-type", b"cache-control", b"x-request-id"]
    response_values = [b"application/json", b"no-store", b"3f9c2a71d0b4-1"]
    response = codec.encode_response(200, response_names, response_values, json_body)
    print(f"pitcher_rpc.codec, µs per call (median of {rounds} runs of 5000; min)")
    for headers in (HEADERS_5, HEADERS_20):
        names = [name for name, _ in headers]
        values = [value for _, value in headers]
        arguments = (b"GET", b"/hello", b"name=world", names, values, b"", "echo", "127.0.0.1:1")
        request = codec.encode_request(*arguments)
        cases: dict[str, Callable[[], Any]] = {
            "encode_request upb": partial(upb_encode_request, *arguments),
            "encode_request hand": partial(hand_encode_request, *arguments),
            "encode_request (codec)": partial(codec.encode_request, *arguments),
            "decode_request upb": partial(upb_decode_request_fields, request),
            "decode_request hand": partial(hand_decode_request_fields, request),
        }
        if headers is HEADERS_5:
            cases |= {
                "encode_response upb": partial(
                    upb_encode_response, 200, response_names, response_values, json_body
                ),
                "encode_response hand (codec)": partial(
                    codec.encode_response, 200, response_names, response_values, json_body
                ),
                "decode_response upb, list()": partial(upb_list_decode_response_fields, response),
                "decode_response upb, [:] (codec)": partial(codec_decode_response_fields, response),
                "decode_response hand": partial(hand_decode_response_fields, response),
            }
        assert upb_encode_request(*arguments) == hand_encode_request(*arguments)
        assert upb_decode_request_fields(request) == hand_decode_request_fields(request)
        assert (
            upb_list_decode_response_fields(response)
            == codec_decode_response_fields(response)
            == hand_decode_response_fields(response)
        )
        timings: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(rounds):
            for name, call in cases.items():
                timings[name].append(timeit.timeit(call, number=5000) / 5000 * 1e6)
        print(f"  request with {len(headers)} headers (responses: 3 headers, {len(json_body)} B)")
        for name, values_ in timings.items():
            print(f"    {name:34} {statistics.median(values_):6.2f}  ({min(values_):.2f})")


# ----------------------------------------------------------------------------- live


class LiveMinimalEcho(MinimalEcho):
    """The minimal echo with the stream handshake a StreamClient needs: preface and SETTINGS."""

    def __init__(self) -> None:
        super().__init__()
        self.preface_left = len(PREFACE)

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        settings = Settings(4 * 1024 * 1024, 100_000).encode()
        transport.write(PREFACE + encode_frame(FrameType.SETTINGS, 0, settings))

    def data_received(self, data: bytes) -> None:
        if self.preface_left:
            taken = min(self.preface_left, len(data))
            self.preface_left -= taken
            data = data[taken:]
        if data:
            super().data_received(data)


async def serve_minimal(address: str) -> None:
    loop = asyncio.get_running_loop()
    path = address.removeprefix("unix://")
    server = await loop.create_unix_server(LiveMinimalEcho, path)
    stop = asyncio.Event()
    for signum in (15, 2):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.close()


class Caller:
    """One call always in flight: each answer sends the next request until told to stop."""

    __slots__ = ("client", "deadline", "errors", "idempotent", "load", "payload")

    def __init__(self, load: Load, client: Any, payload: bytes, deadline: float) -> None:
        self.load = load
        self.client = client
        self.payload = payload
        self.deadline = deadline
        self.idempotent = False
        self.errors = 0

    def on_response(self, payload: bytes) -> None:
        load = self.load
        load.answers += 1
        if load.running:
            self.client.send(self.payload, self)
        else:
            load.in_flight -= 1

    def on_error(self, error: TransportError) -> None:
        self.errors += 1
        self.load.in_flight -= 1


class Load:
    __slots__ = ("answers", "in_flight", "running")

    def __init__(self) -> None:
        self.answers = 0
        self.in_flight = 0
        self.running = True


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


async def load_once(
    address: str, pid: int, payload: bytes, in_flight: int, seconds: float
) -> tuple[float, float, float]:
    """Server CPU µs per answer (user, system), answers per second, over ``seconds``."""
    from transports.stream import StreamClient

    loop = asyncio.get_running_loop()
    client = StreamClient(address, ClientOptions(max_connections=1))
    load = Load()
    deadline = loop.time() + seconds + 30
    callers = [Caller(load, client, payload, deadline) for _ in range(in_flight)]
    try:
        for caller in callers:
            load.in_flight += 1
            client.send(payload, caller)
        await asyncio.sleep(1.0)  # warm-up: connection made, caches and allocator settled
        answers, (user, system), started = load.answers, cpu_seconds(pid), loop.time()
        await asyncio.sleep(seconds)
        answers = load.answers - answers
        user_after, system_after = cpu_seconds(pid)
        user, system = user_after - user, system_after - system
        elapsed = loop.time() - started
        load.running = False
        for _ in range(500):  # bounded: the calls in flight come back
            if not load.in_flight:
                break
            await asyncio.sleep(0.01)
        errors = sum(caller.errors for caller in callers)
        assert not errors, f"{errors} calls failed on {address}"
    finally:
        await client.close(1.0)
    return user / answers * 1e6, system / answers * 1e6, answers / elapsed


def start_server(command: list[str], cwd: str, address: str) -> subprocess.Popen[bytes]:
    environment = dict(os.environ, PYTHONPATH=cwd)
    process = subprocess.Popen(command, cwd=cwd, env=environment)
    path = address.removeprefix("unix://")
    for _ in range(200):  # at most 10 s to start listening
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            return process
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"{command} exited with {process.returncode}") from None
            time.sleep(0.05)
        finally:
            probe.close()
    stop_server(process)
    raise RuntimeError(f"{command} did not listen on {address}")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def live(roots: list[str], rounds: int, seconds: float, in_flight: int) -> None:
    scratch = tempfile.mkdtemp(prefix="pitcher-bench-service-")
    servers: dict[str, tuple[str, subprocess.Popen[bytes]]] = {}
    try:
        address = f"unix://{scratch}/minimal.sock"
        command = [sys.executable, str(Path(__file__).resolve()), "--serve-minimal", address]
        servers["minimal"] = (address, start_server(command, str(ROOT), address))
        for number, root in enumerate(roots):
            address = f"unix://{scratch}/sdk{number}.sock"
            command = [sys.executable, "-m", "pitcher_rpc.cli", "backend"]
            command += ["pitcher_rpc.sdk.echo:app", "--listen", address]
            servers[f"sdk echo @ {root}"] = (address, start_server(command, root, address))
        payloads = {5: request_payload(HEADERS_5), 20: request_payload(HEADERS_20)}
        results: dict[tuple[int, str], list[tuple[float, float, float]]] = {}
        for _ in range(rounds):
            for headers, payload in payloads.items():
                for name, (address, process) in servers.items():
                    outcome = uvloop.run(
                        load_once(address, process.pid, payload, in_flight, seconds)
                    )
                    results.setdefault((headers, name), []).append(outcome)
    finally:
        for _, process in servers.values():
            stop_server(process)
        for entry in os.listdir(scratch):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(scratch, entry))
        os.rmdir(scratch)
    print(
        f"split service processes, {in_flight} calls in flight on one connection,"
        f" {seconds:g} s windows, median of {rounds} rounds"
    )
    print(
        f"  {'headers':>7}  {'server':44} {'CPU µs/req':>10} {'ratio':>6}"
        f" {'user':>6} {'system':>6} {'req/s':>7}"
    )
    for headers in payloads:
        base = statistics.median(user + system for user, system, _ in results[(headers, "minimal")])
        for name in servers:
            outcomes = results[(headers, name)]
            cpu = statistics.median(user + system for user, system, _ in outcomes)
            user = statistics.median(user for user, _, _ in outcomes)
            system = statistics.median(system for _, system, _ in outcomes)
            rate = statistics.median(rate for _, _, rate in outcomes)
            print(
                f"  {headers:>7}  {name:44} {cpu:10.2f} {cpu / base:5.2f}x"
                f" {user:6.2f} {system:6.2f} {rate:7.0f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, help="default: 5, --codec 15, --live 3")
    parser.add_argument("--profile", choices=VARIANTS, help="profile one variant instead")
    parser.add_argument("--codec", action="store_true", help="time the payload codec instead")
    parser.add_argument("--live", action="store_true", help="load real server processes instead")
    parser.add_argument("--roots", default=str(ROOT), help="source trees of the SDK echo (--live)")
    parser.add_argument("--seconds", type=float, default=5.0, help="window per load (--live)")
    parser.add_argument("--in-flight", type=int, default=64, help="calls in flight (--live)")
    parser.add_argument("--serve-minimal", metavar="ADDRESS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_minimal:
        uvloop.run(serve_minimal(args.serve_minimal))
        return
    if args.live:
        live(args.roots.split(","), args.rounds or 3, args.seconds, args.in_flight)
        return
    if args.codec:
        time_codec(args.rounds or 15)
        return
    uvloop.run(compare(args.requests, args.rounds or 5, args.profile))


if __name__ == "__main__":
    main()
