"""Pitcher and its SDK against the yardsticks of their own design, in one run.

Run from the repository root, on a machine doing nothing else::

    python bench/bench_pair.py
    python bench/bench_pair.py --pitcher-root ../pitcher-before   # another checkout, same way
    python bench/bench_pair.py --setups D,E --cases 64x5 --rounds 1 --seconds 3
    python bench/bench_pair.py --setups A,P,D --cases 64x5,1x5   # the two builds and nginx
    python bench/bench_pair.py --check

Six setups, each an HTTP front and a service behind it on a Unix socket:

    A  nginx (1 worker, keep-alive upstream) + bare_http_echo.py (httptools)
    B  minimal_proxy.py + minimal_echo.py: the minimal pair of Pitcher's design
    C  minimal_proxy.py + the SDK echo (pitcher backend pitcher_rpc.sdk.echo:app)
    P  D, but pure Python: PITCHER_PURE_PYTHON=1 for the proxy and the SDK echo
    D  pitcher serve --workers 1 (default modules) + the SDK echo, as built:
       compiled by mypyc when the install has the extensions
    E  D with access_log, metrics and throttle on as well (request_id is on in
       both): the log in the run's scratch directory, the default buckets, a
       proxy-wide rate and concurrency limit and a business quota for the
       route, all far above what the load asks, so that nothing is refused

Every setup but P runs Pitcher as installed: PITCHER_PURE_PYTHON is taken out
of their environment. The header names the build D and P run (each asked of
a process started the way theirs are); the run stops if P's is not pure
Python, and a note says so if D's is pure as well (no compiled build: D and P
then measure the same thing).

Every service answers the same JSON. Each setup is measured at 64 and at 1
connection, with 5 and with 20 request headers (wrk -t1 --latency; without
wrk, a bounded Python load generator stands in), in interleaved rounds,
medians: req/s, p50, p99, and the CPU time per request of the front and of
the service (utime + stime from /proc of each process and its children,
over the run). ``--setups`` and ``--cases`` (``64x5`` is 64 connections, 5
headers) choose a part of it for a quick look.

Around each of E's runs the master's admin ``/metrics`` is read, before and
after: the difference of the route's residence histogram (time a request
spent in the proxy itself) gives that run's p50 and p99, each as the upper
bound of the first bucket whose cumulative count reaches the share. The
same reading shows requests the throttle refused and modules the overload
guard shed (either would make E's numbers mean something else).

Then the ratios against their goals, a ceiling (≤) or a floor (≥): proxy
CPU per request against the minimal proxy's and the SDK service's against the
minimal echo's, for both builds (D/C, D/B and the pure core's own P/C, P/B:
≤1.15); one-connection p50 against the minimal pair's; the modules' cost (E's
proxy CPU per request against D's); E's residence p99 in µs; the compiled
build against nginx (req/s D/A at 64 connections ≥1.0, and ≥1.3 as the
long-term mark; one-connection p50 ≤1.0; proxy and service CPU per request,
SDK echo against the bare HTTP echo, ≤0.8); for information, the pure build
against the compiled one (P/D, D/P) and the pair against nginx. A ratio
whose setups or cases were not run is left out.

Before any of it (and alone with ``--check``), the minimal echo and the SDK
echo behind the same minimal proxy must answer the same requests with the
same bytes (but for the client port); Pitcher's answer is compared too.

``--pitcher-root PATH`` runs C's, P's, D's and E's Pitcher processes from another
checkout (PYTHONPATH and working directory PATH), so numbers before a change
are measured by this same script. Every process is started and stopped here
by its pid; every load is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from prometheus_client.parser import text_string_to_metric_families

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from bench_spine import ROOT, cpu_seconds, exit_on_sigterm, free_port, wait_for_port  # noqa: E402

PYTHON = sys.executable
# Set for a process, it runs Pitcher's pure-Python modules (transports/native.py).
PURE_ENV = "PITCHER_PURE_PYTHON"
# wrk sends Host itself; these make 5 and 20 request headers.
FIVE = ["User-Agent: wrk/4 bench", "Accept: */*", "Accept-Encoding: gzip", "X-Trace: abc123"]
TWENTY = [
    *FIVE,
    "Accept-Language: en-US,en;q=0.9",
    "Cache-Control: no-cache",
    "Referer: http://bench.example/start",
    "Cookie: session=3f9c2a71d0b4; theme=dark",
    "X-Request-Start: t=1700000000000",
    "Sec-Fetch-Mode: navigate",
    "Sec-Fetch-Site: same-origin",
    "Upgrade-Insecure-Requests: 1",
    "DNT: 1",
    "Pragma: no-cache",
    "X-Client-Version: 4.2.1",
    "X-Tenant: shop",
    "X-Correlation-Id: 7d5e1c9a",
    "Priority: u=0, i",
    "Origin: http://bench.example",
]
HEADERS = {5: FIVE, 20: TWENTY}
CASES = [(64, 5), (64, 20), (1, 5), (1, 20)]
SETUPS = {
    "A": "nginx + bare HTTP echo",
    "B": "minimal proxy + minimal echo",
    "C": "minimal proxy + SDK echo",
    "P": "Pitcher + SDK echo, pure Python",
    "D": "Pitcher + SDK echo, as built",
    "E": "Pitcher + SDK echo, with modules",
}

PITCHER_CONFIG = """
[server]
listen = "127.0.0.1:{port}"
backlog = 4096
keepalive_requests = 0   # as nginx's 1000000: no reconnections in the measure

