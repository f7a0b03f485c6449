"""CPU cost of the proxy's own code per request, without sockets.

One request is driven through the real objects: an HTTP connection receives
the request bytes, the exchange encodes it and writes a frame on a backend
connection, the backend connection receives the response frame and the HTTP
response is written. The transports are stand-ins that only keep what is
written, so what is timed is Python work only, not system calls; compare it
with the proxy's CPU time per request in bench_spine.py to see the split.

    python bench/bench_hot_path.py [--requests 200000] [--profile] [--modules N] [--metrics]

``--modules N`` attaches N trivial modules to every request hook, to measure
what the hook dispatch costs; ``--metrics`` loads the metrics module too.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pitcher_rpc.codec import encode_response  # noqa: E402
from pitcher_rpc.config import parse_config  # noqa: E402
from pitcher_rpc.modules import HookChains, Module  # noqa: E402
from pitcher_rpc.modules.metrics import Metrics  # noqa: E402
from pitcher_rpc.proxy.server import HttpConnection, ProxyServer  # noqa: E402
from transports.control import Settings  # noqa: E402
from transports.frame import PREFACE, FrameType, encode_frame  # noqa: E402
from transports.frame import encode_response as encode_response_frame  # noqa: E402
from transports.stream_client import _ClientConnection  # noqa: E402

CONFIG = """
[[routes]]
prefix = "/"
cluster = "echo"
[clusters.echo]
nodes = ["unix:///tmp/pitcher-hot-path-never-connected.sock"]
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


def trivial_modules(count: int, metrics: bool = False) -> HookChains:
    modules: list[Module] = [
        # Negative priorities: never tied with a real module's.
        type(f"Trivial{n}", (_Trivial,), {"name": f"trivial{n}", "priority": -1 - n})({})
        for n in range(count)
    ]
    if metrics:
        modules.append(Metrics({}))
    return HookChains(modules)


async def run(requests: int, profile: bool, modules: int = 0, metrics: bool = False) -> None:
    proxy = ProxyServer(parse_config(CONFIG), modules=trivial_modules(modules, metrics))
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
        await asyncio.sleep(0)
    assert http_transport.last.startswith(b"HTTP/1.1 200 OK"), http_transport.last
    loaded = f"{modules} modules" + (" + metrics" if metrics else "")
    print(
        f"proxy hot path with {loaded}: {statistics.median(timings):.2f} µs per request"
        " (median of 5 batches)"
    )
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
    http.transport = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--modules", type=int, default=0, help="trivial modules on every hook")
    parser.add_argument("--metrics", action="store_true", help="load the metrics module")
    args = parser.parse_args()
    uvloop.run(run(args.requests, args.profile, args.modules, args.metrics))


if __name__ == "__main__":
    main()
