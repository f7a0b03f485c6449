"""The admin commands against a real ``pitcher serve`` (two workers) on loopback.

One proxy serves the whole module; each command runs as a user types it, in
this process through click's runner (the proxy, its workers and the admin
API are real; only the command's own start-up is saved), and in a subprocess
where the exit status, the streams or the terminal are the point. The proxy
asks for an admin token, so every command here also shows it sends one.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import socket
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from click.testing import CliRunner, Result

from pitcher_rpc import cli
from pitcher_rpc.cli import main
from tests.proxy.conftest import Launcher, Proxy, free_port, get, pitcher_command

ANSI = re.compile(r"\x1b\[[0-9;]*m")
TOKEN = "cli-tests-token-0123456789"


@dataclass
class Served:
    launcher: Launcher
    proxy: Proxy
    admin: int
    path: str
    live: str
    dead: str


def _config(admin: int, live: str, dead: str, log: str) -> str:
    return f"""\
[server]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:{admin}"
token_file = "admin.token"

[[routes]]
name = "api"
prefix = "/api/"
cluster = "api"

[[routes]]
prefix = "/"
cluster = "web"

[clusters.api]
nodes = ["{live}", "{dead}"]

[clusters.api.health]
consecutive_failures = 1
ejection_time = 30.0

[clusters.web]
nodes = ["{live}"]