[admin]
listen = "127.0.0.1:{admin}"

[[routes]]
name = "echo"
prefix = "/"
cluster = "echo"
timeout = 10.0
{route}
[clusters.echo]
nodes = ["unix://{socket}"]
"""
# Setup E: D's file with these. request_id is on by default (in D too). Every
# limit is far above what 64 connections of one wrk thread ask of one
# worker, so the throttle does all its work and refuses nothing.
E_ROUTE = 'business = "bench"\n'
E_MODULES = """
[modules.access_log]
path = "{log}"

[modules.metrics]

[modules.throttle]
rate = 1000000
concurrency = 4096

[modules.throttle.business.bench]
rate = 500000
concurrency = 1024
"""

NGINX_CONFIG = """{user}
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  upstream backend {{
    server unix:{socket};
    keepalive 128;
    keepalive_requests 1000000;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    keepalive_requests 1000000;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
    }}
  }}
}}
"""


# ------------------------------------------------------------------------------ processes


class Where(NamedTuple):
    """Where a process runs from: Pitcher's code comes from ``cwd`` first."""

    cwd: Path
    env: dict[str, str]


def where(root: Path | None) -> Where:
    """Pitcher as installed under ``root`` (default: this checkout), compiled if it was built."""
    env = {name: value for name, value in os.environ.items() if name != PURE_ENV}
    if root is None:
        return Where(ROOT, env)
    # The working directory matters too: pitcher serve starts its workers with
    # `python -m`, which puts the working directory first on sys.path.
    return Where(root, {**env, "PYTHONPATH": str(root)})


def pure_python(at: Where) -> Where:
    """The same, told to run the pure-Python modules (setup P)."""
    return Where(at.cwd, {**at.env, PURE_ENV: "1"})


# A process started this way says which build it runs. A checkout from before
# the compiled build has no transports/native.py and is pure Python; it is looked
# for beside the transports package imported, since an editable install's finder
# would take a missing module from the installed tree instead.
_BUILD_OF = """
import os
import transports
if os.path.isfile(os.path.join(os.path.dirname(transports.__file__), "native.py")):
    from transports.native import describe
    print(describe())
else:
    print("pure Python (no transports/native.py in this checkout)")
"""


def build_of(at: Where) -> str:
    """Which build of Pitcher's request path a process started ``at`` runs."""
    asked = subprocess.run(
        [PYTHON, "-c", _BUILD_OF], cwd=at.cwd, env=at.env, capture_output=True, text=True
    )
    if asked.returncode != 0:
        raise RuntimeError(f"cannot tell which build runs in {at.cwd}:\n{asked.stderr}")
    return asked.stdout.strip()


