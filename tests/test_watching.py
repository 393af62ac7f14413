"""A watch stopped at the instant it is woken still stops (speedloaderd/watching.py): Python
3.11's asyncio.wait_for swallows a cancel that arrives as its inner future completes, and a
daemon whose backend watch was poked as SIGTERM arrived never left the bus."""

from __future__ import annotations

import asyncio

from speedloaderd.backends.watch import BackendWatch
from speedloaderd.holders import FileIndex, HolderWatch


async def _poke_then_stop(watch: BackendWatch | HolderWatch) -> None:
    for _ in range(20):
        watch.start()
        await asyncio.sleep(0.6)  # inside its wait for the wake event (HolderWatch: past MIN_GAP)
        watch.poke()  # the wake event is set...
        async with asyncio.timeout(10):  # ...and the cancel lands in the same turn
            await watch.stop()


def test_the_backend_watch_stops_when_poked_as_it_is_stopped():
    async def scenario() -> None:
        watch = BackendWatch(lambda: None, lambda: None, every=60)
        await _poke_then_stop(watch)

    asyncio.run(scenario())


def test_the_holder_watch_stops_when_poked_as_it_is_stopped():
    async def scenario() -> None:
        watch = HolderWatch(lambda: FileIndex({}, {}), lambda models, pools: None)
        await _poke_then_stop(watch)

    asyncio.run(scenario())
