"""The ``pitcher`` command."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import click

from transports.native import describe as describe_build

from . import cli_output
from .config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from .proxy.server import ProxyServer
    from .proxy.snapshot import Snapshot


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _run(coro: object) -> None:
    import uvloop

    uvloop.run(coro)  # type: ignore[arg-type]


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.version_option(
    package_name="pitcher-rpc", message=f"%(prog)s, version %(version)s, {describe_build()}"
)
def main(verbose: bool) -> None:
    """Pitcher RPC: an HTTP/1.1 traffic entry for split services."""
    _setup_logging(verbose)


def _load_or_exit(path: str) -> Config:
    """The configuration at ``path``, or every mistake in it on stderr and exit status 1."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    for warning in config.warnings:
        click.echo(f"warning: {warning}", err=True)
    return config


@main.command()
@click.option("-c", "--config", "path", required=True, type=click.Path(dir_okay=False))
def check(path: str) -> None:
    """Validate a configuration file: prints OK, or each wrong key with its line."""
    config = _load_or_exit(path)
    click.echo(
        f"OK: {path}: {_count(len(config.routes), 'route')},"
        f" {_count(len(config.clusters), 'cluster')}, sha256 {config.checksum[:12]}"
    )


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


@main.command()
@click.option("-c", "--config", "path", required=True, type=click.Path(dir_okay=False))
@click.option(
    "--workers",
    type=click.IntRange(0, 256),
    default=None,
    help="Worker processes (default: the config's server.workers, else one per CPU);"
    " 0 runs everything in this one process.",
)
@click.option("--takeover", hidden=True, help="Take the sockets of a predecessor (restart).")
def serve(path: str, workers: int | None, takeover: str | None) -> None:
    """Run the proxy on a configuration file.

    SIGTERM drains, SIGINT stops, SIGHUP reloads, SIGUSR1 reopens log files,
    SIGUSR2 restarts gracefully (with workers).
    """
    config = _load_or_exit(path)
    if workers is None:
        workers = config.server.workers
    if workers is None:
        workers = os.cpu_count() or 1
    if workers == 0:
        _run(_serve(path, config))
        return
    _run(_serve_with_workers(path, config, workers, takeover))


async def _serve_with_workers(
    path: str, config: Config, workers: int, takeover: str | None
) -> None:
    from .process.handoff import HandoffError
    from .process.master import Master

    try:
        master = Master(os.path.abspath(path), config, workers, takeover)
    except HandoffError as exc:
        click.echo(f"pitcher: {exc}", err=True)
        raise SystemExit(1) from None
    except OSError as exc:
        click.echo(
            f"pitcher: cannot listen on {config.server.listen}: {exc.strerror or exc}", err=True
        )
        raise SystemExit(1) from None
    await master.run()


async def _serve(path: str, config: Config) -> None:
    from .config.tls import describe_listener
    from .proxy.backlog import describe_backlog
    from .proxy.server import ProxyServer

    log = logging.getLogger("pitcher")
    proxy = ProxyServer(config)
    # Nodes found in etcd or DNS, laid over the file as the master does for its
    # workers; taken before the first connection when the registry answers soon.
    found = _SingleProcessDiscovery(proxy, config)
    await found.configure(config)
    await found.settle(2.0)
    try:
        await proxy.start()
    except OSError as exc:
        await found.close()
        click.echo(
            f"pitcher: cannot listen on {config.server.listen}: {exc.strerror or exc}", err=True
        )
        raise SystemExit(1) from None
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def reload() -> None:
        try:
            base = load_config(path)
        except ConfigError as exc:
            log.error("reload refused, keeping generation %d:\n%s", proxy.snapshot.generation, exc)
        else:
            for warning in base.warnings:
                log.warning("%s", warning)
            snapshot = found.reload(base)
            log.info("reloaded %s: generation %d", path, snapshot.generation)

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    loop.add_signal_handler(signal.SIGUSR1, proxy.reopen_modules)
    from .process.gc_tuning import GcSettings, apply

    apply(GcSettings(config.server.gc_freeze, config.server.gc_thresholds))
    # Announced only once the signal handlers are in place.
    log.info(
        "listening on %s (%s%s; config %s, sha256 %s; %s)",
        proxy.address,
        describe_listener(config.server.tls),
        describe_backlog(config.server.backlog),
        path,
        config.checksum[:12],
        describe_build(),
    )
    await stop.wait()
    log.info("draining")
    await found.close()
    await proxy.stop(grace=config.server.drain_timeout)


