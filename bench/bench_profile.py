"""Where the CPU of the proxy and of the SDK service goes, by kind of code, for both builds.

Run from the repository root, on a machine doing nothing else, as a user who
may attach ``perf`` to its own processes (root, or kernel.perf_event_paranoid
at most 1)::

    python bench/bench_profile.py
    python bench/bench_profile.py --rounds 1 --seconds 2 --builds compiled
    python bench/bench_profile.py --top 12 --keep /tmp/pitcher-perf   # perf report -i ... later

The pair of bench_pair.py's setup D, one build at a time: the SDK echo
(``pitcher backend pitcher_rpc.sdk.echo:app``) on a Unix socket behind
``pitcher serve --workers 0`` (one process, so that one pid is the whole
proxy), loaded by ``wrk -t1 -c64 --latency`` with 5 request headers; with
``--modules``, setup E's instead (access_log, metrics and throttle on). After a
second of warm-up, ``perf record -e cpu-clock -F 999 -g`` is attached to the
proxy and to the service at once, each writing its own file, for the length
of a ``--seconds`` wrk run; ``perf script`` then gives the shared object and
symbol of every sample, weighted by its period. The compiled build runs with
``PITCHER_PURE_PYTHON`` unset, the pure one with it set to 1; the builds
alternate which goes first from round to round, every process is fresh for
each run.

Shared objects are put in classes: interpreter (libpython, the python
binary; the line under it is the share of ``_PyEval_EvalFrameDefault``, the
bytecode loop, the rest being the object model, calls and memory), compiled
(the mypyc library and any extension under pitcher_rpc/ or transports/),
kernel, uvloop/httptools, libc (and the dynamic loader), protobuf (upb),
other (each of its objects is listed below the table). For each build and
side: the share of every class and the CPU µs per request it stands for
(share x the process's utime+stime from /proc over the wrk run, divided by
the requests wrk counted), medians over the rounds; then the heaviest
symbols of the interpreter and of the compiled code. ``seen`` is the CPU
time perf sampled against what /proc says the process spent (perf also
samples a moment before and after the wrk run, when the process is all but
idle). ``--keep DIR`` keeps the perf data files, for ``perf report -i``.

Needs perf and wrk; refuses to run without them or when perf cannot attach
to a process. Loopback and Unix sockets only; every process is started and
stopped here by its pid (SIGTERM, then SIGKILL), every wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

# The same pair as bench_pair.py's setup D (or E): its configuration and 5 request headers.
from bench_pair import E_MODULES, E_ROUTE, PITCHER_CONFIG, machine_busy, wait_quiet  # noqa: E402
from bench_pair import FIVE as HEADERS  # noqa: E402
from bench_spine import ROOT, cpu_seconds, exit_on_sigterm, free_port  # noqa: E402

PYTHON = sys.executable
BUILDS = ("compiled", "pure")
SIDES = ("proxy", "service")
CLASSES = (
    "interpreter",
    "compiled",
    "kernel",
    "uvloop/httptools",
    "libc",
    "protobuf (upb)",
    "other",
)
EVAL_LOOP = "_PyEval_EvalFrameDefault"
CONNECTIONS = 64


# ------------------------------------------------------------------------------ processes


def build_env(build: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "PITCHER_PURE_PYTHON"}
    if build == "pure":
        env["PITCHER_PURE_PYTHON"] = "1"
    return env


def describe(build: str) -> str:
    """What ``transports.native.describe()`` says in this build's environment."""
    return subprocess.run(
        [PYTHON, "-c", "from transports.native import describe; print(describe())"],
        cwd=ROOT,
        env=build_env(build),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()


@contextlib.contextmanager
def started(args: list[str], env: dict[str, str], log: Path) -> Iterator[int]:
    """A process until the block ends: SIGTERM, then SIGKILL after 10 s."""
    with open(log, "ab") as errors:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=errors, stderr=errors, cwd=ROOT, env=env
        )
    try:
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_for_unix(path: Path, pid: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(0.5)
            sock.connect(str(path))
            return
        alive(pid)
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {path}")


def wait_until_answers(port: int, pid: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    status = 0
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, http.client.HTTPException):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            try:
                connection.request("GET", "/hello")
                status = connection.getresponse().status
            finally:
                connection.close()
            if status == 200:
                return
        alive(pid)
        time.sleep(0.1)
    raise RuntimeError(f"127.0.0.1:{port} does not answer 200 (last status {status})")


def alive(pid: int) -> None:
    """Raise if the process has exited (a zombie counts as gone)."""
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            return
    raise RuntimeError(f"process {pid} exited")


def children_cpu() -> float:
    """CPU seconds of this process's finished children (wrk)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ----------------------------------------------------------------------------- wrk, perf


def wrk(port: int, seconds: float) -> tuple[float, int, int]:
    """Requests per second, requests and errors (socket errors, non-2xx) of one wrk run."""
    args = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{max(1, round(seconds))}s", "--latency"]
    for header in HEADERS:
        args += ["-H", header]
    out = subprocess.run(
        [*args, f"http://127.0.0.1:{port}/hello"],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
    ).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    count = re.search(r"(\d+) requests in", out)
    if rate is None or count is None:
        raise RuntimeError(f"wrk said:\n{out}")
    errors = 0
    found = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if found is not None:
        errors += sum(int(n) for n in found.groups())
    found = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if found is not None:
        errors += int(found.group(1))
    return float(rate.group(1)), int(count.group(1)), errors


@contextlib.contextmanager
def recording(pid: int, data: Path, log: Path) -> Iterator[int]:
    """``perf record`` attached to ``pid`` until the block ends, then stopped by SIGINT."""
    args = ["perf", "record", "-e", "cpu-clock", "-F", "999", "-g", "-p", str(pid)]
    with open(log, "ab") as errors:
        perf = subprocess.Popen(
            [*args, "-o", str(data)], stdin=subprocess.DEVNULL, stdout=errors, stderr=errors
        )
    try:
        # Ready once it holds a perf event's descriptor; a moment more for it to be enabled.
        deadline = time.monotonic() + 10.0
        while not holds_perf_event(perf.pid):
            if perf.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"perf record -p {pid} did not start; see {log}")
            time.sleep(0.05)
        time.sleep(0.3)
        yield perf.pid
    finally:
        perf.send_signal(signal.SIGINT)
        try:
            perf.wait(30)
        except subprocess.TimeoutExpired:
            perf.kill()
            perf.wait(10)
            raise RuntimeError(f"perf record -p {pid} did not stop at SIGINT; see {log}") from None


def holds_perf_event(pid: int) -> bool:
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[perf_event]":
                    return True
    return False


def samples(data: Path) -> list[tuple[int, str, str]]:
    """Period (ns), symbol and shared object of every sample in a perf data file."""
    out = subprocess.run(
        ["perf", "script", "-F", "period,ip,sym,dso", "--hide-call-graph", "-i", str(data)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    found = []
    for line in out.splitlines():
        # "   1001001      7f2cc9baf9ba _PyObject_Realloc (/path/libpython3.11.so.1.0)"
        head, _, dso = line.strip().rpartition(" (")
        parts = head.split(None, 2)
        if len(parts) < 2 or not dso.endswith(")") or not parts[0].isdigit():
            continue
        found.append((int(parts[0]), parts[2] if len(parts) == 3 else "[unknown]", dso[:-1]))
    return found


def kind(dso: str) -> str:
    """The class of a shared object, by its path."""
    name = os.path.basename(dso)
    if name.startswith("libpython") or re.fullmatch(r"python[\d.]*", name):
        return "interpreter"
    if name.startswith("pitcher_rpc_native__mypyc") or (
        name.endswith(".so") and ("/pitcher_rpc/" in dso or "/transports/" in dso)
    ):
        return "compiled"
    if dso in ("[kernel.kallsyms]", "[vdso]", "[vsyscall]") or dso.startswith("[kernel"):
        return "kernel"
    if "/uvloop/" in dso or "/httptools/" in dso:
        return "uvloop/httptools"
    if name.startswith(("libc.so", "ld-linux")):
        return "libc"
    if "/google/_upb/" in dso:
        return "protobuf (upb)"
    return "other"


def check_tools() -> str | None:
    """Why this script cannot run here, or None."""
    missing = [tool for tool in ("perf", "wrk") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found on PATH: this benchmark needs both"
    paranoid = "?"
    with contextlib.suppress(OSError):
        paranoid = Path("/proc/sys/kernel/perf_event_paranoid").read_text().strip()
    # A busy child bounded in time, to attach to exactly as the runs will.
    busy = "import time\nend = time.monotonic() + 5\nwhile time.monotonic() < end: pass"
    with tempfile.TemporaryDirectory(prefix="pitcher-profile-check-", dir="/tmp") as scratch:
        data, log = Path(scratch) / "check.data", Path(scratch) / "perf.log"
        try:
            with (
                started([PYTHON, "-c", busy], dict(os.environ), Path(scratch) / "busy.log") as pid,
                recording(pid, data, log),
            ):
                time.sleep(0.5)
            seen = samples(data)
        except (RuntimeError, OSError, subprocess.SubprocessError) as error:
            text = log.read_text(errors="replace").strip()[-600:] if log.exists() else ""
            return (
                f"perf cannot record a process here ({error}); kernel.perf_event_paranoid is"
                f" {paranoid} (attaching needs at most 1, or root/CAP_PERFMON). perf said:\n{text}"
            )
    if not seen:
        return f"perf recorded no sample of a busy process (perf_event_paranoid {paranoid})"
    return None


# ------------------------------------------------------------------------- measurement


@dataclass
class Side:
    """One side's numbers over the rounds of one build."""

    shares: dict[str, list[float]] = field(default_factory=dict)  # class -> share per round
    values: dict[str, list[float]] = field(default_factory=dict)  # samples, cpu_us, seen ...
    symbols: Counter[tuple[str, str]] = field(default_factory=Counter)  # (class, sym): period
    dsos: Counter[str] = field(default_factory=Counter)  # "other" objects: period
    total: int = 0  # period of every sample, all rounds

    def add(self, metric: str, value: float) -> None:
        self.values.setdefault(metric, []).append(value)

    def median(self, metric: str) -> float:
        return statistics.median(self.values.get(metric) or [float("nan")])

    def share(self, name: str) -> float:
        return statistics.median(self.shares.get(name) or [float("nan")])


@dataclass
class Run:
    rate: float
    requests: int
    errors: int
    others: float  # cores busy with other processes meanwhile


def profile_once(
    build: str, tmp: Path, seconds: float, tag: str, keep: Path | None, modules: bool
) -> tuple[Run, dict[str, Side]]:
    env = build_env(build)
    sock = tmp / f"{tag}.sock"
    port, admin = free_port(), free_port()
    conf = tmp / f"{tag}.toml"
    route = E_ROUTE if modules else ""
    text = PITCHER_CONFIG.format(port=port, admin=admin, socket=sock, route=route)
    if modules:
        text += E_MODULES.format(log=tmp / f"{tag}-access.log")
    conf.write_text(text)
    echo = [PYTHON, "-m", "pitcher_rpc.cli", "backend", "pitcher_rpc.sdk.echo:app"]
    serve = [PYTHON, "-m", "pitcher_rpc.cli", "serve", "-c", str(conf), "--workers", "0"]
    data = {side: tmp / f"{tag}-{side}.data" for side in SIDES}
    cpu: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        service = stack.enter_context(
            started([*echo, "--listen", f"unix://{sock}"], env, tmp / f"{tag}-service.log")
        )
        wait_for_unix(sock, service)
        proxy = stack.enter_context(started(serve, env, tmp / f"{tag}-proxy.log"))
        wait_until_answers(port, proxy)
        pids = {"proxy": proxy, "service": service}
        wrk(port, 1.0)  # warm up: connections, pools, caches
        with contextlib.ExitStack() as perfs:
            perf_pids = [
                perfs.enter_context(recording(pids[side], data[side], tmp / f"{tag}-perf.log"))
                for side in SIDES
            ]
            before = {side: cpu_seconds(pid) for side, pid in pids.items()}
            ours = sum(cpu_seconds(pid) for pid in perf_pids) + children_cpu()
            busy, began = machine_busy(), time.monotonic()
            rate, requests, errors = wrk(port, seconds)
            busy = machine_busy() - busy
            elapsed = time.monotonic() - began
            for side, pid in pids.items():
                cpu[side] = cpu_seconds(pid) - before[side]
            ours = sum(cpu_seconds(pid) for pid in perf_pids) + children_cpu() - ours
        others = max(0.0, busy - sum(cpu.values()) - ours) / elapsed
    found = {}
    for side in SIDES:
        found[side] = Side()
        seen = samples(data[side])
        if not seen:
            raise RuntimeError(f"perf recorded no sample of the {side} ({data[side]})")
        total = sum(period for period, _, _ in seen)
        by_class: Counter[str] = Counter()
        for period, symbol, dso in seen:
            name = kind(dso)
            by_class[name] += period
            found[side].symbols[(name, symbol)] += period
            if name == "other":
                found[side].dsos[dso] += period
        found[side].total = total
        for name in CLASSES:
            found[side].shares[name] = [by_class[name] / total]
        eval_loop = found[side].symbols[("interpreter", EVAL_LOOP)]
        found[side].add("eval", eval_loop / total)
        found[side].add("samples", len(seen))
        found[side].add("cpu_us", cpu[side] / max(requests, 1) * 1e6)
        found[side].add("seen", total / 1e9 / cpu[side] if cpu[side] else float("nan"))
        if keep is None:
            data[side].unlink()
        else:
            shutil.move(data[side], keep / data[side].name)
    return Run(rate, requests, errors, others), found


def merge(into: Side, one: Side) -> None:
    for name, shares in one.shares.items():
        into.shares.setdefault(name, []).extend(shares)
    for metric, values in one.values.items():
        into.values.setdefault(metric, []).extend(values)
    into.symbols.update(one.symbols)
    into.dsos.update(one.dsos)
    into.total += one.total


# ------------------------------------------------------------------------------ report


def report(
    builds: list[str],
    sides: dict[tuple[str, str], Side],
    runs: dict[str, list[Run]],
    top: int,
) -> None:
    columns = [(side, build) for side in SIDES for build in builds]
    width = 19
    print(f"{'':<24}" + "".join(f"{side + ', ' + build:>{width}}" for side, build in columns))

    def row(label: str, cells: list[str]) -> None:
        print(f"{label:<24}" + "".join(f"{cell:>{width}}" for cell in cells))

    row("req/s (wrk)", [f"{statistics.median(r.rate for r in runs[b]):.0f}" for _, b in columns])
    row("CPU µs/req (/proc)", [f"{sides[c].median('cpu_us'):.1f}" for c in columns])
    row("samples", [f"{sides[c].median('samples'):.0f}" for c in columns])
    row("seen by perf", [f"{sides[c].median('seen'):.0%}" for c in columns])
    row("share, µs/req by class:", [""] * len(columns))
    for name in CLASSES:
        cells = []
        for column in columns:
            share = sides[column].share(name)
            cells.append(f"{share:.1%} {share * sides[column].median('cpu_us'):5.1f}")
        row(f"  {name}", cells)
        if name == "interpreter":
            cells = []
            for column in columns:
                share = sides[column].median("eval")
                cells.append(f"{share:.1%} {share * sides[column].median('cpu_us'):5.1f}")
            row(f"    of it {EVAL_LOOP[:14]}…", cells)
    row(
        "others (cores)",
        [f"{statistics.median(r.others for r in runs[b]):.2f}" for _, b in columns],
    )
    errors = {build: sum(r.errors for r in runs[build]) for build in builds}
    for build, count in errors.items():
        if count:
            print(f"warning: wrk counted {count} errors or non-2xx answers with the {build} build")
    busiest = max(statistics.median(r.others for r in runs[b]) for b in builds)
    if busiest > 0.2:
        print(
            f"warning: other processes kept {busiest:.2f} cores busy (median of a build):"
            " these numbers are skewed by them"
        )

    for name in ("interpreter", "compiled"):
        print()
        print(
            f"heaviest {name} symbols: share of the side's samples over all rounds,"
            f" ≈µs/req (top {top}):"
        )
        for column in columns:
            side = sides[column]
            total = side.total or 1
            heaviest = [
                (symbol, period)
                for (kind_of, symbol), period in side.symbols.most_common()
                if kind_of == name
            ][:top]
            if not heaviest:
                continue
            print(f"  {column[0]}, {column[1]}:")
            for symbol, period in heaviest:
                share = period / total
                print(f"    {share:6.1%} {share * side.median('cpu_us'):5.1f}  {symbol}")
    print()
    print("'other' shared objects, share of the side's samples over all rounds:")
    for column in columns:
        side = sides[column]
        total = side.total or 1
        listed = ", ".join(
            f"{os.path.basename(dso)} {period / total:.1%}"
            for dso, period in side.dsos.most_common()
            if period / total >= 0.001
        )
        print(f"  {column[0]}, {column[1]}: {listed or 'none'}")


def builds_option(text: str) -> list[str]:
    builds = [part.strip() for part in text.split(",") if part.strip()]
    if not builds or any(build not in BUILDS for build in builds) or len(set(builds)) < len(builds):
        raise argparse.ArgumentTypeError(f"builds are among {','.join(BUILDS)}, not {text!r}")
    return builds


def main() -> None:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measured wrk run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--builds", type=builds_option, default=list(BUILDS), metavar="compiled,pure"
    )
    parser.add_argument("--top", type=int, default=8, help="symbols listed per build and side")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep the perf data files here")
    parser.add_argument(
        "--modules",
        action="store_true",
        help="the pair of bench_pair.py's setup E: access_log, metrics and throttle on as well",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="before each run, wait at most this long for the machine to be idle",
    )
    args = parser.parse_args()
    if args.rounds < 1 or args.seconds < 1:
        parser.error("--rounds and --seconds are at least 1")
    refusal = check_tools()
    if refusal is not None:
        sys.exit(f"bench_profile: refused: {refusal}")
    builds: list[str] = args.builds
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    described = {build: describe(build) for build in builds}
    sides = {(side, build): Side() for side in SIDES for build in builds}
    runs: dict[str, list[Run]] = {build: [] for build in builds}
    logs: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="pitcher-profile-", dir="/tmp") as scratch:
        tmp = Path(scratch)
        for number in range(args.rounds):
            order = builds[number % len(builds) :] + builds[: number % len(builds)]
            for build in order:
                say(f"round {number + 1}/{args.rounds}: {build}")
                wait_quiet(args.wait_quiet)
                tag = f"{build}-{number}"
                run, found = profile_once(build, tmp, args.seconds, tag, args.keep, args.modules)
                runs[build].append(run)
                for side in SIDES:
                    merge(sides[(side, build)], found[side])
                    if number == 0:
                        text = (tmp / f"{tag}-{side}.log").read_text(errors="replace")
                        logs.setdefault(build, []).append(text)
    print(
        f"Pitcher RPC CPU profile: {args.rounds} rounds x {args.seconds:g}s per build, medians;"
        f" {os.cpu_count()} CPUs; perf record -e cpu-clock -F 999 -g on the proxy"
        f" (serve --workers 0) and the SDK echo; wrk -t1 -c{CONNECTIONS}, 5 request headers"
    )
    if args.modules:
        print("  the proxy runs setup E's modules: access_log, metrics, throttle, request_id")
    for build in builds:
        print(f"  {build}: transports.native.describe() in its environment: {described[build]}")
        # The processes' own start-up lines say the same, or the numbers are not the build's.
        for side, text in zip(SIDES, logs[build], strict=True):
            if described[build] not in text:
                print(f"  warning: the {side}'s log does not say {described[build]!r}:")
                print("    " + (text.strip().splitlines() or ["(empty)"])[0])
        if build == "compiled" and not described[build].startswith("compiled"):
            print("  warning: the 'compiled' build runs pure Python here (see the line above)")
    print("cells: share of the samples, and CPU µs per request of that class (share x /proc)")
    report(builds, sides, runs, args.top)


if __name__ == "__main__":
    main()
