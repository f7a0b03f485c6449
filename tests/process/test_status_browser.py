"""The status page in a real browser: headless Chromium against a running master with traffic.

One Chromium start per test. The first reads the page as Chromium rendered it
(``--dump-dom``) and saves a screenshot; the others drive the page over the
DevTools protocol (its websocket, through aiohttp) to press its buttons.
Screenshots go to ``$PITCHER_ARTIFACTS`` (default: the test's tmp_path).
Without Chromium the tests are skipped, unless PITCHER_REQUIRE_CHROMIUM is set.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from tests.process.test_master import admin
from tests.process.test_status import TOKEN, StatusSite, break_a_node, start_site
from tests.proxy.conftest import Launcher, get, wait_until

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
)


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("PITCHER_REQUIRE_CHROMIUM"):
        pytest.fail("PITCHER_REQUIRE_CHROMIUM is set but Chromium is not installed")
    pytest.skip("Chromium is not installed (apt-get install -y chromium)")


def artifact(tmp_path: Path, name: str) -> Path:
    folder = Path(os.environ.get("PITCHER_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


class Rows(HTMLParser):
    """Table rows with a data-kind attribute: their attributes, cells' values and text."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, Any]] = []
        self._row: dict[str, Any] | None = None
        self._depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "tr" and "data-kind" in found:
            self._row = {"attrs": found, "text": "", "fields": {}}
            self.rows.append(self._row)
        elif tag == "td" and self._row is not None and "data-field" in found:
            self._row["fields"][found["data-field"]] = found.get("data-value")

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._row is not None:
            self._row["text"] += data + " "

    def find(self, kind: str, **attrs: str) -> dict[str, Any]:
        for row in self.rows:
            found = row["attrs"]
            wanted = all(found.get(f"data-{k}") == v for k, v in attrs.items())
            if found["data-kind"] == kind and wanted:
                return row
        raise AssertionError(f"no {kind} row with {attrs} in {[r['attrs'] for r in self.rows]}")


