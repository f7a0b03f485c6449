"""Hook chains: order, answers, failure isolation, on/off; and the hooks inside a real proxy."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from pitcher_rpc.modules import Answer, Hook, HookChains, Module, ModuleFailure
from pitcher_rpc.sdk.echo import app as echo_app
from tests.inprocess import config_errors, running_proxy, serving


def module(name: str, priority: int, **handlers: Callable[..., Any]) -> Module:
    """A module class made on the spot, with the given handlers; returns an instance."""
    namespace: dict[str, Any] = {"name": name, "priority": priority}
    for hook_name, handler in handlers.items():
        namespace[hook_name] = lambda self, *args, _handler=handler: _handler(*args)
    cls = type(f"M_{name}", (Module,), namespace)
    return cls({})  # type: ignore[no-any-return]


# ------------------------------------------------------------------------- chains


def test_handlers_run_highest_priority_first() -> None:
    seen: list[str] = []
    chains = HookChains(
        [
            module("low", 10, before_cluster=lambda e: seen.append("low")),
            module("high", 90, before_cluster=lambda e: seen.append("high")),
            module("mid", 50, before_cluster=lambda e: seen.append("mid")),
        ]
    )
    assert chains.run(chains.default.before_cluster, object()) is None
    assert seen == ["high", "mid", "low"]


def test_a_priority_tie_on_one_hook_is_refused_at_load() -> None:
    with pytest.raises(ModuleFailure, match="share priority 5"):
        HookChains(
            [
                module("a", 5, after_cluster=lambda e: None),
                module("b", 5, after_cluster=lambda e: None),
            ]
        )
    # The same priority on different hooks is no tie.
    HookChains([module("a", 5, after_cluster=lambda e: None), module("b", 5, on_accept=print)])


def test_an_answer_ends_the_chain() -> None:
    seen: list[str] = []
    chains = HookChains(
        [
            module("gate", 90, before_cluster=lambda e: Answer(403, "no")),
            module("after", 10, before_cluster=lambda e: seen.append("after")),
        ]
    )
    assert chains.run(chains.default.before_cluster, object()) == Answer(403, "no")
    assert seen == []


def test_a_failing_module_is_skipped_logged_and_counted() -> None:
    seen: list[str] = []

    def broken(exchange: object) -> None:
        raise RuntimeError("bug")

    chains = HookChains(
        [
            module("broken", 90, before_cluster=broken),
            module("next", 10, before_cluster=lambda e: seen.append("next")),
        ]
    )
    assert chains.run(chains.default.before_cluster, object()) is None
    assert seen == ["next"]
    assert chains.failures["broken"] == 1


def test_a_failing_module_with_the_fail_policy_answers_500() -> None:
    def broken(exchange: object) -> None:
        raise RuntimeError("bug")

    strict = module("strict", 50, before_cluster=broken)
    type(strict).failure_policy = "fail"  # type: ignore[misc]
    chains = HookChains([strict])
    answer = chains.run(chains.default.before_cluster, object())
    assert answer is not None and answer.status == 500 and "strict" in answer.message


def test_a_module_switched_off_costs_nothing_and_comes_back() -> None:
    seen: list[str] = []
    chains = HookChains([module("m", 1, before_cluster=lambda e: seen.append("m"))])
    chains.set_enabled("m", False)
    assert chains.default.before_cluster == ()
    chains.run(chains.default.before_cluster, object())
    chains.set_enabled("m", True)
    chains.run(chains.default.before_cluster, object())
    assert seen == ["m"]
    with pytest.raises(KeyError):
        chains.set_enabled("nope", True)


def test_a_route_sets_its_own_modules_and_order() -> None:
    seen: list[str] = []
    chains = HookChains(
        [
            module("a", 90, after_cluster=lambda e: seen.append("a")),
            module("b", 10, after_cluster=lambda e: seen.append("b")),
            module("c", 50, after_cluster=lambda e: seen.append("c")),
        ],
        route_orders={"special": ["b", "a"]},
    )
    chains.run(chains.for_route("special").after_cluster, object())
    chains.run(chains.for_route("other").after_cluster, object())
    assert seen == ["b", "a", "a", "c", "b"]
    with pytest.raises(ModuleFailure, match="unknown"):
        HookChains([], route_orders={"r": ["ghost"]})


def test_hooks_are_the_handler_methods_a_module_defines() -> None:
    m = module("m", 1, on_accept=print, request_finish=print)
    assert set(type(m).hooks()) == {Hook.ACCEPT, Hook.REQUEST_FINISH}
    assert chains_describe(HookChains([m]))[0]["hooks"] == ["ACCEPT", "REQUEST_FINISH"]


def chains_describe(chains: HookChains) -> list[dict[str, Any]]:
    return chains.describe()


# ------------------------------------------------------------ inside a real proxy

CONFIG = """
[server]
listen = "127.0.0.1:0"
[[routes]]
name = "echo"
prefix = "/"
cluster = "echo"
[clusters.echo]
nodes = ["{node}"]
"""


async def request(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    if not data:
        return 0, b""
    return int(data.split(b" ", 2)[1]), data


def with_proxy(modules: list[Module], body: Callable[[int, HookChains], Awaitable[None]]) -> None:
    async def main() -> None:
        async with serving(echo_app) as [node]:
            chains = HookChains(modules)
            async with running_proxy(CONFIG.format(node=node), modules=chains) as (_, port):
                await body(port, chains)

    asyncio.run(main())


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def __call__(self, name: str) -> Callable[..., None]:
        return lambda target: self.events.append((name, target))


def test_every_hook_point_fires_in_a_real_proxy() -> None:
    record = Recorder()
    routes: list[str] = []
    statuses: list[int] = []
    spy = module(
        "spy",
        1,
        on_accept=record("accept"),
        before_cluster=record("before"),
        after_cluster=lambda e: routes.append(e.route.name),
        backend_response=record("backend"),
        request_finish=lambda e: statuses.append(e.status),
        on_finish=record("finish"),
    )

    async def body(port: int, chains: HookChains) -> None:
        status, _ = await request(port, "/hello")
        assert status == 200
        await asyncio.sleep(0.05)  # connection_lost runs after the close

    with_proxy([spy], body)
    names = [name for name, _ in record.events]
    assert names == ["accept", "before", "backend", "finish"]
    assert routes == ["echo"] and statuses == [200]


def test_modules_answer_refuse_and_fail_without_breaking_the_proxy() -> None:
    def gate(exchange: Any) -> Answer | None:
        if exchange.request.path == b"/forbidden":
            return Answer(403, "not here", ((b"x-gate", b"1"),))
        return None

    def broken(exchange: Any) -> None:
        raise RuntimeError("a bug in a module")

    def accept(connection: Any) -> Answer | None:
        return Answer(429, "too many") if accept.count >= 3 else None  # type: ignore[attr-defined]

    accept.count = 0  # type: ignore[attr-defined]

    def count_accepts(connection: Any) -> None:
        accept.count += 1  # type: ignore[attr-defined]

    modules = [
        module("gate", 90, before_cluster=gate),
        module("broken", 50, after_cluster=broken),
        module("counter", 80, on_accept=count_accepts),
        module("limit", 70, on_accept=accept),
    ]

    async def body(port: int, chains: HookChains) -> None:
        status, data = await request(port, "/forbidden")
        assert status == 403 and b"x-gate: 1" in data
        status, _ = await request(port, "/fine")  # "broken" is skipped, not fatal
        assert status == 200
        assert chains.failures["broken"] == 1
        status, data = await request(port, "/refused")  # the third connection
        assert status == 429 and re.search(rb"connection: close", data)
        chains.set_enabled("limit", False)
        status, _ = await request(port, "/again")
        assert status == 200

    with_proxy(modules, body)


def test_a_priority_tie_is_refused_when_the_configuration_is_checked() -> None:
    from pitcher_rpc.modules import registry

    first = type("TieA", (Module,), {"name": "tie_a", "priority": 7, "on_accept": print})
    second = type("TieB", (Module,), {"name": "tie_b", "priority": 7, "on_accept": print})
    registry.register(first)
    registry.register(second)
    try:
        text = (
            "[modules.tie_a]\n[modules.tie_b]\n"
            '[[routes]]\ncluster = "a"\n[clusters.a]\nnodes = ["tcp://127.0.0.1:1"]\n'
        )
        assert "t.toml:2: modules.tie_b: shares priority 7 with module 'tie_a' on ACCEPT" in (
            config_errors(text, "t.toml")
        )
    finally:
        registry.unregister("tie_a")
        registry.unregister("tie_b")


class Tenant(Module):
    """A module written in Python, reading a header it names at class level."""

    name = "tenant"
    priority = 60
    watch = frozenset({b"x-tenant"})

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.seen: list[bytes] = []

    def before_cluster(self, exchange: Any) -> Answer | None:
        request = exchange.request
        if not request.watched:
            return None
        tenant = request.values[request.names.index(b"x-tenant")]
        self.seen.append(tenant)
        return Answer(403, "tenant refused") if tenant == b"blocked" else None


def test_a_python_module_subclasses_the_base_and_the_core_sees_its_watched_header() -> None:
    tenant = Tenant({})
    assert tenant.watch == frozenset({b"x-tenant"}) and Tenant.hooks() == (Hook.BEFORE_CLUSTER,)

    async def get(port: int, tenant_header: str) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"GET /x HTTP/1.1\r\nHost: x\r\n{tenant_header}Connection: close\r\n\r\n".encode()
        )
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return int(data.split(b" ", 2)[1])

    async def body(port: int, chains: HookChains) -> None:
        assert await get(port, "") == 200
        assert await get(port, "X-Tenant: shop\r\n") == 200
        assert await get(port, "X-Tenant: blocked\r\n") == 403

    with_proxy([tenant], body)
    assert tenant.seen == [b"shop", b"blocked"]