@contextlib.contextmanager
def started(args: list[str], at: Where, log: Path, ready: bool) -> Iterator[int]:
    """A process until the block ends (SIGTERM, then SIGKILL); with ``ready``, its ready line."""
    with open(log, "ab") as errors:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=errors, cwd=at.cwd, env=at.env)
    try:
        if ready:
            assert proc.stdout is not None
            line = ""
            if select.select([proc.stdout], [], [], 15.0)[0]:
                line = proc.stdout.readline().decode(errors="replace")
            if "ready" not in line:
                raise RuntimeError(f"{args[:4]} did not start: {line!r}; see {log}")
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def wait_for_unix(path: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(0.5)
            sock.connect(path)
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {path}")


def wait_for_line(path: Path, timeout: float = 10.0) -> None:
    """Until the file has a line (the access log writes in batches, every 0.2 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if b"\n" in path.read_bytes():
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing was written to {path}")


def tree(pid: int) -> list[int]:
    """The process and its descendants, from /proc/PID/task/*/children."""
    pids = [pid]
    for each in pids:
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{each}/task"):
                with open(f"/proc/{each}/task/{task}/children") as children:
                    pids.extend(int(child) for child in children.read().split())
    return pids


def tree_cpu(pid: int) -> dict[int, float]:
    seconds = {}
    for each in tree(pid):
        with contextlib.suppress(OSError, IndexError):
            seconds[each] = cpu_seconds(each)
    return seconds


def cpu_spent(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(value - before.get(pid, 0.0) for pid, value in after.items())


class Running(NamedTuple):
    port: int
    front: int  # pid of the HTTP front (its children count too)
    service: int
    # The admin port whose /metrics has the metrics module's numbers; 0: none.
    metrics: int = 0
    access_log: Path | None = None


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    return found or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


@contextlib.contextmanager
def setup(key: str, tmp: Path, pitcher: Where) -> Iterator[Running]:
    here = Where(ROOT, dict(os.environ))
    sock = str(tmp / f"{key}.sock")
    port = free_port()
    log = tmp / f"{key}.log"
    access_log = tmp / f"{key}-access.log"
    minimal_proxy = [PYTHON, str(BENCH / "minimal_proxy.py"), "--listen", f"127.0.0.1:{port}"]
    minimal_proxy += ["--backend", f"unix://{sock}"]
    sdk_echo = [PYTHON, "-m", "pitcher_rpc.cli", "backend", "pitcher_rpc.sdk.echo:app"]
    sdk_echo += ["--listen", f"unix://{sock}"]
    with contextlib.ExitStack() as stack:
        if key == "A":
            bare = [PYTHON, str(BENCH / "bare_http_echo.py"), "--listen", f"unix://{sock}"]
            service = stack.enter_context(started(bare, here, log, ready=True))
            conf = tmp / "nginx.conf"
            # Run as root, nginx's worker would be "nobody", who may not use our socket.
            user = "user root;" if os.geteuid() == 0 else ""
            conf.write_text(NGINX_CONFIG.format(user=user, dir=tmp, socket=sock, port=port))
            nginx = [nginx_binary() or "nginx", "-c", str(conf), "-p", str(tmp)]
            nginx += ["-e", str(tmp / "nginx-error.log")]
            front = stack.enter_context(started(nginx, here, log, ready=False))
        elif key == "B":
            echo = [PYTHON, str(BENCH / "minimal_echo.py"), "--listen", f"unix://{sock}"]
            service = stack.enter_context(started(echo, here, log, ready=True))
            front = stack.enter_context(started(minimal_proxy, here, log, ready=True))
        elif key == "C":
            service = stack.enter_context(started(sdk_echo, pitcher, log, ready=False))
            wait_for_unix(sock)
            front = stack.enter_context(started(minimal_proxy, here, log, ready=True))
        else:
            if key == "P":
                # Both sides: the proxy and the SDK echo share the request path's modules.
                pitcher = pure_python(pitcher)
            service = stack.enter_context(started(sdk_echo, pitcher, log, ready=False))
            wait_for_unix(sock)
            conf = tmp / f"pitcher-{key}.toml"
            admin = free_port()
            text = PITCHER_CONFIG.format(
                port=port, admin=admin, socket=sock, route=E_ROUTE if key == "E" else ""
            )
            if key == "E":
                text += E_MODULES.format(log=access_log)
            conf.write_text(text)
            serve = [PYTHON, "-m", "pitcher_rpc.cli", "serve", "-c", str(conf), "--workers", "1"]
            front = stack.enter_context(started(serve, pitcher, log, ready=False))
        wait_for_port(port, 15.0)
        wait_until_answers(port)
        if key == "E":
            # The modules must be seen at work, or E would measure D again.
            wait_for_line(access_log)
            scrape(admin, retry=10.0)
            yield Running(port, front, service, admin, access_log)
        else:
            yield Running(port, front, service)


# ---------------------------------------------------------------------------------- HTTP


def http_request(method: str, target: str, headers: list[str], body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: bench.example", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def fetch(port: int, raw: bytes, timeout: float = 5.0) -> tuple[int, bytes]:
    """Status and body of one request on a new connection."""
    with socket.create_connection(("127.0.0.1", port), timeout) as sock:
        sock.sendall(raw)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError(f"connection closed after {data!r}")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        found = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        length = int(found.group(1)) if found else 0
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return int(head.split(b" ", 2)[1]), body[:length]


def wait_until_answers(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    status = 0
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, RuntimeError, ValueError, IndexError):
            status, _ = fetch(port, http_request("GET", "/hello", []), 2.0)
            if status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"127.0.0.1:{port} does not answer 200 (last status {status})")


@dataclass
class Load:
    rps: float
    p50_us: float
    p99_us: float
    requests: int
    errors: int


_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6}


def wrk(
    port: int,
    connections: int,
    headers: list[str],
    seconds: float,
    scheme: str = "http",
    closing: bool = False,
) -> Load:
    """wrk's numbers; ``closing``: the server closes after each answer (Connection: close),
    which wrk counts as a read error, so only connect, write and timeout errors count."""
    args = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"]
    for header in headers:
        args += ["-H", header]
    out = subprocess.run(
        [*args, f"{scheme}://127.0.0.1:{port}/hello"],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
    ).stdout

    def number(pattern: str) -> str:
        found = re.search(pattern, out)
        if found is None:
            raise RuntimeError(f"wrk output without {pattern!r}:\n{out}")
        return found.group(1)

    def latency(percent: int) -> float:
        found = re.search(rf"\s{percent}%\s+([\d.]+)(us|ms|s)\b", out)
        if found is None:
            raise RuntimeError(f"wrk output without a {percent}% latency:\n{out}")
        return float(found.group(1)) * _UNITS[found.group(2)]

    errors = 0
    found = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if found is not None:
        connect, read, write, timeout = (int(n) for n in found.groups())
        errors += connect + write + timeout + (0 if closing else read)
    found = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if found is not None:
        errors += int(found.group(1))
    return Load(
        float(number(r"Requests/sec:\s+([\d.]+)")),
        latency(50),
        latency(99),
        int(number(r"(\d+) requests in")),
        errors,
    )


async def _python_load(port: int, connections: int, headers: list[str], seconds: float) -> Load:
    """A bounded keep-alive load generator for machines without wrk."""
    request = http_request("GET", "/hello", headers)
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    limit = 5_000_000  # requests in all: bounded in count as well as in time

    async def one() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while (began := time.perf_counter()) < stop and len(latencies) < limit:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                found = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                await reader.readexactly(int(found.group(1)) if found else 0)
                latencies.append(time.perf_counter() - began)
                if not head.startswith(b"HTTP/1.1 200"):
                    errors += 1
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(connections))), seconds + 30)
    elapsed = time.perf_counter() - start
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return Load(
        len(latencies) / elapsed,
        statistics.median(latencies) * 1e6,
        p99 * 1e6,
        len(latencies),
        errors,
    )


def load(port: int, connections: int, headers: list[str], seconds: float) -> Load:
    if shutil.which("wrk"):
        return wrk(port, connections, headers, seconds)
    import uvloop

    return uvloop.run(_python_load(port, connections, headers, seconds))


# ------------------------------------------------------------------ the proxy's own numbers

RESIDENCE = "pitcher_residence_seconds"
ROUTE = "echo"


class Scrape(NamedTuple):
    """What the master's /metrics said at one moment."""

    # The route's residence histogram: upper bound in seconds (inf last) -> cumulative count.
    residence: dict[float, float]
    refused: float  # requests the throttle refused, every limit
    shed: float  # modules switched off by the overload guard, every worker


def scrape(admin: int, retry: float = 0.0) -> Scrape:
    """Read /metrics; with ``retry``, for at most that many seconds until the route shows."""
    deadline = time.monotonic() + retry
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as answer:
                text = answer.read().decode()
            residence: dict[float, float] = {}
            refused = shed = 0.0
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == f"{RESIDENCE}_bucket" and sample.labels["route"] == ROUTE:
                        residence[float(sample.labels["le"])] = sample.value
                    elif sample.name == "pitcher_throttle_refused_total":
                        refused += sample.value
                    elif sample.name == "pitcher_modules_shed":
                        shed += sample.value
            if not residence:
                raise RuntimeError(f"no {RESIDENCE} of route {ROUTE!r} on :{admin}/metrics")
            return Scrape(dict(sorted(residence.items())), refused, shed)
        except (OSError, RuntimeError):
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


def bucket_counts(before: Scrape, after: Scrape) -> list[float]:
    """Requests per bucket (not cumulative) between two readings, in the order of the bounds."""
    cumulative = [n - before.residence.get(bound, 0.0) for bound, n in after.residence.items()]
    return [n - previous for n, previous in zip(cumulative, [0.0, *cumulative[:-1]], strict=True)]


def quantile_bound(bounds: list[float], counts: list[float], share: float) -> float:
    """The upper bound (µs) of the first bucket whose cumulative count reaches ``share``."""
    total = sum(counts)
    if total <= 0:
        return math.nan
    running = 0.0
    for bound, count in zip(bounds, counts, strict=True):
        running += count
        if running >= share * total:
            return bound * 1e6
    return math.inf


# ---------------------------------------------------------------------------- the check

_CLIENT = re.compile(rb'"client": "([^"]*):\d+"')


def check_requests() -> list[tuple[str, str, list[str], bytes]]:
    many = [*TWENTY, "X-Forwarded-For: 10.0.0.1", "Connection: keep-alive, X-Hop", "X-Hop: 1"]
    return [
        ("GET", "/check/a%20b?x=1&y=%20&z", many, b""),
        ("POST", "/post", ["Content-Type: text/plain; charset=utf-8"], "héllo wörld".encode()),
        ("POST", "/binary", ["Content-Type: application/octet-stream"], b"\xff\x00\xfe\x01"),
        ("PUT", "/empty?sleep=0", [], b""),
    ]


def check(tmp: Path, pitcher: Where, with_pitcher: bool = True) -> list[str]:
    """Minimal echo and SDK echo, behind the same minimal proxy, must answer alike.

    Returns notes about Pitcher's own answers (compared without its request id).
    """
    answers: dict[str, list[bytes]] = {}
    for key in ("B", "C", "D") if with_pitcher else ("B", "C"):
        with setup(key, tmp, pitcher) as running:
            answers[key] = []
            for method, target, headers, body in check_requests():
                status, text = fetch(running.port, http_request(method, target, headers, body))
                assert status == 200, f"{SETUPS[key]}: {method} {target} -> {status} {text!r}"
                answers[key].append(_CLIENT.sub(rb'"client": "\1:PORT"', text))
    for number, (minimal, sdk) in enumerate(zip(answers["B"], answers["C"], strict=True)):
        assert minimal == sdk, (
            f"request {number}: the minimal echo and the SDK echo differ\n"
            f"  minimal: {minimal!r}\n  SDK:     {sdk!r}"
        )
    notes = []
    for number, (ours, pitchers) in enumerate(
        zip(answers["C"], answers.get("D", []), strict=False)
    ):
        document = json.loads(pitchers)
        document["headers"] = [h for h in document["headers"] if h[0] != "x-request-id"]
        if document != json.loads(ours):
            notes.append(
                f"note: request {number}: Pitcher forwards differently from the minimal proxy"
                f" (x-request-id aside):\n  minimal: {ours!r}\n  Pitcher: {pitchers!r}"
            )
    return notes


# ------------------------------------------------------------------------- measurement


class Results:
    def __init__(self) -> None:
        self.values: dict[tuple[str, int, int, str], list[float]] = {}
        # Residence histograms, by setup and case: bounds (s), requests per bucket of all rounds.
        self.residence: dict[tuple[str, int, int], tuple[list[float], list[float]]] = {}

    def add(self, key: str, case: tuple[int, int], metric: str, value: float) -> None:
        self.values.setdefault((key, *case, metric), []).append(value)

    def add_residence(
        self, key: str, case: tuple[int, int], bounds: list[float], counts: list[float]
    ) -> None:
        held = self.residence.get((key, *case))
        if held is not None and held[0] == bounds:
            counts = [a + b for a, b in zip(held[1], counts, strict=True)]
        self.residence[(key, *case)] = (bounds, counts)

    def median(self, key: str, case: tuple[int, int], metric: str) -> float:
        values = self.values.get((key, *case, metric))
        if not values:
            return float("nan")
        # A bucket's bound stays a bound: no mean of two of them.
        return (
            statistics.median_high(values)
            if metric.startswith("res_")
            else statistics.median(values)
        )

    def runs(self, key: str, case: tuple[int, int], metric: str) -> list[float]:
        return self.values.get((key, *case, metric), [])


def machine_busy() -> float:
    """CPU seconds the whole machine has spent not idle (all cores), from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(n) for n in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    """CPU seconds of this process and its finished children (wrk, or the Python generator)."""
    seconds = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        seconds += usage.ru_utime + usage.ru_stime
    return seconds


Residence = tuple[list[float], list[float]]  # bounds (s), requests per bucket


def measure(
    running: Running, case: tuple[int, int], seconds: float
) -> tuple[dict[str, float], Residence | None]:
    connections, count = case
    before: Scrape | None = None
    if running.access_log is not None:
        # Append-only: cut back between runs so that rounds do not fill /tmp.
        os.truncate(running.access_log, 0)
    if running.metrics:
        # Outside the CPU window: the master's scrape work is not the requests'.
        before = scrape(running.metrics)
    front_before, service_before = tree_cpu(running.front), tree_cpu(running.service)
    busy_before, own_before, began = machine_busy(), own_cpu(), time.monotonic()
    result = load(running.port, connections, HEADERS[count], seconds)
    front = cpu_spent(front_before, tree_cpu(running.front))
    service = cpu_spent(service_before, tree_cpu(running.service))
    # What the rest of the machine took meanwhile, in cores: the numbers are only as
    # good as this is small (the machine is shared).
    others = machine_busy() - busy_before - front - service - (own_cpu() - own_before)
    requests = max(result.requests, 1)
    values = {
        "others": max(0.0, others) / (time.monotonic() - began),
        "rps": result.rps,
        "p50": result.p50_us,
        "p99": result.p99_us,
        "front_cpu": front / requests * 1e6,
        "service_cpu": service / requests * 1e6,
        "errors": result.errors,
    }
    if before is None:
        return values, None
    after = scrape(running.metrics)
    bounds = list(after.residence)
    counts = bucket_counts(before, after)
    values["res_p50"] = quantile_bound(bounds, counts, 0.50)
    values["res_p99"] = quantile_bound(bounds, counts, 0.99)
    values["refused"] = after.refused - before.refused
    values["shed"] = after.shed
    return values, (bounds, counts)


def wait_quiet(limit: float) -> None:
    """Wait, at most ``limit`` seconds, for half a second in which the machine is all but idle.

    The machine may be shared: a run that overlaps someone else's work measures
    both. What is left of it shows in the ``others`` column.
    """
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        busy, began = machine_busy(), time.monotonic()
        time.sleep(0.5)
        if (machine_busy() - busy) / (time.monotonic() - began) < 0.1:
            return


def run_rounds(
    keys: list[str],
    cases: list[tuple[int, int]],
    rounds: int,
    seconds: float,
    quiet: float,
    tmp: Path,
    pitcher: Where,
    say: Callable[..., None],
) -> Results:
    """Every setup runs through a round, fresh; runs alternate between setups case by case.

    Interleaving each case across the setups, rather than running one setup's
    cases back to back, spreads whatever else the machine does over all of them.
    """
    results = Results()
    for round_number in range(rounds):
        # Each round starts with another setup: no setup always goes first.
        order = keys[round_number % len(keys) :] + keys[: round_number % len(keys)]
        with contextlib.ExitStack() as stack:
            running = {key: stack.enter_context(setup(key, tmp, pitcher)) for key in order}
            for key in order:
                load(running[key].port, 64, FIVE, 1.0)  # warm up: connections, pools, caches
            for case in cases:
                for key in order:
                    say(
                        f"round {round_number + 1}/{rounds}: {case[0]} conns, {case[1]} hdrs, {key}"
                    )
                    wait_quiet(quiet)
                    values, residence = measure(running[key], case, seconds)
                    for metric, value in values.items():
                        results.add(key, case, metric, value)
                    if residence is not None:
                        results.add_residence(key, case, *residence)
    return results


# ------------------------------------------------------------------------------ report


class Goal(NamedTuple):
    """A ratio's goal: at most ``bound`` (a ceiling) or, with ``floor``, at least ``bound``."""

    bound: float
    floor: bool = False

    def met(self, value: float) -> bool:
        return value >= self.bound if self.floor else value <= self.bound

    def shown(self, digits: int) -> str:
        return ("≥" if self.floor else "≤") + format(self.bound, f".{digits}f")


def at_most(bound: float) -> Goal:
    return Goal(bound)


def at_least(bound: float) -> Goal:
    return Goal(bound, floor=True)


def report(
    results: Results,
    keys: list[str],
    cases: list[tuple[int, int]],
    line: Callable[[str], None],
    skipped: tuple[str, ...] = (),
) -> None:
    """The table, E's residence histograms under it, then the ratios.

    ``skipped``: setups asked for but not run (nginx missing); their ratios say so.
    """
    m = results.median
    line(
        f"{'conns':>5} {'hdrs':>4}  {'setup':<35} {'req/s':>8} {'p50 µs':>8} {'p99 µs':>8}"
        f" {'front µs/req':>12} {'service µs/req':>14} {'others':>6}  req/s of each round"
    )
    for case in cases:
        for key in keys:
            errors = sum(results.runs(key, case, "errors"))
            spread = "/".join(f"{v:.0f}" for v in results.runs(key, case, "rps"))
            line(
                f"{case[0]:>5} {case[1]:>4}  {key} {SETUPS[key]:<33}"
                f" {m(key, case, 'rps'):>8.0f} {m(key, case, 'p50'):>8.0f}"
                f" {m(key, case, 'p99'):>8.0f} {m(key, case, 'front_cpu'):>12.1f}"
                f" {m(key, case, 'service_cpu'):>14.1f} {m(key, case, 'others'):>6.2f}  {spread}"
                + (f"  ({errors:.0f} errors)" if errors else "")
            )
        line("")
    if "E" in keys:
        residence_lines(results, cases, line)
    busiest = max(m(key, case, "others") for key in keys for case in cases)
    if busiest > 0.2:
        line(
            f"warning: other processes kept up to {busiest:.2f} cores busy during these runs"
            " (median of a setup and case): the numbers are skewed by them"
        )

    # (label, numerator, denominator or "" for E's own number, connections, metric, goal)
    lines: list[tuple[str, str, str, int, str, Goal | None]] = [
        ("proxy CPU/request D/C", "D", "C", 64, "front_cpu", at_most(1.15)),
        ("proxy CPU/request D/C", "D", "C", 1, "front_cpu", at_most(1.15)),
        # The request core in pure Python keeps the goals it had before it was compiled.
        ("proxy CPU/request P/C", "P", "C", 64, "front_cpu", at_most(1.15)),
        ("proxy CPU/request P/C", "P", "C", 1, "front_cpu", at_most(1.15)),
        ("service CPU/request D/B", "D", "B", 64, "service_cpu", at_most(1.15)),
        ("service CPU/request D/B", "D", "B", 1, "service_cpu", at_most(1.15)),
        ("service CPU/request P/B", "P", "B", 64, "service_cpu", at_most(1.15)),
        ("service CPU/request P/B", "P", "B", 1, "service_cpu", at_most(1.15)),
        ("  same proxy in front: C/B", "C", "B", 64, "service_cpu", None),
        ("  same proxy in front: C/B", "C", "B", 1, "service_cpu", None),
        ("p50 D/B", "D", "B", 1, "p50", at_most(1.15)),
        ("modules' CPU E/D", "E", "D", 64, "front_cpu", at_most(1.25)),
        ("modules' CPU E/D", "E", "D", 1, "front_cpu", at_most(1.25)),
        ("residence p99 E (µs)", "E", "", 64, "res_p99", at_most(100.0)),
        # The compiled build against nginx and the bare HTTP echo behind it.
        ("req/s D/A", "D", "A", 64, "rps", at_least(1.0)),
        ("req/s D/A, long-term mark", "D", "A", 64, "rps", at_least(1.3)),
        ("req/s D/A", "D", "A", 1, "rps", None),
        ("p50 D/A", "D", "A", 1, "p50", at_most(1.0)),
        ("proxy CPU/request D/A", "D", "A", 64, "front_cpu", at_most(0.8)),
        ("proxy CPU/request D/A", "D", "A", 1, "front_cpu", at_most(0.8)),
        ("service CPU/request D/A", "D", "A", 64, "service_cpu", at_most(0.8)),
        ("service CPU/request D/A", "D", "A", 1, "service_cpu", at_most(0.8)),
        # What compiling gives: the pure build against the compiled one.
        ("proxy CPU/request P/D", "P", "D", 64, "front_cpu", None),
        ("proxy CPU/request P/D", "P", "D", 1, "front_cpu", None),
        ("service CPU/request P/D", "P", "D", 64, "service_cpu", None),
        ("service CPU/request P/D", "P", "D", 1, "service_cpu", None),
        ("req/s D/P", "D", "P", 64, "rps", None),
        ("req/s D/P", "D", "P", 1, "rps", None),
        ("req/s D/B", "D", "B", 64, "rps", None),
        ("req/s B/A (the design against nginx)", "B", "A", 64, "rps", None),
    ]
    line(
        f"{'ratio':<38} {'conns':>5} {'goal':>6}   {'5 headers':<14} {'20 headers':<14}"
        " 20h/5h (goal: within 10%)"
    )
    for label, top, bottom, connections, metric, goal in lines:
        setups = [top, bottom] if bottom else [top]
        missing = [key for key in setups if key not in keys]
        if any(key in skipped for key in missing):
            line(f"{label:<38} {connections:>5}   n/a: setup {missing[0]} was skipped")
            continue
        run = [(connections, h) in cases for h in (5, 20)]
        if missing or not any(run):
            continue
        values: list[float | None] = []
        for headers, was_run in zip((5, 20), run, strict=True):
            case = (connections, headers)
            if not was_run:
                values.append(None)
            elif bottom:
                values.append(m(top, case, metric) / m(bottom, case, metric))
            else:
                values.append(m(top, case, metric))
        digits = 2 if bottom else 0
        cells = []
        for value in values:
            if value is None:
                cells.append("not run")
            elif goal is None:
                cells.append(f"{value:.{digits}f}")
            else:
                verdict = "met" if goal.met(value) else "not met"
                cells.append(f"{value:.{digits}f} {verdict}")
        drift = "-"
        five, twenty = values
        # The residence is a bucket's bound: its 20h/5h says nothing finer than the buckets.
        if goal is not None and bottom and five is not None and twenty is not None:
            ratio = twenty / five
            drift = f"{ratio:.2f} " + ("met" if abs(ratio - 1) <= 0.10 else "not met")
        shown_goal = "-" if goal is None else goal.shown(digits)
        text = f"{label:<38} {connections:>5} {shown_goal:>6}   {cells[0]:<14} {cells[1]:<14}"
        line((text + (f" {drift}" if goal is not None else "")).rstrip())


def _micro(bound: float) -> str:
    """A bucket's upper bound in seconds, as µs."""
    if math.isinf(bound):
        return "+Inf"
    micro = bound * 1e6
    return f"≤{micro:.0f}" if micro >= 1 else f"≤{micro:g}"


def residence_lines(
    results: Results, cases: list[tuple[int, int]], line: Callable[[str], None]
) -> None:
    """E's time in the proxy, from its /metrics: quantiles and the requests per bucket."""
    shown = [case for case in cases if ("E", *case) in results.residence]
    if not shown:
        return
    m = results.median
    line(
        "E's residence in the proxy (its /metrics, the difference over each run; a quantile"
        " is the upper bound of its bucket, median of the rounds; share of the requests by"
        " bucket, all rounds):"
    )
    bounds: list[float] = []
    for case in shown:
        bounds, counts = results.residence[("E", *case)]
        total = sum(counts) or 1.0
        shares = " ".join(
            f"{_micro(bound)} {count / total:.1%}"
            for bound, count in zip(bounds, counts, strict=True)
            if count
        )
        line(
            f"  {case[0]:>3} conns {case[1]:>2} hdrs: p50 {_micro(m('E', case, 'res_p50') / 1e6)}"
            f" µs, p99 {_micro(m('E', case, 'res_p99') / 1e6)} µs; {total:.0f} requests: {shares}"
        )
    line("  bucket bounds, µs: " + " ".join(_micro(bound) for bound in bounds))
    refused = sum(sum(results.runs("E", case, "refused")) for case in shown)
    if refused:
        line(f"  warning: the throttle refused {refused:.0f} requests of E's: raise its limits")
    shed = max(max(results.runs("E", case, "shed"), default=0.0) for case in shown)
    if shed:
        line(
            f"  warning: the overload guard shed {shed:.0f} module(s) during E's runs:"
            " their cost is not all in E's numbers"
        )
    line("")


def setups_option(text: str) -> list[str]:
    keys = [key.strip().upper() for key in text.split(",") if key.strip()]
    unknown = [key for key in keys if key not in SETUPS]
    if unknown or not keys:
        raise argparse.ArgumentTypeError(f"setups are among {','.join(SETUPS)}, not {text!r}")
    # In the table's order, once each.
    return [key for key in SETUPS if key in keys]


def cases_option(text: str) -> list[tuple[int, int]]:
    cases: list[tuple[int, int]] = []
    for part in text.split(","):
        found = re.fullmatch(r"\s*(\d+)x(\d+)\s*", part)
        if found is None or int(found.group(1)) < 1 or int(found.group(2)) not in HEADERS:
            raise argparse.ArgumentTypeError(
                f"{part!r}: a case is CONNECTIONSxHEADERS, headers 5 or 20 (64x5,1x20 ...)"
            )
        case = (int(found.group(1)), int(found.group(2)))
        if case not in cases:
            cases.append(case)
    return cases


def main() -> None:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pitcher-root", type=Path, help="run C, P, D and E's Pitcher from here")
    parser.add_argument(
        "--setups",
        type=setups_option,
        default=list(SETUPS),
        metavar="A,B,C,P,D,E",
        help="the setups to run (default: all)",
    )
    parser.add_argument(
        "--cases",
        type=cases_option,
        default=list(CASES),
        metavar="64x5,64x20,1x5,1x20",
        help="connections x request headers (5 or 20) to run (default: all four)",
    )
    parser.add_argument("--check", action="store_true", help="only compare the echoes' answers")
    parser.add_argument("--skip-nginx", action="store_true")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="before each run, wait at most this long for the machine to be idle",
    )
    args = parser.parse_args()
    pitcher = where(args.pitcher_root.resolve() if args.pitcher_root else None)
    code = subprocess.run(
        [PYTHON, "-c", "import pitcher_rpc; print(pitcher_rpc.__file__)"],
        cwd=pitcher.cwd,
        env=pitcher.env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    built, pure = build_of(pitcher), build_of(pure_python(pitcher))
    builds = f"Pitcher's build: D (and E, C's SDK echo) {built}; P {pure}"

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    keys: list[str] = args.setups
    cases: list[tuple[int, int]] = args.cases
    say(builds)
    if "P" in keys and not pure.startswith("pure Python"):
        parser.error(
            f"setup P must run pure Python, but with {PURE_ENV}=1 Pitcher in {pitcher.cwd}"
            f" runs: {pure}"
        )
    notes = []
    if not built.startswith("compiled"):
        notes.append(
            f"note: D runs {built}, as P does: there is no compiled build to run,"
            " D and P measure the same thing"
        )
    skipped: tuple[str, ...] = ()
    if "A" in keys and (args.skip_nginx or nginx_binary() is None):
        if not args.skip_nginx:
            notes.append("nginx not found: setup A (nginx + bare HTTP echo) is skipped")
        keys.remove("A")
        skipped = ("A",)
    if not keys:
        parser.error("no setup left to run")
    if not shutil.which("wrk"):
        notes.append(
            "wrk not found: load by a bounded Python generator, which takes a core's share"
            " itself (numbers not comparable with wrk's)"
        )
    with tempfile.TemporaryDirectory(prefix="pitcher-pair-", dir="/tmp") as scratch:
        tmp = Path(scratch)
        say("check: minimal echo and SDK echo behind the same minimal proxy")
        notes += check(tmp, pitcher)
        print(f"check passed: the minimal echo answers as the SDK echo ({code})")
        for note in notes:
            print(note)
        if args.check:
            return
        results = run_rounds(
            keys, cases, args.rounds, args.seconds, args.wait_quiet, tmp, pitcher, say
        )
    load_by = "wrk -t1 --latency" if shutil.which("wrk") else "the Python generator"
    print(
        f"Pitcher RPC pair benchmark: {args.rounds} rounds x {args.seconds:g}s per run, medians;"
        f" {os.cpu_count()} CPUs, load by {load_by}; Pitcher code: {code}"
    )
    for key in keys:
        print(f"  {key}: {SETUPS[key]}")
    print(builds)
    print("front/service µs/req: CPU time (user+system, with children) per request")
    print("others: cores busy with other processes than these and the load generator")
    report(results, keys, cases, print, skipped)


if __name__ == "__main__":
    main()
