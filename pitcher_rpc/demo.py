"""`pitcher demo`: the proxy, an echo service per transport and an ASGI app, on the embedded config.

The ASGI app is a small FastAPI app where FastAPI is installed (``pip install
'pitcher-rpc[demo]'``), a framework-free ASGI app otherwise: either way it is
served over frames on a Unix socket, as ``pitcher backend MODULE:APP`` serves
any ASGI app, and the proxy's ``/asgi/`` route reaches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import signal
import tempfile
from collections.abc import MutableMapping
from typing import Any

import click

from transports.base import Server
from transports.native import describe as describe_build

from .config import Config, parse_config
from .embedded import embedded_config
from .proxy.server import ProxyServer
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


def demo_config(services: dict[str, Server], listen: str | None) -> Config:
    text = embedded_config("demo.toml")
    for placeholder, server in services.items():
        text = text.replace("${" + placeholder + "}", server.address)
    config = parse_config(text, source="conf/demo.toml")
    if listen:
        config = dataclasses.replace(
            config, server=dataclasses.replace(config.server, listen=listen)
        )
    return config


async def run_demo(listen: str | None) -> None:
    run_dir = tempfile.mkdtemp(prefix="pitcher-demo-", dir="/tmp")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    services = await start_echo_services(run_dir)
    asgi, asgi_kind = demo_asgi()
    await asgi.startup()
    asgi_server = await asgi.serve(f"unix://{run_dir}/asgi.sock")
    proxy: ProxyServer | None = None
    try:
        config = demo_config({**services, "ASGI_UNIX": asgi_server}, listen)
        proxy = ProxyServer(config)
        try:
            await proxy.start()
        except OSError as exc:
            proxy = None
            listen_on = config.server.listen
            click.echo(f"pitcher demo: cannot listen on {listen_on}: {exc.strerror}", err=True)
            raise SystemExit(1) from None
        base = f"http://{proxy.address}"
        click.echo(f"Pitcher RPC demo: proxy on {base} ({describe_build()})")
        for route in config.routes:
            cluster = config.clusters[route.cluster]
            kind = asgi_kind if route.name == "asgi" else "echo service"
            click.echo(f"  {route.prefix:<8} -> {kind} at {cluster.nodes[0].uri}")
        click.echo("Try:")
        for route in config.routes:
            click.echo(f"  curl {base}{route.prefix}hello")
        click.echo(f"  curl {base}/asgi/items/7?q=pitcher")
        click.echo("Ctrl-C stops everything.", nl=True)
        await stop.wait()
        click.echo("stopping...")
    finally:
        if proxy is not None:
            await proxy.stop(grace=2.0)
        await asyncio.gather(
            *(s.close(1.0) for s in services.values()), asgi.close(asgi_server, 1.0)
        )
        await asgi.shutdown()
        with contextlib.suppress(OSError):
            shutil.rmtree(run_dir)
