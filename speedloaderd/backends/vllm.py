"""vLLM's OpenAI-compatible server: ``GET /v1/models``, and sleep/wake where it offers them.

Read from vllm-project/vllm:

- ``vllm/entrypoints/openai/protocol.py`` (later ``serve/engine/protocol.py``):
  ``ModelList {"object": "list", "data": [ModelCard]}``, ``ModelCard {"id", "object",
  "created", "owned_by": "vllm", "root", "parent", "max_model_len", "permission"}``; the
  serving code fills ``root`` with the model path (``--model``: a directory, or a Hub repo
  id when it was downloaded) and ``parent`` with the base model for a LoRA adapter.
- sleep mode: ``POST /sleep`` (query ``level``, default 1; level 2 discards the weights
  instead of keeping a copy in CPU RAM), ``POST /wake_up``, ``GET /is_sleeping`` answering
  ``{"is_sleeping": bool}``. These are development routes: v0.7-v0.10 register them in
  ``vllm/entrypoints/openai/api_server.py`` under ``if envs.VLLM_SERVER_DEV_MODE:``, later
  versions in ``entrypoints/serve/.../sleep/api_router.py`` whose ``attach_router`` returns
  early without ``VLLM_SERVER_DEV_MODE``. So the adapter asks ``/is_sleeping``: a 404 means
  the server does not offer them (``can_unload`` false, say so); the engine also needs
  ``--enable-sleep-mode``, else ``/sleep`` fails and the outcome says what it answered.
  ``/sleep`` and ``/wake_up`` answer an empty 200 in older versions and a small JSON object
  in newer ones: their body is not read, ``/is_sleeping`` and ``/v1/models`` confirm.

Whether it is busy: ``GET /metrics`` (Prometheus text, on by default) has the gauge
``vllm:num_requests_running`` (labelled ``model_name``, and ``engine`` in v1): any series
above 0 is a request in flight (``vllm/v1/metrics/loggers.py``; the v0 engine's
``vllm/engine/metrics.py`` has the same name).

One server serves one model (plus its LoRA adapters): sleeping puts the whole engine to
sleep, so ``unload(model)`` sleeps only when ``model`` is what the server serves. A
sleeping engine holds no weights: ``loaded()`` is then empty. An ``apiUrl`` that ends in
``/v1`` (as OpenAI clients are configured) is taken as the server's root, since the sleep
routes are not under ``/v1``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from .base import (
    Backend,
    BackendState,
    Capabilities,
    LoadedModel,
    Outcome,
    ServerName,
    ServerPath,
    Status,
)
from .http import HttpProblem

DEFAULT_URL = "http://127.0.0.1:8000"  # vllm serve's --port default
_SLEEP_LEVEL = 2  # level 1 would copy the weights into CPU RAM: the opposite of freeing it


class _Card(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: ServerName
    root: ServerPath | None = None
    parent: ServerName | None = None


class _Models(BaseModel):
    model_config = ConfigDict(extra="ignore")
    data: list[_Card] = Field(max_length=10_000)


class _Sleeping(BaseModel):
    model_config = ConfigDict(extra="ignore")
    is_sleeping: bool


def _gauge(text: bytes, name: bytes) -> float | None:
    """The sum of a gauge's series in Prometheus text, None when it is not there."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name) or line[len(name) : len(name) + 1] not in (b"{", b" "):
            continue
        try:
            total += float(line.rsplit(maxsplit=1)[-1])
        except ValueError:
            continue
        seen = True
    return total if seen else None


class VllmBackend(Backend):
    kind = "vllm"

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/").removesuffix("/v1")
        super().__post_init__()

    async def _sleeping(self) -> bool | None:
        """True/False from /is_sleeping, None when the server does not offer it."""
        try:
            return (await self.http.get_json("/is_sleeping", _Sleeping)).is_sleeping
        except HttpProblem as problem:
            if problem.status == 404:
                return None
            raise

    async def state(self) -> BackendState:
        try:
            models = await self.http.get_json("/v1/models", _Models)
            sleeping = await self._sleeping()
        except HttpProblem as problem:
            return self._down(problem)
        served = ", ".join(repr(c.id) for c in models.data if c.parent is None) or "nothing"
        asleep = " (asleep)" if sleeping else ""
        return BackendState(Status.UP, f"vllm at {self.url} serves {served}{asleep}")

    async def loaded(self) -> list[LoadedModel]:
        models = await self.http.get_json("/v1/models", _Models)
        if await self._sleeping():
            return []
        return [
            LoadedModel(name=c.id, paths=(c.root,) if c.root and c.root.startswith("/") else ())
            for c in models.data
        ]

    async def busy(self, model: str) -> bool | None:
        try:
            reply = await self.http.request("GET", "/metrics")
        except HttpProblem:
            return None
        running = _gauge(reply.body, b"vllm:num_requests_running")
        return None if running is None else running > 0

    async def capabilities(self) -> Capabilities:
        try:
            sleeping = await self._sleeping()
        except HttpProblem as problem:
            return Capabilities(False, False, problem.reason)
        if sleeping is None:
            return Capabilities(
                False,
                False,
                "it offers no /sleep (vLLM registers it only with VLLM_SERVER_DEV_MODE=1 "
                "and --enable-sleep-mode)",
            )
        return Capabilities(can_unload=True, can_preload=True)

    async def _post(self, path: str, what: str, model: str) -> Outcome | None:
        try:
            await self.http.request("POST", path, ok=(200,))
        except HttpProblem as problem:
            if problem.status:
                return Outcome(
                    False, f"vllm at {self.url} refused to {what} {model!r}: {problem.reason}"
                )
            raise
        return None

    async def _request_unload(self, model: str) -> Outcome | None:
        return await self._post(f"/sleep?level={_SLEEP_LEVEL}", "put to sleep", model)

    async def _request_preload(self, model: str) -> Outcome | None:
        models = await self.http.get_json("/v1/models", _Models)
        if model not in {c.id for c in models.data}:
            return Outcome(False, f"vllm at {self.url} does not serve {model!r}")
        return await self._post("/wake_up", "wake", model)