class _SingleProcessDiscovery:
    """With ``workers = 0``: the discovery sources run beside the proxy, in its process."""

    def __init__(self, proxy: ProxyServer, config: Config) -> None:
        from .config.overlay import Overlay
        from .fleet.feed import NodeFeed

        self.proxy = proxy
        self.base = config
        self.overlay = Overlay()
        self.feed = NodeFeed(self._changed)
        self._configuring: set[asyncio.Task[None]] = set()

    async def configure(self, config: Config) -> None:
        await self.feed.configure(config)

    async def settle(self, timeout: float) -> None:
        if self.feed.discovery is not None:
            await self.feed.settle(timeout)
            self._apply()

    def reload(self, base: Config) -> Snapshot:
        self.base = base
        task = asyncio.get_running_loop().create_task(self.feed.configure(base))
        self._configuring.add(task)
        task.add_done_callback(self._configuring.discard)
        self.overlay = self.overlay.for_reload(base)[0]
        return self._apply()

    def _apply(self) -> Snapshot:
        self.overlay = self.overlay.with_discovered(self.feed.found(self.base))
        return self.proxy.reload(self.overlay.apply(self.base))

    async def _changed(self) -> None:
        if self.overlay.with_discovered(self.feed.found(self.base)) != self.overlay:
            self._apply()

    async def close(self) -> None:
        await asyncio.gather(*self._configuring, return_exceptions=True)
        await self.feed.close()


@main.command()
@click.option(
    "--listen",
    default=None,
    metavar="HOST:PORT",
    help="Where the proxy listens (default from the embedded config: 127.0.0.1:8080).",
)
def demo(listen: str | None) -> None:
    """Run the proxy and an echo service per transport on the embedded config."""
    from .config import parse_listen
    from .demo import run_demo

    if listen is not None:
        try:
            parse_listen(listen)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--listen") from None
    _run(run_demo(listen))


# ------------------------------------------------------------------ the admin API's commands

_CONFIG_OPTION = click.option(
    "-c",
    "--config",
    "path",
    required=True,
    type=click.Path(dir_okay=False),
    help="The proxy's configuration file: its [admin] table says where to ask.",
)
_JSON_OPTION = click.option(
    "--json", "as_json", is_flag=True, help="Print the admin API's whole answer as JSON."
)


# A restart waits for the new generation to be ready (the master gives it 30 s).
_ADMIN_TIMEOUT = 60.0


def _colour() -> bool:
    """Colours for a person at a terminal only, and never against NO_COLOR (no-color.org)."""
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def _fail(message: str) -> NoReturn:
    click.echo(f"pitcher: {message}", err=True)
    sys.exit(1)


class _AdminApi:
    """The admin API of the proxy a configuration file names, with its bearer token."""

    __slots__ = ("config", "path", "token")

    def __init__(self, path: str) -> None:
        self.path = path
        # Loading reads [admin] token_file too: an unreadable or empty one is a
        # configuration error on its line, as any other.
        self.config = _load_or_exit(path)
        self.token = self.config.admin.token

    def call(
        self, method: str, route: str, body: dict[str, object] | None = None
    ) -> tuple[int, Any]:
        """The status and JSON answer; stops the command if there is no admin API to ask."""
        import http.client

        listen = self.config.admin.listen
        address = self.config.admin.listen_address
        headers = {"content-type": "application/json"} if body is not None else {}
        if self.token is not None:
            headers["authorization"] = f"Bearer {self.token}"
        connection = http.client.HTTPConnection(address.host, address.port, _ADMIN_TIMEOUT)
        try:
            connection.request(method, route, None if body is None else json.dumps(body), headers)
            response = connection.getresponse()
            text = response.read().decode("utf-8", "replace")
        except TimeoutError:
            _fail(f"the admin API at {listen} did not answer within {_ADMIN_TIMEOUT:g} s")
        except OSError as exc:
            _fail(f"no admin API at {listen}: {exc.strerror or exc}; is the proxy running?")
        except http.client.HTTPException as exc:
            _fail(f"{listen} does not answer as the admin API does ({type(exc).__name__})")
        finally:
            connection.close()
        if response.status == 401:
            if self.token is not None:
                _fail("the admin API refused the token (see [admin] token_file)")
            _fail(f"the admin API asks for a token, and {self.path} sets no [admin] token_file")
        try:
            answer = json.loads(text)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            _fail(cli_output.error_text(response.status, answer, text))
        return response.status, answer

    def show(self, route: str, as_json: bool, render: Callable[[Any, bool], list[str]]) -> None:
        """A listing: a table, or with --json the whole answer."""
        status, answer = self.call("GET", route)
        if status >= 300:
            _print_json_if(as_json, answer)
            _fail(cli_output.error_text(status, answer, ""))
        if as_json:
            _print_json_if(True, answer)
            return
        click.echo("\n".join(render(answer, _colour())), color=_colour())

    def change(
        self,
        method: str,
        route: str,
        body: dict[str, object] | None,
        as_json: bool,
        outcome: Callable[[Any], cli_output.Outcome],
    ) -> None:
        """A change: one line of outcome (or the JSON answer), each problem on stderr."""
        status, answer = self.call(method, route, body)
        _print_json_if(as_json, answer)
        # A change every worker refused is an error; one some workers took has an outcome.
        if "error" in answer or not isinstance(answer.get("workers", []), list):
            _fail(cli_output.error_text(status, answer, ""))
        result = outcome(answer)
        if not as_json:
            click.echo("\n".join(result.lines))
        for problem in result.problems:
            click.echo(f"pitcher: {problem}", err=True)
        if status >= 300 or not result.ok:
            sys.exit(1)


