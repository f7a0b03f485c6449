"""CPU cost of the proxy's own code per request, without sockets.

One request is driven through the real objects: an HTTP connection receives
the request bytes, the exchange encodes it and writes a frame on a backend
connection, the backend connection receives the response frame and the HTTP
response is written. The transports are stand-ins that only keep what is
written, so what is timed is Python work only, not system calls; compare it
with the proxy's CPU time per request in bench_spine.py to see the split.

    python bench/bench_hot_path.py [--requests 200000] [--profile] [--modules N]
                                   [--with request_id,metrics,...] [--health]
    python bench/bench_hot_path.py --compare 3 [--variants "throttle,throttle (fleet)"]

Every run also times a baseline in the same process: the least an httptools +
protobuf proxy does per request (``baseline``), and prints the proxy's work
as a ratio to it.

``--modules N`` attaches N trivial modules to every request hook, to measure
what the hook dispatch costs; ``--with`` loads built-in modules (request_id,
metrics, throttle, throttle_fleet, access_log, headers, tracing, tracing_0 and
tracing_1: sampling every request or none) set to do their whole
work on every request; ``--health`` puts a health table on the cluster
(outcomes counted, balanced by health). ``--compare ROUNDS`` runs every
variant, interleaved, and prints each one's median and its ratio to the bare
core, and the fleet limit's cost against the local limit's.

``throttle_fleet`` is the throttle with the same limits shared by a fleet
through Redis (``scope = "fleet"``): the benchmark starts a redis-server of
its own on a free loopback port (stopped by its pid at the end; the variant
is left out if redis-server is not installed). A request spends a token the
worker holds; the refills run between the timed batches, as they run beside
requests in a proxy, and their own cost per refill is timed apart.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httptools
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pitcher_rpc.codec import encode_response  # noqa: E402
from pitcher_rpc.config import parse_config  # noqa: E402
from pitcher_rpc.modules import HookChains, Module  # noqa: E402
from pitcher_rpc.modules.registry import module_class  # noqa: E402
from pitcher_rpc.pb import pitcher_pb2  # noqa: E402
from pitcher_rpc.proxy.server import HttpConnection, ProxyServer  # noqa: E402
from transports.control import Settings  # noqa: E402
from transports.frame import HEADER, PREFACE, FrameType, encode_frame  # noqa: E402
from transports.frame import encode_response as encode_response_frame  # noqa: E402
from transports.stream_client import _ClientConnection  # noqa: E402

CONFIG = """
[server]
keepalive_requests = 0   # one connection carries every request of the run

