"""The dashboard in a real headless Chromium: it shows, in the allocation map, a group allocated through the API.

Needs Debian's ``chromium`` (``.ci/run`` installs it and sets COMPUTEGROUPS_REQUIRE_BROWSER=1, which turns
a missing browser into a failure instead of a skip). With COMPUTEGROUPS_SCREENSHOT_DIR set, the screenshot
is also written there (``docs/dashboard.png`` is made that way).
"""

from __future__ import annotations

import asyncio
import base64
import html.parser
import os
import re
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from computegroups.service import ComputeGroupsClient
from tests.test_service import served

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and os.environ.get("COMPUTEGROUPS_REQUIRE_BROWSER") == "1":
    raise RuntimeError("COMPUTEGROUPS_REQUIRE_BROWSER=1 but no chromium on PATH (apt-get install chromium)")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)")


class Browser:
    """Headless Chromium driven over the DevTools protocol (a websocket), as a user's browser loads the page."""

    def __init__(self, profile: Path) -> None:
        self.profile = profile
        self.proc: asyncio.subprocess.Process | None = None
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.ids = 0

    async def __aenter__(self) -> Browser:
        assert CHROMIUM is not None
        self.proc = await asyncio.create_subprocess_exec(
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={self.profile}",
            "--window-size=1400,900",
            "--remote-debugging-port=0",
            "about:blank",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        assert self.proc.stderr is not None
        while True:  # Chromium prints the DevTools address on stderr once it listens
            line = (await asyncio.wait_for(self.proc.stderr.readline(), 120)).decode()
            assert line, "chromium exited before listening"
            m = re.search(r"ws://127\.0\.0\.1:(\d+)/", line)
            if m:
                break
        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{m.group(1)}/json/list") as r:
            page = next(t for t in await r.json() if t["type"] == "page")
        self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=64 * 1024 * 1024)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.session is not None:
            await self.session.close()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        assert self.ws is not None
        self.ids += 1
        await self.ws.send_json({"id": self.ids, "method": method, "params": params})
        while True:
            msg = await asyncio.wait_for(self.ws.receive_json(), 120)
            if msg.get("id") == self.ids:
                assert "error" not in msg, msg
                return dict(msg["result"])

    async def evaluate(self, expression: str) -> Any:
        return (await self.call("Runtime.evaluate", expression=expression, returnByValue=True))["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float = 60.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not await self.evaluate(expression):
            assert asyncio.get_running_loop().time() < deadline, f"page never got: {expression}"
            await asyncio.sleep(0.2)


class _Map(html.parser.HTMLParser):
    """The map's cells: (node, GPU index) -> group ids drawn in that cell."""

    def __init__(self) -> None:
        super().__init__()
        self.node = ""
        self.cells: dict[tuple[str, int], list[str]] = {}
        self.unhealthy: set[tuple[str, int]] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr" and "node-row" in (a.get("class") or ""):
            self.node = a.get("data-node") or ""
        if tag == "div" and "gpu" in (a.get("class") or "").split():
            key = (self.node, int(a.get("data-gpu") or -1))
            self.cells[key] = (a.get("data-groups") or "").split()
            if "unhealthy" in (a.get("class") or ""):
                self.unhealthy.add(key)


async def test_the_map_shows_a_group_allocated_through_the_api(tmp_path: Path) -> None:
    async with served(tmp_path / "s.db", "pcie-pairs") as (_, url), ComputeGroupsClient(url) as cg:
        pair = await cg.allocate_compute_group("decode", {"gpus": 2})
        share = await cg.allocate_compute_group("embed", {"gpus": 0.5})
        async with Browser(tmp_path / "profile") as browser:
            await browser.call("Page.navigate", url=url + "/")
            await browser.wait_for(f"document.querySelector('#map [data-group=\"{pair.id}\"]') !== null")
            # A change made while the page is open arrives by the event stream, without a reload.
            spread = await cg.allocate_compute_group("prefill", {"gpus": 4}, {"strategy": "spread"})
            await browser.wait_for(f"document.querySelector('#map [data-group=\"{spread.id}\"]') !== null")
            page = _Map()
            page.feed(await browser.evaluate("document.documentElement.outerHTML"))
            shot = base64.b64decode((await browser.call("Page.captureScreenshot", format="png"))["data"])
        assert len(page.cells) == 16  # two 8-GPU nodes
        for index in pair.resources["gpu_indices"]:
            assert page.cells[(pair.node_id, index)] == [pair.id]
        assert page.cells[(share.node_id, share.resources["gpu_indices"][0])] == [share.id]
        drawn = {g for groups in page.cells.values() for g in groups}
        assert drawn == {g.id for g in await cg.list_compute_groups()}
        assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 10_000
        (tmp_path / "dashboard.png").write_bytes(shot)
        keep = os.environ.get("COMPUTEGROUPS_SCREENSHOT_DIR")
        if keep:
            (Path(keep) / "dashboard.png").write_bytes(shot)
