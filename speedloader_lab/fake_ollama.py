"""A FAKE Ollama server for tests: ``GET /``, ``GET /api/ps`` and ``POST /api/generate``
(load and unload), holding each loaded model's file mapped as Ollama's runner does.

Shapes recorded from ollama/ollama at fb3076099687 (v0.33.0-rc2): ``docs/api.md`` ("List
Running Models", "Load a model", "Unload a model") and ``server/routes.go``
(``PsHandler``: ``api.ProcessModelResponse`` fields, sorted longest expiry first;
``GenerateHandler``: 404 ``{"error": "model 'x' not found"}`` for an unknown model, an empty
prompt with ``keep_alive`` 0 expires the runner and answers ``done_reason`` "unload" at
once, an empty prompt loads and answers ``done_reason`` "load"). The runner goes a moment
after the unload answer (``expireRunner`` only marks it), so the fake unmaps 0.2 s later.
See ``fake_backend.py`` for the misbehaviours.
"""

from __future__ import annotations

import argparse
import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

from .fake_backend import FakeServer, Reply, parse_models, serve

DEFAULT_KEEP_ALIVE = timedelta(minutes=5)  # docs/api.md: keep_alive default 5m
UNLOAD_AFTER = 0.2


def _rfc3339nano(t: datetime) -> str:
    """Go's time.Time JSON: RFC 3339 with nanoseconds."""
    return t.strftime("%Y-%m-%dT%H:%M:%S.%f") + "123Z"


def build(models: dict[str, str]) -> FakeServer:
    srv = FakeServer(models)
    srv.chunk_large = True
    srv.not_found = Reply(404, None, raw=b"404 page not found")  # gin's default
    expires: dict[str, datetime] = {}
    listed: set[str] = set()

    def now() -> datetime:
        return datetime.now(UTC)

    @srv.route("GET", "/")
    def root(srv: FakeServer, q: Any, body: Any) -> Reply:
        return Reply(200, None, raw=b"Ollama is running")

    @srv.route("GET", "/api/ps")
    def ps(srv: FakeServer, q: Any, body: Any) -> Reply:
        out = []
        for name in sorted(listed, key=lambda n: expires[n], reverse=True):
            digest = hashlib.sha256(name.encode()).hexdigest()
            size = srv.mapped[name].size if name in srv.mapped else 0
            out.append(
                {
                    "name": name,
                    "model": name,
                    "size": size,
                    "digest": digest,
                    "details": {
                        "parent_model": "",
                        "format": "gguf",
                        "family": "llama",
                        "families": ["llama"],
                        "parameter_size": "7.2B",
                        "quantization_level": "Q4_0",
                    },
                    "expires_at": _rfc3339nano(expires[name]),
                    "size_vram": 0,
                    "context_length": 4096,
                }
            )
        return Reply(200, {"models": out})

    @srv.route("POST", "/api/generate")
    def generate(srv: FakeServer, q: Any, body: Any) -> Reply:
        if not isinstance(body, dict):
            return Reply(400, {"error": "missing request body"})
        name = body.get("model", "")
        if name not in srv.models:
            return Reply(404, {"error": f"model '{name}' not found"})
        answer = {"model": name, "created_at": _rfc3339nano(now()), "response": "", "done": True}
        if not body.get("prompt") and body.get("keep_alive") == 0:
            if srv.mode == "stuck":
                return Reply(200, {**answer, "done_reason": "unload"})

            def expire() -> None:
                if srv.mode != "lying":
                    srv.unmap(name)  # before it leaves the listing: gone means unmapped
                listed.discard(name)

            with srv.lock:
                if srv.busy:  # expireRunner: refCount > 0, expired when the request ends
                    srv.when_idle.append(lambda: srv.later(UNLOAD_AFTER, expire))
                    return Reply(200, {**answer, "done_reason": "unload"})
            if srv.mode == "lying":
                expire()
            else:
                srv.later(UNLOAD_AFTER, expire)
            return Reply(200, {**answer, "done_reason": "unload"})
        srv.map(name)
        listed.add(name)
        expires[name] = now() + DEFAULT_KEEP_ALIVE
        return Reply(200, {**answer, "done_reason": "load"})

    return srv


def main() -> None:
    serve(lambda args: build(parse_models(args.model)), argparse.ArgumentParser())


if __name__ == "__main__":
    main()
