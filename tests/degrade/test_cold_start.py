"""A proxy started under load: no node that has never failed makes it refuse.

The load starts first, on the port the proxy is about to listen on, and the
proxy (a master and two workers, pitcher serve) starts beneath it. Slow start
used to cap every node of a cold cluster at a tenth of ``ramp_in_flight``:
about 22,000 fast 503s in the first 1.5 s. Nodes that never failed take
their full load at once now; only a node back from an ejection ramps.
"""

from __future__ import annotations

import collections
import threading
import time

from tests.proxy.conftest import Launcher, RawClient, build_request, free_port, toml_config

CLIENTS = 16


def test_load_arriving_as_the_proxy_starts_is_never_refused(launcher: Launcher) -> None:
    backends = [launcher.echo_backend("tcp") for _ in range(2)]
    port = free_port()
    text = toml_config(
        [{"prefix": "/", "cluster": "app", "timeout": 5.0}],
        {"app": {"nodes": [b.uri for b in backends]}},
        server={"listen": f"127.0.0.1:{port}"},
    )
    # A small in-flight cap, so that a ramp would refuse at once.
    text += "\n[clusters.app.health]\nslow_start = 5.0\nramp_in_flight = 4\n"
    statuses: collections.Counter[int] = collections.Counter()
    lock = threading.Lock()
    stop = threading.Event()

    def client() -> None:
        deadline = time.monotonic() + 30
        connection: RawClient | None = None
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                if connection is None:
                    connection = RawClient.connect("127.0.0.1", port)
                # 10 ms at the backend: each worker holds several requests at once.
                connection.send(build_request("GET", "/?sleep=0.01"))
                status = connection.response().status
            except OSError:  # not listening yet
                if connection is not None:
                    connection.close()
                connection = None
                time.sleep(0.005)
                continue
            with lock:
                statuses[status] += 1
        if connection is not None:
            connection.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.2)  # the clients knock before the proxy listens
        launcher.proxy(text, workers=2)
        time.sleep(2.0)  # what was the ramp's first 40%
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert statuses[200] > 200, statuses
    assert set(statuses) == {200}, statuses
