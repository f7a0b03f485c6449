"""The tracing module's settings, its refusal without the extra, and nothing paid when it is off."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pitcher_rpc.modules import tracing
from tests.inprocess import assert_module_refuses

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("sample_ratio = 1.5", "sample_ratio must be a number from 0 to 1"),
        ("sample_ratio = true", "sample_ratio must be a number from 0 to 1"),
        ('exporter = "zipkin"', "exporter must be one of otlp, none"),
        ('endpoint = "collector:4318"', "endpoint must be an http:// or https:// URL"),
        ('headers = { "bad name" = "x" }', "headers must be a table of HTTP header names"),
        ('service_name = ""', "service_name must be a non-empty string"),
        ("max_queue_size = 0", "max_queue_size must be a positive integer"),
        ("max_export_batch_size = 4096", "max_export_batch_size must not be over max_queue_size"),
        ("schedule_delay = 0", "schedule_delay must be a positive number of seconds"),
        ("sampling = 1", "unknown key 'sampling'"),
    ],
)
def test_wrong_settings_are_refused_at_their_line(section: str, message: str) -> None:
    assert_module_refuses("tracing", section, message)


def test_without_the_extra_exporting_is_refused_and_propagating_is_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # OpenTelemetry cannot be uninstalled for one test: its package is made
    # unimportable, as it is where the extra was not installed.
    for name in list(sys.modules):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    assert not tracing.extra_installed()
    error = assert_module_refuses(
        "tracing", "sample_ratio = 0.5", "pip install 'pitcher-rpc[tracing]'"
    )
    assert 'exporter = "none"' in error.text
    assert tracing.Tracing.validate({"exporter": "none"})["exporter"] == "none"


def test_nothing_of_opentelemetry_is_imported_when_tracing_is_off() -> None:
    # A proxy and an SDK service answering through it, in a fresh interpreter.
    script = textwrap.dedent(
        """
        import asyncio, sys
        from pitcher_rpc.sdk import Service
        from tests.inprocess import running_proxy, serving

        app = Service("plain", lambda request, context: [context.request_id])

        async def main():
            config = (
                '[server]\\nlisten = "127.0.0.1:0"\\n[modules.access_log]\\npath = "{log}"\\n'
                '[[routes]]\\ncluster = "b"\\n[clusters.b]\\nnodes = ["{node}"]\\n'
            )
            async with serving(app) as [node], running_proxy(
                config.format(node=node, log="/dev/null")
            ) as (_, port):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET / HTTP/1.1\\r\\nHost: t\\r\\nConnection: close\\r\\n\\r\\n")
                answer = await reader.read()
                writer.close()
                assert answer.startswith(b"HTTP/1.1 200"), answer

        asyncio.run(main())
        loaded = sorted(
            name for name in sys.modules
            if name.startswith(
                ("opentelemetry", "pitcher_rpc.modules.trac", "pitcher_rpc.sdk.trac")
            )
        )
        print(loaded)
        sys.exit(1 if loaded else 0)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, (result.stdout, result.stderr)
