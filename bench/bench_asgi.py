"""The same FastAPI app behind Pitcher (ASGI over frames) and behind nginx -> uvicorn.

Run from the repository root (loopback and Unix sockets only; every load is
bounded in time; needs fastapi, uvicorn, nginx and wrk)::

    python bench/bench_asgi.py               # 3 rounds, medians
    python bench/bench_asgi.py --seconds 2 --rounds 1

Both sides are one proxy process and one app process, the app on a Unix socket:

- pitcher: ``pitcher serve`` (--workers 0) -> ``pitcher backend bench_asgi:app``
  over ``unix://`` (frames; no HTTP at the app);
- nginx: one worker with a keep-alive upstream -> ``uvicorn bench_asgi:app
  --uds`` (uvloop and httptools, as uvicorn picks them when installed).

A third row, for an app left as it is: ``pitcher serve`` -> ``pitcher bridge``
-> the same uvicorn over a Unix socket (one process more than the others).

wrk measures requests/s at 64 connections and p50 at 1 connection, against
``GET /hello?name=bench`` (an async endpoint answering a small JSON object).
The ratio is Pitcher's over nginx's, per round, and the table shows medians.
Every process is started here and stopped by its pid.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from fastapi import FastAPI

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
PYTHON = sys.executable
sys.path.insert(0, str(ROOT))

app = FastAPI()


@app.get("/hello")
async def hello(name: str = "world") -> dict[str, str]:
    return {"hello": name}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def process(args: list[str], log: Path, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """Run a process until the block ends; stopped by its pid (SIGTERM, then SIGKILL)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=BENCH,
            env={**os.environ, "PYTHONPATH": f"{BENCH}{os.pathsep}{ROOT}", **env},
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_until_ready(check: object, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited:\n{log.read_text(errors='replace')[-2000:]}")
        with contextlib.suppress(OSError):
            if check():  # type: ignore[operator]
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not start:\n{log.read_text(errors='replace')[-2000:]}")


def unix_listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
    return True


def get(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), 2) as sock:
        sock.sendall(b"GET /hello?name=bench HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected answer {data[:200]!r}")
    return body


