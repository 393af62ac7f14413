"""Issue 9, finding 8: ``speedloader-tui --web`` lets in only who holds its token, takes
websockets only from its own page, and never runs as root.

The server runs as the group member sl-test-admin, so a dashboard it starts could act
on the daemon: each attack asserts it is refused AND that no dashboard process was
started (the server has no child, and its log names no app process).
"""

from __future__ import annotations

import base64
import http.client
import os
import pwd
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from speedloader_lab.sandbox import REPO

from ..buslab import ADMIN
from ..test_tui_web import CHROMIUM, CHROMIUM_FLAGS, _need_chromium
from ..tui_web import WebServer, free_port


@pytest.fixture
def web(daemon) -> Iterator[WebServer]:
    server = WebServer(daemon.address, user=ADMIN)
    uid = next(
        line.split()[2]  # the effective uid
        for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines()
        if line.startswith("Uid:")
    )
    assert int(uid) == pwd.getpwnam(ADMIN).pw_uid, "the server must run as the group member"
    yield server
    server.stop()


@pytest.fixture
def browser():
    _need_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield b
        finally:
            b.close()


def handshake(ws_url: str, origin: str | None) -> int:
    """The status a websocket handshake to ``ws_url`` gets (101: the socket is open)."""
    url = urlsplit(ws_url)
    headers = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
    }
    if origin is not None:
        headers["Origin"] = origin
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=60)
    try:
        conn.request("GET", f"{url.path}?{url.query}", headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


def assert_no_dashboard_started(web: WebServer) -> None:
    assert web.children() == [], f"a dashboard process was started: {web.children()}"
    started = [line for line in web.log if "app process" in line]
    assert started == [], started


def test_no_token_is_refused_and_starts_nothing(web, browser):
    context = browser.new_context()
    page = context.new_page()
    for path in ("/", "/static/js/textual.js"):
        response = page.goto(web.url + path)
        assert response is not None and response.status == 403, (path, response)
        assert "open the URL that speedloader-tui --web printed" in page.content()
        assert web.token not in page.content()
        web.expect(rf"refused GET {path}: no token or cookie")
    assert context.cookies() == []

    assert handshake(web.ws_url(token=False), origin=web.url) == 403
    web.expect(r"refused GET /ws: no token or cookie")
    assert_no_dashboard_started(web)


def test_a_wrong_token_is_refused_and_sets_no_cookie(web, browser):
    wrong = web.token[:-1] + ("A" if web.token[-1] != "A" else "B")  # one character off
    context = browser.new_context()
    page = context.new_page()
    response = page.goto(f"{web.url}/?token={wrong}")
    assert response is not None and response.status == 403
    web.expect(r"refused GET /: wrong token")
    assert context.cookies() == []
    # Nor does the wrong token leave anything behind that a second visit could use.
    response = page.goto(web.url + "/")
    assert response is not None and response.status == 403
    web.expect(r"refused GET /: no token or cookie")
    assert_no_dashboard_started(web)


class _ForeignPage(BaseHTTPRequestHandler):
    """A page on another loopback port that tries to drive the dashboard's websocket."""

    ws_url = ""

    def do_GET(self) -> None:
        body = f"""<!DOCTYPE html><title>elsewhere</title><script>
window.result = new Promise(resolve => {{
  const ws = new WebSocket("{self.ws_url}");
  ws.onopen = () => {{ resolve("open"); ws.close(); }};
  ws.onclose = event => resolve("closed " + event.code);
}});
</script>""".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def foreign_site(web) -> Iterator[str]:
    handler = type("Foreign", (_ForeignPage,), {"ws_url": f"ws://127.0.0.1:{web.port}/ws"})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_websocket_from_a_foreign_origin_is_refused_even_with_the_cookie(
    web, browser, foreign_site
):
    context = browser.new_context()
    # The admin opened the dashboard's URL once: this browser holds its cookie. (Through
    # the context's own request client, which shares its cookies, so that no page of the
    # dashboard runs yet and the count of dashboard processes stays at 0.)
    traded = context.request.get(web.token_url, max_redirects=0)
    assert traded.status == 303 and traded.headers["location"] == "/"
    assert [c["name"] for c in context.cookies(web.url)] == [f"speedloader-dashboard-{web.port}"]

    # A page elsewhere on loopback (another local user's server, or a tunnelled one)
    # opens the dashboard's websocket: the browser attaches the cookie (cookies are not
    # kept apart by port), only the Origin check stands between it and a dashboard.
    page = context.new_page()
    page.goto(foreign_site + "/")
    assert page.evaluate("window.result") == "closed 1006"
    origin = web.expect(r"refused websocket from origin (\S+)").group(1)
    assert origin == foreign_site  # refused for its origin: the cookie itself was let in
    assert_no_dashboard_started(web)

    # Control: the very same script on the dashboard's own origin gets its websocket.
    own = context.new_page()
    own.goto(web.url + "/static/css/xterm.css")
    opened = own.evaluate(
        """url => new Promise(resolve => {
            const ws = new WebSocket(url);
            ws.onopen = () => { resolve("open"); ws.close(); };
            ws.onclose = event => resolve("closed " + event.code);
        })""",
        f"ws://127.0.0.1:{web.port}/ws",
    )
    assert opened == "open"
    pid = int(web.expect(r"app process (\d+) started").group(1))
    web.expect(rf"app process {pid} ended")


def test_a_websocket_without_origin_is_refused(web):
    """Browsers always send an Origin on websockets; a request without one is not from a
    page, and the token alone does not change that."""

    assert handshake(web.ws_url(token=True), origin=None) == 403
    web.expect(r"refused websocket from origin \(none\)")
    assert_no_dashboard_started(web)


def test_root_may_not_serve_the_dashboard(daemon):
    port = free_port()
    r = subprocess.run(
        [sys.executable, "-m", "speedloader_tui", "--web", "--port", str(port)]
        + ["--bus", daemon.address],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert r.returncode == 2, r
    assert r.stderr.strip().splitlines() == [
        "speedloader-tui: refusing to serve the dashboard as root: whoever drives the page "
        "would act as root on the daemon; run it as a user in the 'speedloader' group."
    ]
    with pytest.raises(ConnectionRefusedError):  # it never listened
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
