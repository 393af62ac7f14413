"""A FAKE vLLM OpenAI-compatible server for tests: ``GET /v1/models``, and in dev mode
``POST /sleep``, ``POST /wake_up``, ``GET /is_sleeping``, holding the served model's file
mapped while awake (a CPU-side copy of the weights, as the real engine's loader holds them
while it serves from host memory).

Shapes recorded from vllm-project/vllm: ``ModelList``/``ModelCard`` (``id``, ``object``
"model", ``created``, ``owned_by`` "vllm", ``root`` = the model path, ``parent`` null for the
base model, ``max_model_len``, ``permission``) in ``entrypoints/openai/protocol.py``; the
sleep routes as ``entrypoints/openai/api_server.py`` registers them only under
``VLLM_SERVER_DEV_MODE`` (``--dev-mode`` here): ``/sleep`` reads ``level`` (default 1) and
answers an empty 200, ``/wake_up`` an empty 200, ``/is_sleeping`` ``{"is_sleeping": bool}``.
Without dev mode they are FastAPI's 404 ``{"detail": "Not Found"}``. Level 2 discards the
weights (unmaps); level 1 keeps them in CPU RAM (stays mapped). See ``fake_backend.py``
for the misbehaviours.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from .fake_backend import FakeServer, Reply, parse_models, serve


def build(models: dict[str, str], dev_mode: bool) -> FakeServer:
    srv = FakeServer(models)
    srv.not_found = Reply(404, {"detail": "Not Found"})
    created = int(time.time())
    state = {"sleeping": False}
    for name in models:
        srv.map(name)  # vLLM loads its model at start

    @srv.route("GET", "/v1/models")
    def list_models(srv: FakeServer, q: Any, body: Any) -> Reply:
        cards: list[dict[str, Any]] = [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "vllm",
                "root": path,
                "parent": None,
                "max_model_len": 4096,
                "permission": [],
            }
            for name, path in srv.models.items()
        ]
        return Reply(200, {"object": "list", "data": cards})

    @srv.route("GET", "/metrics")
    def metrics(srv: FakeServer, q: Any, body: Any) -> Reply:
        # prometheus_client's text format, as vLLM v1 serves it (a few of its series).
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
        ]
        for name in srv.models:
            running = 1.0 if srv.busy else 0.0
            lines.append(f'vllm:num_requests_running{{engine="0",model_name="{name}"}} {running}')
        lines += [
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
        ]
        return Reply(
            200,
            None,
            raw=("\n".join(lines) + "\n").encode(),
            content_type="text/plain; version=0.0.4; charset=utf-8",
        )

    @srv.route("GET", "/health")
    def health(srv: FakeServer, q: Any, body: Any) -> Reply:
        return Reply(200, None, raw=b"")

    if dev_mode:

        @srv.route("POST", "/sleep")
        def sleep(srv: FakeServer, q: Any, body: Any) -> Reply:
            level = int(q.get("level", ["1"])[0])
            if srv.mode == "stuck":
                return Reply(200, None, raw=b"")
            state["sleeping"] = True
            if level >= 2 and srv.mode != "lying":
                for name in list(srv.mapped):
                    srv.unmap(name)
            return Reply(200, None, raw=b"")

        @srv.route("POST", "/wake_up")
        def wake_up(srv: FakeServer, q: Any, body: Any) -> Reply:
            for name in srv.models:
                srv.map(name)
            state["sleeping"] = False
            return Reply(200, None, raw=b"")

        @srv.route("GET", "/is_sleeping")
        def is_sleeping(srv: FakeServer, q: Any, body: Any) -> Reply:
            return Reply(200, {"is_sleeping": state["sleeping"]})

    return srv


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dev-mode", action="store_true", help="as VLLM_SERVER_DEV_MODE=1")
    serve(lambda args: build(parse_models(args.model), args.dev_mode), parser)


if __name__ == "__main__":
    main()
