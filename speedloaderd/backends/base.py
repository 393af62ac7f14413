"""The backend protocol: what the daemon asks the inference server that reads the models dir.

One adapter per ``backend.type`` (``ollama.py``, ``llamacpp.py``, ``vllm.py``,
``huggingface.py``), each a plain async HTTP client of ``backend.apiUrl``. Nothing here
raises to its caller for anything the server does: a server that is down, slow, or answers
something unexpected is a :class:`BackendState` (or an :class:`Outcome`) with one sentence
a person can act on, so a demote can decide to wait or refuse and the bus can show why.

``loaded()`` lists the models whose weights the server holds (or is taking) now: ``loaded``
and ``loading``; a model the server keeps listed but has put to sleep (vLLM's sleep level 2,
llama.cpp's ``sleeping``) holds no weights and is left out. ``unload()`` returns only once
the server no longer lists the model (or says why not); it never claims more than the server
said. Whether the pages are really gone is for the file holders (``/proc``) to tell: a server
may lie.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Annotated, ClassVar

from pydantic import StringConstraints

from .http import Http, HttpProblem

# What a server may name a model or a file, checked at the edge: the names go on the bus
# and into job steps, so no control characters (a terminal escape in a model name), and
# bounded (a name is a few dozen characters; a path at most PATH_MAX).
_PRINTABLE = r"^[^\x00-\x1f\x7f]+$"
ServerName = Annotated[str, StringConstraints(min_length=1, max_length=1024, pattern=_PRINTABLE)]
ServerPath = Annotated[str, StringConstraints(min_length=1, max_length=4096, pattern=_PRINTABLE)]
ServerArg = Annotated[str, StringConstraints(max_length=4096, pattern=r"^[^\x00-\x1f\x7f]*$")]


class Status(str, Enum):
    UP = "up"
    DOWN = "down"  # nothing answered: refused, reset, or no answer within the timeout
    UNKNOWN = "unknown"  # no server to ask, or it answered something we cannot read


@dataclass(frozen=True, slots=True)
class BackendState:
    status: Status
    reason: str
    """One sentence: what was asked of whom, and what came back (or did not)."""

    def __str__(self) -> str:
        return f"{self.status.value}: {self.reason}"


@dataclass(frozen=True, slots=True)
class LoadedModel:
    name: str
    """The server's own name for it (what unload() and preload() take)."""
    paths: tuple[str, ...] = ()
    """Files the server says it loaded the model from; empty where it does not say."""
    size: int | None = None
    """Bytes the server says the loaded model takes, where it reports it."""
    expires_at: datetime | None = None
    """When the server will unload it by itself (Ollama's keep_alive), where it reports it."""
    last_used: datetime | None = None
    status: str = "loaded"  # "loaded" | "loading"


@dataclass(frozen=True, slots=True)
class Outcome:
    ok: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Capabilities:
    can_unload: bool
    can_preload: bool
    why_not: str = ""
    """When either is false: why (the mode the server runs in, a route it does not offer)."""


@dataclass(frozen=True, slots=True)
class Timing:
    """How long to wait for the server. A loopback answer of the fakes takes a few ms, so
    2 s to connect and 10 s in all only trip on a server that is stuck, not busy. An unload
    (and a preload) is confirmed by polling the listing for up to 30 s: Ollama expires a
    runner after answering the request, llama.cpp's router stops its child after
    answering. The first look comes confirm_first s after the request, each next one after
    twice as long, up to confirm_every: the real router's child let go of a 2.2 GiB model
    33 ms after the request (bench/demote_loaded.py), and a flat 0.25 s poll made that
    demote take 314 ms, one whole interval more than the unload."""

    connect: float = 2.0
    total: float = 10.0
    confirm_for: float = 30.0
    confirm_every: float = 0.25
    confirm_first: float = 0.02
    load: float = 300.0
    """A preload request answers once the model is in memory: minutes for a big one."""
    max_bytes: int = 1 << 20
    """Largest answer read: /api/ps of 100 loaded models is about 60 KB."""


