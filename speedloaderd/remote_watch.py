"""The remote watch: every few seconds, is each connected remote pool still usable?

A probe reads sysfs and /proc/mounts only, never the pool (I/O to a lost pool fails or
hangs). A pool found unusable is given up: its links go back to cold storage and its
Problem says why, until a Connect or Disconnect.
"""

from __future__ import annotations

import asyncio
import logging

from .events import EventKind
from .pool_jobs import PoolHost, PoolJobs
from .remote.pool import RemotePool

log = logging.getLogger(__name__)


class RemoteWatch:
    def __init__(self, host: PoolHost, pool_jobs: PoolJobs):
        self.host = host
        self.pool_jobs = pool_jobs

    async def run(self, interval: float) -> None:
        while True:
            try:
                await self.check()
            except Exception:  # the watch must outlive any one bad probe
                log.exception("remote pool watch failed")
            await asyncio.sleep(interval)

    async def check(self) -> list[str]:
        """Probe every connected remote pool (sysfs, /proc/mounts: no I/O to the pool);
        give up each one that is no longer usable. Returns the names given up."""
        lost = []
        for pool in self.host.pools.remote():
            if not pool.connected or pool.lost or self.pool_jobs.busy(pool.name):
                continue  # not ours to watch, already given up, or being (dis)connected
            found = await asyncio.to_thread(pool.probe)
            if not found.usable and pool.connected and not pool.lost:
                await self.lose(pool, found.reason)
                lost.append(pool.name)
        return lost

    async def lose(self, pool: RemotePool, reason: str) -> None:
        """Serve everything in a lost pool from cold storage: repoint the links only. The
        pool's files are never read, written or deleted (I/O to it fails or hangs); a later
        Disconnect or Connect cleans up."""
        host = self.host
        pool.lost = reason or "not usable"
        async with host.lock:
            touched, hot = await asyncio.to_thread(host.evacuate, pool.name)
        log.error(
            "lost pool %s: %s; %d model(s) now served from cold storage; "
            "Connect the pool again to restore it",
            pool.name,
            pool.lost,
            hot,
        )
        for model in touched:
            host.emit(EventKind.MODEL, model)
        host.emit(EventKind.POOL, pool.name)
