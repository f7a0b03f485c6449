"""Running a cluster's scale-out command: no shell, bounded in time, logged.

The command is an argv (``[clusters.NAME.scale_out] command``) started with
the numbers of the cluster in its environment (``PITCHER_CLUSTER``,
``PITCHER_NODES``, ``PITCHER_NODES_IN_SERVICE``, ``PITCHER_HEALTHY_SHARE``,
``PITCHER_THRESHOLD``, ``PITCHER_NODES_OUT``); it is killed after its
``timeout``. The health book decides when (below the mark, once per
cool-down); a cluster never has two runs at once.

Every process the proxy starts (workers, a successor master at a graceful
restart, a scale-out command) is started by :func:`spawn` (here, the lowest
layer that starts one): it gets the parent's standard input, output and
error (or a pipe for its output) and the descriptors named in ``pass_fds``,
nothing else. asyncio's subprocesses cannot promise that under uvloop:
libuv's spawn ignores ``close_fds``, so a child inherited every inheritable
descriptor of its parent and copies of its standard streams besides; a
master started by a restart passed all of that on to its own successor, and
five descriptors piled up in every process at every restart.
:class:`subprocess.Popen` closes everything else in the child; the exit is
awaited through a pidfd on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Mapping, Sequence

from .book import ScaleOut

log = logging.getLogger("pitcher.scale")

# The last bytes of a command's output that go to the log.
_OUTPUT_TAIL = 2000


class ScaleRunner:
    def __init__(self) -> None:
        self._running: dict[str, asyncio.Task[int | None]] = {}
        self.runs = 0

    def start(self, request: ScaleOut) -> None:
        config = request.config
        numbers = ", ".join(f"{k}={v}" for k, v in request.environment.items() if v)
        if config.detect_only:
            log.warning(
                "cluster %s: capacity low (%s); detect only: would run %s",
                request.cluster,
                numbers,
                list(config.command),
            )
            return
        if request.cluster in self._running:
            log.warning("cluster %s: the scale-out command is still running", request.cluster)
            return
        log.warning(
            "cluster %s: capacity low (%s): running %s",
            request.cluster,
            numbers,
            list(config.command),
        )
        task = asyncio.get_running_loop().create_task(
            self._run(request), name=f"pitcher-scale-{request.cluster}"
        )
        self._running[request.cluster] = task
        task.add_done_callback(lambda _: self._running.pop(request.cluster, None))
        self.runs += 1

    async def _run(self, request: ScaleOut) -> int | None:
        config = request.config
        try:
            # Its output in a pipe, and none of the proxy's descriptors (listeners,
            # client connections).
            process = spawn(
                config.command,
                env={**os.environ, **request.environment},
                capture_output=True,
            )
        except OSError as exc:
            log.error("cluster %s: cannot run the scale-out command: %s", request.cluster, exc)
            return None
        try:
            await asyncio.wait_for(process.wait(), config.timeout)
        except (TimeoutError, asyncio.CancelledError) as exc:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.error(
                "cluster %s: the scale-out command ran over %gs and was killed",
                request.cluster,
                config.timeout,
            )
            return None
        tail = bytes(process.output[-_OUTPUT_TAIL:]).decode("utf-8", "replace").strip()
        level = logging.INFO if process.returncode == 0 else logging.ERROR
        log.log(
            level,
            "cluster %s: the scale-out command exited with %s%s",
            request.cluster,
            process.returncode,
            f"; output:\n{tail}" if tail else "",
        )
        return process.returncode

    async def close(self, grace: float = 1.0) -> None:
        """Let running commands finish for ``grace`` seconds, then kill them."""
        tasks = list(self._running.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=grace)


# The last bytes of a child's captured output that are kept.
_OUTPUT_KEPT = 65536


class Child:
    """A process started by :func:`spawn`; its exit is awaited on the event loop."""

    __slots__ = ("_exited", "_loop", "_output_fd", "_pidfd", "output", "popen")

    def __init__(self, popen: subprocess.Popen[bytes], loop: asyncio.AbstractEventLoop) -> None:
        self.popen = popen
        self._loop = loop
        self._exited: asyncio.Future[int] = loop.create_future()
        self.output = bytearray()  # the tail of its output, when captured
        self._output_fd = -1
        if popen.stdout is not None:
            self._output_fd = popen.stdout.fileno()
            os.set_blocking(self._output_fd, False)
            loop.add_reader(self._output_fd, self._read_output)
        self._pidfd = -1
        try:
            self._pidfd = os.pidfd_open(popen.pid)
        except (AttributeError, OSError):
            # No pidfd (an old kernel): one thread waits, and hands the exit over.
            threading.Thread(
                target=self._wait_in_thread, name=f"pitcher-wait-{popen.pid}", daemon=True
            ).start()
        else:
            loop.add_reader(self._pidfd, self._reap)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self._exited.result() if self._exited.done() else None

    def send_signal(self, signum: int) -> None:
        """Signal the process unless it has been reaped (its pid may be someone else's)."""
        if not self._exited.done() and self.popen.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def _reap(self) -> None:
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1
        self._exited_with(self.popen.wait())

    def _wait_in_thread(self) -> None:
        code = self.popen.wait()
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            self._loop.call_soon_threadsafe(self._exited_with, code)

    def _exited_with(self, code: int) -> None:
        if self._output_fd >= 0:
            self._read_output()  # what is left in the pipe
            self._loop.remove_reader(self._output_fd)
            assert self.popen.stdout is not None
            self.popen.stdout.close()
            self._output_fd = -1
        if not self._exited.done():
            self._exited.set_result(code)

    def _read_output(self) -> None:
        while True:
            try:
                data = os.read(self._output_fd, 65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._loop.remove_reader(self._output_fd)
                return
            self.output += data
            if len(self.output) > _OUTPUT_KEPT:
                del self.output[: len(self.output) - _OUTPUT_KEPT]


def spawn(
    argv: Sequence[str],
    *,
    pass_fds: Sequence[int] = (),
    env: Mapping[str, str] | None = None,
    capture_output: bool = False,
) -> Child:
    """Start ``argv`` with the standard streams and ``pass_fds``, and no other descriptor.

    With ``capture_output`` its standard input is /dev/null and its output
    and errors go to :attr:`Child.output`; else it shares the caller's
    standard streams. Must be called on the running event loop; OSError if
    the program cannot be started.
    """
    loop = asyncio.get_running_loop()
    popen = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL if capture_output else None,
        stdout=subprocess.PIPE if capture_output else None,
        stderr=subprocess.STDOUT if capture_output else None,
        close_fds=True,
        pass_fds=tuple(pass_fds),
        env=dict(env) if env is not None else None,
    )
    return Child(popen, loop)