@dataclass
class Backend(ABC):
    """One inference server at one URL."""

    url: str
    timing: Timing = field(default_factory=Timing)
    kind: ClassVar[str] = "backend"
    unload_waits_for_requests: ClassVar[bool] = False
    """The server itself defers an unload until the model's requests in flight end (Ollama's
    scheduler does), so unloading an in-use model never cuts an answer short."""

    def __post_init__(self) -> None:
        self.http = Http(self.url, self.timing.connect, self.timing.total, self.timing.max_bytes)

    @abstractmethod
    async def state(self) -> BackendState: ...

    @abstractmethod
    async def loaded(self) -> list[LoadedModel]:
        """The models the server holds now. Raises :class:`HttpProblem` (its ``reason`` is
        the sentence to show) when the server cannot be asked."""

    @abstractmethod
    async def capabilities(self) -> Capabilities: ...

    @abstractmethod
    async def _request_unload(self, model: str) -> Outcome | None:
        """Ask the server to unload ``model``; None when it accepted, else why not."""

    @abstractmethod
    async def _request_preload(self, model: str) -> Outcome | None:
        """Ask the server to load ``model``; None when it accepted, else why not."""

    async def busy(self, model: str) -> bool | None:
        """Whether the server is answering a request with ``model`` now; None where it does
        not say (or cannot be asked): a reload after a promote then leaves it alone, unless
        the server defers unloads itself (``unload_waits_for_requests``)."""
        return None

    def _load_failure(self, model: str) -> str | None:
        """Why the server gave up loading ``model``, where it says so (llama.cpp's router)."""
        return None

    def _down(self, problem: HttpProblem) -> BackendState:
        status = Status.DOWN if problem.unreachable else Status.UNKNOWN
        return BackendState(status, f"{self.kind} at {self.url}: {problem.reason}")

    async def _listing(self) -> dict[str, LoadedModel] | Outcome:
        try:
            return {m.name: m for m in await self.loaded()}
        except HttpProblem as problem:
            return Outcome(False, f"{self.kind} at {self.url}: {problem.reason}")

    async def unload(self, model: str) -> Outcome:
        """Unload ``model`` and return once the server no longer lists it, or say why not."""
        caps = await self.capabilities()
        if not caps.can_unload:
            return Outcome(False, f"{self.kind} at {self.url} cannot unload: {caps.why_not}")
        names = await self._listing()
        if isinstance(names, Outcome):
            return names
        if model not in names:
            return Outcome(True, f"{self.kind} does not have {model!r} loaded")
        try:
            refused = await self._request_unload(model)
        except HttpProblem as problem:
            return Outcome(False, f"{self.kind} at {self.url}: {problem.reason}")
        if refused is not None:
            return refused
        return await self._confirm(
            model,
            "unload",
            lambda names: (
                Outcome(True, f"{self.kind} no longer lists {model!r} as loaded")
                if model not in names
                else None
            ),
            "still lists {model!r} as loaded {secs:g} s after it was asked to unload it",
        )

    async def preload(self, model: str) -> Outcome:
        """Have the server load ``model`` (so the next request is served at once)."""
        caps = await self.capabilities()
        if not caps.can_preload:
            return Outcome(False, f"{self.kind} at {self.url} cannot preload: {caps.why_not}")
        try:
            refused = await self._request_preload(model)
        except HttpProblem as problem:
            return Outcome(False, f"{self.kind} at {self.url}: {problem.reason}")
        if refused is not None:
            return refused

        def loaded(names: dict[str, LoadedModel]) -> Outcome | None:
            if model in names and names[model].status == "loaded":
                return Outcome(True, f"{self.kind} lists {model!r} as loaded")
            failure = self._load_failure(model)
            if failure is not None:
                return Outcome(False, f"{self.kind} at {self.url} {failure}")
            return None

        return await self._confirm(
            model,
            "preload",
            loaded,
            "does not list {model!r} as loaded {secs:g} s after it was asked to load it",
        )

    async def _confirm(
        self,
        model: str,
        asked: str,
        outcome: Callable[[dict[str, LoadedModel]], Outcome | None],
        late: str,
    ) -> Outcome:
        """Poll the listing until ``outcome(names)`` decides, or ``timing.confirm_for`` has
        passed (then ``late``, formatted with model and secs, says what the server still
        shows). What a server answers to the request is not trusted: its listing is."""
        deadline = time.monotonic() + self.timing.confirm_for
        pause = min(self.timing.confirm_first, self.timing.confirm_every)
        while True:
            names = await self._listing()
            if isinstance(names, Outcome):
                return Outcome(False, f"{asked} of {model!r} asked, then {names.reason}")
            decided = outcome(names)
            if decided is not None:
                return decided
            if time.monotonic() >= deadline:
                secs = self.timing.confirm_for
                return Outcome(
                    False, f"{self.kind} at {self.url} " + late.format(model=model, secs=secs)
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, self.timing.confirm_every)
