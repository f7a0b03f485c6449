"""An SDK service behind a real proxy: what it refuses to send, its handlers' context, the CLI.

One ``pitcher backend app:app`` process, started from the temporary
directory that holds ``app.py`` (no PYTHONPATH: the command itself puts the
working directory on ``sys.path``, as uvicorn does), behind ``pitcher serve``.
"""

from __future__ import annotations

import os
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from tests.proxy.conftest import (
    Backend,
    Launcher,
    Proxy,
    get,
    toml_config,
    wait_until,
)

APP = textwrap.dedent(
    """\
    import asyncio, os, time
    from pitcher_rpc.sdk import Response, Service

    app = Service("checks")
    MARKS = os.environ["TEST_MARK_DIR"]


    @app.route("/bad-name")
    def bad_name(request):
        return Response(200, b"x", [("bad name", "v")])


    @app.route("/bad-value")
    async def bad_value(request):
        await asyncio.sleep(0)
        return Response(200, b"x", {"x-a": "a\\r\\nset-cookie: stolen=1"})


    @app.route("/not-latin-1")
    def not_latin_1(request):
        return Response.json({}, headers={"x-name": "\\u20ac"})


    @app.route("/switching")
    def switching(request):
        return Response(101)


    @app.route("/too-big")
    def too_big(request):
        return b"x" * (4 * 1024 * 1024 + 1)


    @app.route("/good")
    def good(request):
        return Response.json({"ok": True}, headers={"cache-control": "no-store"})


    @app.route("/context")
    def with_context(request, context):
        return {
            "request_id": context.request_id,
            "remaining": context.remaining(),
            "cancelled": context.cancelled,
        }


    @app.route("/plain")
    def plain(request, extra=None):
        return {"extra": extra}


    def _work(context, name):
        # Work that never awaits: it learns from the flag that nobody waits.
        started = time.monotonic()
        while time.monotonic() - started < 5:
            if context.cancelled:
                open(os.path.join(MARKS, name + ".cancelled"), "w").close()
                return
            time.sleep(0.005)
        open(os.path.join(MARKS, name + ".finished"), "w").close()


    @app.route("/slow")
    async def slow(request, context):
        name = request.query_params["mark"]
        open(os.path.join(MARKS, name), "w").close()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, _work, context, name)
        return b"done"
    """
)


@pytest.fixture(scope="module")
def module_launcher() -> Iterator[Launcher]:
    launcher = Launcher()
    try:
        yield launcher
    finally:
        launcher.close()


@pytest.fixture(scope="module")
def served(module_launcher: Launcher) -> tuple[Proxy, Backend]:
    directory = os.path.join(module_launcher.tmpdir, "project")
    os.mkdir(directory)
    with open(os.path.join(directory, "app.py"), "w", encoding="utf-8") as file:
        file.write(APP)
    uri = module_launcher.uri("tcp")
    script = os.path.join(os.path.dirname(sys.executable), "pitcher")
    env = {"TEST_MARK_DIR": module_launcher.mark_dir, "PYTHONPATH": ""}
    # The console script, not `python -m`: -m would put the directory on sys.path itself.
    process = module_launcher.spawn(
        [script, "backend", "app:app", "--listen", uri], env=env, cwd=directory
    )
    module_launcher._wait_listening(process, uri)
    routes = [{"name": "checks", "prefix": "/", "cluster": "checks", "timeout": 0.3}]
    proxy = module_launcher.proxy(toml_config(routes, {"checks": {"nodes": [uri]}}))
    return proxy, Backend(process, uri)


def test_pitcher_backend_imports_a_module_from_the_working_directory(
    served: tuple[Proxy, Backend],
) -> None:
    proxy, _ = served
    response = get(proxy, "/good")
    assert response.status == 200
    assert response.json() == {"ok": True}
    assert response.header("cache-control") == "no-store"
    assert response.header("content-type") == "application/json"


@pytest.mark.parametrize(
    ("path", "handler", "why"),
    [
        ("/bad-name", "app.bad_name", "header name 'bad name' is not an HTTP token"),
        ("/bad-value", "app.bad_value", "value of header 'x-a' has a control character"),
        ("/not-latin-1", "app.not_latin_1", "not a (name, value) pair of latin-1 strings"),
        ("/switching", "app.switching", "status 101 is not a final HTTP status"),
    ],
)
def test_a_response_the_proxy_would_refuse_is_not_sent_and_the_log_names_its_handler(
    served: tuple[Proxy, Backend], path: str, handler: str, why: str
) -> None:
    proxy, backend = served
    response = get(proxy, path)
    assert response.status == 502
    assert response.header("set-cookie") is None
    line = backend.process.wait_for_line(f"handler {handler} returned an answer that cannot")
    assert why in line


def test_a_response_over_the_frame_limit_is_logged_with_its_handler(
    served: tuple[Proxy, Backend],
) -> None:
    proxy, backend = served
    assert get(proxy, "/too-big").status == 502
    line = backend.process.wait_for_line("handler app.too_big answered ")
    assert "over the frame limit of 4194304 bytes" in line


def test_a_handler_that_takes_a_context_gets_the_request_id(
    served: tuple[Proxy, Backend],
) -> None:
    proxy, _ = served
    response = get(proxy, "/context", headers=[("X-Request-Id", "abc-123")])
    assert response.status == 200
    body = response.json()
    assert body["request_id"] == "abc-123"
    assert body["cancelled"] is False
    # A handler whose second parameter has a default is called as before.
    assert get(proxy, "/plain").json() == {"extra": None}


def test_work_in_a_thread_sees_the_cancellation_when_the_proxy_gives_up(
    served: tuple[Proxy, Backend], module_launcher: Launcher
) -> None:
    proxy, _ = served
    started = time.monotonic()
    response = get(proxy, "/slow?mark=slow1")
    assert response.status == 504  # the route's 0.3 s timeout
    cancelled = os.path.join(module_launcher.mark_dir, "slow1.cancelled")
    wait_until(lambda: os.path.exists(cancelled), 3.0, "the thread to see the cancellation")
    assert time.monotonic() - started < 2.0
    assert not os.path.exists(os.path.join(module_launcher.mark_dir, "slow1.finished"))
