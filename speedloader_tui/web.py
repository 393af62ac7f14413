"""``speedloader-tui --web``: the same dashboard served to browsers by textual-serve.

Each browser tab gets its own dashboard process, run as the user who runs this server,
so polkit judges that user: whoever drives the page acts with that user's rights. Hence:

- it never runs as root (exit 2);
- every request needs this server's secret: a random token, printed once in the URL the
  server announces. A request carrying it gets an HttpOnly, SameSite=Strict cookie and a
  redirect to the same URL without the token (so it does not stay in the history); every
  later request is let in by that cookie. No or a wrong token or cookie: 403, and no
  handler runs, so no dashboard process is started;
- a websocket whose Origin is not this server's own (the page's scheme://host:port, as
  the Host header or --public-url says) is refused, and so is one without an Origin:
  browsers always send it, so a page elsewhere cannot drive a dashboard even though the
  browser attaches the cookie (cookies are not kept apart by port).

What textual-serve leaves to us, done here:
- a page that loads nothing from elsewhere (its stock page fetches a font from a
  third-party CDN): ``templates/app_index.html`` uses the fonts textual-serve ships;
- no dashboard process outlives its browser tab, whenever the tab goes: a session that
  ends (even while the app is still starting) asks the app to quit, and after a grace
  period kills its process group; the server's shutdown does the same for every session;
  and each app gets SIGTERM if the server itself dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hmac
import ipaddress
import logging
import os
import secrets
import shlex
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from aiohttp import web
from textual_serve.app_service import AppService
from textual_serve.server import Server, to_int

log = logging.getLogger("speedloader-tui.web")

TEMPLATES = Path(__file__).parent / "templates"
QUIT_GRACE_S = 5.0  # for the app to quit when asked, before it is killed
TERM_GRACE_S = 3.0  # between SIGTERM and SIGKILL
_PR_SET_PDEATHSIG = 1
TOKEN_PARAM = "token"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

NEEDS_TOKEN = (
    "This Speedloader dashboard needs its access token: open the URL that "
    "speedloader-tui --web printed when it started (it ends in ?token=...)."
)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the server dies, however it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class DashboardSession(AppService):
    """One browser tab's dashboard process, which is ended when the session ends."""

    def __init__(self, argv: list[str], **kw: Any):
        super().__init__(shlex.join(argv), **kw)
        self.argv = argv

    async def _open_app_process(self, width: int = 80, height: int = 24) -> Any:
        # exec, not a shell: the pid we hold is the app's, and its group is its own.
        self._process = process = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self._build_environment(width=width, height=height),
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        assert process.stdin is not None
        self._stdin = process.stdin
        log.info("session %s: app process %d started", self.app_service_id[:8], process.pid)
        return process

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def stop(self) -> None:
        """Ask the app to quit; kill it if it has not within the grace period."""
        try:
            await asyncio.wait_for(self._quit(), QUIT_GRACE_S)
        except Exception as err:  # a dead pipe, a timeout: the process is reaped below
            log.info("session %s: no clean quit (%r)", self.app_service_id[:8], err)
        finally:
            await self._reap()

    async def _quit(self) -> None:
        await super().stop()  # sends "quit", waits for the app's output to end
        if self._process is not None:
            await self._process.wait()

    async def _reap(self) -> None:
        process = self._process
        if process is None:
            return
        how = "quit"
        if process.returncode is None:
            how = "terminated"
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), TERM_GRACE_S)
            except TimeoutError:
                how = "killed"
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._process is not None:
            log.info(
                "session %s: app process %d ended (%s, exit %s)",
                self.app_service_id[:8],
                process.pid,
                how,
                process.returncode,
            )
        self._process = None


