"""Where the load goes after a worker is killed under keep-alive load.

Keep-alive clients load two workers; one worker is killed by pid. Its
clients lose their connections (and at most the one request each had in
flight) and reconnect at once, before the replacement has started: the
survivor accepts them all. Keep-alive connections stay where they are, so
the replacement would take only what connects later, which under steady
keep-alive load is nothing. ``keepalive_requests`` ends each connection
after that many requests; the client reconnects, and the kernel hands the
new connection to whichever worker accepts first, the idle replacement as
often as not. The test prints the replacement's share of the requests in
each second after it started (run with -s); docs/process.md quotes
``python -m tests.process.keepalive_load``, which measures the same over ten
seconds with 64 connections.
"""

from __future__ import annotations

from tests.process.keepalive_load import shares_after_kill
from tests.process.test_master import admin_port
from tests.proxy.conftest import Launcher, toml_config

CLIENTS = 8
# Small, so that every client reconnects several times a second.
KEEPALIVE_REQUESTS = 20


def test_the_replacement_of_a_killed_worker_takes_a_share_of_the_load(launcher: Launcher) -> None:
    echo = launcher.echo_backend("tcp")
    config = toml_config(
        [{"name": "echo", "prefix": "/", "cluster": "echo"}],
        {"echo": {"nodes": [echo.uri]}},
        server={"keepalive_requests": KEEPALIVE_REQUESTS, "drain_timeout": 2.0},
    )
    proxy = launcher.proxy(config, workers=2)
    shares, started, result = shares_after_kill(
        proxy.host, proxy.port, admin_port(proxy), CLIENTS, warm=0.5, windows=2
    )
    print(
        f"\n  replacement up {started:.2f} s after the kill; its share of each second after:"
        f" {[round(share, 3) for share in shares]}; {result.served} answers,"
        f" {result.closed_by_proxy} reconnections asked by the proxy"
    )
    assert result.served > 0 and result.closed_by_proxy > 0
    # Each client lost at most its connection to the killed worker.
    assert len(result.failures) <= CLIENTS, result.failures
    # Without a limit the replacement serves none of it (docs/process.md);
    # with one, about half once every client has reconnected a few times.
    assert max(shares) >= 0.25, shares
