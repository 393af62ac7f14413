"""Jobs: one per long operation (promote, demote, pool lifecycle), UDisks2-style.

A Job is created at once, runs as an asyncio task, publishes progress at a bounded rate
and ends with success or a one-sentence failure. The bus layer mirrors each Job as an
object; nothing here knows about D-Bus.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from . import errors
from .errors import Cancelled, SpeedloaderError

log = logging.getLogger(__name__)
T = TypeVar("T")

_ids = itertools.count(1)


class JobState(str, enum.Enum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(eq=False)
class Job:
    operation: str  # "promote" | "demote" | "pool-connect" | ...
    model: str | None = None
    pool: str | None = None
    id: int = field(default_factory=lambda: next(_ids))
    bytes_total: int = 0
    bytes_done: int = 0
    rate: float = 0.0
    eta: float | None = None
    # Pool lifecycle jobs have named steps instead of bytes (connect: ssh, nvmet, mkfs...)
    step: str = ""  # the step running now
    steps_done: int = 0
    steps_total: int = 0
    started: float = field(default_factory=time.time)
    state: JobState = JobState.RUNNING
    message: str = ""
    error: SpeedloaderError | None = None
    # The D-Bus error name of ``error`` (errors.error_name), "" unless the job failed or was
    # cancelled: an asynchronous NoSpace says NoSpace, not only "failed".
    error_name: str = ""
    cancelable: bool = True
    # A promote that ends by having the backend load the model again from the pool
    # (reload.py): asked for (slctl promote --reload), or backend.reloadAfterPromote.
    reload: bool = False
    # Who asked for it (the bus caller's uid, as UDisks2's StartedByUID); 0 for root and
    # for jobs the daemon starts itself. Cancelling another uid's job is an admin's right.
    started_by_uid: int = 0
    # Why the daemon started it, for the jobs it starts itself (automatic tiering: "auto:
    # used 14x in 1 h", "pool fast above its high watermark..."); "" for a caller's job.
    reason: str = ""
    cancel_event: threading.Event = field(default_factory=threading.Event)  # copy threads
    cancel_requested: asyncio.Event = field(default_factory=asyncio.Event)  # the event loop
    listeners: list[Callable[[Job], None]] = field(default_factory=list)
    _done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def finished(self) -> bool:
        return self.state is not JobState.RUNNING

    @property
    def expected_end(self) -> float | None:
        return time.time() + self.eta if self.eta is not None and not self.finished else None

    def cancel(self) -> None:
        if self.cancelable and not self.finished:
            self.cancel_event.set()
            self.cancel_requested.set()

    def notify(self) -> None:
        for listener in list(self.listeners):
            try:
                listener(self)
            except Exception:  # a broken observer must not break the operation
                log.exception("job listener failed")

    def _finish(self, state: JobState, message: str, error: SpeedloaderError | None) -> None:
        self.state, self.message, self.error = state, message, error
        self.error_name = errors.error_name(error) if error is not None else ""
        self.eta = None
        self._done.set()
        self.notify()

    async def wait(self) -> str:
        """Wait for the end; return the success message or raise the job's error."""
        await self._done.wait()
        if self.error is not None:
            raise self.error
        return self.message


async def first_of(job: Job, work: Awaitable[T]) -> asyncio.Future[T] | None:
    """``work`` raced against the job's cancel: its future once done, or None when the cancel
    came first (``work`` is then cancelled; the caller raises its own Cancelled, saying what
    was left undone)."""
    task = asyncio.ensure_future(work)
    cancel = asyncio.ensure_future(job.cancel_requested.wait())
    try:
        await asyncio.wait({task, cancel}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        cancel.cancel()
        if not task.done():
            task.cancel()  # also when this wait itself was cancelled
    return task if task.done() and not task.cancelled() else None


def run_job(job: Job, body: Callable[[Job], Awaitable[str]]) -> asyncio.Task[None]:
    """Run ``body`` as ``job``'s task; any exception becomes the job's failure sentence."""

    async def runner() -> None:
        try:
            message = await body(job)
        except Cancelled as err:
            job._finish(JobState.CANCELLED, str(err) or "cancelled", err)
        except SpeedloaderError as err:
            job._finish(JobState.FAILED, str(err), err)
        except Exception as err:  # a bug: log the traceback, tell the caller one sentence
            log.exception("%s job %d failed unexpectedly", job.operation, job.id)
            wrapped = SpeedloaderError(f"internal error during {job.operation}: {err}")
            job._finish(JobState.FAILED, str(wrapped), wrapped)
        else:
            job._finish(JobState.SUCCEEDED, message, None)

    return asyncio.get_running_loop().create_task(runner(), name=f"job-{job.id}")
