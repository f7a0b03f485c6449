"""Hot reload by snapshot swap, under load: nothing fails, nothing is routed by a stale route."""

from __future__ import annotations

import asyncio
import json
import random

from pitcher_rpc.config import ConfigError, parse_config
from pitcher_rpc.proxy.server import ProxyServer
from pitcher_rpc.sdk.echo import app as echo_app

RELOADS = 50

# Generation A: /stable/ and /extra/ on node one, ip_filter on.
CONFIG_A = """
[server]
listen = "127.0.0.1:0"
keepalive_requests = 0
[modules.ip_filter]
allow = ["127.0.0.0/8"]
[[routes]]
name = "stable"
prefix = "/stable/"
cluster = "first"
[[routes]]
name = "extra"
prefix = "/extra/"
cluster = "first"
[clusters.first]
nodes = ["{one}"]
"""
# Generation B: /stable/ moves to node two, /extra/ and ip_filter are gone, node one too.
CONFIG_B = """
[server]
listen = "127.0.0.1:0"
keepalive_requests = 0
[[routes]]
name = "stable"
prefix = "/stable/"
cluster = "second"
[clusters.second]
nodes = ["{two}"]
"""


async def client(port: int, stop: asyncio.Event, outcomes: list[tuple[str, int, str]]) -> None:
    """One keep-alive connection sending requests until told to stop."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    rng = random.Random(port)
    try:
        while not stop.is_set():
            path = rng.choice(["/stable/x", "/extra/y"])
            writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            status = int(head.split(b" ", 2)[1])
            length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
            body = await asyncio.wait_for(reader.readexactly(length), 5)
            route = json.loads(body)["route"] if status == 200 else ""
            outcomes.append((path, status, route))
    finally:
        writer.close()


def test_fifty_reloads_under_load_fail_nothing_and_route_nothing_stale() -> None:
    async def main() -> None:
        one = await echo_app.serve("tcp://127.0.0.1:0")
        two = await echo_app.serve("tcp://127.0.0.1:0")
        config_a = parse_config(CONFIG_A.format(one=one.address))
        config_b = parse_config(CONFIG_B.format(two=two.address))
        proxy = ProxyServer(config_a)
        await proxy.start()
        port = int(proxy.address.rpartition(":")[2])
        stop = asyncio.Event()
        outcomes: list[tuple[str, int, str]] = []
        clients = [asyncio.ensure_future(client(port, stop, outcomes)) for _ in range(8)]
        try:
            for n in range(RELOADS):
                await asyncio.sleep(0.02)
                proxy.reload(config_b if n % 2 == 0 else config_a)
                # An invalid file never gets this far: it is refused before any swap.
                if n == RELOADS // 2:
                    try:
                        parse_config(CONFIG_A.replace("[[routes]]", "[[routes]]\nbogus = 1", 1))
                    except ConfigError:
                        pass
                    else:
                        raise AssertionError("an invalid configuration was accepted")
            await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.gather(*clients)
            await proxy.stop(1.0)
            await one.close(1.0)
            await two.close(1.0)
        assert proxy.snapshot.generation == RELOADS + 1
        assert len(outcomes) > 500
        for path, status, route in outcomes:
            if path.startswith("/stable/"):
                assert (status, route) == (200, "stable"), (path, status, route)
            else:
                # /extra/ exists in generation A only: its own route, or no route at all.
                assert (status, route) in ((200, "extra"), (404, "")), (path, status, route)
        statuses = {status for path, status, _ in outcomes if path.startswith("/extra/")}
        assert statuses == {200, 404}, "the reloads did not change what /extra/ meets"

    asyncio.run(main())
