"""Run ``speedloader-tui --web`` for a test and read its log as it comes."""

from __future__ import annotations

import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from speedloaderd.sandbox import REPO

ARTIFACTS = REPO / "tests" / "artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebServer:
    """The dashboard's web server as a subprocess; its log lines go to a queue."""

    def __init__(self, bus: str, argv: list[str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = argv or [sys.executable, "-m", "speedloader_tui"]
        self.proc = subprocess.Popen(
            [*cmd, "--web", "--port", str(self.port), "--bus", bus],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
            start_new_session=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.expect(r"serving the Speedloader dashboard on")

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
