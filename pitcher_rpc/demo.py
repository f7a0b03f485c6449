"""`pitcher demo`: the proxy and an echo service per transport, on the embedded config."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import signal
import tempfile

import click

from transports.base import Server
from transports.native import describe as describe_build

from .config import Config, parse_config
from .embedded import embedded_config
from .proxy.server import ProxyServer
from .sdk.echo import app as echo_app


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
    proxy: ProxyServer | None = None
    try:
        config = demo_config(services, listen)
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
            click.echo(f"  {route.prefix:<8} -> echo service at {cluster.nodes[0].uri}")
        click.echo("Try:")
        for route in config.routes:
            click.echo(f"  curl {base}{route.prefix}hello")
        click.echo("Ctrl-C stops everything.", nl=True)
        await stop.wait()
        click.echo("stopping...")
    finally:
        if proxy is not None:
            await proxy.stop(grace=2.0)
        await asyncio.gather(*(s.close(1.0) for s in services.values()))
        with contextlib.suppress(OSError):
            shutil.rmtree(run_dir)