[modules.access_log]
path = "{log}"
"""


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    launcher = Launcher()
    try:
        live = launcher.echo_backend("tcp").uri
        dead = f"tcp://127.0.0.1:{free_port()}"
        admin = free_port()
        # Relative to the configuration's directory, as the proxy reads it.
        launcher.write("admin.token", TOKEN + "\n")
        text = _config(admin, live, dead, os.path.join(launcher.tmpdir, "access.log"))
        proxy = launcher.proxy(text, workers=2)
        proxy.process.wait_for_line("admin on ")
        yield Served(launcher, proxy, admin, proxy.config_path, live, dead)
    finally:
        launcher.close()


def pitcher(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def admin_json(served: Served, path: str) -> Any:
    request = urllib.request.Request(
        f"http://127.0.0.1:{served.admin}{path}", headers={"authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=5) as answer:
        return json.loads(answer.read())


def test_workers(served: Served) -> None:
    result = pitcher("workers", "-c", served.path)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "WORKER",
        "PID",
        "GEN",
        "CONNECTIONS",
        "REQUESTS",
        "LAG",
        "RESTARTS",
        "STATE",
    ]
    pids = [str(w["pid"]) for w in admin_json(served, "/admin/workers")["workers"]]
    assert [line.split()[:2] for line in lines[1:]] == [["0", pids[0]], ["1", pids[1]]]
    assert all(line.endswith("  serving") for line in lines[1:])

    as_json = pitcher("workers", "-c", served.path, "--json")
    assert as_json.exit_code == 0
    answer = json.loads(as_json.stdout)
    assert [str(w["pid"]) for w in answer["workers"]] == pids
    assert "gc" in answer["workers"][0]  # the whole answer, not the table's fields


def eject_the_dead_node(served: Served) -> None:
    """The dead node fails a connect and is ejected; each request is retried on the live one."""
    for _ in range(50):
        assert get(served.proxy, "/api/x").status == 200
        health = admin_json(served, "/admin/clusters")["clusters"]["api"]["health"]
        if health["nodes"][served.dead]["state"] == "ejected":
            return
    raise AssertionError(f"{served.dead} was not ejected: {health}")


def test_nodes_list_shows_an_ejected_node(served: Served) -> None:
    eject_the_dead_node(served)
    result = pitcher("nodes", "list", "-c", served.path)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["CLUSTER", "NODE", "WEIGHT", "STATE"]
    assert re.fullmatch(
        rf"api +{re.escape(served.dead)} +1  ejected, back in \d+\.\ds", lines[2]
    ), lines
    assert re.fullmatch(rf"api +{re.escape(served.live)} +1  healthy", lines[1]), lines
    assert re.fullmatch(rf"web +{re.escape(served.live)} +1  in service", lines[3]), lines
    assert len(lines) == 4

    answer = json.loads(pitcher("nodes", "list", "-c", served.path, "--json").stdout)
    assert answer["clusters"]["api"]["health"]["nodes"][served.dead]["state"] == "ejected"


def test_modules_list_and_switch(served: Served) -> None:
    listed = pitcher("modules", "list", "-c", served.path)
    assert listed.exit_code == 0, listed.output
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines()[1:]}
    assert rows["access_log"] == ["access_log", "10", "no", "on", "0", "REQUEST_FINISH"]
    assert rows["request_id"][2:4] == ["yes", "on"]

    off = pitcher("modules", "disable", "access_log", "-c", served.path)
    assert (off.exit_code, off.stdout, off.stderr) == (0, "disabled access_log in 2 workers\n", "")
    try:
        listed = pitcher("modules", "list", "-c", served.path)
        assert re.search(r"^access_log +10  no +off ", listed.stdout, re.MULTILINE)
    finally:
        on = pitcher("modules", "enable", "access_log", "-c", served.path)
    assert on.stdout == "enabled access_log in 2 workers\n"
    as_json = json.loads(pitcher("modules", "list", "-c", served.path, "--json").stdout)
    assert {w["index"] for w in as_json["workers"]} == {0, 1}

    unknown = pitcher("modules", "enable", "nope", "-c", served.path)
    assert unknown.exit_code == 1
    assert unknown.stdout == ""
    assert unknown.stderr == "pitcher: worker 0: no module named 'nope' is loaded\n"


def test_nodes_add_drain_remove(served: Served) -> None:
    uri = f"tcp://127.0.0.1:{free_port()}"
    added = pitcher("nodes", "add", "web", uri, "--weight", "2", "-c", served.path)
    assert (added.exit_code, added.stderr) == (0, ""), added.output
    assert added.stdout == (
        f"added {uri} to web in 2 workers (weight 2, until the next reload); web now has 2 nodes\n"
    )
    listed = pitcher("nodes", "list", "-c", served.path).stdout
    assert re.search(rf"^web +{re.escape(uri)} +2  in service \(added at run time\)$", listed, re.M)

    drained = pitcher("nodes", "drain", "web", uri, "--keep", "-c", served.path)
    assert drained.stdout == (
        f"draining {uri} in web in 2 workers (kept over reloads): it takes no new requests,"
        " those in flight finish; 1 node left in web\n"
    )
    listed = pitcher("nodes", "list", "-c", served.path).stdout
    assert re.search(rf"^web +{re.escape(uri)} +-  draining$", listed, re.M), listed

    removed = pitcher("nodes", "remove", "web", uri, "-c", served.path, "--json")
    assert removed.exit_code == 0
    assert json.loads(removed.stdout)["nodes"] == [served.live]

    again = pitcher("nodes", "remove", "web", uri, "-c", served.path)
    assert (again.exit_code, again.stdout) == (1, "")
    assert again.stderr == f"pitcher: {uri} is not a node of web\n"
    # With --json the refusal is on stdout too, for a script to read.
    again = pitcher("nodes", "remove", "nope", uri, "-c", served.path, "--json")
    assert again.exit_code == 1
    assert json.loads(again.stdout) == {"error": "no cluster named 'nope'"}
    assert again.stderr == "pitcher: no cluster named 'nope'\n"


def test_reload_prints_its_outcome(served: Served) -> None:
    result = pitcher("reload", "-c", served.path)
    assert (result.exit_code, result.stderr) == (0, ""), result.output
    config = admin_json(served, "/admin/config")
    generation = config["workers"][0]["generation"]
    assert result.stdout == (
        f"reloaded {served.path}: generation {generation} in 2 workers"
        f" (sha256 {config['checksum'][:12]})\n"
    )
    as_json = pitcher("reload", "-c", served.path, "--json")
    assert as_json.exit_code == 0
    answer = json.loads(as_json.stdout)
    assert answer["complete"] is True
    assert answer["workers"][0]["generation"] == generation + 1


def test_status_on_one_screen(served: Served) -> None:
    eject_the_dead_node(served)
    result = pitcher("status", "-c", served.path)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    config = admin_json(served, "/admin/config")
    assert lines[0] == "proxy    serving, 2 workers"
    assert lines[1] == f"admin    http://127.0.0.1:{served.admin}/ (the status page)"
    with urllib.request.urlopen(lines[1].split()[1], timeout=5) as page:  # no token needed
        assert page.headers["content-type"].startswith("text/html")
    assert lines[2].startswith(f"config   {served.path}: generation ")
    assert f"sha256 {config['checksum'][:12]}, {config['reloads']} reload" in lines[2]
    assert lines[3] == ""
    assert lines[4].startswith("WORKER ") and lines[7] == ""
    assert lines[8].split() == ["CLUSTER", "IN", "SERVICE", "OUT", "OF", "SERVICE"]
    clusters = {line.split()[0]: line for line in lines[9:]}
    assert clusters["web"].split() == ["web", "1/1", "-"]
    assert re.fullmatch(
        rf"api +1/2  {re.escape(served.dead)} ejected, back in \d+\.\ds", clusters["api"]
    ), clusters

    as_json = json.loads(pitcher("status", "-c", served.path, "--json").stdout)
    assert set(as_json) == {"health", "config", "workers", "clusters"}
    assert as_json["health"] == {"status": "serving"}


def test_status_says_the_file_given_is_not_what_runs(served: Served) -> None:
    with open(served.path, encoding="utf-8") as file:
        text = file.read()
    # Same admin address, so it finds this proxy; one setting more, so another checksum.
    other = served.launcher.write(
        "edited.toml", text.replace("[server]\n", "[server]\nbacklog = 64\n")
    )
    result = pitcher("status", "-c", other)
    assert result.exit_code == 0, result.output
    assert re.fullmatch(
        rf" +{re.escape(other)} differs \(sha256 [0-9a-f]{{12}}\): reload to apply it",
        result.stdout.splitlines()[3],
    ), result.stdout


def _config_for(served: Served, name: str, port: int) -> str:
    """A file whose [admin] listen is ``port``, where no proxy of this module is."""
    return served.launcher.write(
        name,
        f'[admin]\nlisten = "127.0.0.1:{port}"\n[[routes]]\ncluster = "c"\n'
        '[clusters.c]\nnodes = ["tcp://127.0.0.1:1"]\n',
    )


@pytest.mark.parametrize(
    "command",
    [["status"], ["workers"], ["nodes", "list"], ["modules", "list"], ["reload"]],
    ids=lambda c: c[0],
)
def test_no_proxy_is_one_line_and_status_1(served: Served, command: list[str]) -> None:
    port = free_port()
    path = _config_for(served, f"nobody-{command[0]}.toml", port)
    result = pitcher(*command, "-c", path)
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == (
        f"pitcher: no admin API at 127.0.0.1:{port}: Connection refused; is the proxy running?\n"
    )


def test_exit_status_and_streams_in_a_shell(served: Served) -> None:
    ok = subprocess.run(
        [*pitcher_command(), "nodes", "list", "-c", served.path],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert (ok.returncode, ok.stderr) == (0, "")
    assert ok.stdout.startswith("CLUSTER  NODE ")
    assert not ANSI.search(ok.stdout)  # a pipe is not a terminal
    refused = subprocess.run(
        [*pitcher_command(), "modules", "disable", "nope", "-c", served.path],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert (refused.returncode, refused.stdout) == (1, "")
    assert refused.stderr == "pitcher: worker 0: no module named 'nope' is loaded\n"


def _on_a_terminal(args: list[str], **env: str) -> str:
    """What the command writes to a pseudo-terminal as its stdout."""
    leader, follower = pty.openpty()
    try:
        completed = subprocess.run(
            args,
            stdout=follower,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env},
            timeout=10,
        )
        os.close(follower)
        follower = -1
        chunks: list[bytes] = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the writer is gone and everything was read
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        if follower >= 0:
            os.close(follower)
        os.close(leader)
    assert completed.returncode == 0, completed.stderr
    return b"".join(chunks).decode()


def test_colour_only_on_a_terminal_and_never_with_no_color(served: Served) -> None:
    args = [*pitcher_command(), "workers", "-c", served.path]
    coloured = _on_a_terminal(args, NO_COLOR="")
    assert "\x1b[1mWORKER\x1b[0m" in coloured
    assert "\x1b[32mserving\x1b[0m" in coloured
    plain = _on_a_terminal(args, NO_COLOR="1")
    assert not ANSI.search(plain)
    assert plain.replace("\r\n", "\n").splitlines()[0].split()[0] == "WORKER"


def _same_proxy_other_token(served: Served, name: str, token_line: str | None) -> str:
    """Another file that finds this proxy, with another [admin] token_file line (or none)."""
    with open(served.path, encoding="utf-8") as file:
        text = file.read()
    line = 'token_file = "admin.token"\n'
    assert line in text
    return served.launcher.write(name, text.replace(line, token_line or ""))


@pytest.mark.parametrize("command", [["status"], ["nodes", "list"], ["reload"]], ids=str)
def test_a_wrong_token_is_one_line(served: Served, command: list[str]) -> None:
    served.launcher.write("wrong.token", "not-the-token-but-long-enough\n")
    path = _same_proxy_other_token(served, "wrong.toml", 'token_file = "wrong.token"\n')
    result = pitcher(*command, "-c", path)
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == "pitcher: the admin API refused the token (see [admin] token_file)\n"


def test_no_token_when_the_proxy_asks_for_one(served: Served) -> None:
    path = _same_proxy_other_token(served, "tokenless.toml", None)
    result = pitcher("workers", "-c", path)
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == (
        f"pitcher: the admin API asks for a token, and {path} sets no [admin] token_file\n"
    )


def test_an_unreadable_token_file_is_one_line(served: Served) -> None:
    path = _same_proxy_other_token(served, "missing.toml", 'token_file = "missing.token"\n')
    result = pitcher("workers", "-c", path)
    assert (result.exit_code, result.stdout) == (1, "")
    missing = os.path.join(os.path.dirname(path), "missing.token")
    assert re.fullmatch(
        rf"{re.escape(path)}:\d+: admin\.token_file: cannot read .*{re.escape(missing)}.*:"
        r" No such file or directory\n",
        result.stderr,
    ), result.stderr


# ------------------------------------------------------------------ something else at the address


def _answering(reply: bytes) -> tuple[socket.socket, threading.Thread]:
    """A loopback listener that answers one connection with ``reply`` and closes it."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)

    def serve() -> None:
        with contextlib.suppress(OSError):
            connection, _ = listener.accept()
            with connection:
                connection.settimeout(5)
                connection.recv(65536)
                connection.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (
            b"HTTP/1.1 404 Not Found\r\ncontent-type: text/html\r\ncontent-length: 23\r\n\r\n"
            b"<html>not here</html>\r\n",
            "the admin API answered 404: <html>not here</html>",
        ),
        (b"SSH-2.0-OpenSSH_9.2\r\n", "does not answer as the admin API does (BadStatusLine)"),
    ],
    ids=["http-not-json", "not-http"],
)
def test_something_else_at_the_admin_address(served: Served, reply: bytes, message: str) -> None:
    listener, thread = _answering(reply)
    with listener:
        path = _config_for(served, "elsewhere.toml", listener.getsockname()[1])
        result = pitcher("workers", "-c", path)
        thread.join(5)
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr.startswith("pitcher: ") and result.stderr.endswith(f"{message}\n")
    assert result.stderr.count("\n") == 1


def test_an_admin_api_that_never_answers(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    # Accepted by the kernel's backlog, never read: the command gives up, it does not hang.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        monkeypatch.setattr(cli, "_ADMIN_TIMEOUT", 0.2)
        result = pitcher("nodes", "list", "-c", _config_for(served, "silent.toml", port))
    assert (result.exit_code, result.stdout) == (1, "")
    assert (
        result.stderr == f"pitcher: the admin API at 127.0.0.1:{port} did not answer within 0.2 s\n"
    )