[[routes]]
prefix = "/"
cluster = "echo"
business = "shop"
[clusters.echo]
nodes = ["unix:///tmp/pitcher-hot-path-never-connected.sock"]
"""
HEALTH = """
[clusters.echo.health]
slow_start = 0
"""

REQUEST = (
    b"GET /hello?name=world HTTP/1.1\r\nHost: bench.example\r\nUser-Agent: bench/1.0\r\n"
    b"Accept: */*\r\nAccept-Encoding: gzip\r\nX-Trace: abc123\r\n\r\n"
)
RESPONSE = encode_response(200, [b"content-type"], [b"text/plain"], b"hello /hello")


class SinkTransport:
    """Keeps the last write; answers the questions asyncio protocols ask."""

    def __init__(self, peer: tuple[str, int] | None = ("127.0.0.1", 40000)) -> None:
        self.last = b""
        self.writes = 0
        self._peer = peer

    def write(self, data: bytes) -> None:
        self.last = data
        self.writes += 1

    def writelines(self, chunks: list[bytes]) -> None:
        self.last = b"".join(chunks)
        self.writes += 1

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._peer if name == "peername" else default

    def close(self) -> None:
        raise AssertionError("the benchmark connection must stay open")

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _Trivial(Module):
    """Subscribes to every per-request hook and does nothing."""

    def before_cluster(self, exchange: object) -> None:
        return None

    def after_cluster(self, exchange: object) -> None:
        return None

    def backend_response(self, exchange: object) -> None:
        return None

    def request_finish(self, exchange: object) -> None:
        return None


def trivial_modules(count: int) -> list[Module]:
    return [
        # Negative priorities: never tied with a real module's.
        type(f"Trivial{n}", (_Trivial,), {"name": f"trivial{n}", "priority": -1 - n})({})
        for n in range(count)
    ]


# The Redis of the throttle_fleet variant (start_redis); None: not started.
REDIS_URL: str | None = None


def real_modules(names: list[str], scratch: str) -> list[Module]:
    """Built-in modules with settings that make them do their whole work on every request."""
    # Limits far above what the benchmark sends: every check runs, none refuses.
    throttle: dict[str, Any] = {
        "rate": 1e9,
        "concurrency": 1_000_000,
        "business": {"shop": {"rate": 1e9, "concurrency": 1_000_000, "reserved": 0.1}},
    }
    settings: dict[str, tuple[str, dict[str, Any]]] = {
        "request_id": ("request_id", {}),
        "metrics": ("metrics", {}),
        "throttle": ("throttle", throttle),
        # The same limits, their rates shared by a fleet through Redis.
        "throttle_fleet": ("throttle", {**throttle, "scope": "fleet", "redis": REDIS_URL}),
        "access_log": (
            "access_log",
            {"path": os.path.join(scratch, "access.log"), "buffer": 1_000_000},
        ),
        "headers": ("headers", {"request_set": {"x-env": "bench"}, "response_remove": ["server"]}),
        # W3C trace context on every request; spans recorded by OpenTelemetry's
        # SDK and batch processor for every request (1) or none (0), handed to
        # an exporter that drops them: the cost on the event loop, not the network's.
        "tracing": ("tracing", {"sample_ratio": 1.0}),
        "tracing_1": ("tracing", {"sample_ratio": 1.0}),
        "tracing_0": ("tracing", {"sample_ratio": 0.0}),
    }
    modules = [module_class(settings[name][0])(settings[name][1]) for name in names]
    for module in modules:
        if module.name == "tracing":
            module._span_exporter = _dropping_exporter  # type: ignore[attr-defined]
    return modules


def _dropping_exporter() -> Any:
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class Dropping(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    return Dropping()


def start_redis() -> subprocess.Popen[bytes] | None:
    """A redis-server on a free loopback port, without persistence; sets REDIS_URL."""
    global REDIS_URL
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.access(binary, os.X_OK):
        print("redis-server is not installed (apt-get install redis-server): no fleet variant")
        return None
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    scratch = tempfile.mkdtemp(prefix="pitcher-bench-redis-")
    server = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--dir", scratch],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                stop_redis(server)
                raise SystemExit("redis-server did not start") from None
            time.sleep(0.05)
    REDIS_URL = f"redis://127.0.0.1:{port}/0"
    return server


def stop_redis(server: subprocess.Popen[bytes] | None) -> None:
    if server is None:
        return
    os.kill(server.pid, signal.SIGTERM)
    try:
        server.wait(5)
    except subprocess.TimeoutExpired:
        os.kill(server.pid, signal.SIGKILL)
        server.wait()


async def fleet_ready(modules: list[Module]) -> None:
    """Wait (untimed) until every fleet limit holds its first batch."""
    deadline = time.monotonic() + 10
    for module in modules:
        numbers = module.stats().get("fleet")
        while numbers and not all(limit["refills"] for limit in numbers["limits"].values()):
            if time.monotonic() > deadline:
                raise SystemExit(f"no tokens from Redis: {numbers}")
            await asyncio.sleep(0.01)
            numbers = module.stats().get("fleet")


async def refill_cost(rounds: int = 2000) -> float:
    """µs of this process's CPU per refill round trip (3 buckets, as the variant has)."""
    from pitcher_rpc.degrade.limits import FleetBucket
    from pitcher_rpc.fleet.redis_limits import RedisLimits

    assert REDIS_URL is not None
    now = time.monotonic()
    buckets = [FleetBucket(f"cost{n}", 1e9, 1e9, now, max_batch=10) for n in range(3)]
    limits = RedisLimits(REDIS_URL, "pitcher-bench", buckets, 1.0)
    await limits.aclose()  # its loop is not needed: the calls are made here, one by one
    refills = limits._refills
    start = time.process_time()
    for _ in range(rounds):
        await limits._call(refills, False)
    cost = (time.process_time() - start) / rounds * 1e6
    client = limits._client
    if client is not None:
        await client.aclose()
    return cost


