"""A FAKE llama.cpp ``llama-server`` for tests, in router mode (``--router``: ``GET
/props`` with ``"role": "router"``, ``GET /models``, ``POST /models/load``, ``POST
/models/unload``) or single-model mode (``GET /props`` with ``model_path``, ``GET
/health``), holding each loaded model's file mapped as llama.cpp does by default.

A minimal fake of the shapes in the README and ``server-models.cpp`` vendored by
llama-cpp-python 0.3.36 (``tools/server``): ``/models`` entries ``{"id", "object": "model",
"owned_by": "llamacpp", "status": {"value", "args", ["failed", "exit_code"]}}`` (the
loaded child's ``path`` merged in), load and unload answering ``{"success": true}`` at once
and acting after (0.2 s here), errors as ``{"error": {"code", "message", "type"}}``. A
model whose file cannot be opened fails to load: ``status`` ``unloaded`` with ``failed``
and ``exit_code`` 1. The real server's exact answers are recorded by the llama.cpp tier.
See ``fake_backend.py`` for the misbehaviours.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from .fake_backend import FakeServer, Reply, parse_models, serve

ACT_AFTER = 0.2


def _error(code: int, message: str, kind: str) -> Reply:
    return Reply(code, {"error": {"code": code, "message": message, "type": kind}})


def build(models: dict[str, str], router: bool) -> FakeServer:
    srv = FakeServer(models)
    srv.not_found = _error(404, "File Not Found", "not_found_error")
    status: dict[str, dict[str, Any]] = {n: {"value": "unloaded", "args": []} for n in models}
    listed_path: dict[str, str] = {}

    def args_for(name: str) -> list[str]:
        return ["llama-server", "-m", models[name], "--port", "0"]

    def slots() -> Reply:  # README "GET /slots": one object per slot (-np 1 here)
        return Reply(200, [{"id": 0, "id_task": -1, "n_ctx": 4096, "speculative": False,
                            "is_processing": srv.busy}])  # fmt: skip

    if not router:
        (name, path), *_ = models.items()
        srv.map(name)

        @srv.route("GET", "/slots")
        def single_slots(srv: FakeServer, q: Any, body: Any) -> Reply:
            return slots()

        @srv.route("GET", "/props")
        def props(srv: FakeServer, q: Any, body: Any) -> Reply:
            return Reply(
                200,
                {
                    "default_generation_settings": {"n_ctx": 4096, "params": {}},
                    "total_slots": 1,
                    "model_path": path,
                    "chat_template": "",
                    "modalities": {"vision": False},
                    "build_info": "b0-fake",
                    "is_sleeping": False,
                },
            )

        @srv.route("GET", "/health")
        def health(srv: FakeServer, q: Any, body: Any) -> Reply:
            return Reply(200, {"status": "ok"})

        return srv

    @srv.route("GET", "/props")
    def router_props(srv: FakeServer, q: Any, body: Any) -> Reply:
        return Reply(
            200,
            {
                "role": "router",
                "max_instances": 4,
                "models_autoload": True,
                "model_alias": "llama-server",
                "model_path": "none",
                "default_generation_settings": {"params": {}, "n_ctx": 0},
                "build_info": "b0-fake",
            },
        )

    @srv.route("GET", "/models")
    def list_models(srv: FakeServer, q: Any, body: Any) -> Reply:
        now = int(time.time())
        data = []
        for name in models:
            entry: dict[str, Any] = {
                "id": name,
                "aliases": [],
                "tags": [],
                "object": "model",
                "owned_by": "llamacpp",
                "created": now,
                "status": dict(status[name]),
                "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
                "source": "local",
                "can_remove": False,
            }
            if name in listed_path:
                entry["path"] = listed_path[name]
            data.append(entry)
        return Reply(200, {"data": data, "object": "list"})

    @srv.route("GET", "/slots")
    def router_slots(srv: FakeServer, q: Any, body: Any) -> Reply:
        name = q.get("model", [""])[0]
        if not name:  # README: a GET in router mode needs ?model=
            return _error(400, "model name is missing from the request", "invalid_request_error")
        if status.get(name, {}).get("value") != "loaded":
            return _error(400, "model is not loaded", "invalid_request_error")
        return slots()

    @srv.route("POST", "/models/load")
    def load(srv: FakeServer, q: Any, body: Any) -> Reply:
        name = (body or {}).get("model", "")
        if name not in models:
            return _error(404, "model is not found", "not_found_error")
        if status[name]["value"] in ("loaded", "loading"):
            return _error(400, "model is already running", "invalid_request_error")
        status[name] = {"value": "loading", "args": args_for(name)}

        def loaded() -> None:
            try:
                srv.map(name)
            except OSError:
                status[name] = {**status[name], "value": "unloaded", "failed": True, "exit_code": 1}
                return
            status[name] = {"value": "loaded", "args": args_for(name)}
            listed_path[name] = models[name]

        srv.later(ACT_AFTER, loaded)
        return Reply(200, {"success": True})

    @srv.route("POST", "/models/unload")
    def unload(srv: FakeServer, q: Any, body: Any) -> Reply:
        name = (body or {}).get("model", "")
        if name not in models:
            return _error(400, "model is not found", "invalid_request_error")
        if status[name]["value"] not in ("loaded", "loading"):
            return _error(400, "model is not running", "invalid_request_error")
        if srv.mode == "stuck":
            return Reply(200, {"success": True})

        def gone() -> None:
            if srv.mode != "lying":
                srv.unmap(name)  # before the status changes: unloaded means unmapped
            status[name] = {"value": "unloaded", "args": args_for(name)}
            listed_path.pop(name, None)

        if srv.mode == "lying":
            gone()
        else:
            srv.later(ACT_AFTER, gone)
        return Reply(200, {"success": True})

    return srv


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--router", action="store_true", help="no -m: the router mode")
    serve(lambda args: build(parse_models(args.model), args.router), parser)


if __name__ == "__main__":
    main()
