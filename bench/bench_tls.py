"""What TLS costs Pitcher's listener, beside what it costs nginx, in one run.

Run from the repository root, on a machine doing nothing else::

    python bench/bench_tls.py
    python bench/bench_tls.py --rounds 1 --seconds 2 --setups P,PS

Four setups, each an HTTP front and a service behind it on a Unix socket
(bench/bench_pair.py's: nginx with 1 worker in front of bench/bare_http_echo.py,
``pitcher serve --workers 1`` in front of the SDK echo):

    N   nginx, plain HTTP          NS  nginx, TLS
    P   Pitcher, plain HTTP        PS  Pitcher, TLS

The TLS fronts serve the same certificate (an ECDSA P-256 chain made for the
run by trustme), TLS 1.2 and 1.3 allowed: clients negotiate 1.3. Two cases:

    keepalive   16 connections, many requests each: the cost of encrypting
    handshake   16 clients, a new connection per request (Connection: close):
                the cost of a full handshake per request, no session resumed

Load by wrk (which speaks https) where installed, else a bounded Python load
generator. Rounds are interleaved; the table shows medians of req/s, p50 and
p99, and the ratios: PS/P and NS/N (what TLS keeps of each front's plain
rate), PS/NS (Pitcher against nginx, both with TLS) and P/N for reference.
Every process is started and stopped here by its pid; every load is bounded
in time and count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from bench_pair import (  # noqa: E402
    NGINX_CONFIG,
    PITCHER_CONFIG,
    PYTHON,
    ROOT,
    Load,
    Where,
    build_of,
    free_port,
    nginx_binary,
    started,
    wait_for_port,
    wait_for_unix,
    where,
)
from bench_pair import wrk as wrk_load  # noqa: E402

SETUPS = {
    "N": "nginx, plain HTTP",
    "NS": "nginx, TLS",
    "P": "Pitcher, plain HTTP",
    "PS": "Pitcher, TLS",
}
CASES = ("keepalive", "handshake")
CONNECTIONS = 16

PITCHER_TLS = """
[server.tls]
certificate = "{certificate}"
key = "{key}"
"""


def make_certificate(directory: Path) -> tuple[Path, Path]:
    try:
        import trustme
    except ImportError:
        sys.exit("bench_tls needs trustme (pip install -e '.[test]') to make its certificate")
    authority = trustme.CA()
    issued = authority.issue_cert("127.0.0.1", "localhost")
    certificate, key = directory / "cert.pem", directory / "key.pem"
    with open(certificate, "wb") as file:
        for blob in issued.cert_chain_pems:
            file.write(blob.bytes())
    issued.private_key_pem.write_to_path(str(key))
    return certificate, key


def nginx_tls_config(text: str, certificate: Path, key: Path) -> str:
    """bench_pair's nginx configuration, its listener made a TLS one."""
    listen = re.search(r"listen 127\.0\.0\.1:(\{port\}|\d+) backlog=4096;", text)
    assert listen is not None, "bench_pair's nginx configuration changed"
    tls = (
        "listen 127.0.0.1:{port} ssl backlog=4096;\n"
        f"    ssl_certificate {certificate};\n"
        f"    ssl_certificate_key {key};\n"
        "    ssl_protocols TLSv1.2 TLSv1.3;"
    )
    return text.replace(listen.group(0), tls)


@contextlib.contextmanager
def setup(key: str, tmp: Path, pitcher: Where, certificate: Path, private: Path) -> Iterator[int]:
    """The front's port while the setup runs."""
    here = Where(ROOT, dict(os.environ))
    sock = str(tmp / f"{key}.sock")
    port = free_port()
    log = tmp / f"{key}.log"
    with contextlib.ExitStack() as stack:
        if key.startswith("N"):
            bare = [PYTHON, str(BENCH / "bare_http_echo.py"), "--listen", f"unix://{sock}"]
            stack.enter_context(started(bare, here, log, ready=True))
            template = NGINX_CONFIG
            if key == "NS":
                template = nginx_tls_config(template, certificate, private)
            conf = tmp / f"nginx-{key}.conf"
            user = "user root;" if os.geteuid() == 0 else ""
            conf.write_text(template.format(user=user, dir=tmp, socket=sock, port=port))
            nginx = [nginx_binary() or "nginx", "-c", str(conf), "-p", str(tmp)]
            nginx += ["-e", str(tmp / "nginx-error.log")]
            stack.enter_context(started(nginx, here, log, ready=False))
        else:
            echo = [PYTHON, "-m", "pitcher_rpc.cli", "backend", "pitcher_rpc.sdk.echo:app"]
            echo += ["--listen", f"unix://{sock}"]
            stack.enter_context(started(echo, pitcher, log, ready=False))
            wait_for_unix(sock)
            text = PITCHER_CONFIG.format(port=port, admin=free_port(), socket=sock, route="")
            if key == "PS":
                # [server.tls] belongs to [server]: it goes right after that table.
                head, _, rest = text.partition("\n[admin]")
                tls = PITCHER_TLS.format(certificate=certificate, key=private)
                text = head + tls + "\n[admin]" + rest
            conf = tmp / f"pitcher-{key}.toml"
            conf.write_text(text)
            serve = [PYTHON, "-m", "pitcher_rpc.cli", "serve", "-c", str(conf), "--workers", "1"]
            stack.enter_context(started(serve, pitcher, log, ready=False))
        wait_for_port(port, 15.0)
        wait_answers(port, key.endswith("S"))
        yield port


