"""The status page's shell and its JSON (/admin/status), against a real master and workers."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.process.test_master import admin, admin_port
from tests.proxy.conftest import Backend, Launcher, Proxy, get, toml_config, wait_until

# request_id is on by default: the module the tests switch off.
MODULES = """
[modules.metrics]

[modules.throttle]
rate = 5000
concurrency = 200

[modules.throttle.business.shop]
rate = 2000
concurrency = 50

[modules.throttle.business.tiny]
rate = 1
burst = 1
"""


@dataclass
class StatusSite:
    proxy: Proxy
    admin_port: int
    live: Backend
    doomed: Backend


def start_site(launcher: Launcher, workers: int, token_file: Path | None = None) -> StatusSite:
    """A proxy with one cluster of two echo nodes, health checks, metrics and the throttle."""
    live = launcher.echo_backend("tcp")
    doomed = launcher.echo_backend("tcp")
    health = {"consecutive_failures": 2, "ejection_time": 60.0, "slow_start": 0.0}
    config = toml_config(
        [
            {"name": "api", "prefix": "/api/", "cluster": "api", "business": "shop"},
            {"name": "tiny", "prefix": "/tiny/", "cluster": "api", "business": "tiny"},
        ],
        {"api": {"nodes": [live.uri, doomed.uri], "health": health}},
        server={"drain_timeout": 1.0},
    )
    if token_file is not None:
        admin_table = '[admin]\nlisten = "127.0.0.1:0"\n'
        assert admin_table in config
        config = config.replace(admin_table, admin_table + f'token_file = "{token_file}"\n')
    proxy = launcher.proxy(config + MODULES, workers=workers)
    return StatusSite(proxy, admin_port(proxy), live, doomed)


def break_a_node(site: StatusSite, requests: int = 30) -> None:
    """Kill one node's service and send traffic until the health book ejects it."""
    site.doomed.process.stop()
    for index in range(requests):
        # GETs are retried on the other node: the client sees no failure.
        assert get(site.proxy, f"/api/{index}").status == 200

    def ejected() -> bool:
        _, body = admin(site.admin_port, "/admin/clusters")
        nodes = body["clusters"]["api"]["health"]["nodes"]
        return nodes[site.doomed.uri]["state"] == "ejected"

    wait_until(ejected, 5.0, "the killed node's ejection")


def status(port: int) -> dict[str, Any]:
    code, body = admin(port, "/admin/status")
    assert code == 200, body
    return body


