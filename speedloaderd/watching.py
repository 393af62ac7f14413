"""What the daemon's periodic watches share: a wait for their wake event that a cancel
always ends.

Python 3.11's ``asyncio.wait_for`` returns the inner result when a cancel arrives just as
the inner future completes (CPython gh-86296): the cancel is swallowed. A watch whose wake
event was set at the instant the daemon stopped it (the holders of a copy changed because a
server was killed, poking the backend watch, as SIGTERM arrived) went on looking, stop()
awaited it for ever, and the daemon stayed on the bus answering calls (seen in a fresh-clone
CI run: every later test met the old daemon). ``woken`` uses ``asyncio.wait``, which never
swallows a cancel; the watches also check a stop flag, so a cancel swallowed anywhere else
(an ``asyncio.wait_for`` inside a request) ends them at their next turn.
"""

from __future__ import annotations

import asyncio


async def woken(event: asyncio.Event, timeout: float) -> None:
    """Until ``event`` is set or ``timeout`` seconds have passed (the event is not cleared)."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=max(timeout, 0.0))
    finally:
        waiter.cancel()
