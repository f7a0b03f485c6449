"""Starlette and FastAPI apps behind ``pitcher serve``, answer by answer against uvicorn.

Every process is real: uvicorn serving the app over HTTP on loopback, the
same app served over frames on a Unix socket, and the proxy in front of it.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.proxy.conftest import (
    Backend,
    Launcher,
    Process,
    Proxy,
    RawClient,
    free_port,
    pitcher_command,
    toml_config,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def backend_command(app: str, uri: str) -> list[str]:
    """``pitcher backend APP --listen URI`` for an ASGI app."""
    return [*pitcher_command(), "backend", app, "--listen", uri]


@dataclass
class Pair:
    name: str
    proxy: Proxy
    backend: Backend
    uvicorn_port: int
    marks: str

    def via_pitcher(self, method: str, path: str, **kwargs: object) -> tuple[int, bytes, dict]:
        with self.proxy.connect() as client:
            return summary(client.request(method, path, **kwargs))  # type: ignore[arg-type]

    def via_uvicorn(self, method: str, path: str, **kwargs: object) -> tuple[int, bytes, dict]:
        with RawClient.connect("127.0.0.1", self.uvicorn_port) as client:
            return summary(client.request(method, path, **kwargs))  # type: ignore[arg-type]


# The headers an app chooses; the servers' own (date, server, x-request-id) differ.
COMPARED = ("content-type", "x-answer", "set-cookie", "location")


def summary(response: object) -> tuple[int, bytes, dict]:
    headers = {name: response.all(name) for name in COMPARED if response.all(name)}  # type: ignore[attr-defined]
    return response.status, response.body, headers  # type: ignore[attr-defined]


def start_backend(launcher: Launcher, app: str, marks: str, **env: str) -> tuple[Process, str]:
    uri = f"unix://{launcher.tmpdir}/{launcher.unique('asgi')}.sock"
    process = launcher.spawn(
        backend_command(app, uri), env={"ASGI_TEST_MARKS": marks, **env}, cwd=str(ROOT)
    )
    return process, uri


def serve_pair(launcher: Launcher, name: str) -> Pair:
    app = f"tests.asgi.apps:{name}"
    marks = os.path.join(launcher.tmpdir, name + "-marks")
    os.mkdir(marks)
    process, uri = start_backend(launcher, app, marks)
    port = free_port()
    uvicorn = launcher.spawn(
        [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)],
        env={"ASGI_TEST_MARKS": marks},
        cwd=str(ROOT),
    )
    launcher._wait_listening(process, uri)
    launcher._wait_listening(uvicorn, f"tcp://127.0.0.1:{port}")
    config = toml_config(
        routes=[
            {"name": "slow", "prefix": "/wait", "cluster": "app", "timeout": 0.5},
            {"name": "long", "prefix": "/waitlong", "cluster": "app", "timeout": 30.0},
            {"name": "app", "prefix": "/", "cluster": "app", "timeout": 5.0},
        ],
        clusters={"app": {"nodes": [uri]}},
    )
    return Pair(name, launcher.proxy(config), Backend(process, uri), port, marks)


@pytest.fixture(scope="module")
def launcher() -> Iterator[Launcher]:
    launcher = Launcher()
    try:
        yield launcher
    finally:
        launcher.close()


@pytest.fixture(scope="module")
def starlette(launcher: Launcher) -> Pair:
    return serve_pair(launcher, "starlette_app")


@pytest.fixture(scope="module")
def fastapi(launcher: Launcher) -> Pair:
    return serve_pair(launcher, "fastapi_app")


STARLETTE_REQUESTS = [
    ("GET", "/items/abc?q=1&tag=a&tag=b", {}),
    ("GET", "/items/a%20b%2Fc", {}),
    (
        "POST",
        "/json",
        {"body": b'{"a": [1, 2, null]}', "headers": [("Content-Type", "application/json")]},
    ),
    ("GET", "/headers", {"headers": [("X-Custom", "hi there")]}),
    ("GET", "/status/201", {}),
    ("GET", "/status/404", {}),
    ("GET", "/status/503", {}),
    ("GET", "/boom", {}),
    ("GET", "/state", {}),
    ("GET", "/sync", {}),
    ("GET", "/nowhere", {}),
    ("POST", "/items/x", {}),
    ("HEAD", "/sync", {}),
]

FASTAPI_REQUESTS = [
    ("GET", "/items/7?q=seven", {}),
    ("GET", "/items/not-a-number", {}),
    (
        "POST",
        "/orders",
        {
            "body": b'{"name": "tea", "quantity": 4}',
            "headers": [("Content-Type", "application/json")],
        },
    ),
    (
        "POST",
        "/orders",
        {"body": b'{"quantity": "many"}', "headers": [("Content-Type", "application/json")]},
    ),
    ("POST", "/orders", {"body": b"not json", "headers": [("Content-Type", "application/json")]}),
    ("GET", "/headers", {"headers": [("X-Custom", "abc")]}),
    ("GET", "/missing", {}),
    ("GET", "/boom", {}),
    ("GET", "/state", {}),
    ("GET", "/sync?n=12", {}),
    ("GET", "/hello?name=p%C3%A9", {}),
    ("DELETE", "/hello", {}),
    ("GET", "/openapi.json", {}),
]


@pytest.mark.parametrize(("method", "path", "kwargs"), STARLETTE_REQUESTS)
def test_starlette_answers_as_under_uvicorn(
    starlette: Pair, method: str, path: str, kwargs: dict
) -> None:
    assert starlette.via_pitcher(method, path, **kwargs) == starlette.via_uvicorn(
        method, path, **kwargs
    )


@pytest.mark.parametrize(("method", "path", "kwargs"), FASTAPI_REQUESTS)
def test_fastapi_answers_as_under_uvicorn(
    fastapi: Pair, method: str, path: str, kwargs: dict
) -> None:
    assert fastapi.via_pitcher(method, path, **kwargs) == fastapi.via_uvicorn(
        method, path, **kwargs
    )


def test_an_exception_is_a_500_and_logged(fastapi: Pair) -> None:
    status, body, _ = fastapi.via_pitcher("GET", "/boom")
    assert (status, body) == (500, b"Internal Server Error")
    fastapi.backend.process.wait_for_line("ZeroDivisionError")


@pytest.mark.parametrize("app", ["starlette", "fastapi"])
def test_background_tasks_run_after_the_answer(app: str, request: pytest.FixtureRequest) -> None:
    pair: Pair = request.getfixturevalue(app)
    name = f"bg-{app}"
    status, _, _ = pair.via_pitcher("GET", f"/background?name={name}")
    assert status == 200
    if app == "starlette":  # its task sleeps 0.2 s first: the answer did not wait for it
        assert not os.path.exists(os.path.join(pair.marks, name))
    wait_until(lambda: os.path.exists(os.path.join(pair.marks, name)), 5, "the background task")


def test_the_deadline_gives_the_app_http_disconnect(starlette: Pair) -> None:
    status, _, _ = starlette.via_pitcher("GET", "/wait?name=deadline")
    assert status == 504
    mark = os.path.join(starlette.marks, "deadline.http.disconnect")
    wait_until(lambda: os.path.exists(mark), 5, "http.disconnect at the app")


def test_a_client_going_away_gives_the_app_http_disconnect(starlette: Pair) -> None:
    # The route's timeout is 30 s: only the proxy's CANCEL can end the call this soon.
    client = starlette.proxy.connect()
    client.send(b"GET /waitlong?name=gone HTTP/1.1\r\nHost: x\r\n\r\n")
    arrived = os.path.join(starlette.marks, "gone.arrived")
    wait_until(lambda: os.path.exists(arrived), 5, "the request at the app")
    client.reset()
    mark = os.path.join(starlette.marks, "gone.http.disconnect")
    wait_until(lambda: os.path.exists(mark), 3, "http.disconnect at the app")


def test_a_large_answer_within_the_frame_limit_passes_and_one_over_it_is_a_clear_502(
    starlette: Pair,
) -> None:
    status, body, _ = starlette.via_pitcher("GET", "/big?size=3000000")
    assert (status, len(body)) == (200, 3_000_000)
    status, body, _ = starlette.via_pitcher("GET", "/big?size=5000000")
    assert status == 502
    starlette.backend.process.wait_for_line("over the frame limit of 4194304 bytes")


def test_lifespan_shutdown_runs_at_sigterm_after_the_drain(launcher: Launcher) -> None:
    marks = os.path.join(launcher.tmpdir, launcher.unique("life"))
    os.mkdir(marks)
    process, uri = start_backend(launcher, "tests.asgi.apps:starlette_app", marks)
    launcher._wait_listening(process, uri)
    process.signal(signal.SIGTERM)
    assert process.popen.wait(5) == 0
    assert os.path.exists(os.path.join(marks, "shutdown"))


def test_a_failed_startup_exits_non_zero_with_the_apps_message(launcher: Launcher) -> None:
    marks = os.path.join(launcher.tmpdir, launcher.unique("fail"))
    os.mkdir(marks)
    process, uri = start_backend(
        launcher, "tests.asgi.apps:fastapi_app", marks, ASGI_TEST_FAIL_STARTUP="1"
    )
    assert process.popen.wait(10) == 1
    wait_until(lambda: "the database is not there" in process.output, 2, "the message")
    assert not os.path.exists(uri.removeprefix("unix://"))


def test_a_stripped_prefix_comes_back_as_the_root_path(launcher: Launcher) -> None:
    marks = os.path.join(launcher.tmpdir, launcher.unique("root"))
    os.mkdir(marks)
    uri = f"unix://{launcher.tmpdir}/{launcher.unique('rooted')}.sock"
    process = launcher.spawn(
        [*backend_command("tests.asgi.apps:starlette_app", uri), "--root-path", "/shop"],
        env={"ASGI_TEST_MARKS": marks},
        cwd=str(ROOT),
    )
    launcher._wait_listening(process, uri)
    config = toml_config(
        routes=[{"prefix": "/shop/", "cluster": "app", "strip_prefix": True}],
        clusters={"app": {"nodes": [uri]}},
    )
    with launcher.proxy(config).connect() as client:
        answer = client.request("GET", "/shop/items/abc?q=1")
    assert answer.status == 200
    # The app routed /items/{item} and sees the URL the client asked for.
    assert answer.json()["item"] == "abc"
    assert answer.json()["path"] == "/shop/items/abc"
    assert answer.json()["raw_path"] == "/shop/items/abc"
