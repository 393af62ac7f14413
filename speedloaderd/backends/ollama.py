"""Ollama: loaded models from ``GET /api/ps``, unload and preload through ``/api/generate``.

Read from ollama/ollama at fb3076099687 (v0.33.0-rc2, 2026-08-21):

- ``docs/api.md`` "List Running Models": ``GET /api/ps`` answers ``{"models": [{"name",
  "model", "size", "digest", "details", "expires_at", "size_vram"}]}``; "Load a model":
  ``POST /api/generate {"model": X}`` (no prompt) loads it; "Unload a model": the same with
  ``"keep_alive": 0`` unloads it. Each answers one JSON object with ``"done": true`` and
  ``"done_reason": "load"`` / ``"unload"``.
- ``server/routes.go``: ``PsHandler`` lists ``s.sched.loadedModels()`` as
  ``api.ProcessModelResponse`` (``api/types.go``: ``name``, ``model``, ``size`` int64,
  ``digest``, ``details``, ``expires_at`` time.Time (RFC 3339 with nanoseconds),
  ``size_vram`` int64, ``context_length``), named by ``model.ParseName(..).DisplayShortest()``
  (``model:tag``, ``ns/model:tag`` or ``host/ns/model:tag``: the names the catalog gives
  Ollama models). ``GenerateHandler``: an empty prompt with ``keep_alive`` 0 calls
  ``s.sched.expireRunner(m)`` and answers at once; the runner goes afterwards, which is why
  the unload is confirmed by polling ``/api/ps``. An unknown model is HTTP 404
  ``{"error": "model 'x' not found"}``. ``GET /`` answers "Ollama is running" (the state).

An unload while the model answers a request is deferred by Ollama itself:
``Scheduler.expireRunner`` (``server/sched.go``) sets the runner's session to 0 and expires
it at once only when its ``refCount`` is 0, else when the last request ends
(``unload_waits_for_requests``). ``/api/ps`` does not say whether a model is busy.

``/api/ps`` names no file: Ollama keeps the model in ``blobs/sha256-<hex>`` under its
models dir, so ``paths`` stays empty and the file holders (``/proc``) say which blob is
mapped. ``expires_at`` is the keep-alive deadline; Ollama reports no last-use time.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from .base import (
    Backend,
    BackendState,
    Capabilities,
    LoadedModel,
    Outcome,
    ServerName,
    Status,
)
from .http import HttpProblem

DEFAULT_URL = "http://127.0.0.1:11434"  # Ollama's OLLAMA_HOST default (envconfig)


class _Running(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: ServerName
    model: str = ""
    size: int = Field(default=0, ge=0)
    digest: str = Field(default="", max_length=200)
    expires_at: datetime | None = None
    size_vram: int = Field(default=0, ge=0)


class _Ps(BaseModel):
    model_config = ConfigDict(extra="ignore")
    models: list[_Running] = Field(max_length=10_000)


class _Generated(BaseModel):
    model_config = ConfigDict(extra="ignore")
    done: bool = False
    done_reason: str = ""


class OllamaBackend(Backend):
    kind = "ollama"
    unload_waits_for_requests = True

    async def state(self) -> BackendState:
        try:
            models = await self.loaded()
        except HttpProblem as problem:
            return self._down(problem)
        return BackendState(Status.UP, f"ollama at {self.url} has {len(models)} model(s) loaded")

    async def loaded(self) -> list[LoadedModel]:
        ps = await self.http.get_json("/api/ps", _Ps)
        return [
            LoadedModel(
                name=m.name,
                size=m.size,
                expires_at=m.expires_at,
            )
            for m in ps.models
        ]

    async def capabilities(self) -> Capabilities:
        return Capabilities(can_unload=True, can_preload=True)

    async def _generate(
        self, model: str, body: dict[str, object], want: str, total: float
    ) -> Outcome | None:
        try:
            reply = await self.http.post_json("/api/generate", body, total=total)
        except HttpProblem as problem:
            if problem.status == 404:
                return Outcome(False, f"ollama at {self.url} does not know model {model!r}")
            raise
        answer = self.http.validate(reply, "POST /api/generate", _Generated)
        if not answer.done:
            return Outcome(False, f"ollama answered the {want} of {model!r} with done=false")
        return None

    async def _request_unload(self, model: str) -> Outcome | None:
        return await self._generate(
            model, {"model": model, "keep_alive": 0}, "unload", self.timing.total
        )

    async def _request_preload(self, model: str) -> Outcome | None:
        # No prompt: routes.go answers done_reason "load" once scheduleRunner has the runner.
        return await self._generate(model, {"model": model}, "load", self.timing.load)
