"""How the metrics leave the daemon: HTTP ``GET /metrics`` (loopback TCP or a unix socket)
and the node_exporter textfile. Off unless the admin sets ``metrics`` in the config.

The HTTP server runs in threads of its own (``ThreadingHTTPServer``), so a scrape never
waits on the event loop nor holds it; each scrape renders the registry in its thread, as
the bus reads engine state through asyncio.to_thread.

Nothing here is a way in for a web page in the admin's browser: only ``GET /metrics`` is
answered, with the exposition as ``text/plain`` and ``nosniff``, no CORS header ever; a
request a browser made for a page (an ``Origin`` header, or ``Sec-Fetch-Site`` other than
``none``, which only an address typed by the admin sends) is refused; on loopback the
``Host`` header must name the loopback address, so a DNS-rebinding page (its own name
resolved to 127.0.0.1) reads nothing. The unix socket is root's, group ``speedloader``,
mode 0660. At most ``MAX_CONNECTIONS`` requests are served at once, each given
``REQUEST_TIMEOUT`` seconds: a local user holding connections open stalls no scrape for
long and no thread count grows without bound.

The textfile is written through roots.Root (temp name, fsync, rename), as node_exporter's
textfile collector requires: it must never read half a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import ipaddress
import logging
import secrets
import socket
import socketserver
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from .config import MetricsConfig, parse_listen
from .roots import Root, bind_unix_socket, check_trusted_dir, unlink_in_dir

log = logging.getLogger(__name__)

TEXTFILE_NAME = "speedloader.prom"  # node_exporter reads *.prom only; the temp name is not
SOCKET_GROUP = "speedloader"
SOCKET_MODE = 0o660
MAX_CONNECTIONS = 8
REQUEST_TIMEOUT = 10.0


def _is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback


class _Handler(BaseHTTPRequestHandler):
    server_version = "speedloaderd"
    sys_version = ""
    timeout = REQUEST_TIMEOUT
    error_content_type = "text/plain; charset=utf-8"
    error_message_format = "%(code)d %(message)s\n"
    server: _Serving  # type: ignore[assignment]

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        problem = self._refusal()
        if problem is not None:
            code, message = problem
            self.send_error(code, message)
            return
        try:
            body = self.server.render()
        except Exception:
            log.exception("rendering the metrics failed")
            self.send_error(500, "the metrics could not be read; see the daemon's log")
            return
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _refusal(self) -> tuple[int, str] | None:
        if self.path != "/metrics":
            return 404, "only /metrics is served here"
        if (
            self.headers.get("Origin") is not None
            or self.headers.get("Sec-Fetch-Site", "none") != "none"
        ):
            return 403, "metrics are not served to web pages"
        allowed = self.server.allowed_hosts
        if allowed is not None and self.headers.get("Host", "").lower() not in allowed:
            return 403, "this Host is not the address the metrics listen on"
        return None

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        log.debug("metrics request: " + format, *args)


class _Serving:
    """What the handler needs of its server (both kinds below carry it)."""

    render: Callable[[], bytes]
    allowed_hosts: set[str] | None
    slots: threading.BoundedSemaphore


class _Bounded(socketserver.ThreadingMixIn):
    """At most MAX_CONNECTIONS requests at a time; one more is closed at once."""

    daemon_threads = True
    slots: threading.BoundedSemaphore

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # type: ignore[attr-defined]
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class _TcpServer(_Bounded, ThreadingHTTPServer):
    pass


class _Tcp6Server(_TcpServer):
    address_family = socket.AF_INET6


class _UnixServer(_Bounded, socketserver.UnixStreamServer):
    pass


def _host_header_names(host: str, port: int) -> set[str]:
    """The Host headers a loopback listener accepts: its address as written, and
    ``localhost``, each with the port (an HTTP client always sends it for a port not 80)."""
    shown = f"[{host}]" if ":" in host else host
    return {f"{shown}:{port}", f"localhost:{port}"}


class MetricsExport:
    """Starts and stops what ``metrics`` in the config asks for; restarts on a change."""

    def __init__(self, render: Callable[[], bytes]):
        self.render = render
        self.config = MetricsConfig()
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._socket_path: Path | None = None
        self._textfile: asyncio.Task[None] | None = None
        self.address: tuple[str, int] | Path | None = None  # where it listens (tests read it)

    async def apply(self, config: MetricsConfig) -> None:
        """Serve as ``config`` says (nothing if it equals what runs). A failure (a port in
        use, an unsafe directory) is logged and leaves the daemon running without it."""
        if config == self.config:
            return
        await self.stop()
        self.config = config
        if config.listen is not None:
            try:
                await asyncio.to_thread(self._listen, config.listen)
            except (OSError, ValueError) as err:
                log.error("metrics not served at %s: %s", config.listen, err)
        if config.textfile_dir is not None:
            self._textfile = asyncio.get_running_loop().create_task(
                self._write_textfile(config.textfile_dir, config.textfile_interval),
                name="metrics-textfile",
            )

    def _listen(self, listen: str) -> None:
        where = parse_listen(listen)
        server: Any
        if isinstance(where, Path):
            server = _UnixServer(str(where), _Handler, bind_and_activate=False)
            try:
                gid = grp.getgrnam(SOCKET_GROUP).gr_gid
            except KeyError:
                gid = 0  # no group: root only, until `slctl install` makes it
                log.warning("no group %r: the metrics socket is root's only", SOCKET_GROUP)
            try:
                bind_unix_socket(server.socket, where, mode=SOCKET_MODE, gid=gid)
                server.server_activate()
            except BaseException:
                server.server_close()
                raise
            self._socket_path = where
            server.allowed_hosts = None  # no browser reaches a unix socket
            self.address = where
        else:
            host, port = where
            cls = _Tcp6Server if ":" in host else _TcpServer
            server = cls((host, port), _Handler)
            port = server.server_address[1]  # the port given, or the one the kernel chose
            if _is_loopback(host):
                server.allowed_hosts = _host_header_names(host, port)
            else:
                server.allowed_hosts = None
                log.warning(
                    "metrics listen on %s:%d, which is not loopback: anyone who can reach "
                    "it reads the model names and pool sizes",
                    host,
                    port,
                )
            self.address = (host, port)
        server.render = self.render
        server.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="sl-metrics-http", daemon=True
        )
        self._thread.start()
        log.info("metrics served at %s", listen if isinstance(where, Path) else self.address)

    async def _write_textfile(self, directory: Path, interval: int) -> None:
        tree = Root(directory, "metrics textfileDir")
        last_error = ""
        while True:
            try:
                await asyncio.to_thread(self._write_once, tree)
                last_error = ""
            except Exception as err:  # the writer must outlive a full disk or a bad dir
                text = str(err)
                if text != last_error:  # once per distinct problem, not every interval
                    log.error("metrics textfile not written in %s: %s", directory, text)
                last_error = text
            await asyncio.sleep(interval)

    def _write_once(self, tree: Root) -> None:
        check_trusted_dir(tree.path, "metrics textfileDir")
        body = self.render()
        tmp = f".{TEXTFILE_NAME}.{secrets.token_hex(6)}.tmp"
        tree.write_file(TEXTFILE_NAME, body, tmp, mode=0o644)

    async def stop(self) -> None:
        """Stop serving; remove the socket and the textfile (a stopped daemon's metrics
        would otherwise be read as current)."""
        if self._textfile is not None:
            self._textfile.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._textfile
            self._textfile = None
            directory = self.config.textfile_dir
            if directory is not None:
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(
                        Root(directory, "metrics textfileDir").unlink, TEXTFILE_NAME
                    )
        server, self._server = self._server, None
        if server is not None:
            await asyncio.to_thread(server.shutdown)
            server.server_close()
        if self._socket_path is not None:
            await asyncio.to_thread(unlink_in_dir, self._socket_path)
            self._socket_path = None
        self.address = None
        self.config = MetricsConfig()