def client_context() -> ssl.SSLContext:
    # The load measures the servers, not verification: the certificate is the run's own.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def wait_answers(port: int, secure: bool, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            load = asyncio.run(python_load(port, secure, 1, 0.05, new_connections=False))
            if load.requests and not load.errors:
                return
        time.sleep(0.1)
    raise RuntimeError(f"127.0.0.1:{port} does not answer 200")


REQUEST = b"GET /hello HTTP/1.1\r\nHost: bench.example\r\nUser-Agent: bench_tls\r\n\r\n"
CLOSING = b"GET /hello HTTP/1.1\r\nHost: bench.example\r\nConnection: close\r\n\r\n"


async def python_load(
    port: int, secure: bool, connections: int, seconds: float, new_connections: bool
) -> Load:
    """A bounded load generator for machines without wrk."""
    context = client_context() if secure else None
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    limit = 2_000_000

    async def one() -> None:
        nonlocal errors
        reader = writer = None
        try:
            while (began := time.perf_counter()) < stop and len(latencies) < limit:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
                assert reader is not None
                writer.write(CLOSING if new_connections else REQUEST)
                head = await reader.readuntil(b"\r\n\r\n")
                found = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                await reader.readexactly(int(found.group(1)) if found else 0)
                latencies.append(time.perf_counter() - began)
                if not head.startswith(b"HTTP/1.1 200"):
                    errors += 1
                if new_connections:
                    writer.close()
                    reader = writer = None
        except (OSError, asyncio.IncompleteReadError):
            errors += 1
        finally:
            if writer is not None:
                writer.close()

    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(connections))), seconds + 30)
    elapsed = time.perf_counter() - start
    latencies.sort() if latencies else latencies.append(0.0)
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return Load(
        len(latencies) / elapsed,
        statistics.median(latencies) * 1e6,
        p99 * 1e6,
        len(latencies),
        errors,
    )


def wrk(port: int, secure: bool, seconds: float, new_connections: bool) -> Load:
    return wrk_load(
        port,
        CONNECTIONS,
        ["Connection: close"] if new_connections else [],
        seconds,
        scheme="https" if secure else "http",
        closing=new_connections,
    )


def measure(port: int, secure: bool, case: str, seconds: float) -> Load:
    new_connections = case == "handshake"
    if shutil.which("wrk"):
        return wrk(port, secure, seconds, new_connections)
    return asyncio.run(python_load(port, secure, CONNECTIONS, seconds, new_connections))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="per measure (default 2)")
    parser.add_argument("--setups", default="N,NS,P,PS")
    args = parser.parse_args()
    keys = [key for key in args.setups.split(",") if key]
    unknown = [key for key in keys if key not in SETUPS]
    if unknown:
        parser.error(f"unknown setups {unknown}; known: {', '.join(SETUPS)}")
    if any(key.startswith("N") for key in keys) and nginx_binary() is None:
        print("nginx is not installed: its setups are left out")
        keys = [key for key in keys if not key.startswith("N")]
    seconds = min(max(args.seconds, 0.5), 30.0)
    rounds = min(max(args.rounds, 1), 10)
    generator = "wrk" if shutil.which("wrk") else "a Python load generator"
    print(f"{rounds} rounds of {seconds:g} s, {CONNECTIONS} connections, load by {generator}")
    pitcher = where(None)
    print(f"Pitcher: {build_of(pitcher)}; {ssl.OPENSSL_VERSION}")
    results: dict[tuple[str, str], list[Load]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as scratch:
        tmp = Path(scratch)
        certificate, private = make_certificate(tmp)
        with contextlib.ExitStack() as stack:
            ports = {
                key: stack.enter_context(setup(key, tmp, pitcher, certificate, private))
                for key in keys
            }
            for round_number in range(rounds):
                for case in CASES:
                    for key in keys:
                        load = measure(ports[key], key.endswith("S"), case, seconds)
                        results.setdefault((key, case), []).append(load)
                        print(
                            f"  round {round_number + 1} {case:9} {key:2} {load.rps:9.0f} req/s"
                            + (f"  ({load.errors} errors)" if load.errors else ""),
                            flush=True,
                        )
    report(keys, results)


def report(keys: list[str], results: dict[tuple[str, str], list[Load]]) -> None:
    def median(key: str, case: str, field: str) -> float:
        return statistics.median(getattr(load, field) for load in results[(key, case)])

    print()
    print(f"{'case':10} {'setup':22} {'req/s':>9} {'p50 us':>9} {'p99 us':>9}")
    for case in CASES:
        for key in keys:
            print(
                f"{case:10} {key + ' ' + SETUPS[key]:22} {median(key, case, 'rps'):9.0f}"
                f" {median(key, case, 'p50_us'):9.0f} {median(key, case, 'p99_us'):9.0f}"
            )
    print()
    ratios = [
        ("PS", "P", "Pitcher: TLS over plain"),
        ("NS", "N", "nginx: TLS over plain"),
        ("PS", "NS", "Pitcher / nginx, TLS"),
        ("P", "N", "Pitcher / nginx, plain"),
    ]
    for case in CASES:
        for top, bottom, what in ratios:
            if top in keys and bottom in keys:
                ratio = median(top, case, "rps") / median(bottom, case, "rps")
                print(f"{case:10} {top + '/' + bottom:6} req/s {ratio:5.2f}   {what}")


if __name__ == "__main__":
    main()
