"""The backend's state, asked every few seconds, for the Manager's ``BackendState``.

One cheap call per look (Ollama ``/api/ps``, llama.cpp ``/props`` + ``/models``, vLLM
``/v1/models`` + ``/is_sleeping``): a loopback answer of a few ms, so a look every 15 s costs
nothing and a server that went away shows within 15 s. The adapter is built afresh from the
configuration at each look, so a live ``backend.apiUrl`` change is followed at the next one.
``on_change`` is called (on the event loop) only when the state or its reason changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from ..config import BackendConfig
from . import backend_for
from .base import BackendState, Status, Timing

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
        self._task: asyncio.Task[None] | None = None

    async def check(self) -> BackendState:
        """Ask once now; never raises (a bug in an adapter is logged and shown as unknown)."""
        config = self._config()
        try:
            state = NO_CONFIG if config is None else await backend_for(config, PROBE).state()
        except Exception as err:
            log.exception("asking the backend for its state failed")
            state = BackendState(Status.UNKNOWN, f"asking it failed: {type(err).__name__}")
        if state != self.state:
            # Once per change, not per look: a backend down for a day is one warning.
            level = logging.INFO if state.status is Status.UP else logging.WARNING
            if self.state is not NOT_ASKED or state.status is not Status.UP:
                log.log(level, "backend %s", state)
            self.state = state
            self._on_change()
        return state

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            await self.check()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
