"""A worker process: the whole proxy on its own uvloop, on a listening socket it inherited.

Started by the master as ``python -m pitcher_rpc.process.worker``; not for
running by hand. It serves until told to drain (control command or SIGTERM),
stops at once on SIGINT, and drains when its master goes away.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from typing import Any

from ..config import Config, ConfigError, load_config
from ..config.overlay import Overlay
from ..config.tls import tls_digest
from ..proxy.server import ProxyServer
from .control import ControlError, encode_message, read_message
from .gc_tuning import GcPauses, GcSettings, apply

log = logging.getLogger("pitcher.worker")

# The longest a new worker waits for the master to bring it up to date before
# it accepts anyway (a master that says nothing must not keep it closed).
_CATCH_UP_TIMEOUT = 2.0


class Worker:
    def __init__(
        self, index: int, config_path: str, listener: socket.socket, workers: int = 1
    ) -> None:
        self.index = index
        self.workers = workers
        self.config_path = config_path
        self.listener = listener
        self.proxy: ProxyServer | None = None
        # The configuration file as last loaded, without run-time node changes.
        self.base_config: Config | None = None
        self.stopping = asyncio.Event()
        # Set by the master's "start" (or its first tick): accept from then on.
        self._caught_up = asyncio.Event()
        self.fast = False
        self.pauses = GcPauses()

    async def run(self, control_path: str) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self._stop_fast)
        # The master handles SIGHUP for the whole proxy (a terminal's hangup
        # reaches the whole process group).
        loop.add_signal_handler(signal.SIGHUP, lambda: None)
        self.base_config = config = load_config(self.config_path)
        # Until the master's first tick, each proxy-wide limit is split evenly.
        self.proxy = proxy = ProxyServer(
            config, default_share=1.0 / max(1, self.workers), local_health=False
        )
        # Log rotation: the master passes SIGUSR1 on to every worker.
        loop.add_signal_handler(signal.SIGUSR1, proxy.reopen_modules)
        reader, writer = await asyncio.open_unix_connection(control_path)
        writer.write(encode_message({"op": "hello", "index": self.index, "pid": os.getpid()}))

        def suspect(uri: str) -> None:
            # A node failed several requests in a row here: the master judges now.
            if not writer.is_closing():
                writer.write(encode_message({"event": "suspect", "uri": uri}))

        proxy.upstreams.alarm = suspect
        control = loop.create_task(self._serve_control(reader, writer), name="pitcher-control")
        # Accept only once the master has brought this worker up to date (the
        # current file, the nodes added at run time or found in etcd): a
        # replacement's first request must not see the file's nodes alone.
        # Clients meanwhile wait in the listener's backlog.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CATCH_UP_TIMEOUT):
                await self._caught_up.wait()
        await proxy.start(sock=self.listener)
        # Start-up is done: what exists now lives as long as the process.
        apply(GcSettings(config.server.gc_freeze, config.server.gc_thresholds))
        self.pauses.install()
        try:
            await self.stopping.wait()
        finally:
            control.cancel()
            grace = 0.0 if self.fast else config.server.drain_timeout
            await proxy.stop(grace=grace)
            writer.close()

    def _stop_fast(self) -> None:
        self.fast = True
        self.stopping.set()

    async def _serve_control(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while (message := await read_message(reader)) is not None:
                answer: dict[str, Any] = {"id": message.get("id", 0)}
                try:
                    answer["result"] = self.handle(message)
                    answer["ok"] = True
                except (ConfigError, ControlError, ValueError) as exc:
                    answer.update(ok=False, error=str(exc))
                except Exception as exc:
                    # A bug must not cost the control channel: answered, and logged.
                    log.exception("control command %r failed", message.get("op"))
                    answer.update(ok=False, error=f"internal error: {exc!r}")
                writer.write(encode_message(answer))
        except (ControlError, ConnectionError) as exc:
            log.error("control channel failed: %s", exc)
        # The master is gone (or told us to go): never outlive it.
        self.stopping.set()

    def handle(self, message: dict[str, Any]) -> dict[str, Any]:
        proxy = self.proxy
        assert proxy is not None
        op = message.get("op")
        if op == "start":
            self._caught_up.set()
            return {}
        if op == "tick":
            self._caught_up.set()
            proxy.apply_shares(message.get("shares") or {})
            if "connections" in message:
                proxy.set_connection_share(float(message["connections"]))
            if "health" in message:
                proxy.apply_health(message["health"])
            return {
                "index": self.index,
                "demand": proxy.module_demand(),
                "connections": proxy.connection_demand(),
                "outcomes": proxy.upstreams.take_outcomes(),
            }
        if op == "status":
            return self.status()
        if op == "reload":
            config = load_config(str(message["path"]))
            if config.checksum != message.get("checksum"):
                raise ControlError("the file changed after the master checked it; not reloaded")
            if "tls" in message and tls_digest(config) != message["tls"]:
                raise ControlError(
                    "a certificate or key file changed after the master checked it; not reloaded"
                )
            self.base_config = config
            proxy.reload(Overlay.from_json(message.get("overlay") or ()).apply(config))
            return self.status()
        if op == "overlay":
            # Nodes added, drained or removed at run time, over the file last loaded.
            assert self.base_config is not None
            proxy.reload(Overlay.from_json(message.get("overlay") or ()).apply(self.base_config))
            return self.status()
        if op == "modules":
            name = message.get("name")
            if name is not None:
                try:
                    proxy.set_module(str(name), bool(message.get("enabled")))
                except KeyError:
                    raise ControlError(f"no module named {name!r} is loaded") from None
            return {"index": self.index, "modules": proxy.snapshot.modules.describe()}
        if op == "drain":
            self.stopping.set()
            return {"draining": True}
        raise ControlError(f"unknown command {op!r}")

    def status(self) -> dict[str, Any]:
        proxy = self.proxy
        assert proxy is not None
        snapshot = proxy.snapshot
        return {
            "index": self.index,
            "pid": os.getpid(),
            "generation": snapshot.generation,
            "checksum": snapshot.config.checksum,
            "requests": proxy.requests_served,
            "connections": len(proxy.connections),
            "connection_cap": proxy.connection_status(),
            "draining": proxy.draining,
            "gc": self.pauses.snapshot(),
            "modules": proxy.module_stats(),
            "overload": proxy.overload_status(),
            "tls": proxy.tls_status(),
        }


def main() -> None:
    parser = argparse.ArgumentParser(prog="pitcher worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--control", required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s worker[{args.index}] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    listener = socket.socket(fileno=args.listen_fd)
    import uvloop

    try:
        uvloop.run(Worker(args.index, args.config, listener, args.workers).run(args.control))
    except ConfigError as exc:
        log.error("cannot start: %s", exc)
        sys.exit(2)


if __name__ == "__main__":
    main()
