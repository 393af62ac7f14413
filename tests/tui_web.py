"""Run ``speedloader-tui --web`` for a test, as an unprivileged user (it refuses root),
and read its log as it comes."""

from __future__ import annotations

import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from speedloader_lab.sandbox import REPO

from .buslab import ADMIN, as_user

ARTIFACTS = REPO / "tests" / "artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebServer:
    """The dashboard's web server as a subprocess run as ``user``; its log lines go to a
    queue. ``url`` is its origin, ``token_url`` the URL with the token it printed."""

    def __init__(self, bus: str, user: str = ADMIN):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "speedloader_tui"]
        self.proc = subprocess.Popen(
            as_user(user, [*cmd, "--web", "--port", str(self.port), "--bus", bus], bus),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
            start_new_session=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.token_url = self.expect(r"serving the Speedloader dashboard on (\S+)").group(1)
        self.token = parse_qs(urlsplit(self.token_url).query)["token"][0]

    def ws_url(self, token: bool = True) -> str:
        """The websocket's URL, with the token in it (as a client without a cookie needs)."""
        query = f"token={self.token}&width=100&height=30" if token else "width=100&height=30"
        return f"ws://127.0.0.1:{self.port}/ws?{query}"

    def children(self) -> list[int]:
        """The server's live child processes: one dashboard per session."""
        return [pid for pid, ppid in _live_processes() if ppid == self.proc.pid]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        """The next log line matching ``pattern`` (waiting for it, at most ``timeout``)."""
        rx = re.compile(pattern)
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(
                    f"no log line like {pattern!r} within {timeout} s; log so far:\n"
                    + "\n".join(self.log[-30:])
                ) from None
            if line is None:
                raise AssertionError(
                    f"server exited ({self.proc.wait()}) before logging {pattern!r}:\n"
                    + "\n".join(self.log[-30:])
                )
            self.log.append(line)
            if m := rx.search(line):
                return m

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def _live_processes() -> list[tuple[int, int]]:
    """(pid, parent pid) of every process that is not a zombie."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            out.append((int(stat.parent.name), int(fields[1])))
    return out


def processes_in_group(pgid: int) -> list[int]:
    """Live processes whose process group is ``pgid`` (a dashboard and its children)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(stat.parent.name))
    return out
