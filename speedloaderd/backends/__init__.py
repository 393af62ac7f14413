"""The inference servers Speedloader serves, one adapter per ``backend.type``.

``backend_for(config.backend)`` gives the adapter for the configured server at
``backend.apiUrl`` (or, when unset, the server's own default address, named in every
state's reason). See ``base.py`` for the protocol; nothing here imports D-Bus.
"""

from __future__ import annotations

from ..config import BackendConfig, BackendType
from .base import (
    Backend,
    BackendState,
    Capabilities,
    LoadedModel,
    Outcome,
    Status,
    Timing,
)
from .http import check_url
from .huggingface import HuggingFaceBackend
from .llamacpp import DEFAULT_URL as LLAMACPP_URL
from .llamacpp import LlamaCppBackend
from .ollama import DEFAULT_URL as OLLAMA_URL
from .ollama import OllamaBackend
from .vllm import DEFAULT_URL as VLLM_URL
from .vllm import VllmBackend

__all__ = [
    "Backend",
    "BackendState",
    "Capabilities",
    "LoadedModel",
    "Outcome",
    "Status",
    "Timing",
    "backend_for",
]

_ADAPTERS: dict[BackendType, tuple[type[Backend], str]] = {
    BackendType.OLLAMA: (OllamaBackend, OLLAMA_URL),
    BackendType.LLAMACPP: (LlamaCppBackend, LLAMACPP_URL),
    BackendType.VLLM: (VllmBackend, VLLM_URL),
    BackendType.HUGGINGFACE: (HuggingFaceBackend, ""),
}


class _Misconfigured(HuggingFaceBackend):
    """An apiUrl we will not talk to: every state and outcome names the problem."""

    kind = "backend"

    def __init__(self, why: str) -> None:
        super().__init__("")
        self.why = why

    async def state(self) -> BackendState:
        return BackendState(Status.UNKNOWN, self.why)

    async def capabilities(self) -> Capabilities:
        return Capabilities(False, False, self.why)

    async def _request_unload(self, model: str) -> Outcome | None:
        return Outcome(False, self.why)

    async def _request_preload(self, model: str) -> Outcome | None:
        return Outcome(False, self.why)


def backend_for(config: BackendConfig, timing: Timing | None = None) -> Backend:
    cls, default = _ADAPTERS[config.type]
    if cls is HuggingFaceBackend:
        return HuggingFaceBackend("", timing or Timing())
    try:
        url = check_url(config.api_url or default)
    except ValueError as err:
        return _Misconfigured(f"backend.apiUrl: {err}")
    return cls(url, timing or Timing())
