"""What the fake inference servers share: a loopback HTTP server in its own process that
holds each "loaded" model's file mapped (as the real servers do: llama.cpp and Ollama's
runners mmap the GGUF), so ``/proc/<pid>/maps`` shows it, and misbehaves on request.

A fake is a test double, never a server: each fake module (``fake_ollama.py``,
``fake_llamacpp.py``, ``fake_vllm.py``) answers its server's documented routes with the
documented shapes (cited there) and nothing more. Run one as
``python -m speedloader_lab.fake_ollama --model NAME=PATH ...``; it prints ``port N`` once
it listens on 127.0.0.1 and serves until killed. ``FakeProcess`` does that for tests.

Misbehaviours, set with ``POST /_fake/mode {"mode": M}`` (``/_fake/*`` is the fake's own
control, no real server has it):

- ``ok``: as documented.
- ``slow``: every answer waits ``slow`` seconds first (past the adapter's timeout).
- ``lying``: an unload answers success and the model leaves the listing, but its file
  stays mapped.
- ``stuck``: an unload answers success, and the model stays listed and mapped.
- busy (``POST /_fake/busy {"busy": true}``, apart from the modes): as if a request were
  in flight; Ollama's fake defers an unload until it ends, as Ollama does.
- ``garbage``: 200 with a body that is not JSON; ``shape``: JSON of another shape;
  ``huge``: 200 with 2 MiB of JSON; ``drop``: the connection closes with no answer.

Being down is being killed (``FakeProcess.stop``), or a port nobody listens on.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

MODES = ("ok", "slow", "lying", "stuck", "garbage", "shape", "huge", "drop")
GO_CHUNK_THRESHOLD = 2048
"""Go's net/http sends a Content-Length only when the whole answer fits its 2 KiB buffer,
else chunked (Ollama is Go): the Ollama fake does the same, so both paths are read."""


class Mapped:
    """A model file held mapped read-only, as an inference server holds its weights."""

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            self.size = os.fstat(fd).st_size
            self.map = mmap.mmap(fd, self.size, prot=mmap.PROT_READ) if self.size else None
        finally:
            os.close(fd)  # the mapping keeps the file (and its tmpfs pages) alive, as theirs do

    def close(self) -> None:
        if self.map is not None:
            self.map.close()


class Reply:
    def __init__(
        self,
        status: int,
        body: Any,
        *,
        raw: bytes | None = None,
        content_type: str = "application/json; charset=utf-8",
    ) -> None:
        self.status = status
        self.body = body
        self.raw = raw
        self.content_type = content_type


Route = Callable[["FakeServer", dict[str, list[str]], Any], Reply]


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True
    chunk_large = False  # Go's rule (GO_CHUNK_THRESHOLD); set by the Ollama fake

    def __init__(self, models: dict[str, str]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.models = models  # name -> file
        self.mapped: dict[str, Mapped] = {}
        self.lock = threading.RLock()
        self.mode = "ok"
        self.slow = 30.0
        self.routes: dict[tuple[str, str], Route] = {}
        self.not_found: Reply = Reply(404, {"error": "not found"})
        # Answering a request with its model now (``POST /_fake/busy {"busy": B}``): the
        # servers that say so show it (llama.cpp's /slots, vLLM's /metrics); what a server
        # defers until its requests end (Ollama's unload) waits in ``when_idle``.
        self.busy = False
        self.when_idle: list[Callable[[], None]] = []

    def route(self, method: str, path: str) -> Callable[[Route], Route]:
        def add(fn: Route) -> Route:
            self.routes[(method, path)] = fn
            return fn

        return add

    def map(self, name: str) -> None:
        with self.lock:
            if name not in self.mapped:
                self.mapped[name] = Mapped(self.models[name])

    def unmap(self, name: str) -> None:
        with self.lock:
            held = self.mapped.pop(name, None)
        if held is not None:
            held.close()

    def set_busy(self, busy: bool) -> None:
        with self.lock:
            self.busy = busy
            deferred: list[Callable[[], None]] = []
            if not busy:
                deferred, self.when_idle = self.when_idle, []
        for fn in deferred:
            fn()

    def later(self, seconds: float, fn: Callable[[], None]) -> None:
        """Do ``fn`` after the answer, as the real servers unload after answering."""
        timer = threading.Timer(seconds, fn)
        timer.daemon = True
        timer.start()


class _Handler(BaseHTTPRequestHandler):
    server: FakeServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass

    def _answer(self, method: str) -> None:
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body: Any
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        srv = self.server
        if parts.path == "/_fake/mode" and method == "POST" and isinstance(body, dict):
            srv.mode = body["mode"]
            srv.slow = float(body.get("slow", srv.slow))
            return self._send(Reply(200, {"mode": srv.mode}))
        if parts.path == "/_fake/busy" and method == "POST" and isinstance(body, dict):
            srv.set_busy(bool(body["busy"]))
            return self._send(Reply(200, {"busy": srv.busy}))
        if srv.mode == "slow":
            time.sleep(srv.slow)
        if srv.mode == "drop":
            self.close_connection = True
            return
        if srv.mode == "garbage":
            return self._send(Reply(200, None, raw=b"<html>not json{"))
        if srv.mode == "shape":
            return self._send(Reply(200, {"object": "list", "something": ["else"]}))
        if srv.mode == "huge":
            return self._send(Reply(200, None, raw=b'{"models": [' + b"0," * (1 << 20) + b"0]}"))
        fn = srv.routes.get((method, parts.path))
        reply = fn(srv, parse_qs(parts.query), body) if fn else srv.not_found
        self._send(reply)

    def _send(self, reply: Reply) -> None:
        data = reply.raw if reply.raw is not None else b""
        if reply.raw is None and reply.body is not None:
            data = json.dumps(reply.body).encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        chunked = self.server.chunk_large and len(data) > GO_CHUNK_THRESHOLD
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if chunked:
            for i in range(0, len(data), 4096):
                piece = data[i : i + 4096]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - the base's name
        self._answer("GET")

    def do_POST(self) -> None:  # noqa: N802 - the base's name
        self._answer("POST")


def parse_models(values: list[str]) -> dict[str, str]:
    models = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            raise SystemExit(f"--model {value!r}: use NAME=PATH")
        models[name] = path
    return models


def serve(build: Callable[[argparse.Namespace], FakeServer], parser: argparse.ArgumentParser):
    parser.add_argument("--model", action="append", default=[], help="NAME=PATH")
    args = parser.parse_args()
    server = build(args)
    print(f"port {server.server_address[1]}", flush=True)
    server.serve_forever()


class FakeProcess:
    """A fake server in a child process (so its mappings are its own, in its own
    ``/proc/<pid>/maps``), started and waited for, stopped by pid."""

    def __init__(self, module: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"speedloader_lab.{module}", *args],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # blocks until it listens, or EOF if it died
        if not line.startswith("port "):
            self.proc.kill()
            raise RuntimeError(f"{module} did not start: {line!r}")
        self.port = int(line.split()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.pid = self.proc.pid

    def set_mode(self, mode: str, slow: float | None = None) -> None:
        import urllib.request

        body: dict[str, Any] = {"mode": mode}
        if slow is not None:
            body["slow"] = slow
        req = urllib.request.Request(
            f"{self.url}/_fake/mode", data=json.dumps(body).encode(), method="POST"
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            r.read()

    def set_busy(self, busy: bool) -> None:
        """As if a request were in flight (True) or had ended (False)."""
        import urllib.request

        req = urllib.request.Request(
            f"{self.url}/_fake/busy", data=json.dumps({"busy": busy}).encode(), method="POST"
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            r.read()

    def maps(self) -> str:
        return Path(f"/proc/{self.pid}/maps").read_text()

    def maps_file(self, path: str | Path) -> bool:
        """Whether the fake has ``path`` mapped now (``/proc/<pid>/maps`` names it)."""
        return any(line.endswith(" " + str(path)) for line in self.maps().splitlines())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
