"""How many copies read one source filesystem at once: a bound per device, shared by all.

Every running promote takes its copies' streams from one :class:`CopyStreams`, keyed by the
cold file's device (the scan's ``ModelFile.ident.dev``), so the files of one model and of
several models copy side by side, never more than ``limit()`` at a time from one
filesystem. A copy waiting for a stream holds no thread: it waits on the event loop, in the
order it asked, and a cancel ends the wait at once (copies.py). The bound is read at each
admission, so a new ``storage.copyStreams`` applies to the next copy started; copies already
running beyond a lowered bound finish.

Event-loop only: ``release`` from a copy thread goes through ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable


class CopyStreams:
    def __init__(self, limit: Callable[[], int]):
        """``limit()``: the streams allowed per source filesystem (storage.copyStreams)."""
        self._limit = limit
        self._running: collections.Counter[int] = collections.Counter()
        self._queue: dict[int, collections.deque[asyncio.Future[None]]] = {}

    def running(self, dev: int) -> int:
        """Copies reading device ``dev`` now (an abandoned copy counts until it returns)."""
        return self._running[dev]

    def waiting(self, dev: int) -> int:
        """Copies waiting for a stream of device ``dev``."""
        return sum(not f.done() for f in self._queue.get(dev, ()))

    async def acquire(self, dev: int) -> None:
        """Wait for a stream of ``dev`` (first come, first served); cancellable."""
        queue = self._queue.setdefault(dev, collections.deque())
        if not queue and self._running[dev] < max(self._limit(), 1):
            self._running[dev] += 1
            return
        admitted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(admitted)
        try:
            await admitted
        except asyncio.CancelledError:
            if admitted.done() and not admitted.cancelled():
                self.release(dev)  # admitted just as the wait was cancelled: hand it on
            else:
                admitted.cancel()
                self._admit(dev)  # a waiter behind this one may go now
            raise

    def release(self, dev: int) -> None:
        """A copy of ``dev`` has ended (its thread returned, or it never started)."""
        self._running[dev] -= 1
        if self._running[dev] <= 0:
            del self._running[dev]
        self._admit(dev)

    def limit_changed(self) -> None:
        """The bound may have grown: admit whoever now fits."""
        for dev in list(self._queue):
            self._admit(dev)

    def _admit(self, dev: int) -> None:
        queue = self._queue.get(dev)
        while queue and self._running[dev] < max(self._limit(), 1):
            waiter = queue.popleft()
            if not waiter.done():  # a cancelled wait is skipped
                self._running[dev] += 1
                waiter.set_result(None)
        if queue is not None and not queue:
            del self._queue[dev]
        if not self._running[dev]:
            del self._running[dev]
