"""Real processes and raw sockets for the proxy's integration tests.

Every proxy and backend here is a subprocess (``pitcher serve``, ``pitcher
backend`` or a script written into a short temporary directory), and every
client is a plain socket, so the tests see exactly what a user would. The
:class:`Launcher` owns each process it starts and stops it by pid when its
fixture is torn down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

# Generous bounds for things that normally take milliseconds; they only stop a
# broken build from hanging the suite.
START_TIMEOUT = 5.0
SOCKET_TIMEOUT = 5.0
STOP_TIMEOUT = 3.0


def pitcher_command() -> list[str]:
    """The ``pitcher`` console script of the running interpreter's environment."""
    script = os.path.join(os.path.dirname(sys.executable), "pitcher")
    if os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-m", "pitcher_rpc.cli"]


# A port for a test to bind later. bind(0) picks from the kernel's ephemeral
# range (32768-60999 here), where the client connections of the tests running
# in parallel (pytest-xdist) can take it before the test binds it; each worker
# hands out the ports of its own block below that range instead, in turn.
_PORT_BASE = 20000
_PORT_BLOCK = 1000
_PORT_BLOCKS = 12
_next_port = [-1]


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
    block = _PORT_BASE + (int(worker) % _PORT_BLOCKS if worker.isdigit() else 0) * _PORT_BLOCK
    if _next_port[0] < 0:
        _next_port[0] = random.randrange(_PORT_BLOCK)
    for _ in range(_PORT_BLOCK):
        port = block + _next_port[0]
        _next_port[0] = (_next_port[0] + 1) % _PORT_BLOCK
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {block}-{block + _PORT_BLOCK - 1}")


def short_tmpdir() -> str:
    # Unix socket paths are limited to ~107 bytes; pytest's tmp_path is too deep.
    return tempfile.mkdtemp(prefix="pitcher-t-", dir="/tmp")


def can_connect(uri: str) -> bool:
    """Whether something accepts connections at ``uri``.

    A stream address is probed with a plain connect; a datagram or ZeroMQ one
    has no connection to make, so a Pitcher PING must come back instead.
    """
    if not uri.startswith(("tcp://", "unix://")):
        return _answers_ping(uri)
    if uri.startswith("unix://"):
        family, address = socket.AF_UNIX, uri[len("unix://") :]
    else:
        host, _, port = uri.removeprefix("tcp://").rpartition(":")
        family, address = socket.AF_INET, (host, int(port))  # type: ignore[assignment]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        try:
            sock.connect(address)
        except OSError:
            return False
    return True


def _answers_ping(uri: str) -> bool:
    from transports.errors import TransportError
    from transports.registry import transport_for

    async def ping() -> bool:
        client = transport_for(uri).client(uri)
        try:
            await client.ping(0.3)
            return True
        except TransportError:
            return False
        finally:
            client.abort()

    return asyncio.run(ping())


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def toml_config(
    routes: Sequence[Mapping[str, Any]],
    clusters: Mapping[str, Mapping[str, Any]],
    server: Mapping[str, Any] | None = None,
    upstream: Mapping[str, Any] | None = None,
) -> str:
    """A configuration file; JSON literals are valid TOML for the scalars used here."""

    def value(item: Any) -> str:
        if isinstance(item, Mapping):
            return "{" + ", ".join(f"{k} = {value(v)}" for k, v in item.items()) + "}"
        if isinstance(item, list | tuple):
            return "[" + ", ".join(value(v) for v in item) + "]"
        return json.dumps(item)

    def table(header: str, items: Mapping[str, Any]) -> str:
        return header + "\n" + "".join(f"{k} = {value(v)}\n" for k, v in items.items())

    server = {"listen": "127.0.0.1:0", **(server or {})}
    # Port 0 for the master's admin API too: tests run side by side.
    parts = [table("[server]", server), table("[admin]", {"listen": "127.0.0.1:0"})]
    if upstream:
        parts.append(table("[upstream]", upstream))
    parts += [table("[[routes]]", route) for route in routes]
    parts += [table(f"[clusters.{name}]", cluster) for name, cluster in clusters.items()]
    return "\n".join(parts)


# --------------------------------------------------------------------- processes