async def run(requests: int, profile: bool, modules: list[Module], health: bool = False) -> float:
    """The median µs per request over five batches."""
    config = CONFIG + (HEALTH if health else "")
    proxy = ProxyServer(parse_config(config), modules=HookChains(modules))
    await fleet_ready(modules)
    node = proxy.snapshot.clusters["echo"].nodes[0]
    client: Any = node.client
    loop = asyncio.get_running_loop()
    backend = _ClientConnection(client, loop)
    backend_transport = SinkTransport(None)
    backend.connection_made(backend_transport)  # type: ignore[arg-type]
    settings = Settings(4 * 1024 * 1024, 100000).encode()
    backend.data_received(PREFACE + encode_frame(FrameType.SETTINGS, 0, settings))
    client._connections.append(backend)

    http = HttpConnection(proxy)
    http_transport = SinkTransport()
    http.connection_made(http_transport)  # type: ignore[arg-type]

    def one(request_id: int) -> None:
        http.data_received(REQUEST)
        backend.data_received(encode_response_frame(request_id, RESPONSE))

    one(1)
    await asyncio.sleep(0)  # let the write batcher close its turn
    assert http_transport.last.startswith(b"HTTP/1.1 200 OK"), http_transport.last
    request_id = 2
    timings = []
    profiler = cProfile.Profile() if profile else None
    for _ in range(5):
        batch = requests // 5
        if profiler:
            profiler.enable()
        start = time.perf_counter()
        for _ in range(batch):
            one(request_id)
            request_id += 1
        elapsed = time.perf_counter() - start
        if profiler:
            profiler.disable()
        timings.append(elapsed / batch * 1e6)
        # Untimed: background work (an access log's writes) catches up.
        await asyncio.sleep(0)
        while any(module.stats().get("buffered") for module in modules):
            await asyncio.sleep(0.01)
    assert http_transport.last.startswith(b"HTTP/1.1 200 OK"), http_transport.last
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
    http.transport = None
    for module in modules:
        await module.aclose()
    await proxy.stop(0.0)
    return statistics.median(timings)


class _MinimalRequest:
    """What a minimal httptools proxy keeps of a request: its callbacks and nothing else."""

    __slots__ = ("body", "names", "url", "values")

    def __init__(self) -> None:
        self.url = b""
        self.names: list[bytes] = []
        self.values: list[bytes] = []
        self.body = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.names.append(name.lower())
        self.values.append(value)

    def on_body(self, body: bytes) -> None:
        self.body += body


def baseline(requests: int) -> float:
    """µs per request of a minimal httptools + protobuf path, the median of five batches.

    The same request bytes and response payload as run(): parse with httptools
    into a minimal callback object, encode the Request with the generated
    class and frame it, frame and decode the Response (run() pays for making
    the response frame too) and build the HTTP response bytes. No routing, no
    header rules, no modules, no sockets: the floor the proxy's Python work is
    compared with.
    """
    sink = _MinimalRequest()
    parser = httptools.HttpRequestParser(sink)
    new_request = pitcher_pb2.Request
    parse_response = pitcher_pb2.Response.FromString
    pack = HEADER.pack
    unpack_from = HEADER.unpack_from
    date = b"date: Thu, 01 Jan 2026 00:00:00 GMT\r\n"
    written: list[bytes] = []

    def one(request_id: int) -> None:
        sink.url = b""
        names = sink.names = []
        values = sink.values = []
        sink.body = b""
        parser.feed_data(REQUEST)
        path, _, query = sink.url.partition(b"?")
        names += (b"x-forwarded-for", b"x-forwarded-proto")
        values += (b"127.0.0.1", b"http")
        payload = new_request(
            method=parser.get_method(),
            path=path,
            query=query,
            header_names=names,
            header_values=values,
            body=sink.body,
            route="echo",
            client="127.0.0.1:40000",
        ).SerializeToString()
        written.append(pack(1, 1, 0, len(payload), request_id, 10000) + payload)
        frame = encode_response_frame(request_id, RESPONSE)
        _, _, _, length, _, _ = unpack_from(frame, 0)
        response = parse_response(frame[20 : 20 + length])
        lines = [b"HTTP/1.1 200 OK\r\n"]
        for name, value in zip(response.header_names, response.header_values, strict=True):
            lines += (name, b": ", value, b"\r\n")
        body = response.body
        keep = b"" if parser.should_keep_alive() else b"connection: close\r\n"
        lines += (date, b"content-length: %d\r\n" % len(body), keep, b"\r\n", body)
        written.append(b"".join(lines))

    one(1)
    assert written[-1].startswith(b"HTTP/1.1 200 OK") and written[-1].endswith(b"hello /hello")
    timings = []
    request_id = 2
    for _ in range(5):
        batch = requests // 5
        start = time.perf_counter()
        for _ in range(batch):
            one(request_id)
            request_id += 1
        timings.append((time.perf_counter() - start) / batch * 1e6)
        written.clear()
    return statistics.median(timings)


