"""The ``pitcher`` command as a shell user runs it: exit codes and what it prints.

Every command runs in a real subprocess with the working directory set to a
temporary one, so that file names in messages are exactly what the user typed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from tests.proxy.conftest import Launcher, can_connect, free_port, pitcher_command, wait_until

GOOD = """\
[server]
listen = "127.0.0.1:0"
header_timeout = 5

[[routes]]
name = "api"
host = "*.example.com"
prefix = "/api/"
cluster = "api"
strip_prefix = true

[[routes]]
prefix = "/"
cluster = "api"
timeout = 2.5

[clusters.api]
balance = "weighted"
nodes = [{uri = "tcp://127.0.0.1:7001", weight = 3}, "unix:///tmp/pitcher-api.sock"]
"""

# One mistake per key whose line is asserted below; line numbers are 1-based.
BAD = """\
[server]
listen = "127.0.0.1:0"
header_timout = 5

[[routes]]
prefix = "/"
cluster = "echo"
timeout = "fast"

[clusters.echo]
nodes = ["tcp://127.0.0.1:7001"]
balance = "weighed"
"""


@pytest.fixture
def workdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="pitcher-cli-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write(directory: str, name: str, text: str) -> str:
    with open(os.path.join(directory, name), "w", encoding="utf-8") as file:
        file.write(text)
    return name


def pitcher(*args: str, cwd: str, timeout: float = 5.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*pitcher_command(), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr, result.stderr


# ------------------------------------------------------------------ check


def test_check_accepts_a_good_file(workdir: str) -> None:
    result = pitcher("check", "-c", write(workdir, "good.toml", GOOD), cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(
        r"OK: good\.toml: 2 routes, 1 cluster, sha256 [0-9a-f]{12}\n", result.stdout
    ), result.stdout
    assert result.stderr == ""


def test_check_reports_every_bad_key_with_its_line(workdir: str) -> None:
    result = pitcher("check", "-c", write(workdir, "bad.toml", BAD), cwd=workdir)
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines == [
        "bad.toml:3: server.header_timout: unknown key; did you mean 'header_timeout'?",
        'bad.toml:8: routes[0].timeout: expected a number of seconds, got a string "fast"',
        'bad.toml:12: clusters.echo.balance: must be one of "round_robin", "weighted",'
        ' got "weighed"; did you mean "weighted"?',
    ]


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        ('[[routes]]\ncluster = "nope"\n', 2, "routes[0].cluster"),
        (
            '[[routes]]\ncluster = "c"\n[clusters.c]\nnodes = ["tcp://h"]\n',
            4,
            "clusters.c.nodes[0]",
        ),
        (
            '[server]\nlisten = "x"\n'
            '[[routes]]\ncluster = "c"\n[clusters.c]\nnodes = ["tcp://h:1"]\n',
            2,
            "server.listen",
        ),
        (
            '[[routes]]\ncluster = "c"\nhost = "a b"\n[clusters.c]\nnodes = ["tcp://h:1"]\n',
            3,
            "routes[0].host",
        ),
        (
            '[[routes]]\ncluster = "c"\n\n[clusters.c]\nnodes = [\n  "tcp://h:1",\n'
            '  {uri = "tcp://h:2", weight = 0},\n]\n',
            7,
            "clusters.c.nodes[1].weight",
        ),
    ],
    ids=["unknown-cluster", "node-without-port", "listen", "host", "weight"],
)
def test_check_names_line_and_key(workdir: str, text: str, line: int, key: str) -> None:
    result = pitcher("check", "-c", write(workdir, "bad.toml", text), cwd=workdir)
    assert result.returncode != 0
    assert result.stderr.startswith(f"bad.toml:{line}: {key}: "), result.stderr


def test_check_reports_a_toml_syntax_error_with_its_line(workdir: str) -> None:
    text = '[server]\nlisten = "127.0.0.1:0"\n[[routes]\ncluster = "c"\n'
    result = pitcher("check", "-c", write(workdir, "broken.toml", text), cwd=workdir)
    assert result.returncode != 0
    assert result.stderr.startswith("broken.toml:3: invalid TOML: "), result.stderr
    assert_no_traceback(result)


def test_check_reports_a_missing_file(workdir: str) -> None:
    result = pitcher("check", "-c", "absent.toml", cwd=workdir)
    assert result.returncode != 0
    assert result.stderr.startswith("absent.toml: cannot read: "), result.stderr
    assert_no_traceback(result)


def test_check_requires_a_config(workdir: str) -> None:
    result = pitcher("check", cwd=workdir)
    assert result.returncode == 2
    assert "Missing option '-c'" in result.stderr


# ------------------------------------------------------------------ serve


def test_serve_refuses_an_invalid_config(workdir: str) -> None:
    result = pitcher("serve", "-c", write(workdir, "bad.toml", BAD), cwd=workdir)
    assert result.returncode != 0
    assert "bad.toml:8: routes[0].timeout: " in result.stderr
    assert "bad.toml:3: server.header_timout: " in result.stderr
    assert "listening on" not in result.stderr
    assert_no_traceback(result)


def test_serve_reports_a_busy_listen_address_plainly(workdir: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = GOOD.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"')
        result = pitcher("serve", "-c", write(workdir, "busy.toml", config), cwd=workdir)
    assert result.returncode != 0
    assert str(port) in result.stderr
    assert "in use" in result.stderr
    # A port conflict is an operator's everyday mistake, not a crash.
    assert_no_traceback(result)


# ------------------------------------------------------------------ backend


@pytest.mark.parametrize(
    ("app", "message"),
    [
        ("no_colon_here", "expected MODULE:ATTRIBUTE"),
        ("no_such_module_xyz:app", "cannot load no_such_module_xyz:app"),
        ("pitcher_rpc.sdk.echo:missing", "cannot load pitcher_rpc.sdk.echo:missing"),
        ("pitcher_rpc.sdk.echo:echo", "is not a pitcher_rpc.sdk.Service"),
        ("pitcher_rpc.sdk.echo:", "expected MODULE:ATTRIBUTE"),
    ],
)
def test_backend_with_a_bad_app_is_a_usage_error(workdir: str, app: str, message: str) -> None:
    uri = f"tcp://127.0.0.1:{free_port()}"
    result = pitcher("backend", app, "--listen", uri, cwd=workdir)
    assert result.returncode == 2
    assert "Usage: pitcher backend" in result.stderr
    assert "Invalid value for APP" in result.stderr
    assert message in result.stderr
    assert_no_traceback(result)


def test_backend_requires_listen(workdir: str) -> None:
    result = pitcher("backend", "pitcher_rpc.sdk.echo:app", cwd=workdir)
    assert result.returncode == 2
    assert "Missing option '--listen'" in result.stderr


@pytest.mark.parametrize("uri", ["bogus://127.0.0.1:1", "not-a-uri"])
def test_backend_with_a_bad_listen_uri_is_a_usage_error(workdir: str, uri: str) -> None:
    result = pitcher("backend", "pitcher_rpc.sdk.echo:app", "--listen", uri, cwd=workdir)
    assert result.returncode == 2
    assert "--listen" in result.stderr
    assert uri in result.stderr
    assert_no_traceback(result)


def test_backend_runs_an_app_from_the_working_directory(workdir: str) -> None:
    # The SDK documents `pitcher backend mymodule:app` for a module beside the user.
    write(workdir, "hello_app.py", "from pitcher_rpc.sdk import Service\napp = Service('hello')\n")
    uri = f"unix://{workdir}/hello.sock"
    launcher = Launcher()
    try:
        process = launcher.spawn(
            [*pitcher_command(), "backend", "hello_app:app", "--listen", uri], cwd=workdir
        )

        def ready() -> bool:
            assert process.alive(), process.output
            return can_connect(uri)

        wait_until(ready, 5.0, "the backend socket")
        assert process.stop() == 0
    finally:
        launcher.close()
    # A drained backend leaves no socket file behind.
    assert not os.path.exists(f"{workdir}/hello.sock")


# ------------------------------------------------------------------ demo and the rest


def test_demo_with_a_bad_listen_address_is_a_usage_error(workdir: str) -> None:
    result = pitcher("demo", "--listen", "nonsense", cwd=workdir)
    assert result.returncode == 2
    assert "--listen" in result.stderr
    assert_no_traceback(result)


def test_version_and_help(workdir: str) -> None:
    version = pitcher("--version", cwd=workdir)
    assert version.returncode == 0
    assert re.fullmatch(
        r"pitcher, version \d+\.\d+\.\d+\S*, (compiled|pure Python) \(.+\)\n", version.stdout
    )
    help_text = pitcher("--help", cwd=workdir)
    assert help_text.returncode == 0
    for command in ("serve", "check", "demo", "backend", "status", "workers", "nodes"):
        assert re.search(rf"^\s+{command}\s", help_text.stdout, re.MULTILINE), help_text.stdout


def test_module_entry_point_matches_the_script(workdir: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pitcher_rpc.cli", "check", "-c", write(workdir, "g.toml", GOOD)],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=5,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK: g.toml: ")


# ------------------------------------------------------------------ reload, restart


def _served(admin_port: int, routes: str) -> str:
    return (
        f'[server]\nlisten = "127.0.0.1:0"\n[admin]\nlisten = "127.0.0.1:{admin_port}"\n'
        f'{routes}\n[clusters.c]\nnodes = ["tcp://127.0.0.1:1"]\n'
    )


def _admin_json(port: int, path: str) -> dict[str, object]:
    import json
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
        return dict(json.loads(answer.read()))


def test_reload_and_restart_take_the_served_file_and_refuse_any_other(workdir: str) -> None:
    admin_port = free_port()
    served = write(workdir, "served.toml", _served(admin_port, '[[routes]]\ncluster = "c"'))
    launcher = Launcher()
    try:
        process = launcher.spawn(
            [*pitcher_command(), "serve", "-c", served, "--workers", "1"], cwd=workdir
        )
        process.wait_for_line("listening on ", timeout=10)
        before = _admin_json(admin_port, "/admin/config")["checksum"]

        # Another file that finds this proxy (same admin address): refused, and named.
        other_text = _served(admin_port, '[[routes]]\nprefix = "/x/"\ncluster = "c"')
        os.mkdir(os.path.join(workdir, "elsewhere"))
        other = write(workdir, "elsewhere/other.toml", other_text)
        served_path = os.path.join(workdir, "served.toml")
        for command, what in (("reload", "reloaded"), ("restart", "restarted")):
            result = pitcher(command, "-c", other, cwd=workdir, timeout=20)
            assert (result.returncode, result.stdout) == (1, ""), result
            assert result.stderr.startswith(
                f"pitcher: this proxy serves {served_path}, not {os.path.join(workdir, other)};"
                f" nothing was {what}."
            )
            assert result.stderr.count("\n") == 1, result.stderr
        assert _admin_json(admin_port, "/admin/config")["checksum"] == before

        # The served file, by another name too (a symlink), after an edit: reloaded.
        write(workdir, "served.toml", other_text)
        os.symlink(os.path.join(workdir, "served.toml"), os.path.join(workdir, "link.toml"))
        for generation, name in enumerate(("served.toml", "link.toml"), start=2):
            result = pitcher("reload", "-c", name, cwd=workdir, timeout=20)
            assert (result.returncode, result.stderr) == (0, ""), result
            assert re.fullmatch(
                rf"reloaded {re.escape(served_path)}: generation {generation} in 1 worker"
                r" \(sha256 [0-9a-f]{12}\)\n",
                result.stdout,
            )
        config = _admin_json(admin_port, "/admin/config")
        assert config["checksum"] != before and config["reloads"] == 2
        # A bad served file is refused by the command before the proxy is asked.
        write(workdir, "served.toml", BAD)
        result = pitcher("reload", "-c", "served.toml", cwd=workdir)
        assert result.returncode == 1 and "served.toml:3: server.header_timout" in result.stderr
        assert _admin_json(admin_port, "/admin/config")["reloads"] == 2

        # The served file again: a new master takes over, and says which.
        write(workdir, "served.toml", other_text)
        result = pitcher("restart", "-c", "served.toml", cwd=workdir, timeout=40)
        assert (result.returncode, result.stderr) == (0, ""), result
        found = re.fullmatch(
            rf"restarted {re.escape(served_path)}: the new master \(pid (\d+)\) serves;"
            r" the previous one drains its connections\n",
            result.stdout,
        )
        assert found, result.stdout
        successor = int(found.group(1))
        try:
            # The old master may answer the shared admin socket a moment longer.
            wait_until(
                lambda: _admin_json(admin_port, "/admin/config")["reloads"] == 0,
                10.0,
                "the new master on the admin API",
            )
            with open(f"/proc/{successor}/cmdline", "rb") as cmdline:
                assert b"--takeover" in cmdline.read()
        finally:
            stop_pid(successor)
    finally:
        launcher.close()


def stop_pid(pid: int) -> None:
    """Stop a process this test did not start (a restarted master) and wait until it is gone."""
    try:
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not _alive(pid), 10.0, f"pid {pid} to exit")
    except ProcessLookupError:
        return
    except AssertionError:
        os.kill(pid, signal.SIGKILL)
        raise


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
