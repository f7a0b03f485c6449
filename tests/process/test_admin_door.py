"""The admin listener's door: the bearer token, what stays open, the log, and GET /admin.

The configuration's checks run on real files; the door's rules run on a real
AdminServer on 127.0.0.1 with http.client as the operator's curl; a real
master (``pitcher serve`` with one worker) shows the whole: what a refused
call leaves unchanged, and a reload that changes the token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from pitcher_rpc.config import ConfigError, load_config
from pitcher_rpc.process.admin import AdminRequest, AdminResponse, AdminServer
from pitcher_rpc.process.admin_routing import RefusalBudget, Router
from tests.process.test_admin import Address, answer, fetch, serving
from tests.process.test_restart import _stop
from tests.proxy.conftest import (
    HttpResponse,
    Launcher,
    Proxy,
    pitcher_command,
    short_tmpdir,
    toml_config,
)

TOKEN = "s3cret-0123456789-abcdef"
OTHER_TOKEN = "another-9876543210-fedcba"
ROUTES = '[[routes]]\ncluster = "a"\n\n[clusters.a]\nnodes = ["tcp://127.0.0.1:1"]\n'


@pytest.fixture
def tmpdir() -> Iterator[str]:
    directory = short_tmpdir()
    try:
        yield directory
    finally:
        for name in os.listdir(directory):
            path = os.path.join(directory, name)
            if os.path.isdir(path):
                os.rmdir(path)
            else:
                os.unlink(path)
        os.rmdir(directory)


def write(directory: str, name: str, text: str) -> str:
    path = os.path.join(directory, name)
    with open(path, "w", encoding="utf-8") as file:
        file.write(text)
    return path


def line_of(path: str, start: str) -> int:
    with open(path, encoding="utf-8") as file:
        return next(n for n, line in enumerate(file, 1) if line.startswith(start))


def refusal(path: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return str(caught.value)


# -- the configuration ------------------------------------------------------------------


@pytest.mark.parametrize(
    "listen", ["0.0.0.0:9180", "[::]:9180", "10.1.2.3:9180", "admin.example.com:9180"]
)
def test_a_listen_other_machines_reach_needs_a_token(tmpdir: str, listen: str) -> None:
    path = write(tmpdir, "p.toml", f'{ROUTES}\n[admin]\nlisten = "{listen}"\n')
    message = refusal(path)
    assert message.startswith(f"{path}:{line_of(path, 'listen')}: admin.listen: ")
    assert "token_file" in message


@pytest.mark.parametrize(
    "listen",
    ["127.0.0.1:9180", "127.8.9.10:0", "[::1]:9180", "localhost:9180", "[::ffff:127.0.0.1]:1"],
)
def test_loopback_needs_no_token(tmpdir: str, listen: str) -> None:
    path = write(tmpdir, "p.toml", f'{ROUTES}\n[admin]\nlisten = "{listen}"\n')
    admin = load_config(path).admin
    assert (admin.listen, admin.token_file, admin.token) == (listen, None, None)


def test_the_token_is_read_stripped_relative_to_the_file_and_never_shown(tmpdir: str) -> None:
    write(tmpdir, "admin.token", f"\n  {TOKEN}\t\n")
    text = f'{ROUTES}\n[admin]\nlisten = "0.0.0.0:9180"\ntoken_file = "admin.token"\n'
    path = write(tmpdir, "p.toml", text)
    # Read from elsewhere: the path is the configuration's neighbour, not the cwd's.
    here = os.getcwd()
    os.chdir("/")
    try:
        config = load_config(path)
    finally:
        os.chdir(here)
    assert config.admin.token == TOKEN
    assert config.admin.token_file == os.path.join(tmpdir, "admin.token")
    assert TOKEN not in repr(config)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "cannot read"),
        ("", "is empty"),
        (" \n\t\n", "is empty"),
        ("short-token", "fewer than 16"),
        ("two words-0123456789", "one word"),
        ("caf\u00e9-0123456789abcdef", "must be ASCII"),
        ("x" * 5000, "more than 4096 bytes"),
    ],
    ids=["missing", "empty", "blank", "short", "two-words", "not-ascii", "huge"],
)
def test_a_token_file_that_holds_no_usable_token_is_refused_with_its_line(
    tmpdir: str, content: str | None, expected: str
) -> None:
    token_path = os.path.join(tmpdir, "admin.token")
    if content is not None:
        write(tmpdir, "admin.token", content)
    text = f'{ROUTES}\n[admin]\nlisten = "127.0.0.1:0"\ntoken_file = "{token_path}"\n'
    path = write(tmpdir, "p.toml", text)
    message = refusal(path)
    assert message.startswith(f"{path}:{line_of(path, 'token_file')}: admin.token_file: ")
    assert expected in message


def test_a_directory_or_an_empty_path_is_no_token_file(tmpdir: str) -> None:
    os.mkdir(os.path.join(tmpdir, "dir"))
    for value, expected in ((os.path.join(tmpdir, "dir"), "cannot read"), ("", "empty string")):
        text = f'{ROUTES}\n[admin]\ntoken_file = "{value}"\n'
        path = write(tmpdir, "p.toml", text)
        message = refusal(path)
        assert message.startswith(f"{path}:{line_of(path, 'token_file')}: admin.token_file: ")
        assert expected in message


# -- the door on a real admin server ----------------------------------------------------


def scenario(coroutine: Any) -> None:
    asyncio.run(asyncio.wait_for(coroutine, 5.0))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def guarded_server(token: str | None) -> tuple[AdminServer, list[str]]:
    """Routes like the master's; ``changed`` records each handler that ran."""
    changed: list[str] = []

    async def reload(request: AdminRequest) -> AdminResponse:
        changed.append(request.path)
        return AdminResponse(200, {"reloaded": True})

    server = AdminServer()
    server.set_token_source(lambda: token)
    server.route("GET", "/healthz", answer(AdminResponse(200, {"status": "serving"})), "health")
    server.route("GET", "/metrics", answer(AdminResponse(200, "requests_total 1\n")), "metrics")
    server.route("GET", "/", answer(AdminResponse(200, "<html>")), "the status page")
    server.route("GET", "/admin/config", answer(AdminResponse(200, {"checksum": "x"})), "config")
    server.route("POST", "/admin/reload", reload, "reload the file")
    server.route("DELETE", "/admin/clusters/{name}/nodes", reload, "remove a node")
    return server, changed


