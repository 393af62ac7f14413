"""llama.cpp's ``llama-server``, in router mode (many models) or single-model mode.

Read from the llama.cpp that the llama-cpp-python 0.3.36 sdist vendors
(``vendor/llama.cpp/tools/server``): ``README.md`` "Using multiple models" and
``server-models.cpp`` (``server_models_routes::init_routes``):

- which mode: ``GET /props`` without a ``model`` parameter; the router answers its own
  properties with ``"role": "router"`` (``get_router_props``), a single-model server its
  model's, with ``model_path`` (README "GET /props") and ``is_sleeping``.
- router: ``GET /models`` answers ``{"data": [{"id", "status": {"value", "args",
  "failed", "exit_code"}, ...}], "object": "list"}``; ``status.value`` is one of
  ``downloading``, ``downloaded``, ``unloaded``, ``loading``, ``loaded``, ``sleeping``
  (``server_model_status_to_string`` in ``server-models.h``); a running model's entry also
  carries what its child reports (the README shows a ``path``). ``POST /models/load`` and
  ``POST /models/unload`` take ``{"model": id}`` and answer ``{"success": true}`` at once
  (the child starts or stops afterwards: both are confirmed by polling ``/models``); an
  unknown model, or unloading one not running, is an error object.
- single-model: ``GET /health`` answers 200 ``{"status": "ok"}`` once the model is loaded,
  503 while it loads. The one model stays loaded until the process exits: no unload, no
  preload (``can_unload`` false: a demote waits for the process or refuses).

Whether a model is busy: ``GET /slots`` (on by default, off with ``--no-slots``; in router
mode ``?model=<id>``, routed to that model's child, README "Routing requests") answers one
object per slot with ``is_processing``. The router's unload stops the child (``request_stop``
in ``server-models.cpp``: exit sent, killed after ``stop_timeout``) whatever it is doing, so
a reload after a promote asks first and leaves a busy (or unaskable) model alone.

Where the router lists no ``path``, the model file is read from the child's arguments
(``status.args``: ``-m``/``--model``, ``-mm``/``--mmproj``). llama.cpp reports no last-use
time on the API (``last_used`` is internal to the router).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, RootModel

from .base import (
    Backend,
    BackendState,
    Capabilities,
    LoadedModel,
    Outcome,
    ServerArg,
    ServerName,
    ServerPath,
    Status,
)
from .http import HttpProblem

DEFAULT_URL = "http://127.0.0.1:8080"  # llama-server's --host/--port defaults
_HOLDING = ("loaded", "loading")  # statuses whose child holds (or is mapping) the weights
_FILE_ARGS = ("-m", "--model", "-mm", "--mmproj")


class _Props(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str = ""
    model_path: ServerPath | None = None
    model_alias: ServerName | None = None
    is_sleeping: bool = False


class _Status(BaseModel):
    model_config = ConfigDict(extra="ignore")
    value: str = Field(max_length=64)
    args: list[ServerArg] = Field(default_factory=list, max_length=1000)
    failed: bool = False
    exit_code: int | None = None


class _Entry(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: ServerName
    path: ServerPath | None = None
    status: _Status


class _Models(BaseModel):
    model_config = ConfigDict(extra="ignore")
    data: list[_Entry] = Field(max_length=10_000)


class _Slot(BaseModel):
    model_config = ConfigDict(extra="ignore")
    is_processing: bool = False


class _Slots(RootModel[list[_Slot]]):
    root: list[_Slot] = Field(max_length=10_000)


def _files_in(args: list[str]) -> tuple[str, ...]:
    files = []
    for i, arg in enumerate(args[:-1]):
        if arg in _FILE_ARGS:
            files.append(args[i + 1])
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key in _FILE_ARGS:
            files.append(value)
    return tuple(f for f in files if f)


class LlamaCppBackend(Backend):
    kind = "llama.cpp"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._failures: dict[str, str] = {}

    async def _props(self) -> _Props:
        return await self.http.get_json("/props", _Props)

    async def state(self) -> BackendState:
        try:
            props = await self._props()
            models = await self.loaded()
        except HttpProblem as problem:
            return self._down(problem)
        mode = "router" if props.role == "router" else "single-model"
        return BackendState(
            Status.UP, f"llama.cpp ({mode}) at {self.url} has {len(models)} model(s) loaded"
        )

    async def loaded(self) -> list[LoadedModel]:
        props = await self._props()
        if props.role == "router":
            return await self._router_loaded()
        return await self._single_loaded(props)

    async def _router_loaded(self) -> list[LoadedModel]:
        listing = await self.http.get_json("/models", _Models)
        self._failures = {
            e.id: f"could not load {e.id!r}: its llama-server exited with {e.status.exit_code}"
            for e in listing.data
            if e.status.failed
        }
        return [
            LoadedModel(
                name=e.id,
                paths=(e.path,) if e.path else _files_in(e.status.args),
                status=e.status.value,
            )
            for e in listing.data
            if e.status.value in _HOLDING
        ]

    async def _single_loaded(self, props: _Props) -> list[LoadedModel]:
        if props.is_sleeping:  # --sleep-idle-seconds: the weights are out of RAM
            return []
        reply = await self.http.request("GET", "/health", ok=(200, 503))
        name = props.model_alias or props.model_path
        if not name:
            raise HttpProblem("GET /props named no model_path (is this llama-server?)")
        return [
            LoadedModel(
                name=name,
                paths=(props.model_path,) if props.model_path else (),
                status="loaded" if reply.status == 200 else "loading",
            )
        ]

    async def capabilities(self) -> Capabilities:
        try:
            props = await self._props()
        except HttpProblem as problem:
            return Capabilities(False, False, problem.reason)
        if props.role == "router":
            return Capabilities(can_unload=True, can_preload=True)
        return Capabilities(
            False,
            False,
            "llama-server runs in single-model mode (started with -m): its model stays "
            "loaded until the process exits",
        )

    def _load_failure(self, model: str) -> str | None:
        return self._failures.get(model)

    async def busy(self, model: str) -> bool | None:
        try:
            props = await self._props()
            path = f"/slots?model={quote(model, safe='')}" if props.role == "router" else "/slots"
            slots = await self.http.get_json(path, _Slots)
        except HttpProblem:
            return None
        return any(slot.is_processing for slot in slots.root)

    async def _post(self, path: str, model: str, total: float) -> Outcome | None:
        try:
            reply = await self.http.post_json(path, {"model": model}, total=total)
        except HttpProblem as problem:
            if problem.status in (400, 404):
                return Outcome(False, f"llama.cpp at {self.url} refused {path}: {problem.reason}")
            raise
        data: Any = reply.json(f"POST {path}")
        if not (isinstance(data, dict) and data.get("success") is True):
            return Outcome(False, f"llama.cpp answered POST {path} without success: true")
        return None

    async def _request_unload(self, model: str) -> Outcome | None:
        return await self._post("/models/unload", model, self.timing.total)

    async def _request_preload(self, model: str) -> Outcome | None:
        self._failures.pop(model, None)
        return await self._post("/models/load", model, self.timing.total)
