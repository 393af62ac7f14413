"""Copies into the pools, as a promote runs them: on their own threads, one per blob.

A copy runs on the copies' own executor (``COPY_WORKERS`` threads), apart from the
metadata steps (asyncio.to_thread): copies blocked in a read that never returns (a hung NFS
or FUSE source) must never starve the engine's own steps, nor delay a cancel. Before it
takes a thread, a copy waits on the event loop for a stream of its source filesystem
(streams.py: at most ``storage.copyStreams`` copies read one device at once, across every
running promote); it holds that stream until its thread returns, so an abandoned copy still
counts against its device, and never against another's. A promote needing a blob another
promote is copying into the same pool joins that copy. A cancelled copy gets
``COPY_CANCEL_GRACE`` to stop at its next chunk; one still blocked then is abandoned: its
job ends now, and when its read returns it removes its partial file (or, had it completed,
the engine collects the copy no link points to).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from .catalog.types import ModelFile
from .config import DEFAULT_COPY_STREAMS, MAX_COPY_STREAMS
from .errors import Cancelled
from .jobs import Job, first_of
from .ledger import SpaceLedger
from .modelsdir import ModelsDir
from .streams import CopyStreams
from .transfer import CopyResult, ProgressMeter, copy_into
from .verified import Verified

log = logging.getLogger(__name__)

# Copy threads, apart from the metadata work (asyncio.to_thread): copies blocked in a read
# that never returns (a hung NFS or FUSE source) must never starve the engine's own steps.
# Twice the largest copyStreams: one source filesystem whose every stream is blocked holds
# at most half of them, and the other half still serve another device at the full bound.
# A copy takes a thread only once it has a stream, so nothing ever queues here; the
# executor starts threads as they are needed, so the headroom costs nothing until used.
COPY_WORKERS = 2 * MAX_COPY_STREAMS
# Seconds a cancelled copy gets to stop at its next chunk boundary before it is abandoned:
# its job ends at once then, and the thread removes its partial file when the read returns.
COPY_CANCEL_GRACE = 3.0


class Copies:
    def __init__(
        self,
        models_dir: ModelsDir,
        ledger: SpaceLedger,
        collect: Callable[[str, str], Coroutine[Any, Any, None]],
        room_taken: Callable[[str], None] = lambda pool: None,
        verified: Verified | None = None,
        streams: Callable[[], int] = lambda: DEFAULT_COPY_STREAMS,
    ):
        """``collect(pool, rel)``: remove a copy an abandoned thread completed after all
        (no link points to it; the engine decides under its lock). ``room_taken(pool)``, on
        the event loop: a copy has just preallocated its whole file there, so the pool's
        usage changed at once (statvfs counts it), not only when the job ends.
        ``verified``: the blobs verified before, copied again without hashing while their
        cold file is unchanged (verified.py). ``streams()``: the copies allowed to read one
        source filesystem at once (storage.copyStreams, read at each admission)."""
        self.models_dir = models_dir
        self.ledger = ledger
        self._collect = collect
        self._room_taken = room_taken
        self.verified = verified
        self.streams = CopyStreams(streams)
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=COPY_WORKERS, thread_name_prefix="sl-copy"
        )
        self.abandoned: set[concurrent.futures.Future[Any]] = set()  # copies given up on

    def close(self) -> None:
        """No new copies; threads still blocked are not waited for."""
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def copy(
        self, pool: str, f: ModelFile, meter: ProgressMeter, job: Job
    ) -> CopyResult | None:
        """Copy one file into a pool, joining a copy of the same blob already under way;
        the copy's result, or None when another copy (or an earlier one) did it."""
        key = (pool, f.rel)
        while True:
            running = self.ledger.copies.get(key)
            if running is None:
                break
            try:
                await asyncio.shield(running)
            except Cancelled:
                if job.cancel_event.is_set():
                    raise
                continue  # the other job was cancelled; copy it ourselves
            await self._taken_elsewhere(job, f)  # the other job's copy holds the room
            meter.add(f.size)
            return None
        tree = self.models_dir.pool(pool)
        if tree.lstat(f.rel) is not None:
            await self._taken_elsewhere(job, f)
            meter.add(f.size)
            return None
        loop = asyncio.get_running_loop()
        # Claimed before the wait for a stream: a promote needing the same blob meanwhile
        # joins this copy rather than starting its own.
        future: asyncio.Future[None] = loop.create_future()
        self.ledger.copies[key] = future

        def allocated() -> None:  # on the copy thread, under the ledger's lock
            self.ledger.allocated(job.id, f.size)
            loop.call_soon_threadsafe(self._room_taken, pool)

        # The scan's device of the cold file; one without (none today) shares device 0.
        dev = f.ident.dev if f.ident is not None else 0
        try:
            await self._stream(dev, job, f.rel)
            # On the copies' own executor: a copy that blocks must not take a thread
            # from the metadata steps (asyncio.to_thread), nor delay a cancel.
            try:
                work = self.executor.submit(
                    copy_into,
                    self.models_dir.cold,
                    f.rel,
                    tree,
                    f.rel,
                    expect=f.ident,
                    like=self.models_dir.cold,
                    digest=f.digest,
                    expected_size=f.size,
                    on_bytes=meter.add,
                    cancel=job.cancel_event,
                    on_allocated=allocated,
                    allocation_lock=self.ledger.lock,
                    **self._verify_once(f.digest),
                )
            except BaseException:
                self.streams.release(dev)  # never started (the executor is shut down)
                raise
            # The stream is the thread's until it returns, even when abandoned below.
            work.add_done_callback(functools.partial(self._stream_ended, loop, dev))
            result = await self._await_copy(work, job, pool, f.rel)
        except BaseException as err:
            future.set_exception(err if isinstance(err, Exception) else Cancelled("cancelled"))
            future.exception()  # mark retrieved: joiners may not exist
            raise
        else:
            future.set_result(None)
            return result
        finally:
            del self.ledger.copies[key]

    async def _taken_elsewhere(self, job: Job, f: ModelFile) -> None:
        """``f``'s room is taken by a copy that is not this job's: no longer promised. Under
        the ledger's lock, as the job's own copy threads (running beside this one) move
        theirs; in a thread, since one of them may hold it through a long preallocation."""

        def moved() -> None:
            with self.ledger.lock:
                self.ledger.allocated(job.id, f.size)

        await asyncio.to_thread(moved)

    async def _stream(self, dev: int, job: Job, rel: str) -> None:
        """Wait for a stream of ``dev``; Cancelled (holding none) if the job is cancelled
        first: a copy queued behind a hung source must not delay its job's cancel."""
        # A stream acquire() got just as it was cancelled is handed on by acquire itself.
        admitted = await first_of(job, self.streams.acquire(dev))
        if admitted is not None and admitted.exception() is None:
            if not job.cancel_event.is_set():
                return
            self.streams.release(dev)
        raise Cancelled(f"promote of {job.model} cancelled before the copy of {rel} began")

    def _stream_ended(
        self, loop: asyncio.AbstractEventLoop, dev: int, work: concurrent.futures.Future[Any]
    ) -> None:
        """In the copy thread (or on the loop, for a copy that never ran): the copy's
        stream is free for the next one waiting."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: the daemon is exiting
            loop.call_soon_threadsafe(self.streams.release, dev)

    def _verify_once(self, digest: str | None) -> dict[str, Any]:
        v = self.verified
        if digest is None or v is None:
            return {}
        return {
            "known_good": lambda st: v.known(digest, st),
            "on_verified": lambda st: v.add(digest, st),
        }

    async def _await_copy(
        self, work: concurrent.futures.Future[Any], job: Job, pool: str, rel: str
    ) -> CopyResult:
        """Wait for a copy thread. Once the job is cancelled the thread gets
        COPY_CANCEL_GRACE to stop at a chunk boundary (then it has removed its partial file
        itself); a thread still blocked after that is abandoned and the job ends now."""
        copied = asyncio.wrap_future(work)
        cancelled = asyncio.ensure_future(job.cancel_requested.wait())
        try:
            await asyncio.wait({copied, cancelled}, return_when=asyncio.FIRST_COMPLETED)
            if not copied.done():
                await asyncio.wait({copied}, timeout=COPY_CANCEL_GRACE)
        finally:
            cancelled.cancel()
        if copied.done():
            return copied.result()  # the copy's own outcome (Cancelled included)
        copied.cancel()  # a copy still queued never starts; a running one is abandoned
        if not work.cancelled():
            self.abandoned.add(work)
            loop = asyncio.get_running_loop()
            work.add_done_callback(functools.partial(self._abandoned_copy_ended, loop, pool, rel))
            log.warning(
                "copy of %s into pool %s abandoned: its read from cold storage has not "
                "returned %.0f s after the cancel",
                rel,
                pool,
                COPY_CANCEL_GRACE,
            )
        raise Cancelled(
            f"promote of {job.model} cancelled; the read of {rel} from cold storage it was "
            "blocked in has not returned (its partial copy is removed when it does)"
        )

    def _abandoned_copy_ended(
        self,
        loop: asyncio.AbstractEventLoop,
        pool: str,
        rel: str,
        work: concurrent.futures.Future[Any],
    ) -> None:
        """In the copy thread, when an abandoned copy finally returns: it removed its
        partial file itself; a copy that completed left a file no link points to, which
        the engine collects."""

        def ended() -> None:
            self.abandoned.discard(work)
            log.info("abandoned copy of %s into pool %s has returned", rel, pool)
            if not work.cancelled() and work.exception() is None:
                loop.create_task(self._collect(pool, rel))

        with contextlib.suppress(RuntimeError):  # the loop is closed: the daemon is exiting
            loop.call_soon_threadsafe(ended)