def fetch_page(port: int, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/", method=method)
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()


@pytest.fixture
def site(launcher: Launcher) -> StatusSite:
    return start_site(launcher, workers=2)


def test_the_page_is_one_self_contained_document(site: StatusSite) -> None:
    code, headers, body = fetch_page(site.admin_port)
    assert code == 200
    assert headers["content-type"] == "text/html; charset=utf-8"
    # The browser is told the page may load nothing from anywhere else.
    assert "default-src 'none'" in headers["content-security-policy"]
    assert "connect-src 'self'" in headers["content-security-policy"]
    page = body.decode()
    assert page.startswith("<!doctype html>")
    # Nothing external: no script or style files, no fonts, no images by URL.
    assert not re.search(r"<script[^>]+src=|<link|@import|url\(|@font-face", page)
    assert set(re.findall(r"https?://[^\s\"']+", page)) == {"http://www.w3.org/2000/svg"}
    # Data reaches the DOM as text only.
    assert "innerHTML" not in page and "outerHTML" not in page and "insertAdjacentHTML" not in page
    head_code, _, head_body = fetch_page(site.admin_port, "HEAD")
    assert (head_code, head_body) == (200, b"")


def test_status_reports_routes_nodes_modules_throttle_and_workers(site: StatusSite) -> None:
    break_a_node(site)
    for index in range(20):
        assert get(site.proxy, f"/api/more/{index}").status == 200
    assert get(site.proxy, "/nowhere").status == 404
    # A business over its quota: 429s, counted against it and not the whole proxy.
    tiny = [get(site.proxy, f"/tiny/{index}").status for index in range(6)]
    assert tiny.count(429) >= 3, tiny
    report = status(site.admin_port)

    routes = {route["name"]: route for route in report["routes"]}
    api = routes["api"]
    assert api["rps"] > 0
    assert (api["prefix"], api["cluster"], api["business"]) == ("/api/", "api", "shop")
    assert api["error_rate"] == 0.0
    assert 0 < api["p50"] <= api["p90"] <= api["p99"] < 5.0
    # The request no route took is counted under the empty name, as a client error.
    assert routes[""]["client_error_rate"] == 1.0

    (cluster,) = report["clusters"]
    assert cluster["name"] == "api" and cluster["health"] is True
    assert cluster["rps"] == pytest.approx(api["rps"] + routes["tiny"]["rps"], abs=0.01)
    assert cluster["routes"] == ["api", "tiny"]
    nodes = {node["uri"]: node for node in cluster["nodes"]}
    assert nodes[site.live.uri]["state"] == "in_service"
    doomed = nodes[site.doomed.uri]
    assert doomed["state"] == "ejected"
    assert 50.0 < doomed["ejected_for"] <= 60.0
    assert doomed["ejected_until"] == pytest.approx(time.time() + doomed["ejected_for"], abs=5)
    assert cluster["in_service_share"] == 0.5
    # The node numbers the metrics module reports: calls, failures in the window, in flight.
    live = nodes[site.live.uri]
    assert live["rps"] > 0 and live["failures"] == 0 and live["in_flight"] == 0
    assert live["connections"] >= 1
    assert doomed["failures"] >= 2 and doomed["failure_rate"] == 1.0

    throttle = report["throttle"]
    assert throttle["mode"] == "enforce" and throttle["enabled"] is True
    assert throttle["admitted_rps"] > 0 and throttle["refused_rps"] > 0
    assert (throttle["proxy"]["rate"], throttle["proxy"]["concurrency"]) == (5000, 200)
    assert throttle["proxy"]["in_flight"] == 0 and throttle["proxy"]["refused_rps"] == 0
    shop, small = throttle["businesses"]
    assert (shop["name"], shop["rate"], shop["concurrency"]) == ("shop", 2000, 50)
    assert shop["admitted_rps"] == pytest.approx(api["rps"], abs=0.01)
    assert shop["refused_rps"] == 0
    assert (small["name"], small["rate"], small["burst"]) == ("tiny", 1, 1)
    assert small["refused_rps"] == pytest.approx(tiny.count(429) / report["window"], rel=0.01)
    assert small["refused_rps"] == pytest.approx(throttle["refused_rps"], abs=0.01)
    assert routes["tiny"]["client_error_rate"] == pytest.approx(tiny.count(429) / 6, abs=0.01)

    workers = report["workers"]
    assert [w["index"] for w in workers] == [0, 1]
    assert len({w["pid"] for w in workers}) == 2
    assert all(w["config_current"] and w["shed"] == [] for w in workers)
    assert sum(w["requests"] for w in workers) >= 51
    assert all(w["lag"] >= 0 and w["connection_limit"] for w in workers)

    _, config = admin(site.admin_port, "/admin/config")
    assert report["config"]["checksum"] == config["checksum"]
    assert report["config"]["generation"] == 1
    assert report["config"]["workers_current"] == 2
    assert report["proxy"]["address"] == f"127.0.0.1:{site.proxy.port}"
    assert report["proxy"]["admin"] == f"127.0.0.1:{site.admin_port}"
    assert report["proxy"]["workers_answering"] == 2

    modules = {module["name"]: module for module in report["modules"]}
    assert set(modules) == {"request_id", "throttle", "metrics"}
    assert modules["request_id"]["enabled"] is True
    assert admin(site.admin_port, "/admin/modules/request_id/disable", "POST")[0] == 200
    modules = {module["name"]: module for module in status(site.admin_port)["modules"]}
    assert modules["request_id"]["enabled"] is False
    assert modules["request_id"]["enabled_workers"] == 0


def test_the_history_ring_fills_from_the_samples(site: StatusSite) -> None:
    deadline = time.monotonic() + 6.0
    history: dict[str, Any] = {}
    # Traffic until a sample interval has seen some: the ring holds rates, not totals.
    while time.monotonic() < deadline:
        for index in range(10):
            assert get(site.proxy, f"/api/{index}").status == 200
        history = status(site.admin_port)["history"]
        if any(rate > 0 for rate in history["rps"]):
            break
        time.sleep(0.2)
    assert history["interval"] == 2.0
    assert any(rate > 0 for rate in history["rps"]), history
    points = len(history["time"])
    assert len(history["routes"]["api"]["rps"]) == points
    assert set(history["workers"]) == {"0", "1"}
    assert all(len(series["lag"]) == points for series in history["workers"].values())
    # Stored as JSON numbers or null, nothing else (NaN would break the page's parser).
    json.dumps(history, allow_nan=False)


TOKEN = "status-page-test-token-0123456789"


def test_with_a_token_the_shell_is_open_and_its_data_is_not(
    launcher: Launcher, tmp_path: Path
) -> None:
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    site = start_site(launcher, workers=1, token_file=token_file)
    code, _, body = fetch_page(site.admin_port)
    assert code == 200 and b"sessionStorage" in body
    url = f"http://127.0.0.1:{site.admin_port}/admin/status"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=5)
    assert refused.value.code == 401
    request = urllib.request.Request(url, headers={"authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert json.loads(response.read())["config"]["generation"] == 1


def test_an_unknown_page_path_is_still_a_json_404(site: StatusSite) -> None:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{site.admin_port}/status.html", timeout=5)
    except urllib.error.HTTPError as error:
        assert error.code == 404
        assert "error" in json.loads(error.read())
    else:
        raise AssertionError("a path that is not the page answered")
