"""The master: owns the listening socket, runs N workers, answers for the whole proxy.

The master binds the proxy's listener once, with the configured backlog, and
every worker inherits that one socket, so no connection waiting in the accept
queue belongs to a worker that might die or drain: whichever worker accepts
next gets it. (SO_REUSEPORT would give each worker its own queue, and a
draining worker's queued connections would be lost.)

A worker that dies is replaced, with a back-off that doubles while workers
keep dying young. A reload is validated once here, then every worker builds
and swaps its own snapshot; the answer says when all have it. The admin API
listens on its own loopback port and speaks for all workers at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from transports.native import describe as describe_build

from ..config import Config, ConfigError, load_config
from ..config.overlay import NodeChange, Overlay
from ..config.tls import describe_listener, tls_digest
from ..degrade.scale import Child, spawn
from ..fleet.feed import NodeFeed
from ..proxy.backlog import describe_backlog
from . import cluster_routes, metrics, status
from .admin import AdminError, AdminRequest, AdminResponse, AdminServer
from .control import ControlError, WorkerLink, read_message
from .coordination import Coordination
from .handoff import HandoffError, offer, ready, take
from .notify import notify

log = logging.getLogger("pitcher.master")

# A worker that exits sooner than this after its start counts as dying young.
_YOUNG = 5.0
_BACKOFF_MAX = 30.0
# How long a new generation may take to start its workers and take over.
_HANDOFF_TIMEOUT = 30.0
# How long the first read of etcd (or DNS) may hold the start of the workers.
_DISCOVERY_SETTLE = 2.0


@dataclass
class WorkerSlot:
    index: int
    process: Child | None = None
    link: WorkerLink | None = None
    started: float = 0.0
    backoff: float = 0.0
    restarts: int = 0
    linked: asyncio.Event = field(default_factory=asyncio.Event)


def bind_listener(config: Config) -> socket.socket:
    """The proxy's listening socket; workers get it through ``pass_fds`` (it is not inheritable)."""
    address = config.server.listen_address
    if address.is_unix:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(address.path)
    else:
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address.host, address.port))
    sock.listen(config.server.backlog)
    sock.setblocking(False)
    return sock


def bind_admin(config: Config) -> socket.socket:
    address = config.admin.listen_address
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address.host, address.port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


