"""``speedloader-tui --web``: the same dashboard served to browsers by textual-serve.

Each browser tab gets its own dashboard process, run as the user who runs this server,
so polkit judges that user: serving as root hands root's rights to whoever reaches the
port. Hence the defaults: loopback only, and a refusal to listen elsewhere as root.

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
import ipaddress
import logging
import os
import shlex
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from aiohttp import web
from textual_serve.app_service import AppService
from textual_serve.server import Server, to_int

log = logging.getLogger("speedloader-tui.web")

TEMPLATES = Path(__file__).parent / "templates"
QUIT_GRACE_S = 5.0  # for the app to quit when asked, before it is killed
TERM_GRACE_S = 3.0  # between SIGTERM and SIGKILL
_PR_SET_PDEATHSIG = 1


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


class DashboardServer(Server):
    def __init__(self, argv: list[str], host: str, port: int, public_url: str | None = None):
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

    async def on_startup(self, app: web.Application) -> None:
        pass  # textual-serve prints a banner here, before the port is even open

    def serve(self, debug: bool = False) -> None:
        self.debug = debug
        self.initialize_logging()
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        runner = web.AppRunner(await self._make_app(), handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
            # Said once the port accepts connections: scripts and tests may wait for it.
            log.info("serving the Speedloader dashboard on %s", self.public_url)
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
    if os.geteuid() == 0 and not _is_loopback(host):
        print(
            f"speedloader-tui: refusing to serve on {host} as root: everyone who reaches "
            "the port would act as root on the daemon. Run it as a user in the "
            "'speedloader' group, or keep it on 127.0.0.1 and reach it through an SSH "
            "tunnel or an authenticating reverse proxy.",
            file=sys.stderr,
        )
        return 2
    argv = [sys.executable, "-m", "speedloader_tui"]
    if bus:
        argv += ["--bus", bus]
    server = DashboardServer(argv, host, port, public_url)
    server.serve()
    return 0