def _print_json_if(as_json: bool, answer: object) -> None:
    if as_json:
        click.echo(json.dumps(answer, indent=2))


@main.command()
@_CONFIG_OPTION
@_JSON_OPTION
def restart(path: str, as_json: bool) -> None:
    """Restart the proxy gracefully: a new generation takes over, no connection is lost.

    FILE must be the file the proxy serves (the new generation reads it);
    any other is refused, naming the served one.
    """
    api = _AdminApi(path)
    served = os.path.abspath(path)
    api.change(
        "POST",
        "/admin/restart",
        {"path": served},
        as_json,
        lambda answer: cli_output.restart_outcome(served, answer),
    )


@main.command()
@_CONFIG_OPTION
@_JSON_OPTION
def reload(path: str, as_json: bool) -> None:
    """Reload the configuration in every worker (validated first; a bad file changes nothing).

    FILE must be the file the proxy serves: any other is refused, naming the
    served one (a proxy keeps the file it was started with).
    """
    api = _AdminApi(path)
    body: dict[str, object] = {"path": os.path.abspath(path)}
    api.change("POST", "/admin/reload", body, as_json, cli_output.reload_outcome)


@main.command()
@_CONFIG_OPTION
@_JSON_OPTION
def workers(path: str, as_json: bool) -> None:
    """The worker processes: pid, configuration generation, connections, requests, lag."""
    _AdminApi(path).show("/admin/workers", as_json, cli_output.workers_table)


@main.command()
@_CONFIG_OPTION
@_JSON_OPTION
def status(path: str, as_json: bool) -> None:
    """The proxy on one screen: up or draining, its configuration, workers and clusters."""
    api = _AdminApi(path)
    answers: dict[str, Any] = {}
    for name, route in (
        ("health", "/healthz"),
        ("config", "/admin/config"),
        ("workers", "/admin/workers"),
        ("clusters", "/admin/clusters"),
    ):
        code, answer = api.call("GET", route)
        # /healthz answers 503 while the proxy drains: a state to show, not an error.
        if code >= 300 and not (route == "/healthz" and code == 503):
            _fail(cli_output.error_text(code, answer, ""))
        answers[name] = answer
    if as_json:
        _print_json_if(True, answers)
        return
    lines = cli_output.status_lines(
        answers["health"],
        answers["config"],
        answers["workers"],
        answers["clusters"],
        admin=api.config.admin.listen,
        path=path,
        file_checksum=api.config.checksum,
        colour=_colour(),
    )
    click.echo("\n".join(lines), color=_colour())


@main.command()
@click.argument("action", type=click.Choice(["list", "enable", "disable"]))
@click.argument("name", required=False)
@_CONFIG_OPTION
@_JSON_OPTION
def modules(action: str, name: str | None, path: str, as_json: bool) -> None:
    """List the modules, or switch one on or off in every worker."""
    if action != "list" and not name:
        raise click.BadParameter(f"'{action}' needs a module name", param_hint="NAME")
    api = _AdminApi(path)
    if action == "list" or not name:
        api.show("/admin/modules", as_json, cli_output.modules_table)
        return
    route = f"/admin/modules/{urllib.parse.quote(name, safe='')}/{action}"
    api.change("POST", route, None, as_json, cli_output.module_outcome)


