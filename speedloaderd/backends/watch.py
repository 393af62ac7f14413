"""The backend's state, asked every few seconds, for the Manager's ``BackendState``.

One cheap call per look (Ollama ``/api/ps``, llama.cpp ``/props`` + ``/models``, vLLM
``/v1/models`` + ``/is_sleeping``): a loopback answer of a few ms, so a look every 15 s costs
nothing and a server that went away shows within 15 s. The adapter is built afresh from the
configuration at each look, so a live ``backend.apiUrl`` change is followed at the next one.
``on_change`` is called (on the event loop) only when the state or its reason changes.
With the state, the server's list of loaded models is asked (``loaded``: the Model objects'
``Loaded``), again at once when ``poke()`` says the holders of a model's files changed.
``on_look`` hears every look (``listed``: whether it read the listing), for the usage
telemetry (speedloaderd/usage.py), which counts per look, not per change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from ..config import BackendConfig
from ..watching import woken
from . import backend_for
from .base import BackendState, LoadedModel, Status, Timing
from .http import HttpProblem

log = logging.getLogger(__name__)

EVERY = 15.0
# A probe, not a request that must succeed: a server that cannot list its models in 3 s is
# shown as down, and the first look (awaited before the daemon takes its bus name) never
# holds the start up longer than that.
PROBE = Timing(connect=2.0, total=3.0)
NOT_ASKED = BackendState(Status.UNKNOWN, "not asked yet")
NO_CONFIG = BackendState(Status.UNKNOWN, "speedloaderd has no valid configuration")


class BackendWatch:
    def __init__(
        self,
        config: Callable[[], BackendConfig | None],
        on_change: Callable[[], None],
        every: float = EVERY,
    ) -> None:
        self._config = config
        self._on_change = on_change
        self.every = every
        self.state = NOT_ASKED
        # What the server says it has loaded (asked with the state, one more cheap call);
        # empty while it is not up. ``on_loaded`` hears a change of it.
        self.loaded: tuple[LoadedModel, ...] = ()
        self.on_loaded: Callable[[], None] | None = None
        self.listed = False  # the last look read the server's listing (``loaded`` is its)
        self.on_look: Callable[[], None] | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    async def check(self) -> BackendState:
        """Ask once now; never raises (a bug in an adapter is logged and shown as unknown)."""
        config = self._config()
        loaded: tuple[LoadedModel, ...] = ()
        listed = False
        try:
            backend = None if config is None else backend_for(config, PROBE)
            state = NO_CONFIG if backend is None else await backend.state()
            if backend is not None and state.status is Status.UP:
                try:
                    loaded = tuple(await backend.loaded())
                    listed = True
                except HttpProblem:
                    loaded = ()  # the next look says why, in the state
        except Exception as err:
            log.exception("asking the backend for its state failed")
            state = BackendState(Status.UNKNOWN, f"asking it failed: {type(err).__name__}")
        self.listed = listed
        if loaded != self.loaded:
            self.loaded = loaded
            if self.on_loaded is not None:
                self.on_loaded()
        if state != self.state:
            # Once per change, not per look: a backend down for a day is one warning.
            level = logging.INFO if state.status is Status.UP else logging.WARNING
            if self.state is not NOT_ASKED or state.status is not Status.UP:
                log.log(level, "backend %s", state)
            self.state = state
            self._on_change()
        if self.on_look is not None:
            try:
                self.on_look()
            except Exception:  # the looks go on: a bug here must not stop BackendState
                log.exception("a backend look's listener failed")
        return state

    def start(self) -> None:
        if self._task is None:
            self._stopped = False
            self._task = asyncio.get_running_loop().create_task(self._run())

    def poke(self) -> None:
        """Ask again now, not at the next look (the holders of a model's files changed:
        the server may have loaded or unloaded it)."""
        if self._task is not None:
            self._wake.set()

    async def _run(self) -> None:
        while not self._stopped:
            await woken(self._wake, self.every)
            self._wake.clear()
            if self._stopped:
                break
            await self.check()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            self._stopped = True  # ends the loop even if the cancel is swallowed (watching.py)
            self._wake.set()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
