"""``speedloader-tui --web`` in a real browser (Debian's Chromium, driven by Playwright
with the system browser), and its sessions' processes when browsers come and go. The
server runs as the group member sl-test-admin, as it must (it refuses root); the attacks
on it (no token, a wrong one, a foreign Origin, root) are in tests/security/test_web.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from speedloader_lab.sandbox import REPO

from .tui_web import ARTIFACTS, WebServer, free_port, processes_in_group

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _need_chromium() -> None:
    if shutil.which(CHROMIUM) is None:
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's 'chromium' package (scripts/setup does); "
            "the browser test cannot run without it",
            pytrace=False,
        )


@pytest.fixture
def web(daemon):
    server = WebServer(daemon.address)
    yield server
    server.stop()


def test_browser_shows_the_dashboard_keys_reach_it_nothing_external(web):
    _need_chromium()
    from playwright.sync_api import sync_playwright

    requests: list[str] = []
    external: list[str] = []
    sent: list[str] = []
    received = bytearray()

    def route(r) -> None:
        url = r.request.url
        requests.append(url)
        if url.startswith(web.url + "/") or url.startswith(f"ws://127.0.0.1:{web.port}/"):
            r.continue_()
        else:
            external.append(url)
            r.abort()

    def on_received(payload) -> None:
        received.extend(payload if isinstance(payload, bytes) else payload.encode())

    def seen(text: str):
        return lambda _payload: text.encode() in received

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.route("**/*", route)
            with page.expect_websocket(timeout=60_000) as ws_info:
                page.goto(web.token_url)
            ws = ws_info.value
            # The token was traded for a cookie and is gone from the address bar.
            assert page.url == web.url + "/", page.url
            (cookie,) = page.context.cookies()
            assert cookie["value"] == web.token and cookie["httpOnly"], cookie
            assert cookie["sameSite"] == "Strict" and cookie["path"] == "/", cookie
            ws.on("framesent", lambda payload: sent.append(payload))
            ws.on("framereceived", on_received)
            # The dashboard has drawn the Models tab once the COLD column's title arrives.
            ws.wait_for_event("framereceived", predicate=seen("COLD"), timeout=60_000)
            page.locator("#terminal").click()
            page.keyboard.press("2")
            ws.wait_for_event("framereceived", predicate=seen("Disconnect"), timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "tui-web.png"))
        finally:
            browser.close()

    stdin = [json.loads(f)[1] for f in sent if isinstance(f, str) and f.startswith('["stdin"')]
    assert "2" in stdin, f"the key never went over the websocket: {sent[:20]}"
    assert b"tiny:1b" in received and b"Disconnect" in received
    assert external == [], f"the page asked for something elsewhere: {external}"
    assert any(u.endswith("/static/js/textual.js") for u in requests)
    assert (ARTIFACTS / "tui-web.png").stat().st_size > 0
    # Its tab closed, the session's dashboard process is gone.
    pid = int(web.expect(r"app process (\d+) started").group(1))
    web.expect(rf"app process {pid} ended")
    assert processes_in_group(pid) == []


async def _connect_and_leave(web: WebServer, wait_for_first_byte: bool) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(web.ws_url(), headers={"Origin": web.url}) as ws,
    ):
        if wait_for_first_byte:
            await asyncio.wait_for(ws.receive(), 60)
        await ws.close()


@pytest.mark.parametrize("when", ["before the app started", "after its first output"])
def test_a_browser_leaving_leaves_no_dashboard_process(web, when):
    asyncio.run(_connect_and_leave(web, wait_for_first_byte=when != "before the app started"))
    pid = int(web.expect(r"app process (\d+) started").group(1))
    how = web.expect(rf"app process {pid} ended \((\w+)").group(1)
    assert processes_in_group(pid) == [], f"dashboard {pid} outlived its session"
    assert how in ("quit", "terminated", "killed")
    print(f"[{when}] dashboard {pid} ended: {how}")


def test_stopping_the_server_ends_every_session(web):
    async def hold_a_session() -> None:
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(web.ws_url(), headers={"Origin": web.url}) as ws,
        ):
            await asyncio.wait_for(ws.receive(), 60)  # the app is up and drawing
            pid = int(web.expect(r"app process (\d+) started").group(1))
            assert processes_in_group(pid) == [pid]
            assert await asyncio.to_thread(web.stop) == 0
            hold_a_session.pid = pid  # type: ignore[attr-defined]

    asyncio.run(hold_a_session())
    pid = hold_a_session.pid  # type: ignore[attr-defined]
    assert processes_in_group(pid) == []
    assert any(f"app process {pid} ended" in line for line in _drain(web)), web.log[-10:]


def _drain(web: WebServer) -> list[str]:
    lines = list(web.log)
    while True:
        line = web.lines.get(timeout=30)
        if line is None:
            return lines
        lines.append(line)


STOCK_SERVER = """
import sys
from textual_serve.server import Server
Server(sys.argv[1], host="127.0.0.1", port=int(sys.argv[2])).serve()
"""


async def _session_then_kill_server(ws_url: str, origin: str, server_pid: int) -> list[int]:
    """Open a session, wait for the app's first output, SIGKILL the server; return the
    server's children as they were before the kill."""
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(ws_url, headers={"Origin": origin}) as ws,
    ):
        await asyncio.wait_for(ws.receive(), 60)
        children = [
            int(p)
            for p in Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
        ]
        os.kill(server_pid, signal.SIGKILL)
        return children


def _gone(pid: int, timeout: float = 30) -> bool:
    """Wait (on the pid's own file descriptor) for ``pid`` to end; True if it did."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def test_a_killed_server_takes_its_dashboards_along(web):
    (app,) = asyncio.run(_session_then_kill_server(web.ws_url(), web.url, web.proc.pid))
    web.proc.wait(timeout=30)
    assert _gone(app), f"dashboard {app} outlived its SIGKILLed server"


def test_control_stock_textual_serve_leaves_a_dashboard_behind(daemon, tmp_path):
    """The control for the test above: with textual-serve's own server the dashboard
    survives a killed server, so that test can fail."""
    script = tmp_path / "stock_serve.py"
    script.write_text(STOCK_SERVER)
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            str(script),
            f"{sys.executable} -m speedloader_tui --bus {daemon.address}",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_for_port(port, server)
        ws_url = url.replace("http:", "ws:") + "/ws?width=100&height=30"
        children = asyncio.run(_session_then_kill_server(ws_url, url, server.pid))
        server.wait(timeout=30)
        assert children, "the stock server started no app"
        left = [pid for pid in _descendants_of(children) if not _gone(pid, timeout=3)]
        assert left, "the stock server cleaned up after all: the test above proves nothing"
    finally:
        for pid in _descendants_of(children if "children" in locals() else []):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if server.poll() is None:
            server.kill()


def _descendants_of(pids: list[int]) -> list[int]:
    out = []
    todo = list(pids)
    while todo:
        pid = todo.pop()
        out.append(pid)
        kids = Path(f"/proc/{pid}/task/{pid}/children")
        if kids.exists():
            todo += [int(p) for p in kids.read_text().split()]
    return out


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    """The stock server says nothing when it is ready: connect until it accepts."""
    import socket
    import time

    end = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > end:
                raise AssertionError(f"stock server on {port} never listened") from None
            select.select([], [], [], 0.05)  # back off briefly before the next try
