"""Instructions per request, counted by callgrind: ratios that a busy machine cannot blur.

Run from the repository root (valgrind must be installed; loopback only)::

    python bench/bench_instructions.py
    python bench/bench_instructions.py --setups C,D --requests 2000
    python bench/bench_instructions.py --pitcher-root ../pitcher-before
    python bench/bench_instructions.py --setups D --keep /tmp/instr   # then:
    callgrind_annotate --inclusive=yes /tmp/instr/D/front.out.1 | head -60

CPU seconds per request (bench_pair.py) move by several percent from run to
run on a shared machine; the number of instructions a process executes for
the same requests does not. Each setup of bench_pair.py that runs Python on
both sides is started with its front and its service under ``valgrind
--tool=callgrind``, warmed up with ``--warm`` requests, its counters zeroed
(``callgrind_control -z``), loaded with ``--requests`` keep-alive requests
at one connection (5 request headers, or 20 with ``--headers 20``, one at
a time), and dumped
(``callgrind_control -d``): instructions per request of the front and of the
service, user space only (what the kernel does for the same system calls is
not counted, and is the same for every setup here: 2 reads, 2 writes and 2
waits per request on each side).

    B  minimal_proxy.py + minimal_echo.py
    C  minimal_proxy.py + the SDK echo
    D  pitcher serve --workers 0 + the SDK echo, as built (compiled or not)
    P  D with PITCHER_PURE_PYTHON=1 on both sides
    E  D with bench_pair.py's modules: access_log, metrics, throttle (and
       request_id, on by default, as in D); its access log writes in batches
       of 4,096 lines, so the lines of the measured requests are made, not
       written (a batch's write, in a thread, is some 100 instructions a line)

Pitcher runs as one process (``--workers 0``) so that one pid is the whole
request path; what a master and its worker spend per second whatever the
load (their coordination tick) is not per request and is measured apart:
``--idle SECONDS`` reports the CPU an idle ``pitcher serve --workers 1``
spends per second (from /proc, not callgrind).

Ratios: D/C and P/C for the front (the goal of the request core: 1.15 at
most), the SDK echo against the minimal echo (C's service against B's).
Under callgrind a process runs some 50 times slower, so timers that run per
second of wall time weigh less per request than they do at full speed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from bench_pair import (  # noqa: E402
    E_MODULES,
    E_ROUTE,
    HEADERS,
    PITCHER_CONFIG,
    PURE_ENV,
    http_request,
)
from bench_spine import ROOT, exit_on_sigterm, free_port, wait_for_port  # noqa: E402

PYTHON = sys.executable
SUMMARY = re.compile(rb"^summary: (\d+)", re.MULTILINE)


def callgrind(out: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", "--dump-instr=no", f"--callgrind-out-file={out}"]


@contextlib.contextmanager
def started(args: list[str], cwd: Path, env: dict[str, str], log: Path) -> Iterator[int]:
    with open(log, "ab") as output:
        proc = subprocess.Popen(args, stdout=output, stderr=output, cwd=cwd, env=env)
    try:
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for_file(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear in {timeout:g}s")
        time.sleep(0.2)


def requests(port: int, count: int, headers: int = 5) -> None:
    """``count`` keep-alive requests, one at a time, on one connection; each answer read whole."""
    raw = http_request("GET", "/bench", HEADERS[headers])
    with socket.create_connection(("127.0.0.1", port), 60) as sock:
        for _ in range(count):
            sock.sendall(raw)
            buffer = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    raise RuntimeError("the front closed the connection")
                buffer += chunk
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    continue
                head = buffer[:end].lower()
                length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
                if len(buffer) >= end + 4 + length:
                    if not buffer.startswith(b"HTTP/1.1 200"):
                        raise RuntimeError(f"answered {buffer[:40]!r}")
                    break


def control(action: str, pid: int) -> None:
    subprocess.run(
        ["callgrind_control", action, str(pid)], check=True, capture_output=True, timeout=60
    )


def counted(out: Path) -> int:
    """Instructions in the dump callgrind_control -d wrote (``out.1``)."""
    dump = out.with_name(out.name + ".1")
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(OSError):
            found = SUMMARY.search(dump.read_bytes())
            if found:
                return int(found.group(1))
        if time.monotonic() > deadline:
            raise RuntimeError(f"no callgrind dump at {dump}")
        time.sleep(0.2)


def measure(
    key: str, root: Path, tmp: Path, warm: int, count: int, headers: int = 5
) -> tuple[float, float]:
    """Instructions per request of (front, service) for one setup."""
    work = tmp / key
    work.mkdir(exist_ok=True)
    for old in work.glob("*.out*"):
        old.unlink()
    env = dict(os.environ)
    env.pop(PURE_ENV, None)
    env["PYTHONPATH"] = str(root)
    if key == "P":
        env[PURE_ENV] = "1"
    sock = work / "echo.sock"
    port = free_port()
    if key == "B":
        service = [PYTHON, str(BENCH / "minimal_echo.py"), "--listen", f"unix://{sock}"]
    else:
        service = [PYTHON, "-m", "pitcher_rpc.cli", "backend", "pitcher_rpc.sdk.echo:app"]
        service += ["--listen", f"unix://{sock}"]
    if key in ("B", "C"):
        front = [PYTHON, str(BENCH / "minimal_proxy.py"), "--listen", f"127.0.0.1:{port}"]
        front += ["--backend", f"unix://{sock}"]
    else:
        conf = work / "pitcher.toml"
        route = E_ROUTE if key == "E" else ""
        text = PITCHER_CONFIG.format(port=port, admin=free_port(), socket=sock, route=route)
        if key == "E":
            # Under callgrind the event loop lags ~50 times more than at full
            # speed: the overload guard would switch access_log off. And the
            # access log writes a batch when half its buffer (4,096 lines)
            # is full, as it does at full speed (where 0.2 s holds thousands
            # of lines), not every 0.2 s of a run slowed 50 times.
            log = work / "access.log"
            modules = E_MODULES.format(log=log)
            modules = modules.replace(f'path = "{log}"', f'path = "{log}"\nflush_interval = 600.0')
            text += modules + '\n[overload]\nmode = "off"\n'
        conf.write_text(text)
        front = [PYTHON, "-m", "pitcher_rpc.cli", "serve", "-c", str(conf), "--workers", "0"]
    service_out, front_out = work / "service.out", work / "front.out"
    log = work / "log"
    with started(callgrind(service_out) + service, root, env, log) as service_pid:
        wait_for_file(sock, 120)
        with started(callgrind(front_out) + front, root, env, log) as front_pid:
            wait_for_port(port, 120)
            requests(port, warm, headers)
            control("-z", front_pid)
            control("-z", service_pid)
            requests(port, count, headers)
            control("-d", front_pid)
            control("-d", service_pid)
            return counted(front_out) / count, counted(service_out) / count


def idle_cpu(root: Path, tmp: Path, seconds: float) -> float:
    """CPU seconds per second an idle master and one worker spend (/proc, after start-up)."""
    work = tmp / "idle"
    work.mkdir(exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root)
    conf = work / "pitcher.toml"
    conf.write_text(
        PITCHER_CONFIG.format(
            port=free_port(), admin=free_port(), socket=work / "none.sock", route=""
        )
    )
    serve = [PYTHON, "-m", "pitcher_rpc.cli", "serve", "-c", str(conf), "--workers", "1"]
    with started(serve, root, env, work / "log") as pid:
        time.sleep(3.0)

        def spent() -> float:
            total = 0.0
            for each in [pid, *children(pid)]:
                with contextlib.suppress(OSError):
                    fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
                    total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            return total

        before = spent()
        time.sleep(seconds)
        return (spent() - before) / seconds


def children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            found.extend(int(child) for child in text.split())
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setups", default="B,C,D,P")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warm", type=int, default=300)
    parser.add_argument("--headers", type=int, choices=sorted(HEADERS), default=5)
    parser.add_argument("--idle", type=float, default=10.0, help="seconds; 0 skips it")
    parser.add_argument("--pitcher-root", type=Path, default=ROOT)
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="leave the callgrind dumps here (DIR/KEY/front.out.1, service.out.1) to read with"
        " callgrind_annotate",
    )
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    exit_on_sigterm()
    keys = [key.strip() for key in args.setups.split(",") if key.strip()]
    root = args.pitcher_root.resolve()
    found: dict[str, tuple[float, float]] = {}
    with contextlib.ExitStack() as stack:
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            tmp = args.keep.resolve()
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pitcher-instr-")))
        for key in keys:
            found[key] = measure(key, root, tmp, args.warm, args.requests, args.headers)
            front, service = found[key]
            print(f"{key}  front {front:9,.0f}  service {service:9,.0f}  instructions/request")
        for top, bottom, side, label in (
            ("D", "C", 0, "proxy, compiled build / minimal proxy"),
            ("P", "C", 0, "proxy, pure build / minimal proxy"),
            ("D", "P", 0, "proxy, compiled / pure"),
            ("E", "D", 0, "proxy with modules / without (goal: 1.25 at most)"),
            ("C", "B", 1, "SDK echo / minimal echo"),
            ("P", "B", 1, "SDK echo, pure build / minimal echo"),
        ):
            if top in found and bottom in found:
                ratio = found[top][side] / found[bottom][side]
                print(f"{top}/{bottom}  {ratio:5.2f}  {label}")
        if args.idle > 0:
            cpu = idle_cpu(root, tmp, args.idle)
            print(
                f"idle master + 1 worker: {cpu * 1000:.1f} ms of CPU per second"
                f" ({cpu * 1e6 / 5000:.1f} us per request at 5,000 req/s)"
            )


if __name__ == "__main__":
    main()
