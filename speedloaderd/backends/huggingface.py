"""huggingface: the models dir is read by whatever program loads from it (transformers,
diffusers, a notebook); there is no server to ask. The state says so, nothing is listed as
loaded, nothing can be unloaded: who holds a model's files is for the file holders
(``/proc``) to tell, and a demote waits or refuses on them."""

from __future__ import annotations

from .base import Backend, BackendState, Capabilities, LoadedModel, Outcome, Status

_WHY = "no server to ask: Hugging Face models are read by whichever program loads them"


class HuggingFaceBackend(Backend):
    kind = "huggingface"

    async def state(self) -> BackendState:
        return BackendState(Status.UNKNOWN, _WHY)

    async def loaded(self) -> list[LoadedModel]:
        return []

    async def capabilities(self) -> Capabilities:
        return Capabilities(False, False, _WHY)

    async def _request_unload(self, model: str) -> Outcome | None:
        return Outcome(False, _WHY)

    async def _request_preload(self, model: str) -> Outcome | None:
        return Outcome(False, _WHY)
