"""`pitcher demo`: the proxy, an echo service per transport and an ASGI app, on the embedded config.

The services run in this process; the proxy is a master with one worker, as
``pitcher serve`` runs it, on the embedded configuration written to the demo's
temporary directory, so its admin listener (and the status page at ``/``)
answers as in production. SIGINT stops everything at once, SIGTERM drains first.

The ASGI app is a small FastAPI app where FastAPI is installed (``pip install
'pitcher-rpc[demo]'``), a framework-free ASGI app otherwise: either way it is
served over frames on a Unix socket, as ``pitcher backend MODULE:APP`` serves
any ASGI app, and the proxy's ``/asgi/`` route reaches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import MutableMapping
from typing import Any

import click

from transports.base import Server
from transports.native import describe as describe_build

from .config import Config, load_config, parse_config
from .embedded import embedded_config
from .process.master import Master
from .sdk.asgi import AsgiService
from .sdk.echo import app as echo_app


def fastapi_app() -> Any:
    """The demo's FastAPI app: path and query parameters, a JSON body, a status code."""
    from fastapi import FastAPI, HTTPException
    from pydantic import BaseModel

    app = FastAPI(title="Pitcher demo")

    class Item(BaseModel):
        name: str
        price: float

    @app.get("/hello")
    async def hello(name: str = "world") -> dict[str, str]:
        return {"hello": name, "served_by": "FastAPI, over Pitcher frames"}

    @app.get("/items/{item_id}")
    async def read_item(item_id: int, q: str | None = None) -> dict[str, Any]:
        if item_id < 0:
            raise HTTPException(status_code=404, detail="no such item")
        return {"item_id": item_id, "q": q}

    @app.post("/items", status_code=201)
    async def create_item(item: Item) -> Item:
        return item

    return app


async def plain_asgi_app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
    """The demo's ASGI app without a framework (FastAPI not installed): a JSON hello."""
    if scope["type"] != "http":
        return  # lifespan: nothing to set up
    body = (
        b'{"hello": "world", "served_by": "a plain ASGI app, over Pitcher frames",'
        b' "fastapi": "pip install \'pitcher-rpc[demo]\'"}'
    )
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def demo_asgi() -> tuple[AsgiService, str]:
    """The ASGI service of the demo, and what it is."""
    try:
        return AsgiService(fastapi_app(), "fastapi-demo"), "FastAPI app"
    except ImportError:
        return AsgiService(plain_asgi_app, "asgi-demo"), "ASGI app (FastAPI not installed)"


async def start_echo_services(run_dir: str) -> dict[str, Server]:
    """One echo service per transport this build has, keyed by placeholder name."""
    return {
        "ECHO_TCP": await echo_app.serve("tcp://127.0.0.1:0"),
        "ECHO_UNIX": await echo_app.serve(f"unix://{run_dir}/echo.sock"),
        "ECHO_UDP": await echo_app.serve("udp://127.0.0.1:0"),
        "ECHO_ZMQ": await echo_app.serve("zmq+tcp://127.0.0.1:0"),
    }


def demo_config_text(
    services: dict[str, Server], listen: str | None, admin: str | None = None
) -> str:
    """The embedded configuration with the services' addresses (and --listen) filled in."""
    text = embedded_config("demo.toml")
    for placeholder, server in services.items():
        text = text.replace("${" + placeholder + "}", server.address)
    if listen:
        text = _set_listen(text, "server", listen)
    if admin:
        text = _set_listen(text, "admin", admin)
    return text


def _set_listen(text: str, section: str, address: str) -> str:
    """``text`` with the ``listen`` key of ``[section]`` set to ``address``."""
    lines = text.splitlines(keepends=True)
    inside = False
    for number, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("["):
            inside = stripped == f"[{section}]"
        elif inside and stripped.split("=", 1)[0].strip() == "listen":
            lines[number] = f"listen = {json.dumps(address)}\n"
            return "".join(lines)
    raise ValueError(f"conf/demo.toml has no listen key in [{section}]")


def _start_master(path: str, text: str) -> Master:
    """A master with one worker on ``text``, written to ``path``; OSError if it cannot listen.

    The admin listener takes the configured port, or any free one if that is taken
    (another demo, or a proxy, holds it): the demo prints where it is.
    """
    for attempt in (text, _set_listen(text, "admin", "127.0.0.1:0")):
        with open(path, "w", encoding="utf-8") as file:
            file.write(attempt)
        config = load_config(path)
        try:
            return Master(path, config, workers=1)
        except OSError as exc:
            if not _is_admin_taken(config, exc):
                raise
    raise AssertionError("unreachable: port 0 is always free")


def _is_admin_taken(config: Config, exc: OSError) -> bool:
    """Whether the proxy's port is free, so that the error was the admin listener's."""
    if exc.errno != errno.EADDRINUSE or config.admin.listen_address.port == 0:
        return False
    address = config.server.listen_address
    if address.is_unix:
        return True
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address.host, address.port))
        except OSError:
            return False
    return True


async def _ready(master: Master, running: asyncio.Task[None]) -> bool:
    """Wait until the master's worker serves and its admin listener is up (False: it stopped)."""
    while not running.done():
        with contextlib.suppress(RuntimeError):
            master.admin.address  # noqa: B018 - raises until the admin listener is up
            return True
        await asyncio.sleep(0.02)
    return False


async def run_demo(listen: str | None) -> None:
    run_dir = tempfile.mkdtemp(prefix="pitcher-demo-", dir="/tmp")
    master: Master | None = None
    stopping = asyncio.Event()

    def stop() -> None:
        # Until the master's own handlers take over (SIGTERM drains, SIGINT stops).
        stopping.set()
        if master is not None:
            master.stopping.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop)
    services = await start_echo_services(run_dir)
    asgi, asgi_kind = demo_asgi()
    await asgi.startup()
    asgi_server = await asgi.serve(f"unix://{run_dir}/asgi.sock")
    try:
        text = demo_config_text({**services, "ASGI_UNIX": asgi_server}, listen)
        try:
            master = _start_master(os.path.join(run_dir, "demo.toml"), text)
        except OSError as exc:
            listen_on = listen or parse_config(text).server.listen
            click.echo(f"pitcher demo: cannot listen on {listen_on}: {exc.strerror}", err=True)
            raise SystemExit(1) from None
        if stopping.is_set():
            master.stopping.set()
        running = loop.create_task(master.run(), name="pitcher-demo-master")
        if await _ready(master, running):
            _announce(master, asgi_kind)
        await running
        click.echo("stopping...")
    finally:
        await asyncio.gather(
            *(s.close(1.0) for s in services.values()), asgi.close(asgi_server, 1.0)
        )
        await asgi.shutdown()
        with contextlib.suppress(OSError):
            shutil.rmtree(run_dir)


def _announce(master: Master, asgi_kind: str) -> None:
    config = master.config
    base = f"http://{master.address}"
    host, port = master.admin.address
    admin = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    click.echo(f"Pitcher RPC demo: proxy on {base} ({describe_build()})")
    for route in config.routes:
        cluster = config.clusters[route.cluster]
        kind = asgi_kind if route.name == "asgi" else "echo service"
        click.echo(f"  {route.prefix:<8} -> {kind} at {cluster.nodes[0].uri}")
    click.echo(f"Status page: {admin}/ (the admin API: {admin}/admin/status, {admin}/metrics)")
    click.echo("Try:")
    for route in config.routes:
        click.echo(f"  curl {base}{route.prefix}hello")
    click.echo(f"  curl {base}/asgi/items/7?q=pitcher")
    click.echo("Ctrl-C stops everything.", nl=True)