class Process:
    """A subprocess whose output is drained by a thread, so its pipes never fill."""

    def __init__(self, args: Sequence[str], *, env: Mapping[str, str] | None = None, cwd=None):
        full_env = dict(os.environ)
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.update(env or {})
        self.args = list(args)
        self.popen = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            cwd=cwd,
        )
        self.pid = self.popen.pid
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._readers = [
            threading.Thread(target=self._drain, args=(self.popen.stdout, self.stdout_lines)),
            threading.Thread(target=self._drain, args=(self.popen.stderr, self.stderr_lines)),
        ]
        for reader in self._readers:
            reader.daemon = True
            reader.start()

    def _drain(self, stream: Any, lines: list[str]) -> None:
        for raw in iter(stream.readline, b""):
            with self._changed:
                lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._changed.notify_all()
        stream.close()

    @property
    def output(self) -> str:
        with self._lock:
            return "\n".join(self.stdout_lines + self.stderr_lines)

    def wait_for_line(self, needle: str, timeout: float = START_TIMEOUT, stream="stderr") -> str:
        """The first line of ``stream`` containing ``needle``; fails if the process exits."""
        lines = self.stderr_lines if stream == "stderr" else self.stdout_lines
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in lines:
                    if needle in line:
                        return line
                if self.popen.poll() is not None:
                    self._changed.wait(0.05)  # let the readers catch the last lines
                    for line in lines:
                        if needle in line:
                            return line
                    raise AssertionError(
                        f"{self.args} exited ({self.popen.returncode}) before printing "
                        f"{needle!r}:\n{self._unlocked_output()}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{self.args} did not print {needle!r} within {timeout}s:\n"
                        f"{self._unlocked_output()}"
                    )
                self._changed.wait(min(left, 0.05))

    def _unlocked_output(self) -> str:
        return "\n".join(self.stdout_lines + self.stderr_lines)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, signum)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """Terminate, wait, then kill: the process is gone when this returns."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(timeout)
        for reader in self._readers:
            reader.join(1.0)
        return self.popen.returncode


@dataclass
class Proxy:
    process: Process
    host: str
    port: int
    config_path: str

    def connect(self) -> RawClient:
        return RawClient.connect(self.host, self.port)


@dataclass
class Backend:
    process: Process
    uri: str

    @property
    def port(self) -> int:
        return int(self.uri.rpartition(":")[2])


# A split service for behaviour the echo app does not have. Query parameters:
# jitter=S sleeps a random 0..S seconds; sleep=S sleeps S seconds (with
# only=NAME, only on the backend of that name); mark=NAME creates MARK_DIR/NAME
# when the request arrives and NAME.cancelled if the proxy cancels it;
# status=N answers with that status; header=NAME:VALUE adds a raw response
# header. The answer says which backend served it, in what order it arrived
# and finished, and how many connections that backend has open.
TEST_APP = textwrap.dedent(
    """\
    import asyncio, os, random, sys
    from urllib.parse import parse_qsl
    from pitcher_rpc.sdk import Response, Service

    NAME = os.environ.get("TEST_BACKEND_NAME", "backend")
    MARK_DIR = os.environ.get("TEST_MARK_DIR", "")
    app = Service("test")
    server = None
    arrivals = 0
    finished = 0


    @app.route("/")
    async def handle(request):
        global arrivals, finished
        arrivals += 1
        arrival = arrivals
        params = dict(parse_qsl(request.query, keep_blank_values=True))
        if "mark" in params:
            open(os.path.join(MARK_DIR, params["mark"]), "w").close()
        try:
            if "jitter" in params:
                await asyncio.sleep(random.uniform(0, float(params["jitter"])))
            if "sleep" in params and params.get("only", NAME) == NAME:
                await asyncio.sleep(float(params["sleep"]))
        except asyncio.CancelledError:
            if "mark" in params:
                open(os.path.join(MARK_DIR, params["mark"] + ".cancelled"), "w").close()
            raise
        finished += 1
        connections = server.connection_count if server is not None else -1
        response = Response.json(
            {
                "backend": NAME,
                "path": request.path,
                "query": request.query,
                "arrival": arrival,
                "finish": finished,
                "connections": connections,
                "headers": request.headers.items_list(),
            },
            status=int(params.get("status", 200)),
        )
        if "header" in params:
            name, _, value = params["header"].partition(":")
            response.headers.append((name, value))
        return response


    async def main(uri):
        global server
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(15, stop.set)
        server = await app.serve(uri)
        await stop.wait()
        await server.close(5.0)


    if __name__ == "__main__":
        asyncio.run(main(sys.argv[1]))
    """
)


# The ends of hand-written backends (Launcher.script_backend), which are run
# with the URI to listen on as argv[1] and stopped by SIGTERM:
#
# SERVE_PEER serves the script's ``async def peer(reader, writer)``, a peer
# speaking (or breaking) docs/wire.md itself, on a tcp:// or unix:// address.
SERVE_PEER = """