def send_raw(address: Address, request: bytes) -> bytes:
    """``request`` as it is (http.client would refuse it), and all that comes back."""
    with socket.create_connection(address, timeout=2.0) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


def refused_for_the_token(response: HttpResponse, invalid: bool) -> None:
    assert response.status == 401
    assert response.header("content-type") == "application/json"
    assert "error" in response.json()
    challenge = response.header("www-authenticate") or ""
    assert challenge.startswith("Bearer ")
    assert ('error="invalid_token"' in challenge) is invalid


def test_without_the_token_nothing_runs_and_with_it_everything_does() -> None:
    server, changed = guarded_server(TOKEN)

    async def run() -> None:
        async with serving(server) as address:

            def call(method: str, path: str, headers: dict[str, str] | None = None) -> Any:
                return asyncio.to_thread(fetch, address, method, path, None, headers)

            for path in ("/admin/reload", "/admin/clusters/a/nodes?uri=tcp://x:1"):
                method = "POST" if path == "/admin/reload" else "DELETE"
                refused_for_the_token(await call(method, path), invalid=False)
                refused_for_the_token(await call(method, path, bearer(OTHER_TOKEN)), True)
                # A prefix of the token, or the token under another scheme, is no token.
                refused_for_the_token(await call(method, path, bearer(TOKEN[:-1])), True)
                basic = {"Authorization": f"Basic {TOKEN}"}
                refused_for_the_token(await call(method, path, basic), True)
            # Reads are guarded too, and a path that does not exist says no more than one that does.
            refused_for_the_token(await call("GET", "/admin/config"), False)
            refused_for_the_token(await call("GET", "/admin"), False)
            refused_for_the_token(await call("GET", "/no/such/path"), False)
            refused_for_the_token(await call("POST", "/healthz"), False)
            assert changed == []

            # Open to anyone who reaches the listener: health, metrics, the status page's shell.
            assert (await call("GET", "/healthz")).json() == {"status": "serving"}
            assert (await call("HEAD", "/healthz")).status == 200
            assert (await call("GET", "/healthz/")).status == 200
            assert (await call("GET", "/metrics")).body == b"requests_total 1\n"
            assert (await call("GET", "/")).body == b"<html>"

            reloaded = await call("POST", "/admin/reload", bearer(TOKEN))
            assert (reloaded.status, reloaded.json()) == (200, {"reloaded": True})
            # The scheme is case-insensitive (RFC 9110 11.1).
            lower = await call("POST", "/admin/reload", {"Authorization": f"bearer  {TOKEN}"})
            assert lower.status == 200
            assert (await call("GET", "/admin/config", bearer(TOKEN))).json() == {"checksum": "x"}
            assert (await call("GET", "/no/such/path", bearer(TOKEN))).status == 404
            assert (await call("POST", "/healthz", bearer(TOKEN))).status == 405
            assert changed == ["/admin/reload", "/admin/reload"]

    scenario(run())