def _origin(url: str) -> str:
    """``scheme://host[:port]`` of ``url``, as a browser writes it in an Origin header."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def _forbidden(text: str) -> web.Response:
    return web.Response(status=403, text=text + "\n", content_type="text/plain")


class DashboardServer(Server):
    def __init__(
        self,
        argv: list[str],
        host: str,
        port: int,
        public_url: str | None = None,
        token: str | None = None,
    ):
        super().__init__(
            shlex.join(argv),
            host=host,
            port=port,
            title="Speedloader",
            public_url=public_url,
            templates_path=TEMPLATES,
        )
        self.argv = argv
        self.sessions: set[DashboardSession] = set()
        self.token = token or secrets.token_urlsafe(32)
        # Cookies are not kept apart by port: one name per port, so that two dashboards on
        # one host (two users, two ports) do not overwrite each other's cookie.
        self.cookie = f"speedloader-dashboard-{port}"
        public = urlsplit(self.public_url)
        self.base_path = public.path.rstrip("/")  # a reverse proxy's prefix, if any
        self.secure = public.scheme == "https"

    @property
    def token_url(self) -> str:
        """The URL to open: the one place the token is ever shown."""
        return f"{self.public_url.rstrip('/')}/?{TOKEN_PARAM}={self.token}"

    def _is_token(self, given: str | None) -> bool:
        if not given:
            return False
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _allowed_origin(self, request: web.Request) -> bool:
        """The websocket's Origin is the page's own: the origin the browser used to reach
        this server (its Host header) or, behind a proxy, the --public-url's."""
        origin = request.headers.get("Origin", "").lower()
        if not origin:
            return False
        return origin in (_origin(self.public_url), f"{request.scheme}://{request.host}".lower())

    @web.middleware
    async def guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Let a request reach textual-serve's handlers only with this server's secret
        (and, for the websocket, from this server's own page)."""
        given = request.query.get(TOKEN_PARAM)
        if given is not None:
            if not self._is_token(given):
                log.warning("refused %s %s: wrong token", request.method, request.path)
                return _forbidden(NEEDS_TOKEN)
        elif not self._is_token(request.cookies.get(self.cookie)):
            log.warning("refused %s %s: no token or cookie", request.method, request.path)
            return _forbidden(NEEDS_TOKEN)
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        if (upgrade or request.path == "/ws") and not self._allowed_origin(request):
            origin = request.headers.get("Origin", "(none)")
            log.warning("refused websocket from origin %s", origin)
            return _forbidden("This dashboard accepts websockets from its own page only.")
        if given is not None and not upgrade and request.path != "/ws":
            # Trade the token for a cookie, and take the token out of the address bar.
            rest = [(k, v) for k, v in request.query.items() if k != TOKEN_PARAM]
            location = self.base_path + request.path + (f"?{urlencode(rest)}" if rest else "")
            response = web.Response(status=303, headers={"Location": location})
            response.set_cookie(
                self.cookie,
                self.token,
                path="/",
                httponly=True,
                samesite="Strict",
                secure=self.secure,
            )
            return response
        return await handler(request)

    async def _make_app(self) -> web.Application:
        app = await super()._make_app()
        app.middlewares.append(self.guard)
        return app

    async def on_startup(self, app: web.Application) -> None:
        pass  # textual-serve prints a banner here, before the port is even open

    def serve(self, debug: bool = False) -> None:
        self.debug = debug
        self.initialize_logging()
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        # No access log: the first request's line would carry the token.
        runner = web.AppRunner(await self._make_app(), handle_signals=False, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
            # Said once the port accepts connections: scripts and tests may wait for it.
            log.info("serving the Speedloader dashboard on %s", self.token_url)
            stopping = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stopping.set)
            await stopping.wait()
            log.info("stopping: ending %d session(s)", len(self.sessions))
        finally:
            await runner.cleanup()  # on_shutdown ends every session

    async def on_shutdown(self, app: web.Application) -> None:
        await asyncio.gather(*(s.stop() for s in list(self.sessions)), return_exceptions=True)

    async def handle_websocket(self, request: web.Request) -> web.WebSocketResponse:
        """textual-serve's handler, with a session that is always ended, even when the
        browser goes away while the app is still starting."""
        websocket = web.WebSocketResponse(heartbeat=15)
        width = to_int(request.query.get("width", "80"), 80)
        height = to_int(request.query.get("height", "24"), 24)
        session: DashboardSession | None = None
        try:
            await websocket.prepare(request)
            session = DashboardSession(
                self.argv,
                write_bytes=websocket.send_bytes,
                write_str=websocket.send_str,
                close=websocket.close,
                download_manager=self.download_manager,
                debug=self.debug,
            )
            self.sessions.add(session)
            await session.start(width, height)
            await self._process_messages(websocket, session)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("session failed")
        finally:
            if session is not None:
                # Shielded: a second cancellation must not leave the process behind.
                ending = asyncio.ensure_future(session.stop())
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(ending)
                self.sessions.discard(session)
            with contextlib.suppress(Exception):
                await websocket.close()
        return websocket

    def initialize_logging(self) -> None:
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s %(name)s: %(message)s",
            stream=sys.stderr,
        )


def _is_loopback(host: str) -> bool:
    try:
        return all(
            ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None)
        )
    except (OSError, ValueError):
        return False


def serve(host: str, port: int, bus: str | None, public_url: str | None = None) -> int:
    if os.geteuid() == 0:
        print(
            "speedloader-tui: refusing to serve the dashboard as root: whoever drives the "
            "page would act as root on the daemon; run it as a user in the 'speedloader' "
            "group.",
            file=sys.stderr,
        )
        return 2
    if not _is_loopback(host) and not (public_url or "").startswith("https:"):
        print(
            f"speedloader-tui: warning: serving on {host} without TLS: the token and the "
            "session travel in clear text; put a TLS reverse proxy in front "
            "(--public-url https://...)",
            file=sys.stderr,
        )
    argv = [sys.executable, "-m", "speedloader_tui"]
    if bus:
        argv += ["--bus", bus]
    server = DashboardServer(argv, host, port, public_url)
    server.serve()
    return 0