VARIANTS: dict[str, tuple[list[str], int, bool]] = {
    # name: (built-in modules, trivial modules, health table on the cluster)
    "core": ([], 0, False),
    "5 trivial modules": ([], 5, False),
    "request_id": (["request_id"], 0, False),
    "metrics": (["metrics"], 0, False),
    "throttle": (["throttle"], 0, False),
    "throttle (fleet)": (["throttle_fleet"], 0, False),
    "access_log": (["access_log"], 0, False),
    "node health": ([], 0, True),
    "tracing (sampled 0)": (["tracing_0"], 0, False),
    "tracing (sampled 1)": (["tracing_1"], 0, False),
    "bench_pair's E": (["request_id", "metrics", "throttle", "access_log"], 0, False),
    "all of them": (["request_id", "metrics", "throttle", "access_log", "headers"], 0, True),
}


async def compare(requests: int, rounds: int, only: list[str] | None = None) -> None:
    """Every variant (or those in ``only``), interleaved, ``rounds`` times; medians, ratios."""
    variants = {
        name: variant
        for name, variant in VARIANTS.items()
        if (REDIS_URL is not None or "throttle_fleet" not in variant[0])
        and (not only or name in only or name == "core")
    }
    results: dict[str, list[float]] = {name: [] for name in variants}
    floors: list[float] = []
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(rounds):
            floors.append(baseline(requests))
            for name, (names, trivial, health) in variants.items():
                modules = real_modules(names, scratch) + trivial_modules(trivial)
                results[name].append(await run(requests, False, modules, health))
    core = statistics.median(results["core"])
    floor = statistics.median(floors)
    print(f"proxy hot path, µs per request (median of {rounds} runs, each a median of 5 batches)")
    print(f"  {'baseline':18} {floor:6.2f}  minimal httptools + protobuf path, same run")
    for name, values in results.items():
        median = statistics.median(values)
        print(
            f"  {name:18} {median:6.2f}  {median / core:5.2f}x  (+{median - core:.2f})"
            f"  {median / floor:5.2f}x baseline"
        )
    if "throttle (fleet)" in results:
        local_whole = statistics.median(results["throttle"])
        fleet_whole = statistics.median(results["throttle (fleet)"])
        local, fleet = local_whole - core, fleet_whole - core
        print(
            f"fleet limit vs local limit, the module's own µs per request (over the core):"
            f" {fleet:.2f} vs {local:.2f}, ratio {fleet / local:.2f}"
            f" (whole request: {fleet_whole / local_whole:.3f}x)"
        )
        cost = await refill_cost()
        # A worker asks for 50 ms of its demand at a time: at most ~20 refills a second.
        print(
            f"a refill (one EVALSHA round trip for 3 limits) costs {cost:.0f} µs of CPU; a worker"
            f" makes at most about 20 a second, whatever its load: {cost * 20 / 1e4:.2f}% of a"
            f" core, {cost * 20 / 1e4:.2f} µs per request at 10k req/s per worker"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--modules", type=int, default=0, help="trivial modules on every hook")
    parser.add_argument(
        "--with", dest="real", default="", help="built-in modules, e.g. metrics,throttle"
    )
    parser.add_argument("--health", action="store_true", help="a health table on the cluster")
    parser.add_argument(
        "--compare", type=int, metavar="ROUNDS", help="every variant, interleaved, ROUNDS times"
    )
    parser.add_argument(
        "--variants",
        default="",
        help='with --compare: only these (and the core), e.g. "throttle,throttle (fleet)"',
    )
    args = parser.parse_args()
    names = [name for name in args.real.split(",") if name]
    only = [name for name in args.variants.split(",") if name]
    unknown = set(only) - set(VARIANTS)
    if unknown:
        parser.error(f"no variant {sorted(unknown)[0]!r}; known: {', '.join(VARIANTS)}")
    fleet = "throttle (fleet)" in only if only else bool(args.compare)
    redis = start_redis() if fleet or "throttle_fleet" in names else None
    # SIGTERM ends a run as Ctrl-C does, so the redis-server is stopped too.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if args.compare:
            uvloop.run(compare(args.requests, args.compare, only))
            return
        with tempfile.TemporaryDirectory() as scratch:
            floor = baseline(args.requests)

            async def timed() -> float:
                # Modules made inside the loop: a fleet limit starts its refills there.
                modules = real_modules(names, scratch) + trivial_modules(args.modules)
                return await run(args.requests, args.profile, modules, args.health)

            median = uvloop.run(timed())
    finally:
        stop_redis(redis)
    loaded = ", ".join([*names, f"{args.modules} trivial modules"] + (["health"] * args.health))
    print(f"proxy hot path with {loaded}: {median:.2f} µs per request (median of 5 batches)")
    print(
        f"minimal httptools + protobuf baseline, same run: {floor:.2f} µs per request;"
        f" the proxy's Python work is {median / floor:.2f}x the baseline"
    )


if __name__ == "__main__":
    main()
