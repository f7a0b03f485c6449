"""A split service that registers itself with the proxy at start and leaves drained at stop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from pitcher_rpc.sdk import Registration
from tests.proxy.conftest import (
    Launcher,
    Process,
    Proxy,
    free_port,
    get,
    pitcher_command,
    toml_config,
)


def with_admin_port(text: str, port: int) -> str:
    admin = '[admin]\nlisten = "127.0.0.1:0"'
    assert admin in text
    return text.replace(admin, f'[admin]\nlisten = "127.0.0.1:{port}"')


def self_registering(launcher: Launcher, admin: int, name: str, *extra: str) -> Process:
    env = {
        "TEST_BACKEND_NAME": name,
        "TEST_MARK_DIR": launcher.mark_dir,
        "PYTHONPATH": launcher.tmpdir + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    return launcher.spawn(
        [
            *pitcher_command(),
            "backend",
            "testapp:app",
            "--listen",
            "tcp://127.0.0.1:0",
            "--register",
            f"http://127.0.0.1:{admin}",
            "--cluster",
            "app",
            *extra,
        ],
        env=env,
    )


def cluster_state(admin: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/admin/clusters", timeout=5) as answer:
        return json.load(answer)["clusters"]["app"]


def cluster_nodes(admin: int) -> list[str]:
    return [node["uri"] for node in cluster_state(admin)["nodes"]]


def test_a_service_joins_at_start_and_leaves_without_losing_a_request(
    launcher: Launcher,
) -> None:
    first = launcher.test_backend("tcp", name="first")
    admin = free_port()
    text = toml_config([{"prefix": "/", "cluster": "app"}], {"app": {"nodes": [first.uri]}})
    proxy: Proxy = launcher.proxy(with_admin_port(text, admin), workers=2)

    joiner = self_registering(launcher, admin, "joiner")
    joiner.wait_for_line("registered ")
    joined = time.monotonic()
    assert len(cluster_nodes(admin)) == 2

    answers: list[tuple[float, int, str]] = []
    stop = threading.Event()

    def ask() -> None:
        while not stop.is_set():
            response = get(proxy, "/?jitter=0.01")
            backend = response.json()["backend"] if response.status == 200 else ""
            answers.append((time.monotonic(), response.status, backend))

    askers = [threading.Thread(target=ask) for _ in range(4)]
    for asker in askers:
        asker.start()
    drained_seen = False
    try:
        time.sleep(1.0)
        joiner.signal(signal.SIGTERM)
        # Drained first (listed as draining, taking nothing new), then gone.
        while joiner.alive():
            state = cluster_state(admin)
            drained_seen = drained_seen or bool(state["draining"])
            time.sleep(0.01)
        assert joiner.stop(timeout=15) == 0
        left = time.monotonic()
        time.sleep(0.5)
    finally:
        stop.set()
        for asker in askers:
            asker.join(10)

    assert drained_seen
    assert [a for a in answers if a[1] != 200] == []
    took = [at for at, _, who in answers if who == "joiner"]
    assert took and took[0] - joined < 1.0
    assert all(at < left for at in took)
    assert cluster_nodes(admin) == [first.uri]
    output = joiner.output
    assert "registered tcp://127.0.0.1:" in output


def test_a_registration_outlives_reloads_and_is_renewed_if_forgotten(
    launcher: Launcher,
) -> None:
    first = launcher.test_backend("tcp", name="first")
    second = launcher.test_backend("tcp", name="second")
    admin = free_port()
    text = toml_config([{"prefix": "/", "cluster": "app"}], {"app": {"nodes": [first.uri]}})
    launcher.proxy(with_admin_port(text, admin), workers=1)
    registration = Registration(f"http://127.0.0.1:{admin}", "app", refresh=0.2)

    async def scenario() -> list[list[str]]:
        seen = []
        assert await registration.register(second.uri) is True
        assert await registration.register(second.uri) is False  # already there
        keeper = asyncio.create_task(registration.keep_registered(second.uri))
        try:
            with urllib.request.urlopen(
                urllib.request.Request(
                    f"http://127.0.0.1:{admin}/admin/reload", b"", method="POST"
                ),
                timeout=10,
            ):
                pass
            seen.append(cluster_nodes(admin))  # kept over the reload
            await asyncio.to_thread(
                urllib.request.urlopen,
                urllib.request.Request(
                    f"http://127.0.0.1:{admin}/admin/clusters/app/nodes?uri={second.uri}",
                    method="DELETE",
                ),
            )
            seen.append(cluster_nodes(admin))  # forgotten by the proxy ...
            await asyncio.sleep(0.6)
            seen.append(cluster_nodes(admin))  # ... and registered again
        finally:
            keeper.cancel()
        return seen

    after_reload, forgotten, renewed = asyncio.run(scenario())
    assert after_reload == [first.uri, second.uri]
    assert forgotten == [first.uri]
    assert renewed == [first.uri, second.uri]


def test_a_service_started_before_the_proxy_waits_for_it(launcher: Launcher) -> None:
    first = launcher.test_backend("tcp", name="first")
    admin = free_port()
    joiner = self_registering(launcher, admin, "early", "--weight", "3")
    time.sleep(1.0)
    assert joiner.alive()
    text = toml_config([{"prefix": "/", "cluster": "app"}], {"app": {"nodes": [first.uri]}})
    launcher.proxy(with_admin_port(text, admin), workers=1)
    joiner.wait_for_line("registered ")
    assert len(cluster_nodes(admin)) == 2


def test_register_and_cluster_go_together() -> None:
    result = subprocess.run(
        [
            *pitcher_command(),
            "backend",
            "pitcher_rpc.sdk.echo:app",
            "--listen",
            "tcp://127.0.0.1:0",
            "--register",
            "http://127.0.0.1:1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--register and --cluster go together" in result.stderr


def test_an_etcd_registration_names_its_cluster_in_the_url() -> None:
    registration = Registration("etcd://10.0.0.1:2379,10.0.0.2:2379/users")
    assert registration.cluster == "users"
    assert registration._etcd is not None
    assert registration._etcd.client.endpoints == ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
    assert registration._etcd.prefix == "/pitcher/nodes/users/"
    for url, message in [
        ("etcd://10.0.0.1:2379", "expected etcd://HOST:PORT/CLUSTER"),
        ("etcd://10.0.0.1/users", "an etcd member is HOST:PORT"),
        ("etcd://h:1/users?prefix=nodes", "the prefix must start and end with '/'"),
    ]:
        with pytest.raises(ValueError, match=message):
            Registration(url)
    with pytest.raises(ValueError, match="names cluster 'users', not 'other'"):
        Registration("etcd://h:1/users", "other")
    with pytest.raises(ValueError, match="needs a cluster"):
        Registration("http://127.0.0.1:9180")


def test_register_etcd_takes_the_cluster_from_the_url() -> None:
    result = subprocess.run(
        [
            *pitcher_command(),
            "backend",
            "pitcher_rpc.sdk.echo:app",
            "--listen",
            "tcp://127.0.0.1:0",
            "--register",
            "etcd://127.0.0.1:1/users",
            "--cluster",
            "orders",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "names cluster 'users', not 'orders'" in result.stderr


def test_register_etcd_without_the_fleet_extra_says_what_to_install() -> None:
    script = (
        "import sys; sys.modules['aiohttp'] = None\n"
        "from pitcher_rpc.cli import main\n"
        "main(['backend', 'pitcher_rpc.sdk.echo:app', '--listen', 'tcp://127.0.0.1:0',"
        " '--register', 'etcd://127.0.0.1:1/users'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "--register etcd:// needs the fleet extra: pip install 'pitcher-rpc[fleet]'" in (
        result.stderr
    )


def test_a_proxy_whose_admin_api_asks_for_a_token_takes_a_service_that_sends_it(
    launcher: Launcher,
) -> None:
    first = launcher.test_backend("tcp", name="first")
    admin = free_port()
    token = "registration-token-0123456789"
    token_path = os.path.join(launcher.tmpdir, "admin.token")
    with open(token_path, "w") as file:
        file.write(token + "\n")
    text = toml_config([{"prefix": "/", "cluster": "app"}], {"app": {"nodes": [first.uri]}})
    listen = f'listen = "127.0.0.1:{admin}"'
    text = with_admin_port(text, admin).replace(listen, f'{listen}\ntoken_file = "{token_path}"')
    launcher.proxy(text, workers=1)  # the admin API is the master's

    without = self_registering(launcher, admin, "without")
    deadline = time.monotonic() + 15
    while without.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert without.stop(timeout=5) != 0
    assert "401" in without.output

    joiner = self_registering(launcher, admin, "joiner", "--register-token-file", token_path)
    joiner.wait_for_line("registered ")
    request = urllib.request.Request(
        f"http://127.0.0.1:{admin}/admin/clusters", headers={"authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=5) as answer:
        assert len(json.load(answer)["clusters"]["app"]["nodes"]) == 2
    joiner.signal(signal.SIGTERM)
    assert joiner.stop(timeout=15) == 0
    with urllib.request.urlopen(request, timeout=5) as answer:
        assert [n["uri"] for n in json.load(answer)["clusters"]["app"]["nodes"]] == [first.uri]


def test_a_token_file_goes_with_an_admin_api_registration(tmp_path: os.PathLike[str]) -> None:
    empty = os.path.join(tmp_path, "empty.token")
    open(empty, "w").close()
    for extra, message in (
        (["--register-token-file", empty], "goes with --register"),
        (
            [
                "--register",
                "http://127.0.0.1:1",
                "--cluster",
                "app",
                "--register-token-file",
                empty,
            ],
            "is empty: it must hold the token",
        ),
        (
            [
                "--register",
                "http://127.0.0.1:1",
                "--cluster",
                "app",
                "--register-token-file",
                os.path.join(tmp_path, "missing"),
            ],
            "cannot read",
        ),
    ):
        result = subprocess.run(
            [*pitcher_command(), "backend", "x:app", "--listen", "tcp://127.0.0.1:0", *extra],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
