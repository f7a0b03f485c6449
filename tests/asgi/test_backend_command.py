"""The backend command's choice between an SDK Service and an ASGI app, as real processes."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pitcher_rpc.codec import decode_response, encode_request
from tests.asgi.test_asgi_served import backend_command
from tests.proxy.conftest import Launcher
from transports.registry import transport_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def launcher() -> Iterator[Launcher]:
    launcher = Launcher()
    try:
        yield launcher
    finally:
        launcher.close()


def call(uri: str, path: bytes) -> tuple[int, bytes]:
    async def once() -> tuple[int, bytes]:
        client = transport_for(uri).client(uri)
        try:
            payload = await client.call(encode_request(b"GET", path, b"", [], [], b"", "", ""), 5)
        finally:
            await client.close()
        answer = decode_response(payload)
        return answer.status, answer.body

    return asyncio.run(once())


@pytest.mark.parametrize(
    ("app", "interface", "path", "expected"),
    [
        ("pitcher_rpc.sdk.echo:app", "auto", b"/x", b'"path": "/x"'),
        ("pitcher_rpc.sdk.echo:app", "sdk", b"/y", b'"path": "/y"'),
        ("tests.asgi.apps:fastapi_app", "auto", b"/hello", b'{"hello":"world"}'),
        ("tests.asgi.apps:starlette_app", "asgi", b"/sync", b"from a thread\n"),
    ],
)
def test_a_service_or_an_asgi_app_is_served(
    launcher: Launcher, app: str, interface: str, path: bytes, expected: bytes
) -> None:
    uri = f"unix://{launcher.tmpdir}/{launcher.unique('b')}.sock"
    process = launcher.spawn([*backend_command(app, uri), "--interface", interface], cwd=str(ROOT))
    launcher._wait_listening(process, uri)
    status, body = call(uri, path)
    assert status == 200
    assert expected in body


@pytest.mark.parametrize(
    ("app", "interface", "message"),
    [
        ("tests.asgi.apps:starlette_app", "sdk", "starlette_app is not a pitcher_rpc.sdk.Service"),
        (
            "pitcher_rpc.sdk.echo:app",
            "asgi",
            "echo:app is a pitcher_rpc.sdk.Service, not an ASGI app",
        ),
        ("tests.asgi.apps:MARKS", "auto", "MARKS is not a pitcher_rpc.sdk.Service, nor an ASGI 3"),
        # An SDK handler is an async callable too, of one argument.
        ("pitcher_rpc.sdk.echo:echo", "auto", "echo:echo is not a pitcher_rpc.sdk.Service"),
        ("tests.asgi.nowhere:app", "auto", "cannot load tests.asgi.nowhere:app"),
        ("tests.asgi.apps", "auto", "expected MODULE:ATTRIBUTE"),
    ],
)
def test_what_cannot_be_served_is_refused_with_a_reason(
    app: str, interface: str, message: str
) -> None:
    result = subprocess.run(
        [*backend_command(app, "unix:///tmp/never.sock"), "--interface", interface],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert message in " ".join(result.stderr.split())