def wrk(port: int, connections: int, seconds: float) -> tuple[float, float]:
    out = subprocess.run(
        [
            *("wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"),
            f"http://127.0.0.1:{port}/hello?name=bench",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
    ).stdout
    if re.search(r"Non-2xx|Socket errors", out):
        raise RuntimeError(f"wrk saw errors:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    value, unit = re.search(r"\s50%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    return rps, float(value) * {"us": 1, "ms": 1e3, "s": 1e6}[unit]


def measure(port: int, seconds: float) -> tuple[float, float]:
    wrk(port, 8, 1)  # warm up: connections, pools, caches
    rps, _ = wrk(port, 64, seconds)
    _, p50 = wrk(port, 1, max(1.0, seconds / 2))
    return rps, p50


PROXY_CONFIG = """
[server]
listen = "127.0.0.1:{port}"
backlog = 4096
keepalive_requests = 0

[admin]
listen = "127.0.0.1:{admin}"

[[routes]]
prefix = "/"
cluster = "app"
timeout = 10.0

[clusters.app]
nodes = ["{node}"]
"""

NGINX_CONFIG = """
{user}
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  upstream app {{ server unix:{sock}; keepalive 128; keepalive_requests 1000000; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    keepalive_requests 1000000;
    location / {{
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
    }}
  }}
}}
"""


def pitcher_command() -> list[str]:
    script = str(Path(PYTHON).with_name("pitcher"))
    return [script] if os.access(script, os.X_OK) else [PYTHON, "-m", "pitcher_rpc.cli"]


def serve_and_measure(tmp: Path, node: str, seconds: float) -> tuple[tuple[float, float], bytes]:
    """``pitcher serve`` (one process) in front of ``node``: measured, and one answer."""
    port = free_port()
    conf = tmp / "pitcher.toml"
    conf.write_text(PROXY_CONFIG.format(port=port, admin=free_port(), node=node))
    serve = [*pitcher_command(), "serve", "-c", str(conf), "--workers", "0"]
    with process(serve, tmp / "serve.log") as proxy:
        wait_until_ready(lambda: get(port), proxy, "pitcher serve", tmp / "serve.log")
        return measure(port, seconds), get(port)


def pitcher_round(tmp: Path, seconds: float) -> tuple[tuple[float, float], bytes]:
    sock = str(tmp / "pitcher-app.sock")
    backend = [
        PYTHON,
        "-m",
        "pitcher_rpc.cli",
        "backend",
        "bench_asgi:app",
        "--listen",
        f"unix://{sock}",
    ]
    with process(backend, tmp / "backend.log") as app_proc:
        wait_until_ready(
            lambda: unix_listening(sock), app_proc, "pitcher backend", tmp / "backend.log"
        )
        return serve_and_measure(tmp, f"unix://{sock}", seconds)


def bridge_round(tmp: Path, seconds: float) -> tuple[tuple[float, float], bytes]:
    """pitcher serve -> pitcher bridge -> uvicorn: the app left as it is, behind a sidecar."""
    origin = str(tmp / "bridged-uvicorn.sock")
    sock = str(tmp / "bridge.sock")
    uvicorn = [PYTHON, "-m", "uvicorn", "bench_asgi:app", "--uds", origin]
    uvicorn += ["--no-access-log", "--log-level", "warning"]
    bridge = [PYTHON, "-m", "pitcher_rpc.cli", "bridge", "--listen", f"unix://{sock}"]
    bridge += ["--to", f"unix://{origin}"]
    with process(uvicorn, tmp / "bridged-uvicorn.log") as app_proc:
        wait_until_ready(lambda: unix_listening(origin), app_proc, "uvicorn", tmp / "uvicorn.log")
        with process(bridge, tmp / "bridge.log") as bridge_proc:
            wait_until_ready(
                lambda: unix_listening(sock), bridge_proc, "pitcher bridge", tmp / "bridge.log"
            )
            return serve_and_measure(tmp, f"unix://{sock}", seconds)


def nginx_round(tmp: Path, seconds: float, nginx: str) -> tuple[tuple[float, float], bytes]:
    sock = str(tmp / "uvicorn.sock")
    port = free_port()
    uvicorn = [PYTHON, "-m", "uvicorn", "bench_asgi:app", "--uds", sock]
    uvicorn += ["--no-access-log", "--log-level", "warning"]
    with process(uvicorn, tmp / "uvicorn.log") as app_proc:
        wait_until_ready(lambda: unix_listening(sock), app_proc, "uvicorn", tmp / "uvicorn.log")
        conf = tmp / "nginx.conf"
        # Run as root, nginx's worker would be "nobody", who may not open the socket.
        user = "user root;" if os.geteuid() == 0 else ""
        conf.write_text(NGINX_CONFIG.format(user=user, dir=tmp, sock=sock, port=port))
        with process([nginx, "-c", str(conf), "-p", str(tmp)], tmp / "nginx.log") as proxy:
            wait_until_ready(lambda: get(port), proxy, "nginx", tmp / "nginx.log")
            return measure(port, seconds), get(port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="under load, per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else ""
    )
    if not nginx or not shutil.which("wrk"):
        sys.exit("bench_asgi needs nginx and wrk (apt-get install nginx-light wrk)")
    rows: dict[str, list[float]] = {}
    for number in range(1, args.rounds + 1):
        tmp = Path(tempfile.mkdtemp(prefix="pitcher-asgi-", dir="/tmp"))
        try:
            (p_rps, p_p50), p_body = pitcher_round(tmp, args.seconds)
            (n_rps, n_p50), n_body = nginx_round(tmp, args.seconds, nginx)
            (b_rps, b_p50), b_body = bridge_round(tmp, args.seconds)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if not p_body == n_body == b_body:
            raise RuntimeError(f"the answers differ: {p_body!r}, {n_body!r}, {b_body!r}")
        for key, value in (
            ("pitcher rps", p_rps),
            ("pitcher p50", p_p50),
            ("nginx rps", n_rps),
            ("nginx p50", n_p50),
            ("bridge rps", b_rps),
            ("bridge p50", b_p50),
            ("rps ratio", p_rps / n_rps),
            ("p50 ratio", p_p50 / n_p50),
            ("bridge rps ratio", b_rps / n_rps),
            ("bridge p50 ratio", b_p50 / n_p50),
        ):
            rows.setdefault(key, []).append(value)
        print(
            f"round {number}: pitcher {p_rps:.0f} req/s p50 {p_p50:.0f} µs;"
            f" nginx -> uvicorn {n_rps:.0f} req/s p50 {n_p50:.0f} µs;"
            f" pitcher -> bridge -> uvicorn {b_rps:.0f} req/s p50 {b_p50:.0f} µs",
            file=sys.stderr,
            flush=True,
        )
    m = {key: statistics.median(values) for key, values in rows.items()}
    from transports.native import describe

    print(f"FastAPI GET /hello, medians of {args.rounds} rounds of {args.seconds:g} s")
    print(f"(pitcher build: {describe()}; ratios: the median of each round's ratio)")
    print("| path | req/s (64 conn.) | p50 µs (1 conn.) |")
    print("|---|---|---|")
    print(f"| pitcher -> ASGI over unix:// | {m['pitcher rps']:.0f} | {m['pitcher p50']:.0f} |")
    print(f"| nginx -> uvicorn over unix:  | {m['nginx rps']:.0f} | {m['nginx p50']:.0f} |")
    print(f"| ratio (pitcher / nginx)      | {m['rps ratio']:.2f}x | {m['p50 ratio']:.2f}x |")
    print(f"| pitcher -> bridge -> uvicorn | {m['bridge rps']:.0f} | {m['bridge p50']:.0f} |")
    print(
        f"| ratio (bridge / nginx)       | {m['bridge rps ratio']:.2f}x"
        f" | {m['bridge p50 ratio']:.2f}x |"
    )
    rounds = ", ".join(f"{r:.2f}" for r in rows["rps ratio"])
    print(f"rounds' req/s ratios: {rounds}")


if __name__ == "__main__":
    main()