@main.command()
@click.argument("action", type=click.Choice(["list", "add", "drain", "remove"]))
@click.argument("cluster", required=False)
@click.argument("uri", required=False)
@click.option("--weight", type=click.IntRange(1, 1000), default=None, help="For add (default 1).")
@click.option("--keep", is_flag=True, help="Keep the change over later reloads.")
@_CONFIG_OPTION
@_JSON_OPTION
def nodes(
    action: str,
    cluster: str | None,
    uri: str | None,
    weight: int | None,
    keep: bool,
    path: str,
    as_json: bool,
) -> None:
    """List clusters and their nodes, or add, drain or remove a node in every worker.

    A change lasts until the next reload unless --keep is given; the file is
    never written.
    """
    if action != "list":
        if not cluster or not uri:
            raise click.BadParameter(f"'{action}' needs a CLUSTER and a node URI", param_hint="URI")
        if weight is not None and action != "add":
            raise click.BadParameter("only 'add' takes a weight", param_hint="--weight")
    api = _AdminApi(path)
    if action == "list" or not cluster or not uri:
        api.show("/admin/clusters", as_json, cli_output.nodes_table)
        return
    body: dict[str, object] = {"uri": uri, "keep": keep}
    if weight is not None:
        body["weight"] = weight
    quoted = urllib.parse.quote(cluster, safe="")
    method, route = {
        "add": ("POST", f"/admin/clusters/{quoted}/nodes"),
        "drain": ("POST", f"/admin/clusters/{quoted}/nodes/drain"),
        "remove": ("DELETE", f"/admin/clusters/{quoted}/nodes"),
    }[action]
    node = uri

    def outcome(answer: Any) -> cli_output.Outcome:
        return cli_output.node_outcome(action, node, answer, weight=weight, keep=keep)

    api.change(method, route, body, as_json, outcome)


@main.command()
@click.option(
    "--seconds",
    type=click.FloatRange(min=1.0, max=600.0),
    default=20.0,
    show_default=True,
    help="Total time under load, shared by every measurement.",
)
@click.option(
    "--transports",
    "carriers",
    default=",".join(("tcp", "unix", "udp", "zmq+tcp", "zmq+ipc")),
    show_default=True,
    help="Comma-separated carriers to measure.",
)
@click.option("--in-flight", type=click.IntRange(2, 1024), default=32, show_default=True)
@click.option("--no-proxy", is_flag=True, help="Measure the transports only, not HTTP.")
@click.option("--chart", type=click.Path(dir_okay=False), help="Write a PNG of the latencies.")
def bench(seconds: float, carriers: str, in_flight: int, no_proxy: bool, chart: str | None) -> None:
    """Compare the transports on this machine, each beside its raw floor (loopback only)."""
    from .benchmark import report
    from .benchmark.runner import CARRIERS, run

    chosen = tuple(c.strip() for c in carriers.split(",") if c.strip())
    unknown = [c for c in chosen if c not in CARRIERS]
    if unknown or not chosen:
        raise click.BadParameter(
            f"unknown {', '.join(unknown)}; choose from {', '.join(CARRIERS)}",
            param_hint="--transports",
        )
    rows = run(
        chosen,
        seconds,
        in_flight,
        with_proxy=not no_proxy,
        progress=lambda step: click.echo(f"  measuring {step}", err=True),
    )
    click.echo(f"build: {describe_build()}")
    click.echo(report.table(rows))
    if chart:
        if report.chart(rows, chart):
            click.echo(f"chart written to {chart}")
        else:
            click.echo("no chart: matplotlib is not installed (pip install 'pitcher-rpc[chart]')")


@main.command(
    context_settings={"ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def backend(args: tuple[str, ...]) -> None:
    """Run a split service: APP (MODULE:ATTRIBUTE) is an SDK Service or an ASGI 3 app."""
    # Loaded only when run, as the bridge: the SDK would slow every other command.
    from .sdk.commands import backend_command

    backend_command.main(list(args), prog_name="pitcher backend")


@main.command(
    context_settings={"ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bridge(args: tuple[str, ...]) -> None:
    """Forward frames to an HTTP/1.1 origin: --listen URI --to http://HOST:PORT (docs/asgi.md)."""
    # Loaded only when run: the codec and the SDK would slow every other command.
    from .sdk.bridge import bridge_command

    bridge_command.main(list(args), prog_name="pitcher bridge")


if __name__ == "__main__":
    main()
