"""A handler's Context knows the route's timeout, on every carrier, through a running proxy.

The proxy sends what is left of the route's ``timeout`` in each REQUEST
frame (deadline_ms); the SDK turns it into ``context.remaining()``. A route
whose timeout does not fit the header field (about 49.7 days) sends none, and
the handler sees None. Cancellation still reaches a handler that takes a
Context: the client going away (CANCEL) and the route's timeout passing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.proxy.conftest import (
    SERVE_APP,
    Launcher,
    Proxy,
    build_request,
    get,
    toml_config,
    wait_until,
)

CARRIERS = ["tcp", "unix", "udp", "zmq+tcp", "zmq+ipc"]
TIMEOUT = 3.0
SHORT_TIMEOUT = 0.4
# Beyond deadline_ms's uint32 of milliseconds: sent as "no deadline".
NO_DEADLINE = 5e6

# /remaining answers what the Context says; /wait?mark=NAME creates
# MARK_DIR/NAME, waits, and once it is cancelled writes NAME.cancelled holding
# what context.cancelled and context.remaining() say then.
CONTEXT_APP = """
import asyncio, os, sys
from pitcher_rpc.sdk import Context, Request, Service

MARK_DIR = os.environ["TEST_MARK_DIR"]
app = Service("context")


@app.route("/")
async def handle(request: Request, context: Context):
    if request.path.endswith("/remaining"):
        return {"remaining": context.remaining(), "cancelled": context.cancelled}
    mark = os.path.join(MARK_DIR, request.query_params["mark"])
    open(mark, "w").close()
    try:
        await asyncio.sleep(10)
    except asyncio.CancelledError:
        # context.cancelled turns true as the error leaves the handler: look after.
        asyncio.get_running_loop().call_soon(report, mark, context)
        raise
    return {"waited": True}


def report(mark, context):
    # Written whole, then named: the test may look the moment the name appears.
    with open(mark + ".part", "w") as file:
        file.write("%s %s" % (context.cancelled, context.remaining()))
    os.replace(mark + ".part", mark + ".cancelled")
    return {"waited": True}
"""


@pytest.fixture(scope="module")
def proxy(module_launcher: Launcher) -> Iterator[Proxy]:
    launcher = module_launcher
    routes = []
    clusters = {}
    for carrier in CARRIERS:
        backend = launcher.script_backend(CONTEXT_APP + SERVE_APP, carrier)
        name = _name(carrier)
        clusters[name] = {"nodes": [backend.uri]}
        for kind, timeout in (("timed", TIMEOUT), ("short", SHORT_TIMEOUT), ("open", NO_DEADLINE)):
            routes.append(
                {
                    "name": f"{name}-{kind}",
                    "prefix": f"/{name}/{kind}/",
                    "cluster": name,
                    "timeout": timeout,
                    "retries": 0,
                }
            )
    yield launcher.proxy(toml_config(routes, clusters))


def _name(carrier: str) -> str:
    return carrier.replace("+", "-")


@pytest.mark.parametrize("carrier", CARRIERS)
def test_the_handler_sees_the_routes_timeout_as_its_remaining_time(
    proxy: Proxy, carrier: str
) -> None:
    response = get(proxy, f"/{_name(carrier)}/timed/remaining")
    assert response.status == 200, response.body
    answer = response.json()
    # What the proxy spent before sending, plus the carrier's way there: milliseconds.
    assert TIMEOUT - 1.0 < answer["remaining"] <= TIMEOUT, answer
    assert answer["cancelled"] is False


@pytest.mark.parametrize("carrier", CARRIERS)
def test_a_route_with_no_deadline_the_frame_can_carry_gives_none(
    proxy: Proxy, carrier: str
) -> None:
    response = get(proxy, f"/{_name(carrier)}/open/remaining")
    assert response.status == 200, response.body
    assert response.json() == {"remaining": None, "cancelled": False}


@pytest.mark.parametrize("carrier", CARRIERS)
def test_a_client_going_away_cancels_a_handler_that_takes_a_context(
    proxy: Proxy, module_launcher: Launcher, carrier: str
) -> None:
    mark = f"gone-{_name(carrier)}"
    client = proxy.connect()
    client.send(build_request("GET", f"/{_name(carrier)}/timed/wait?mark={mark}"))
    module_launcher.wait_for_mark(mark)
    client.reset()
    cancelled = os.path.join(module_launcher.mark_dir, mark + ".cancelled")
    wait_until(lambda: os.path.exists(cancelled), 2.0, "the handler's cancellation")
    with open(cancelled) as file:
        flag, remaining = file.read().split()
    # Cancelled well before its deadline, and the Context says so.
    assert flag == "True"
    assert float(remaining) > TIMEOUT - 1.5


@pytest.mark.parametrize("carrier", CARRIERS)
def test_the_routes_timeout_cancels_the_handler_and_the_client_gets_504(
    proxy: Proxy, module_launcher: Launcher, carrier: str
) -> None:
    mark = f"late-{_name(carrier)}"
    response = get(proxy, f"/{_name(carrier)}/short/wait?mark={mark}")
    assert response.status == 504, response.body
    cancelled = os.path.join(module_launcher.mark_dir, mark + ".cancelled")
    wait_until(lambda: os.path.exists(cancelled), 2.0, "the handler's cancellation")
    with open(cancelled) as file:
        flag, remaining = file.read().split()
    assert flag == "True"
    assert float(remaining) < 0.1
