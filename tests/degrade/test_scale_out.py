"""The scale-out command: run when a cluster's healthy capacity is low, once per cool-down."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pitcher_rpc.config import parse_config
from pitcher_rpc.degrade.book import HealthBook
from pitcher_rpc.proxy.server import ProxyServer
from tests.inprocess import answering, config_errors, running_proxy, serving
from tests.proxy.conftest import Launcher, get, toml_config, wait_until

CLUSTER = """
[[routes]]
prefix = "/"
cluster = "app"
retries = 0
[clusters.app]
nodes = ["{a}", "{b}"]
[clusters.app.health]
slow_start = 0
consecutive_failures = 3
ejection_time = 30
"""


def recorder(path: Path) -> str:
    """A command (TOML array) that appends its PITCHER_* environment to ``path``."""
    script = (
        "import json, os, sys; "
        "open(sys.argv[1], 'a').write(json.dumps({k: v for k, v in os.environ.items() "
        "if k.startswith('PITCHER_')}) + '\\n')"
    )
    return json.dumps([sys.executable, "-c", script, str(path)])


def runs(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("command = 'scale.sh'", "command: required: the program and its arguments"),
        ("command = []", "command: required"),
        ("command = ['x']\nbelow = 0", "below: must be a share in (0, 1], got 0"),
        ("command = ['x']\nsometimes = 1", "sometimes: unknown key"),
    ],
)
def test_bad_scale_out_tables_are_refused(table: str, message: str) -> None:
    text = CLUSTER.format(a="tcp://127.0.0.1:1", b="tcp://127.0.0.1:2")
    assert message in config_errors(text + f"[clusters.app.scale_out]\n{table}\n", "s.toml")


def test_scale_out_needs_health() -> None:
    text = '[[routes]]\ncluster = "c"\n[clusters.c]\nnodes = ["tcp://h:1"]\n'
    errors = config_errors(text + "[clusters.c.scale_out]\ncommand = ['x']\n", "s.toml")
    assert "s.toml:5: clusters.c.scale_out: needs a [clusters.NAME.health] table" in errors


def test_the_book_asks_once_per_cool_down_while_capacity_is_low() -> None:
    text = CLUSTER.format(a="tcp://127.0.0.1:1", b="tcp://127.0.0.1:2")
    text += "[clusters.app.scale_out]\ncommand = ['scale']\nbelow = 0.75\ncooldown = 10\n"
    book = HealthBook()
    book.configure(parse_config(text), 0.0)
    book.tick({}, 0.1)
    assert book.capacity("app") == (1.0, [])
    assert book.scale_outs(0.1) == []
    book.tick({"tcp://127.0.0.1:2": (0, 3, 3)}, 1.0)
    assert book.capacity("app") == (0.5, ["tcp://127.0.0.1:2"])
    [request] = book.scale_outs(1.0)
    assert request.environment == {
        "PITCHER_CLUSTER": "app",
        "PITCHER_NODES": "2",
        "PITCHER_NODES_IN_SERVICE": "1",
        "PITCHER_HEALTHY_SHARE": "0.500",
        "PITCHER_THRESHOLD": "0.75",
        "PITCHER_NODES_OUT": "tcp://127.0.0.1:2",
    }
    assert book.scale_outs(5.0) == []  # cooling down
    assert len(book.scale_outs(11.5)) == 1  # still low after the cool-down


# -- a real proxy, one process ------------------------------------------------------------

good = answering("good", 200, "good")
bad = answering("bad", 503, "bad")


def drive(scale_out: str, seconds: float) -> ProxyServer:
    async def main() -> ProxyServer:
        async with serving(good, bad) as [a, b]:
            text = '[server]\nlisten = "127.0.0.1:0"\n' + CLUSTER.format(a=a, b=b) + scale_out
            async with running_proxy(text) as (proxy, port):
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.write(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                    await reader.read()
                    writer.close()
                    await asyncio.sleep(0.02)
        return proxy

    return asyncio.run(main())


def test_a_proxy_runs_the_command_with_the_numbers_once_per_cool_down(tmp_path: Path) -> None:
    record = tmp_path / "runs.jsonl"
    table = (
        f"[clusters.app.scale_out]\ncommand = {recorder(record)}\nbelow = 0.75\ncooldown = 0.8\n"
    )
    drive(table, seconds=1.2)
    found = runs(record)
    # Once when the bad node was ejected, once more after the cool-down.
    assert len(found) == 2, found
    assert found[0]["PITCHER_CLUSTER"] == "app"
    assert found[0]["PITCHER_HEALTHY_SHARE"] == "0.500"
    assert found[0]["PITCHER_NODES_IN_SERVICE"] == "1"


def test_detect_only_runs_nothing_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    record = tmp_path / "runs.jsonl"
    table = (
        f"[clusters.app.scale_out]\ncommand = {recorder(record)}\n"
        "below = 0.75\ndetect_only = true\n"
    )
    with caplog.at_level(logging.WARNING, "pitcher.scale"):
        drive(table, seconds=0.5)
    assert runs(record) == []
    assert "detect only: would run" in caplog.text


def test_a_command_that_hangs_is_killed_at_its_timeout(caplog: pytest.LogCaptureFixture) -> None:
    table = (
        "[clusters.app.scale_out]\n"
        f"command = {json.dumps([sys.executable, '-c', 'import time; time.sleep(30)'])}\n"
        "below = 0.75\ntimeout = 0.3\n"
    )
    with caplog.at_level(logging.INFO, "pitcher.scale"):
        started = time.monotonic()
        drive(table, seconds=1.0)
    assert time.monotonic() - started < 5
    assert "ran over 0.3s and was killed" in caplog.text


# -- with workers: the master runs it -----------------------------------------------------


def test_the_master_runs_it_when_a_backend_dies(launcher: Launcher, tmp_path: Path) -> None:
    record = tmp_path / "runs.jsonl"
    backends = [launcher.test_backend("tcp", name=f"n{i}") for i in range(2)]
    text = toml_config(
        [{"prefix": "/", "cluster": "app"}], {"app": {"nodes": [b.uri for b in backends]}}
    )
    text += (
        "\n[clusters.app.health]\nslow_start = 0\nconsecutive_failures = 3\n"
        f"[clusters.app.scale_out]\ncommand = {recorder(record)}\nbelow = 0.75\n"
    )
    proxy = launcher.proxy(text, workers=2)
    backends[1].process.signal(signal.SIGKILL)
    backends[1].process.stop()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not runs(record):
        assert get(proxy, "/").status == 200  # never-sent requests go to the live node
    wait_until(lambda: runs(record), 5, "the scale-out command")
    [run] = runs(record)
    assert run["PITCHER_NODES_OUT"] == backends[1].uri
    proxy.process.wait_for_line("the scale-out command exited with 0")

    # The master's /metrics says what happened.
    line = proxy.process.wait_for_line("admin on ")
    admin = line.split("admin on ")[1].split(",")[0]
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as answer:
        families = {
            sample.name + str(sorted(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(answer.read().decode())
            for sample in family.samples
        }
    dead = sorted({"cluster": "app", "node": backends[1].uri, "state": "ejected"}.items())
    assert families[f"pitcher_node_weight_factor{dead}"] == 0.0
    ejected = sorted({"cluster": "app", "event": "ejected"}.items())
    assert families[f"pitcher_health_events_total{ejected}"] == 1
    assert families["pitcher_cluster_panic[('cluster', 'app')]"] == 0
    assert families["pitcher_scale_out_runs_total[]"] == 1