def test_the_page_shows_an_ejected_node_a_module_switched_off_and_traffic(
    launcher: Launcher, tmp_path: Path
) -> None:
    browser = chromium()
    site = start_site(launcher, workers=1)
    break_a_node(site)
    assert admin(site.admin_port, "/admin/modules/request_id/disable", "POST")[0] == 200
    for index in range(30):
        assert get(site.proxy, f"/api/{index}").status == 200
    shot = artifact(tmp_path, "status-page.png")
    started = time.monotonic()
    result = subprocess.run(
        [
            browser,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            # Virtual time: the page's first poll and render, without waiting out its timer.
            "--virtual-time-budget=1500",
            f"--screenshot={shot}",
            "--dump-dom",
            f"http://127.0.0.1:{site.admin_port}/",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    print(f"status page screenshot: {shot} (Chromium ran {time.monotonic() - started:.1f} s)")
    assert result.returncode == 0, result.stderr[-2000:]
    assert shot.stat().st_size > 10_000
    dom = result.stdout
    assert 'data-loaded="1"' in dom, dom[-3000:]
    rows = Rows()
    rows.feed(dom)

    node = rows.find("node", uri=site.doomed.uri)
    assert node["attrs"]["data-state"] == "ejected"
    assert "ejected" in node["text"]
    assert rows.find("node", uri=site.live.uri)["attrs"]["data-state"] == "in_service"
    module = rows.find("module", name="request_id")
    assert module["attrs"]["data-state"] == "off"
    assert "Turn on" in module["text"]
    assert rows.find("module", name="metrics")["attrs"]["data-state"] == "on"
    route = rows.find("route", name="api")
    assert float(route["fields"]["rps"]) > 0
    assert rows.find("worker", index="0")
    assert rows.find("business", name="shop")


# -- driving the page over the DevTools protocol ------------------------------------


class Page:
    """One tab, spoken to over the DevTools protocol's websocket."""

    def __init__(self, socket: Any) -> None:
        self.socket = socket
        self.next_id = 0

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        ident = self.next_id
        await self.socket.send_str(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads((await self.socket.receive(timeout=10)).data)
            if message.get("id") == ident:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return dict(message["result"])

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, condition: str, timeout: float = 5.0) -> Any:
        """Poll a JavaScript expression in the page until it is truthy."""
        milliseconds = int(timeout * 1000)
        return await self.evaluate(
            f"new Promise((ok, fail) => {{ const end = Date.now() + {milliseconds};"
            f" (function check() {{ let v; try {{ v = ({condition}); }} catch (e) {{ v = null; }}"
            f" if (v) ok(v); else if (Date.now() > end)"
            f" fail(new Error('timed out: ' + {json.dumps(condition)}));"
            " else setTimeout(check, 25); })(); })"
        )

    async def screenshot(self, path: Path) -> None:
        shot = await self.send("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))
        print(f"status page screenshot: {path}")


@asynccontextmanager
async def open_page(browser: str, profile: Path, url: str) -> AsyncIterator[Page]:
    import aiohttp

    process = subprocess.Popen(
        [
            browser,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Chromium writes the port it took here once it listens.
        port_file = profile / "DevToolsActivePort"
        wait_until(lambda: port_file.exists() and port_file.read_text().strip(), 10.0, "DevTools")
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as answer:
                tabs = [t for t in await answer.json() if t.get("type") == "page"]
            async with session.ws_connect(tabs[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page = Page(ws)
                await page.send("Page.enable")
                await page.send("Page.navigate", url=url)
                yield page
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_the_buttons_act_only_once_confirmed(launcher: Launcher, tmp_path: Path) -> None:
    browser = chromium()
    site = start_site(launcher, workers=1)
    base = f"http://127.0.0.1:{site.admin_port}"

    def module_on() -> bool:
        _, body = admin(site.admin_port, "/admin/modules")
        return next(m for m in body["workers"][0]["modules"] if m["name"] == "request_id")[
            "enabled"
        ]

    async def drive() -> list[str]:
        async with open_page(browser, tmp_path / "profile", base + "/") as page:
            await page.wait_for("document.body.dataset.loaded === '1'")
            button = "document.querySelector('tr[data-name=\"request_id\"] button')"
            # Cancelled: nothing is sent.
            await page.evaluate(f"window.confirm = () => false; {button}.click(); true")
            await asyncio.sleep(0.3)
            assert module_on()
            await page.evaluate(
                "window.asked = []; window.confirm = (q) => { window.asked.push(q); return true; };"
                f" {button}.click(); true"
            )
            await page.wait_for(
                "document.querySelector('tr[data-name=\"request_id\"]').dataset.state === 'off'"
            )
            assert not module_on()
            # Drain the second node from its row's button.
            uri = json.dumps(site.doomed.uri)
            await page.evaluate(
                f"document.querySelector('tr[data-kind=\"node\"][data-uri=' + JSON.stringify({uri})"
                " + '] button').click(); true"
            )
            await page.wait_for(
                f"document.querySelector('tr[data-uri=' + JSON.stringify({uri}) + ']')"
                ".dataset.state === 'draining'"
            )
            await page.wait_for("document.getElementById('message').textContent")
            await page.screenshot(artifact(tmp_path, "status-page-actions.png"))
            return list(await page.evaluate("window.asked"))

    module, node = asyncio.run(drive())
    assert "request_id" in module and "off" in module
    assert site.doomed.uri in node and "Drain" in node
    _, clusters = admin(site.admin_port, "/admin/clusters")
    assert clusters["clusters"]["api"]["draining"] == [site.doomed.uri]


def test_strings_from_the_server_are_shown_as_text(launcher: Launcher, tmp_path: Path) -> None:
    browser = chromium()
    site = start_site(launcher, workers=1)
    # A node URI with markup in it: a Unix socket path may hold any character but NUL.
    hostile = "unix:///tmp/<img src=x onerror=window.pwned=1>.sock"
    code, body = admin_post(site, "/admin/clusters/api/nodes", {"uri": hostile})
    assert code == 201, body

    async def drive() -> tuple[Any, Any, Any]:
        url = f"http://127.0.0.1:{site.admin_port}/"
        async with open_page(browser, tmp_path / "profile", url) as page:
            await page.wait_for("document.body.dataset.loaded === '1'")
            return (
                await page.evaluate("window.pwned === undefined"),
                await page.evaluate("document.querySelectorAll('img').length"),
                await page.evaluate(
                    "[...document.querySelectorAll('tr[data-kind=node] td.uri')]"
                    ".map(td => td.textContent)"
                ),
            )

    untouched, images, shown = asyncio.run(drive())
    assert untouched is True and images == 0
    assert hostile in shown


def admin_post(site: StatusSite, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{site.admin_port}{path}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_page_asks_for_the_token_once_and_sends_it(launcher: Launcher, tmp_path: Path) -> None:
    browser = chromium()
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    site = start_site(launcher, workers=1, token_file=token_file)
    headers = {"authorization": f"Bearer {TOKEN}"}

    def submit(token: str) -> str:
        return (
            f"document.getElementById('token').value = {json.dumps(token)};"
            " document.getElementById('login').requestSubmit(); true"
        )

    async def drive() -> tuple[Any, Any]:
        url = f"http://127.0.0.1:{site.admin_port}/"
        async with open_page(browser, tmp_path / "profile", url) as page:
            await page.wait_for("document.getElementById('login').className === 'shown'")
            assert await page.evaluate("document.getElementById('page').style.display") == "none"
            await page.evaluate(submit("not-the-token-at-all"))
            await page.wait_for(
                "document.getElementById('login-error').textContent.includes('refused')"
            )
            await page.evaluate(submit(TOKEN))
            await page.wait_for("document.body.dataset.loaded === '1'")
            # An action carries the token too.
            await page.evaluate(
                "window.confirm = () => true;"
                " document.querySelector('tr[data-name=\"request_id\"] button').click(); true"
            )
            await page.wait_for(
                "document.querySelector('tr[data-name=\"request_id\"]').dataset.state === 'off'"
            )
            # Kept for this tab only: a reload does not ask again.
            await page.send("Page.reload")
            await page.wait_for("document.body.dataset.loaded === '1'")
            return (
                await page.evaluate("sessionStorage.getItem('pitcher.admin.token')"),
                await page.evaluate("document.getElementById('login').className"),
            )

    stored, login = asyncio.run(drive())
    assert stored == TOKEN and login == ""
    request = urllib.request.Request(
        f"http://127.0.0.1:{site.admin_port}/admin/modules", headers=headers
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        modules = json.loads(response.read())["workers"][0]["modules"]
    assert not next(m for m in modules if m["name"] == "request_id")["enabled"]