async def main(uri):
    if uri.startswith("unix://"):
        server = await asyncio.start_unix_server(peer, uri[len("unix://"):])
    else:
        host, port = uri[len("tcp://"):].rsplit(":", 1)
        server = await asyncio.start_server(peer, host, int(port))
    async with server:
        await server.serve_forever()

asyncio.run(main(sys.argv[1]))
"""
# SERVE_HANDLER serves the script's transport ``handler`` (request payload in,
# response payload out) on a real transports server, any carrier.
SERVE_HANDLER = """

async def main(uri):
    from transports.registry import transport_for
    await transport_for(uri).serve(uri, handler)
    await asyncio.Event().wait()

asyncio.run(main(sys.argv[1]))
"""
# SERVE_APP serves the script's SDK ``app`` (a pitcher_rpc.sdk.Service), any
# carrier, with the script's ``OPTIONS`` (transports.base.ServerOptions) if it has some.
SERVE_APP = """

async def main(uri):
    await app.serve(uri, globals().get("OPTIONS"))
    await asyncio.Event().wait()

asyncio.run(main(sys.argv[1]))
"""


class Launcher:
    """Starts proxies and backends; stops every one of them on :meth:`close`."""

    def __init__(self) -> None:
        self.tmpdir = short_tmpdir()
        self.processes: list[Process] = []
        self._counter = 0
        self.app_path = self.write("testapp.py", TEST_APP)
        self.mark_dir = os.path.join(self.tmpdir, "marks")
        os.mkdir(self.mark_dir)

    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.tmpdir, name)
        with open(path, "w", encoding="utf-8") as file:
            file.write(text)
        return path

    def unique(self, stem: str) -> str:
        self._counter += 1
        return f"{stem}{self._counter}"

    def uri(self, transport: str) -> str:
        if transport in ("unix", "zmq+ipc"):
            return f"{transport}://{self.tmpdir}/{self.unique('b')}.sock"
        if transport == "udp":
            return f"udp://127.0.0.1:{free_port(socket.SOCK_DGRAM)}"
        return f"{transport}://127.0.0.1:{free_port()}"

    def spawn(self, args: Sequence[str], **kwargs: Any) -> Process:
        process = Process(args, **kwargs)
        self.processes.append(process)
        return process

    def _wait_listening(self, process: Process, uri: str) -> None:
        def ready() -> bool:
            if not process.alive():
                raise AssertionError(f"{process.args} exited early:\n{process.output}")
            return can_connect(uri)

        wait_until(ready, START_TIMEOUT, f"a backend at {uri}")

    def echo_backend(self, transport: str = "tcp", uri: str | None = None) -> Backend:
        """``pitcher backend pitcher_rpc.sdk.echo:app``, ready to serve."""
        uri = uri or self.uri(transport)
        process = self.spawn(
            [*pitcher_command(), "backend", "pitcher_rpc.sdk.echo:app", "--listen", uri]
        )
        self._wait_listening(process, uri)
        return Backend(process, uri)

    def test_backend(
        self, transport: str = "tcp", name: str = "backend", uri: str | None = None
    ) -> Backend:
        """The TEST_APP script run directly, so it can count its own connections."""
        uri = uri or self.uri(transport)
        env = {"TEST_BACKEND_NAME": name, "TEST_MARK_DIR": self.mark_dir}
        process = self.spawn([sys.executable, self.app_path, uri], env=env)
        self._wait_listening(process, uri)
        return Backend(process, uri)

    def test_backend_via_cli(self, transport: str = "tcp", name: str = "backend") -> Backend:
        """The TEST_APP module run by ``pitcher backend``, which drains on SIGTERM."""
        uri = self.uri(transport)
        env = {
            "TEST_BACKEND_NAME": name,
            "TEST_MARK_DIR": self.mark_dir,
            "PYTHONPATH": self.tmpdir + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }
        process = self.spawn(
            [*pitcher_command(), "backend", "testapp:app", "--listen", uri], env=env
        )
        self._wait_listening(process, uri)
        return Backend(process, uri)

    def script_backend(
        self, source: str, transport: str = "tcp", env: Mapping[str, str] | None = None
    ) -> Backend:
        """A hand-written peer: ``source`` is run with the URI to listen on as argv[1].

        ``TEST_MARK_DIR`` in its environment names :attr:`mark_dir`.
        """
        uri = self.uri(transport)
        path = self.write(self.unique("peer") + ".py", textwrap.dedent(source))
        process = self.spawn(
            [sys.executable, path, uri], env={"TEST_MARK_DIR": self.mark_dir, **(env or {})}
        )
        self._wait_listening(process, uri)
        return Backend(process, uri)

    def proxy(self, config_text: str, workers: int = 0) -> Proxy:
        """``pitcher serve`` on ``config_text``; the port is read from its log.

        One process unless ``workers`` says otherwise: most tests are about the
        proxy's behaviour, not its process model.
        """
        path = self.write(self.unique("proxy") + ".toml", config_text)
        process = self.spawn([*pitcher_command(), "serve", "-c", path, "--workers", str(workers)])
        line = process.wait_for_line("listening on ")
        address = line.split("listening on ", 1)[1].split()[0]
        host, _, port = address.rpartition(":")
        return Proxy(process, host, int(port), path)

    def wait_for_mark(self, name: str, timeout: float = START_TIMEOUT) -> None:
        path = os.path.join(self.mark_dir, name)
        wait_until(lambda: os.path.exists(path), timeout, f"request {name} at the backend")

    def close(self) -> None:
        # Proxies first, so that they do not log every backend going away.
        for process in reversed(self.processes):
            process.stop()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


@pytest.fixture(scope="module")
def module_launcher() -> Iterator[Launcher]:
    launcher = Launcher()
    try:
        yield launcher
    finally:
        launcher.close()


# ------------------------------------------------------------------------ HTTP


@dataclass
class HttpResponse:
    status: int
    reason: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    raw_head: bytes = field(repr=False, default=b"")

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        name = name.lower()
        return [value for key, value in self.headers if key == name]

    def json(self) -> Any:
        return json.loads(self.body)


class RawClient:
    """One client connection: raw bytes out, responses parsed strictly by length."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    @classmethod
    def connect(cls, host: str, port: int, timeout: float = SOCKET_TIMEOUT) -> RawClient:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock)

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def reset(self) -> None:
        """Close abortively (RST): after a FIN alone the server cannot tell this client
        from one that half-closed and still wants its answer (RFC 9112 section 9.6)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(
        self,
        method: str,
        path: str,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        host: str = "localhost",
        version: str = "1.1",
    ) -> HttpResponse:
        self.send(build_request(method, path, headers, body, host, version))
        return self.response(head=method == "HEAD")

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buffer += data
        return True

    def response(self, head: bool = False) -> HttpResponse:
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                raise ConnectionError(f"connection closed before a response; got {self.buffer!r}")
        raw_head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = raw_head.decode("latin-1").split("\r\n")
        version, status_text, reason = [*status_line.split(" ", 2), ""][:3]
        headers = []
        for line in lines:
            name, colon, value = line.partition(":")
            assert colon and name == name.strip(), f"malformed header line {line!r}"
            headers.append((name.lower(), value.strip(" \t")))
        status = int(status_text)
        lengths = [value for name, value in headers if name == "content-length"]
        assert not any(name == "transfer-encoding" for name, _ in headers)
        length = 0
        if not head and status not in (204, 304) and status >= 200:
            assert len(lengths) == 1, f"expected one Content-Length in {raw_head!r}"
            length = int(lengths[0])
        while len(self.buffer) < length:
            if not self._fill():
                raise ConnectionError("connection closed in the middle of a body")
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return HttpResponse(status, reason, version, headers, body, raw_head)

    def is_closed(self, timeout: float = 2.0) -> bool:
        """True if the peer closes within ``timeout`` sending nothing more."""
        if self.buffer:
            return False
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        finally:
            self.sock.settimeout(SOCKET_TIMEOUT)
        if data:
            self.buffer += data
            return False
        return True


def build_request(
    method: str,
    path: str,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    host: str | None = "localhost",
    version: str = "1.1",
) -> bytes:
    lines = [f"{method} {path} HTTP/{version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [f"{name}: {value}" for name, value in headers]
    has_framing = any(n.lower() in ("content-length", "transfer-encoding") for n, _ in headers)
    if body and not has_framing:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def get(proxy: Proxy, path: str, **kwargs: Any) -> HttpResponse:
    """One request on a fresh connection."""
    with proxy.connect() as client:
        return client.request(kwargs.pop("method", "GET"), path, **kwargs)


def established_connections(port: int) -> int | None:
    """Established TCP connections whose local port is ``port``, per ``ss``; None if no ss."""
    ss = shutil.which("ss")
    if ss is None:
        return None
    result = subprocess.run(
        [ss, "-Htn", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        timeout=5,
        check=True,
    )
    return len([line for line in result.stdout.splitlines() if line.strip()])


def child_pids(pid: int) -> list[int]:
    """Processes whose parent is ``pid``, read from /proc."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as file:
                stat = file.read()
        except OSError:
            continue
        # The command name may hold spaces or parentheses; fields resume after the last ")".
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            children.append(int(entry))
    return children
