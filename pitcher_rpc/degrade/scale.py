"""Running a cluster's scale-out command: no shell, bounded in time, logged.

The command is an argv (``[clusters.NAME.scale_out] command``) started with
the numbers of the cluster in its environment (``PITCHER_CLUSTER``,
``PITCHER_NODES``, ``PITCHER_NODES_IN_SERVICE``, ``PITCHER_HEALTHY_SHARE``,
``PITCHER_THRESHOLD``, ``PITCHER_NODES_OUT``); it is killed after its
``timeout``. The health book decides when (below the mark, once per
cool-down); a cluster never has two runs at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

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
            process = await asyncio.create_subprocess_exec(
                *config.command,
                env={**os.environ, **request.environment},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
        except OSError as exc:
            log.error("cluster %s: cannot run the scale-out command: %s", request.cluster, exc)
            return None
        try:
            output, _ = await asyncio.wait_for(process.communicate(), config.timeout)
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
        tail = output[-_OUTPUT_TAIL:].decode("utf-8", "replace").strip()
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