class Master:
    def __init__(
        self, config_path: str, config: Config, workers: int, takeover: str | None = None
    ) -> None:
        self.config_path = config_path
        # The file as loaded, the run-time node changes over it, and the two
        # together: the configuration the workers run.
        self.base_config = config
        self.overlay = Overlay()
        self.config = config
        self._changing = asyncio.Lock()
        self.generation = 1
        self.slots = [WorkerSlot(index) for index in range(workers)]
        # Each worker's last counters, kept past its death: /metrics sums never go backwards.
        self.counters = metrics.Keeper()
        # A successor takes its predecessor's sockets instead of binding its own.
        self._ready_line: socket.socket | None = None
        if takeover is not None:
            self._ready_line, (self.listener, self.admin_socket) = take(takeover, 2)
        else:
            self.listener = bind_listener(config)
            try:
                self.admin_socket = bind_admin(config)
            except OSError:
                self.listener.close()
                raise
        self._restarting = False
        self.handed_over = False
        self.run_dir = tempfile.mkdtemp(prefix="pitcher-", dir="/tmp")
        self.control_path = os.path.join(self.run_dir, "control.sock")
        self.draining = False
        self.stopping = asyncio.Event()
        self.fast = False
        self.admin = AdminServer()
        self._watchers: set[asyncio.Task[None]] = set()
        # Proxy-wide limits split between the workers, moved every tick.
        self.coordination = Coordination(lambda: [(s.index, s.link) for s in self.slots])
        # Cold or after a graceful restart alike, no node ramps at start (none has failed).
        self.coordination.health.configure(config, time.monotonic())
        self._coordinator: asyncio.Task[None] | None = None
        self._control: asyncio.AbstractServer | None = None
        # Nodes found in etcd or DNS: one watcher per proxy, here, never in a worker.
        self.feed = NodeFeed(self._publish_discovered)

    @property
    def address(self) -> str:
        name = self.listener.getsockname()
        if isinstance(name, str):
            return f"unix://{name}"
        host, port = name[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    # -- lifetime ----------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # Before anything is announced: a signal sent as soon as the log says
        # "listening" must find its handler, not the default action.
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self._stop_fast)
        loop.add_signal_handler(signal.SIGHUP, self._reload_in_background)
        loop.add_signal_handler(signal.SIGUSR2, self._restart_in_background)
        loop.add_signal_handler(signal.SIGUSR1, self._reopen_files)
        self._control = await asyncio.start_unix_server(self._on_worker, self.control_path)
        # Workers start with the registry's nodes (as a new generation must, in a
        # restart); a registry that does not answer soon is waited for no longer.
        await self.feed.configure(self.base_config)
        if self.feed.discovery is not None:
            await self.feed.settle(_DISCOVERY_SETTLE)
            self.overlay = self.overlay.with_discovered(self.feed.found(self.base_config))
            self.config = self.overlay.apply(self.base_config)
            self.coordination.health.configure(self.config, time.monotonic())
        for slot in self.slots:
            await self._spawn(slot)
        await asyncio.gather(*(asyncio.wait_for(s.linked.wait(), 10.0) for s in self.slots))
        self._routes()
        self._coordinator = loop.create_task(self.coordination.run(), name="pitcher-tick")
        await self.admin.start(sock=self.admin_socket)
        host, port = self.admin.address
        if self._ready_line is not None:
            # The predecessor drains from here on; the service manager watches us.
            notify(MAINPID=os.getpid(), READY=1)
            ready(self._ready_line)
            self._ready_line = None
        else:
            notify(READY=1, MAINPID=os.getpid())
        log.info(
            "listening on %s (%s%s) with %d workers (admin on %s:%d, config %s, sha256 %s; %s)",
            self.address,
            describe_listener(self.config.server.tls),
            describe_backlog(self.config.server.backlog),
            len(self.slots),
            host,
            port,
            self.config_path,
            self.config.checksum[:12],
            describe_build(),
        )
        try:
            await self.stopping.wait()
        finally:
            await self._shutdown()

    def _stop_fast(self) -> None:
        self.fast = True
        self.stopping.set()

    def _reopen_files(self) -> None:
        """SIGUSR1 (log rotation): every worker reopens the files its modules write."""
        log.info("reopening log files in %d workers", len(self.slots))
        for slot in self.slots:
            if slot.process is not None and slot.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.process.send_signal(signal.SIGUSR1)

    async def _shutdown(self) -> None:
        self.draining = True
        if self._coordinator is not None:
            self._coordinator.cancel()
        await self.feed.close()
        await self.coordination.scaler.close()
        if self.handed_over:
            # The successor answers for the proxy on the same admin socket now;
            # a draining generation must not answer a health check beside it.
            await asyncio.sleep(0.1)  # let the restart request's answer go out
            await self.admin.stop()
        else:
            notify(STOPPING=1)
        log.info("%s: stopping %d workers", "fast" if self.fast else "draining", len(self.slots))
        signum = signal.SIGINT if self.fast else signal.SIGTERM
        for slot in self.slots:
            if slot.process is not None and slot.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.process.send_signal(signum)
        grace = (0.0 if self.fast else self.config.server.drain_timeout) + 5.0
        processes = [slot.process for slot in self.slots if slot.process is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in processes)), grace)
        except TimeoutError:
            log.error("workers still running %.0fs after the drain began: killing them", grace)
            for process in processes:
                if process.returncode is None:
                    process.kill()
            await asyncio.gather(*(p.wait() for p in processes), return_exceptions=True)
        for task in self._watchers:
            task.cancel()
        await self.admin.stop()
        if self._control is not None:
            self._control.close()
        self.listener.close()
        self.admin_socket.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    # -- workers -----------------------------------------------------------------

    async def _spawn(self, slot: WorkerSlot) -> None:
        slot.linked.clear()
        slot.link = None
        fd = self.listener.fileno()
        # The listener and the standard streams, nothing else (not the admin listener).
        slot.process = spawn(
            [
                sys.executable,
                "-m",
                "pitcher_rpc.process.worker",
                "--index",
                str(slot.index),
                "--config",
                self.config_path,
                "--listen-fd",
                str(fd),
                "--control",
                self.control_path,
                "--workers",
                str(len(self.slots)),
            ],
            pass_fds=(fd,),
        )
        slot.started = time.monotonic()
        watcher = asyncio.get_running_loop().create_task(
            self._watch(slot, slot.process), name=f"pitcher-watch-{slot.index}"
        )
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    async def _watch(self, slot: WorkerSlot, process: Child) -> None:
        code = await process.wait()
        if self.stopping.is_set() or self.draining:
            return
        lived = time.monotonic() - slot.started
        slot.backoff = min(_BACKOFF_MAX, max(0.1, slot.backoff * 2)) if lived < _YOUNG else 0.0
        slot.restarts += 1
        log.error(
            "worker %d (pid %d) exited with %s after %.1fs; restarting in %.1fs",
            slot.index,
            process.pid,
            _describe_exit(code),
            lived,
            slot.backoff,
        )
        await asyncio.sleep(slot.backoff)
        if not (self.stopping.is_set() or self.draining):
            await self._spawn(slot)

    async def _on_worker(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = await asyncio.wait_for(read_message(reader), 10.0)
        except (TimeoutError, ControlError):
            writer.close()
            return
        if not hello or hello.get("op") != "hello":
            writer.close()
            return
        index = int(hello.get("index", -1))
        if not 0 <= index < len(self.slots):
            writer.close()
            return
        slot = self.slots[index]
        slot.link = link = WorkerLink(index, int(hello.get("pid", 0)), reader, writer)
        link.on_event = self._on_worker_event
        try:
            # A worker started from an older file catches up with the current one,
            # and takes the run-time and discovered nodes, before it counts as linked.
            status = await link.command("status")
            if status.get("checksum") != self.config.checksum or self.overlay:
                await link.command(
                    "reload",
                    path=self.config_path,
                    checksum=self.config.checksum,
                    overlay=self.overlay.to_json(),
                )
        except (ControlError, ConfigError) as exc:
            log.error("worker %d could not take the current configuration: %s", index, exc)
        try:
            # Only now does the worker accept: its first request sees every node.
            await link.command("start")
        except ControlError as exc:
            log.error("worker %d could not be told to accept: %s", index, exc)
        finally:
            slot.linked.set()

    def _on_worker_event(self, message: dict[str, Any]) -> None:
        if message.get("event") == "suspect":
            self.coordination.hurry()

    async def _each(self, op: str, **arguments: Any) -> list[dict[str, Any]]:
        """Send a command to every live worker; a worker that fails is reported, not fatal."""

        async def one(slot: WorkerSlot) -> dict[str, Any]:
            if slot.link is None:
                return {"index": slot.index, "error": "not running"}
            try:
                return await slot.link.command(op, **arguments)
            except ControlError as exc:
                return {"index": slot.index, "error": str(exc)}

        return list(await asyncio.gather(*(one(slot) for slot in self.slots)))

    # -- nodes at run time ---------------------------------------------------------

    async def change_nodes(self, change: NodeChange) -> dict[str, Any]:
        """Add, drain or remove a node in every worker; OverlayError if it cannot be."""
        async with self._changing:
            overlay = self.overlay.change(self.base_config, change)
            config = overlay.apply(self.base_config)
            self.overlay, self.config = overlay, config
            self.coordination.health.configure(config, time.monotonic())
            results = await self._each("overlay", overlay=overlay.to_json())
        failed = [r for r in results if "error" in r]
        log.info(
            "%s node %s in cluster %s%s: %d of %d workers",
            change.action,
            change.uri,
            change.cluster,
            " (kept over reloads)" if change.keep else "",
            len(results) - len(failed),
            len(results),
        )
        return {
            "cluster": change.cluster,
            "nodes": [node.uri for node in config.clusters[change.cluster].nodes],
            "draining": overlay.draining(config).get(change.cluster, []),
            "workers": results,
            "complete": not failed,
        }

    # -- nodes found in etcd or DNS -------------------------------------------------

    async def _publish_discovered(self) -> None:
        """Send the discovered nodes, changed, to every worker (the feed calls this)."""
        async with self._changing:
            found = self.feed.found(self.base_config)
            overlay = self.overlay.with_discovered(found)
            if overlay == self.overlay:
                return
            before = self.config
            config = overlay.apply(self.base_config)
            self.overlay, self.config = overlay, config
            self.coordination.health.configure(config, time.monotonic())
            results = await self._each("overlay", overlay=overlay.to_json())
        failed = sum(1 for r in results if "error" in r)
        for name in found:
            old, new = _uris(before, name), _uris(config, name)
            if old != new:
                log.info(
                    "cluster %s: %d nodes (discovery added %s, removed %s): %d of %d workers",
                    name,
                    len(new),
                    sorted(new - old) or "none",
                    sorted(old - new) or "none",
                    len(results) - failed,
                    len(results),
                )

    # -- reload ------------------------------------------------------------------

    async def reload(self) -> dict[str, Any]:
        """Validate the file once here; then every worker swaps to it. ConfigError keeps the old."""
        async with self._changing:
            return await self._reload()

    async def _reload(self) -> dict[str, Any]:
        base = load_config(self.config_path)
        overlay, dropped = self.overlay.for_reload(base)
        for change in dropped:
            log.warning(
                "reload: the kept change %s %s in cluster %s no longer applies; dropped",
                change.action,
                change.uri,
                change.cluster,
            )
        await self.feed.configure(base)
        overlay = overlay.with_discovered(self.feed.found(base))
        config = overlay.apply(base)
        self.base_config, self.overlay, self.config = base, overlay, config
        self.coordination.health.configure(config, time.monotonic())
        self.generation += 1
        for warning in base.warnings:
            log.warning("%s", warning)
        results = await self._each(
            "reload",
            path=self.config_path,
            checksum=config.checksum,
            overlay=overlay.to_json(),
            tls=tls_digest(config),
        )
        failed = [r for r in results if "error" in r]
        log.info(
            "reloaded %s (sha256 %s): %d of %d workers",
            self.config_path,
            config.checksum[:12],
            len(results) - len(failed),
            len(results),
        )
        return {
            "path": self.config_path,
            "checksum": config.checksum,
            "workers": results,
            "complete": not failed,
            "warnings": [str(warning) for warning in base.warnings],
        }

    def _reload_in_background(self) -> None:
        async def reload() -> None:
            try:
                await self.reload()
            except ConfigError as exc:
                log.error("reload refused, the running configuration stays:\n%s", exc)

        task = asyncio.get_running_loop().create_task(reload(), name="pitcher-reload")
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    # -- graceful restart ----------------------------------------------------------

    async def restart(self) -> dict[str, Any]:
        """Start a successor master on our sockets; once it is ready, drain and exit.

        If the successor fails to start or is not ready in time, it is stopped
        and this generation keeps serving; HandoffError says why.
        """
        if self._restarting or self.draining:
            raise HandoffError("a restart or a shutdown is already under way")
        self._restarting = True
        loop = asyncio.get_running_loop()
        path = os.path.join(self.run_dir, "handoff.sock")
        # The sockets go over ``path``; the successor inherits only the standard streams.
        command = [sys.executable, "-m", "pitcher_rpc.cli", "serve", "-c", self.config_path]
        command += ["--workers", str(len(self.slots)), "--takeover", path]
        try:
            successor = spawn(command)
        except OSError as exc:
            self._restarting = False
            raise HandoffError(f"cannot start a new master: {exc}") from None
        abort = threading.Event()
        handing: asyncio.Future[Any] = loop.run_in_executor(
            None, offer, path, [self.listener, self.admin_socket], _HANDOFF_TIMEOUT, abort
        )
        died: asyncio.Future[Any] = asyncio.ensure_future(successor.wait())
        try:
            done, _ = await asyncio.wait({handing, died}, return_when=asyncio.FIRST_COMPLETED)
            if handing not in done:
                raise HandoffError(
                    f"the new master exited with {_describe_exit(successor.returncode or 0)}"
                )
            handing.result()
        except HandoffError as exc:
            self._restarting = False
            abort.set()
            if successor.returncode is None:
                successor.kill()
            await asyncio.gather(died, handing, return_exceptions=True)
            log.error("restart failed, this generation keeps serving: %s", exc)
            raise
        died.cancel()
        log.info("the new master (pid %d) is serving; draining this generation", successor.pid)
        self.handed_over = True
        self.stopping.set()
        return {"new_master_pid": successor.pid}

    def _restart_in_background(self) -> None:
        async def restart() -> None:
            with contextlib.suppress(HandoffError):
                await self.restart()

        task = asyncio.get_running_loop().create_task(restart(), name="pitcher-restart")
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    # -- admin API ---------------------------------------------------------------

    def _routes(self) -> None:
        # The token of the configuration running now: a reload that changes it
        # changes it here at once, and a refused reload leaves the old one.
        self.admin.set_token_source(lambda: self.config.admin.token)
        admin = self.admin
        admin.route("GET", "/healthz", self._healthz, "200 serving, 503 draining")
        admin.route(
            "GET", "/admin/config", self._admin_config, "the configuration file, checksum, reloads"
        )
        admin.route("POST", "/admin/reload", self._admin_reload, "reload the file in every worker")
        admin.route("GET", "/admin/workers", self._admin_workers, "every worker's status")
        admin.route(
            "POST",
            "/admin/restart",
            self._admin_restart,
            "a new generation takes over, this drains",
        )
        admin.route("GET", "/metrics", self._metrics, "Prometheus text, all workers added up")
        admin.route("GET", "/admin/modules", self._admin_modules, "every worker's modules")
        cluster_routes.install(self.admin, self)
        status.register(self.admin, self)
        admin.route(
            "POST", "/admin/modules/{name}/enable", self._admin_enable, "switch a module on"
        )
        admin.route(
            "POST", "/admin/modules/{name}/disable", self._admin_disable, "switch a module off"
        )

    async def _healthz(self, request: AdminRequest) -> AdminResponse:
        if self.draining:
            return AdminResponse(503, {"status": "draining"})
        return AdminResponse(200, {"status": "serving"})

    async def _admin_config(self, request: AdminRequest) -> AdminResponse:
        workers = await self._each("status")
        return AdminResponse(
            200,
            {
                "source": self.config.source,
                "checksum": self.config.checksum,
                "reloads": self.generation - 1,
                "workers": [
                    {k: w.get(k) for k in ("index", "generation", "checksum", "error") if k in w}
                    for w in workers
                ],
            },
        )

    def _check_served_file(self, request: AdminRequest, what: str) -> None:
        """A reload or restart may name the file it means (``{"path": ...}``): the served one.

        The file a proxy serves is fixed for its life, as nginx's ``-c``:
        replaced workers and the next generation of a restart read it again.
        ``pitcher reload -c OTHER`` finds this proxy by the admin address in
        OTHER; taking OTHER for the served file would repoint a running proxy
        on a typo, and reloading the served file instead (as it once did) lets
        an operator believe OTHER is live. So it is refused, naming both.
        """
        if not request.body.strip():
            return
        body = request.json()
        path = body.get("path") if isinstance(body, dict) else None
        if not isinstance(path, str) or not path:
            raise AdminError(400, 'the body must be a JSON object like {"path": "/etc/p.toml"}')
        if _same_file(path, self.config_path):
            return
        raise AdminError(
            409,
            f"this proxy serves {self.config_path}, not {path}; nothing was {what}."
            f" Edit {self.config_path} and reload it, or stop this proxy and serve {path}",
        )

    async def _admin_reload(self, request: AdminRequest) -> AdminResponse:
        self._check_served_file(request, "reloaded")
        try:
            result = await self.reload()
        except ConfigError as exc:
            raise AdminError(400, str(exc)) from None
        return AdminResponse(200 if result["complete"] else 500, result)

    async def _admin_modules(self, request: AdminRequest) -> AdminResponse:
        return AdminResponse(200, {"workers": await self._each("modules")})

    async def _admin_enable(self, request: AdminRequest) -> AdminResponse:
        return await self._switch(request.params["name"], True)

    async def _admin_disable(self, request: AdminRequest) -> AdminResponse:
        return await self._switch(request.params["name"], False)

    async def _switch(self, name: str, enabled: bool) -> AdminResponse:
        """Switch a module in every worker; the answer comes once all have it."""
        results = await self._each("modules", name=name, enabled=enabled)
        failed = [r for r in results if "error" in r]
        if failed and len(failed) == len(results):
            raise AdminError(404, failed[0]["error"])
        return AdminResponse(
            200 if not failed else 500,
            {"module": name, "enabled": enabled, "complete": not failed, "workers": results},
        )

    async def _metrics(self, request: AdminRequest) -> AdminResponse:
        workers = await self._each("status")
        body = metrics.render(
            workers,
            [slot.restarts for slot in self.slots],
            self.generation - 1,
            self.draining,
            health=self.coordination.health.describe(time.monotonic()),
            scale_outs=self.coordination.scaler.runs,
            discovery=self.feed.describe(),
            keeper=self.counters,
        )
        return AdminResponse(200, body, (("content-type", metrics.CONTENT_TYPE_LATEST),))

    async def _admin_restart(self, request: AdminRequest) -> AdminResponse:
        self._check_served_file(request, "restarted")
        try:
            return AdminResponse(200, await self.restart())
        except HandoffError as exc:
            raise AdminError(500, f"restart failed, still serving: {exc}") from None

    async def _admin_workers(self, request: AdminRequest) -> AdminResponse:
        statuses = await self._each("status")
        for slot, answer in zip(self.slots, statuses, strict=True):
            answer["restarts"] = slot.restarts
        return AdminResponse(200, {"workers": statuses})


def _uris(config: Config, cluster: str) -> set[str]:
    found = config.clusters.get(cluster)
    return {node.uri for node in found.nodes} if found is not None else set()


def _same_file(one: str, other: str) -> bool:
    """Whether two paths name one file (links and relative parts resolved)."""
    try:
        return os.path.samefile(one, other)
    except OSError:  # one of them is gone: compare the names
        return os.path.realpath(one) == os.path.realpath(other)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"