def test_two_authorization_fields_are_refused() -> None:
    server, changed = guarded_server(TOKEN)
    request = (
        f"POST /admin/reload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Authorization: Bearer {OTHER_TOKEN}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    ).encode()

    async def run() -> None:
        async with serving(server) as address:
            answer_bytes = await asyncio.to_thread(send_raw, address, request)
        assert answer_bytes.startswith(b"HTTP/1.1 401 ")
        assert changed == []

    scenario(run())


def test_a_listener_others_reach_without_a_token_refuses_all_but_the_open_paths(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Tests listen on loopback only, so the socket's reach is set by hand: the
    # case is a configuration reloaded without its token while the master keeps
    # its 0.0.0.0 socket, or a new generation taking over such a socket.
    server, changed = guarded_server(None)

    async def run() -> None:
        async with serving(server) as address:
            assert server.door.exposed is False
            assert (await asyncio.to_thread(fetch, address, "POST", "/admin/reload")).status == 200
            server.door.exposed = True
            refused = await asyncio.to_thread(fetch, address, "POST", "/admin/reload")
            listing = await asyncio.to_thread(fetch, address, "GET", "/admin")
            health = await asyncio.to_thread(fetch, address, "GET", "/healthz")
        assert refused.status == 403
        assert "token_file" in refused.json()["error"]
        assert listing.status == 403
        assert health.status == 200
        assert changed == ["/admin/reload"]

    with caplog.at_level(logging.INFO, logger="pitcher.admin"):
        scenario(run())
    assert any(
        record.levelno == logging.WARNING and "403 refused" in record.getMessage()
        for record in caplog.records
    )


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_a_loopback_listener_is_not_exposed(host: str) -> None:
    server, changed = guarded_server(None)

    async def run() -> None:
        await server.start(host, 0)
        try:
            assert server.door.exposed is False
            address = server.address
            reloaded = await asyncio.to_thread(fetch, address, "POST", "/admin/reload")
        finally:
            await server.stop()
        assert reloaded.status == 200
        assert changed == ["/admin/reload"]

    scenario(run())


def test_calls_that_may_change_things_and_every_refusal_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, _ = guarded_server(TOKEN)

    async def run() -> None:
        async with serving(server) as address:
            for method, path, headers in [
                ("POST", "/admin/reload", bearer(TOKEN)),
                ("DELETE", "/admin/clusters/a/nodes?uri=tcp://x:1", bearer(TOKEN)),
                ("POST", "/admin/nothing", bearer(TOKEN)),
                ("POST", "/admin/reload", bearer(OTHER_TOKEN)),
                ("GET", "/admin/config", {}),
                ("GET", "/admin/config", bearer(TOKEN)),
                ("GET", "/healthz", {}),
                ("POST", "/admin/%0d%0aforged%20line", {}),
            ]:
                await asyncio.to_thread(fetch, address, method, path, None, headers)

    with caplog.at_level(logging.INFO, logger="pitcher.admin"):
        scenario(run())
    lines = [
        (record.levelname, record.getMessage())
        for record in caplog.records
        if record.name == "pitcher.admin"
    ]
    shown = [(level, re.sub(r" from 127\.0\.0\.1:\d+:", " from C:", text)) for level, text in lines]
    assert shown == [
        ("INFO", "POST /admin/reload from C: 200"),
        ("INFO", "DELETE /admin/clusters/a/nodes?uri=tcp://x:1 from C: 200"),
        ("INFO", "POST /admin/nothing from C: 404"),
        ("WARNING", "POST /admin/reload from C: 401 refused (wrong token)"),
        ("WARNING", "GET /admin/config from C: 401 refused (no token)"),
        ("WARNING", "POST /admin/%0d%0aforged%20line from C: 401 refused (no token)"),
    ]
    assert not any(TOKEN in message or OTHER_TOKEN in message for _, message in lines)


def test_a_flood_of_refused_calls_is_logged_up_to_a_budget_then_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, _ = guarded_server(TOKEN)
    server.refusals = RefusalBudget(burst=3, window=1.0)

    def refused() -> list[str]:
        return [
            record.getMessage()
            for record in caplog.records
            if record.name == "pitcher.admin" and "refused" in record.getMessage()
        ]

    async def run() -> None:
        async with serving(server) as address:
            for _ in range(7):
                await asyncio.to_thread(fetch, address, "POST", "/admin/reload")
            assert len(refused()) == 3
            # The count comes once the window is over, without waiting for another call.
            for _ in range(300):
                if len(refused()) == 4:
                    break
                await asyncio.sleep(0.01)
            assert refused()[3] == (
                "4 more calls refused at the door, not logged one by one (at most 3 lines in 1 s)"
            )
            # A new window logs again, and a granted call is never held back.
            await asyncio.to_thread(fetch, address, "POST", "/admin/reload")
            await asyncio.to_thread(fetch, address, "POST", "/admin/reload", None, bearer(TOKEN))
        assert len(refused()) == 5

    with caplog.at_level(logging.INFO, logger="pitcher.admin"):
        scenario(run())
    assert caplog.records[-1].getMessage().endswith(": 200")


def test_get_admin_lists_every_route_in_the_order_registered() -> None:
    tokens: list[str | None] = [TOKEN]
    server, _ = guarded_server(None)
    server.set_token_source(lambda: tokens[0])

    async def run() -> None:
        async with serving(server) as address:
            guarded = await asyncio.to_thread(fetch, address, "GET", "/admin", None, bearer(TOKEN))
            tokens[0] = None
            open_ = await asyncio.to_thread(fetch, address, "GET", "/admin/")
        assert guarded.status == 200
        listing = guarded.json()
        assert listing["token_required"] is True
        assert [
            (e["method"], e["path"], e["description"], e["needs_token"])
            for e in listing["endpoints"]
        ] == [
            ("GET", "/admin", "this list of the admin endpoints", True),
            ("GET", "/healthz", "health", False),
            ("GET", "/metrics", "metrics", False),
            ("GET", "/", "the status page", False),
            ("GET", "/admin/config", "config", True),
            ("POST", "/admin/reload", "reload the file", True),
            ("DELETE", "/admin/clusters/{name}/nodes", "remove a node", True),
        ]
        # With no token set nothing needs one, and the list says so.
        assert open_.json()["token_required"] is False
        assert not any(e["needs_token"] for e in open_.json()["endpoints"])

    scenario(run())


def test_a_description_is_one_line() -> None:
    router = Router()
    with pytest.raises(ValueError):
        router.add("GET", "/x", answer(AdminResponse()), "two\nlines")
    router.add("GET", "/x/", answer(AdminResponse()), "  one line ")
    assert [(r.method, r.pattern, r.description) for r in router.routes] == [
        ("GET", "/x", "one line")
    ]


# -- a real master ----------------------------------------------------------------------


def master_config(token_file: str | None, listen: str = "127.0.0.1:0") -> str:
    text = toml_config(
        [{"name": "a", "prefix": "/", "cluster": "a"}], {"a": {"nodes": ["tcp://127.0.0.1:1"]}}
    )
    admin = f'[admin]\nlisten = "{listen}"\n'
    if token_file is not None:
        admin += f"token_file = {json.dumps(token_file)}\n"
    return text.replace('[admin]\nlisten = "127.0.0.1:0"\n', admin)


def admin_address(proxy: Proxy) -> Address:
    line = proxy.process.wait_for_line("admin on ")
    host, _, port = line.split("admin on ", 1)[1].split()[0].rstrip(",").rpartition(":")
    return host, int(port)


def call(
    address: Address, method: str, path: str, token: str | None = None
) -> tuple[int, Any, HttpResponse]:
    response = fetch(address, method, path, None, bearer(token) if token else None)
    body: Any = response.body
    if response.header("content-type") == "application/json":
        body = response.json()
    return response.status, body, response


def request_id_enabled(address: Address) -> bool:
    status, body, _ = call(address, "GET", "/admin/modules", TOKEN)
    assert status == 200, body
    (worker,) = body["workers"]
    (module,) = [m for m in worker["modules"] if m["name"] == "request_id"]
    return bool(module["enabled"])


@pytest.fixture
def guarded(launcher: Launcher) -> tuple[Proxy, Address, str]:
    token_file = launcher.write("admin.token", TOKEN + "\n")
    proxy = launcher.proxy(master_config(token_file), workers=1)
    return proxy, admin_address(proxy), token_file


def test_a_master_with_a_token(guarded: tuple[Proxy, Address, str]) -> None:
    proxy, address, _ = guarded
    disable = "/admin/modules/request_id/disable"
    assert request_id_enabled(address)

    status, body, response = call(address, "POST", disable)
    assert (status, response.header("www-authenticate")) == (401, 'Bearer realm="pitcher admin"')
    assert "Authorization" in body["error"]
    assert call(address, "POST", disable, OTHER_TOKEN)[0] == 401
    assert call(address, "POST", "/admin/reload", OTHER_TOKEN)[0] == 401
    assert request_id_enabled(address)
    assert call(address, "GET", "/admin/config")[0] == 401

    assert call(address, "GET", "/healthz")[:2] == (200, {"status": "serving"})
    status, metrics, _ = call(address, "GET", "/metrics")
    assert status == 200
    assert b"# TYPE" in metrics

    status, body, _ = call(address, "POST", disable, TOKEN)
    assert (status, body["enabled"], body["complete"]) == (200, False, True)
    assert not request_id_enabled(address)

    # Every GET the list names changes nothing: the same configuration and modules after.
    status, listing, _ = call(address, "GET", "/admin", TOKEN)
    assert status == 200
    endpoints = listing["endpoints"]
    described = {(e["method"], e["path"]): e["description"] for e in endpoints}
    for route in [
        ("GET", "/admin"),
        ("GET", "/healthz"),
        ("GET", "/metrics"),
        ("GET", "/admin/config"),
        ("GET", "/admin/workers"),
        ("GET", "/admin/modules"),
        ("GET", "/admin/clusters"),
        ("POST", "/admin/reload"),
        ("POST", "/admin/restart"),
        ("POST", "/admin/modules/{name}/enable"),
        ("POST", "/admin/modules/{name}/disable"),
        ("POST", "/admin/clusters/{name}/nodes"),
        ("POST", "/admin/clusters/{name}/nodes/drain"),
        ("DELETE", "/admin/clusters/{name}/nodes"),
    ]:
        assert described[route], route
    assert {e["method"] for e in endpoints} == {"GET", "POST", "DELETE"}
    # "/" is open too once the status page registers it.
    opened = {e["path"] for e in endpoints if not e["needs_token"]}
    assert {"/healthz", "/metrics"} <= opened <= {"/healthz", "/metrics", "/"}
    for expected in ("/admin/reload", "/admin/restart", "/admin/modules/{name}/enable"):
        assert ("POST", expected, True) in [
            (e["method"], e["path"], e["needs_token"]) for e in endpoints
        ]
    before = call(address, "GET", "/admin/config", TOKEN)[1]
    for endpoint in endpoints:
        if endpoint["method"] == "GET" and "{" not in endpoint["path"]:
            assert call(address, "GET", endpoint["path"], TOKEN)[0] < 500
    assert call(address, "GET", "/admin/config", TOKEN)[1] == before
    assert not request_id_enabled(address)

    # The master's log names the caller, the call and what came of it.
    proxy.process.wait_for_line(f"INFO pitcher.admin: POST {disable} from 127.0.0.1:")
    logged = [
        re.sub(r" from 127\.0\.0\.1:\d+:", " from C:", line.split(" ", 2)[2])
        for line in proxy.process.stderr_lines
        if "pitcher.admin" in line
    ]
    assert logged == [
        f"WARNING pitcher.admin: POST {disable} from C: 401 refused (no token)",
        f"WARNING pitcher.admin: POST {disable} from C: 401 refused (wrong token)",
        "WARNING pitcher.admin: POST /admin/reload from C: 401 refused (wrong token)",
        "WARNING pitcher.admin: GET /admin/config from C: 401 refused (no token)",
        f"INFO pitcher.admin: POST {disable} from C: 200",
    ]
    assert TOKEN not in proxy.process.output


def test_a_reload_changes_the_token_and_a_gone_token_file_keeps_the_last_one(
    guarded: tuple[Proxy, Address, str],
) -> None:
    proxy, address, token_file = guarded
    with open(token_file, "w") as file:
        file.write(OTHER_TOKEN)
    # The file is read again at the reload, not before.
    assert call(address, "GET", "/admin/workers", TOKEN)[0] == 200
    status, body, _ = call(address, "POST", "/admin/reload", TOKEN)
    assert status == 200, body
    assert call(address, "GET", "/admin/workers", TOKEN)[0] == 401
    assert call(address, "GET", "/admin/workers", OTHER_TOKEN)[0] == 200

    os.unlink(token_file)
    status, body, _ = call(address, "POST", "/admin/reload", OTHER_TOKEN)
    assert status == 400
    assert f"admin.token_file: cannot read {json.dumps(token_file)}" in body["error"]
    assert call(address, "GET", "/admin/workers", OTHER_TOKEN)[0] == 200
    assert call(address, "GET", "/admin/workers", TOKEN)[0] == 401

    # A file without the token opens the door again (on loopback, where that is allowed).
    with open(proxy.config_path, "w") as file:
        file.write(master_config(None))
    assert call(address, "POST", "/admin/reload", OTHER_TOKEN)[0] == 200
    assert call(address, "GET", "/admin/workers")[0] == 200


def test_a_restart_needs_the_token_and_the_new_generation_reads_its_own(
    guarded: tuple[Proxy, Address, str],
) -> None:
    proxy, address, token_file = guarded
    with open(token_file, "w") as file:
        file.write(OTHER_TOKEN)
    assert call(address, "POST", "/admin/restart")[0] == 401
    assert call(address, "POST", "/admin/restart", OTHER_TOKEN)[0] == 401
    assert proxy.process.alive()
    status, body, _ = call(address, "POST", "/admin/restart", TOKEN)
    assert status == 200, body
    try:
        # Once the old generation is gone, only the new one answers on the socket.
        proxy.process.popen.wait(10)
        assert call(address, "GET", "/admin/workers", TOKEN)[0] == 401
        assert call(address, "GET", "/admin/workers", OTHER_TOKEN)[0] == 200
        assert call(address, "GET", "/healthz")[0] == 200
    finally:
        _stop(body["new_master_pid"])


def test_serve_refuses_an_admin_listen_others_reach_without_a_token(launcher: Launcher) -> None:
    text = master_config(None, listen="0.0.0.0:0")
    path = launcher.write("exposed.toml", text)
    line = text.splitlines().index('listen = "0.0.0.0:0"') + 1
    for command in (["check", "-c", path], ["serve", "-c", path, "--workers", "1"]):
        result = subprocess.run(
            [*pitcher_command(), *command], capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 1, result
        assert f"{path}:{line}: admin.listen: " in result.stdout + result.stderr
