"""Pool lifecycle jobs: connect, disconnect and resize, at most one at a time per pool.

Each is a Job made of named steps (a remote connect: ssh, nvmet, mkfs...), not of bytes.
What they need of the engine is ``PoolHost``: its lock, the pools, the config, evacuating
a pool's models to cold storage and collecting a pool's garbage.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from .config import Config, with_pool_size
from .errors import Busy, InvalidArgument
from .events import EventKind
from .jobs import Job
from .pool_registry import PoolRegistry
from .sizes import format_size


class PoolHost(Protocol):
    """What the pool jobs and the remote watch use of the engine."""

    pools: PoolRegistry
    config: Config
    cold_problem: str
    lock: asyncio.Lock  # the engine lock: held while links and pool contents change

    def evacuate(self, pool: str) -> tuple[list[str], int]:
        """Blocking, under the lock: every link into ``pool`` back to cold storage;
        returns (models touched, models that were wholly hot there)."""
        ...

    async def let_go_of_pool(self, job: Job, pool: str) -> None:
        """Have whoever maps a copy in ``pool`` let go, as a demote does (freeing.py):
        Busy, with nothing changed, when one does not."""
        ...

    def gc_pool(self, pool: str) -> list[str]:
        """Blocking, under the lock: delete what no link in ``pool`` points to."""
        ...

    def unmounting(self, path: Path) -> None:
        """Blocking: the pool at ``path`` is about to be unmounted (watches let go)."""
        ...

    async def set_config(self, new: Config) -> None: ...

    def start_job(self, job: Job, body: Callable[[Job], Awaitable[str]]) -> Job: ...

    def emit(self, kind: EventKind, name: str) -> None: ...


class PoolJobs:
    def __init__(self, host: PoolHost):
        self.host = host
        self.running: dict[str, Job] = {}  # pool name -> its running lifecycle job

    def busy(self, name: str) -> bool:
        """Is a lifecycle job running on pool ``name``? (The remote watch leaves it alone.)"""
        return name in self.running

    def _start(
        self,
        operation: str,
        name: str,
        body: Callable[[Job], Awaitable[str]],
        started_by_uid: int = 0,
    ) -> Job:
        self.host.pools.lookup(name)
        active = self.running.get(name)
        if active is not None:
            raise Busy(f"pool {name!r} is busy with {active.operation} (job {active.id})")
        job = Job(operation, pool=name, cancelable=False, started_by_uid=started_by_uid)
        self.running[name] = job

        def done(j: Job) -> None:
            if j.finished and self.running.get(name) is j:
                del self.running[name]

        job.listeners.append(done)
        return self.host.start_job(job, body)

    def connect(self, name: str, started_by_uid: int = 0) -> Job:
        """Mount a local pool; connect a remote one (its Job's Step names each step)."""
        host = self.host

        async def body(job: Job) -> str:
            pool = host.pools[name]
            await asyncio.to_thread(pool.mount, _step_reporter(job))
            job.steps_done, job.step = job.steps_total, ""
            async with host.lock:
                await asyncio.to_thread(host.gc_pool, name)
            host.emit(EventKind.POOL, name)
            return f"pool {name} {pool.describe()}"

        return self._start("pool-connect", name, body, started_by_uid)

    def disconnect(self, name: str, started_by_uid: int = 0) -> Job:
        """Demote everything the pool holds (its holders let go first, then the links back to
        cold), then unmount."""
        host = self.host
        if host.cold_problem:  # its models would be left with links to nothing
            raise Busy(
                f"cannot disconnect pool {name!r}: {host.cold_problem}; its "
                "models keep serving from RAM until cold storage is back"
            )

        async def body(job: Job) -> str:
            pool = host.pools[name]
            # A copy still mapped keeps its pages after the evacuation deletes it, and the
            # tmpfs busy: the unmount would fail with every model already made cold.
            try:
                await host.let_go_of_pool(job, name)
            except Busy as err:
                raise Busy(f"cannot disconnect pool {name!r}: {err}") from None
            async with host.lock:
                touched, hot = await asyncio.to_thread(host.evacuate, name)
                await asyncio.to_thread(host.unmounting, pool.path)
                await asyncio.to_thread(pool.unmount)
            for model in touched:
                host.emit(EventKind.MODEL, model)
            host.emit(EventKind.POOL, name)
            return f"pool {name} disconnected; {hot} model(s) now served from cold storage"

        return self._start("pool-disconnect", name, body, started_by_uid)

    def resize(self, name: str, size: int, started_by_uid: int = 0) -> Job:
        host = self.host

        async def body(job: Job) -> str:
            pool = host.pools[name]
            await asyncio.to_thread(pool.resize, size)
            await host.set_config(with_pool_size(host.config, name, pool.size))
            host.emit(EventKind.POOL, name)
            return f"pool {name} resized to {format_size(pool.size)}"

        if size <= 0:
            raise InvalidArgument(f"pool size must be positive, got {size}")
        return self._start("pool-resize", name, body, started_by_uid)


def _step_reporter(job: Job) -> Callable[[int, int, str], None]:
    """A progress hook a worker thread may call: (steps done, steps, step starting)."""
    loop = asyncio.get_running_loop()

    def on_step(done: int, total: int, step: str) -> None:
        if not job.finished:
            job.steps_done, job.steps_total, job.step = done, total, step
            job.notify()

    def report(done: int, total: int, step: str) -> None:
        loop.call_soon_threadsafe(on_step, done, total, step)

    return report
