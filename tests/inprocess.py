"""SDK backends and a proxy run in the test's own event loop, and refused configurations.

    async with serving(app) as [node], running_proxy(CONFIG.format(node=node)) as (proxy, port):
        ...

On the way out the proxy stops first (grace 1.0), then each backend closes
(grace 1.0), in the order given.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

import pytest

from pitcher_rpc.config import ConfigError, parse_config
from pitcher_rpc.proxy.server import ProxyServer
from pitcher_rpc.sdk import Response, Service
from transports.base import Server

LOCAL = "tcp://127.0.0.1:0"

Check = Callable[[ProxyServer, int], Awaitable[None]]


@asynccontextmanager
async def serving(*apps: Service | tuple[Service, str]) -> AsyncIterator[list[str]]:
    """Serve each app on a free local TCP port (or at the address paired with it).

    Yields the addresses they serve on, in order; closes them all, in order, at the end.
    """
    servers: list[Server] = []
    try:
        for app in apps:
            service, address = app if isinstance(app, tuple) else (app, LOCAL)
            servers.append(await service.serve(address))
        yield [server.address for server in servers]
    finally:
        for server in servers:
            await server.close(1.0)


def port_of(proxy: ProxyServer) -> int:
    """The TCP port a started proxy listens on."""
    return int(proxy.address.rpartition(":")[2])


@asynccontextmanager
async def running_proxy(text: str, **kwargs: Any) -> AsyncIterator[tuple[ProxyServer, int]]:
    """A started proxy of configuration ``text`` and its port; ``kwargs`` go to ProxyServer."""
    proxy = ProxyServer(parse_config(text), **kwargs)
    await proxy.start()
    try:
        yield proxy, port_of(proxy)
    finally:
        await proxy.stop(1.0)


def check_through_proxy(app: Service, template: str, check: Check, **fields: str) -> None:
    """Run ``check(proxy, port)`` against a proxy before ``app``.

    The proxy's configuration is ``template.format(node=<app's address>, **fields)``.
    """

    async def main() -> None:
        async with (
            serving(app) as [node],
            running_proxy(template.format(node=node, **fields)) as (proxy, port),
        ):
            await check(proxy, port)

    asyncio.run(main())


def config_errors(text: str, source: str) -> str:
    """The text of the ConfigError that ``parse_config(text, source)`` raises.

    Fails the test if the configuration is accepted.
    """
    __tracebackhide__ = True
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source)
    return str(caught.value)


class ModuleError(NamedTuple):
    text: str  # the whole error
    key: str  # the key it names, under [modules.NAME] ("" for the table itself)
    line: str  # the configuration line it points at


def module_error(text: str, source: str, module: str) -> ModuleError:
    """The error a module's own validation gives, and the line and key it points at."""
    __tracebackhide__ = True
    error = config_errors(text, source)
    pattern = rf"{re.escape(source)}:(\d+): modules\.{module}(?:\.([\w.-]+))?: module {module}: "
    match = re.match(pattern, error)
    assert match, error
    return ModuleError(error, match.group(2) or "", text.splitlines()[int(match.group(1)) - 1])


def assert_points_at_key(error: ModuleError) -> None:
    """The line reported is the named key's, or the module's table for no single key."""
    __tracebackhide__ = True
    line = error.line.lstrip()
    if error.key:
        assert any(line.startswith(part) for part in error.key.split(".")), error
    else:
        assert line.startswith("[modules."), error


_ONE_ROUTE = '[[routes]]\ncluster = "a"\n[clusters.a]\nnodes = ["tcp://127.0.0.1:1"]\n'


def assert_module_refuses(module: str, section: str, message: str) -> ModuleError:
    """``[modules.NAME]`` with ``section`` is refused at the right line, saying ``message``."""
    __tracebackhide__ = True
    error = module_error(f"{_ONE_ROUTE}[modules.{module}]\n{section}\n", "m.toml", module)
    assert_points_at_key(error)
    assert message in error.text, error.text
    return error


def answering(name: str, status: int, body: str) -> Service:
    """A service that answers every request with ``status`` and ``body``."""
    service = Service(name)

    @service.route("/")
    def answer(request: Any) -> Response:
        return Response(status, body)

    return service
