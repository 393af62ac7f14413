"""The space ledger: room in the pools that promotes have been promised, and copies under way.

Placement decides from a pool's free space (statvfs) less what running promotes were
promised and have not taken yet. A copy preallocates its whole file when it starts
(posix_fallocate), so from then on statvfs counts it: the promise for that file is dropped
at the same instant, under the allocation lock that placement reads free space under too.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterable

from .pools import Pool


class SpaceLedger:
    """What running promotes hold in the pools.

    Invariant: a file is counted as promised or as taken, never both. A promote's files not
    yet started are *promised* (``inflight_bytes``); a started copy has *taken* its room
    (statvfs counts its preallocated file); ``allocated`` moves a file from one to the
    other under ``lock``, the lock ``free`` reads statvfs under, so placement never sees a
    file in both (overbooking nothing) nor in neither (overbooking the pool).

    Besides bytes, a promote *holds* its files' names in its pool (``holds``): they are not
    garbage while it runs, even before their copy exists. And ``copies`` maps each file
    being copied into a pool to the copy's future, so a second promote needing the same
    blob joins it instead of copying it again.

    Changed only on the event loop under the engine lock, which placement runs under too,
    except ``allocated``, which a copy thread calls under ``lock``.
    """

    def __init__(self) -> None:
        # Held while a copy preallocates its file and while placement reads free space.
        self.lock = threading.Lock()
        self._held: Counter[tuple[str, str]] = Counter()  # (pool, rel) -> promotes holding it
        self._holds: dict[int, tuple[str, tuple[str, ...]]] = {}  # job id -> (pool, rels)
        self._unstarted: dict[int, tuple[str, int]] = {}  # job id -> (pool, bytes not started)
        self.copies: dict[tuple[str, str], asyncio.Future[None]] = {}

    # --- a promote's promise -------------------------------------------------------------

    def reserve(self, job_id: int, pool: str, rels: Iterable[str], unstarted: int) -> None:
        """Promise ``pool`` room for a promote: its files are not garbage, and the bytes it
        has not started copying are not free."""
        rels = tuple(rels)
        self._holds[job_id] = (pool, rels)
        for rel in rels:
            self._held[(pool, rel)] += 1
        self._unstarted[job_id] = (pool, unstarted)

    def unreserve(self, job_id: int) -> None:
        """The promote ended (either way): it holds and is promised nothing any more."""
        self._unstarted.pop(job_id, None)
        pool, rels = self._holds.pop(job_id, ("", ()))
        for rel in rels:
            self._held[(pool, rel)] -= 1
            if self._held[(pool, rel)] <= 0:
                del self._held[(pool, rel)]

    def allocated(self, job_id: int, size: int) -> None:
        """A file of ``job_id`` of ``size`` bytes now takes its room in the pool (its copy
        preallocated it, or another promote's copy did): no longer promised. The copy
        thread calls this inside ``lock``, right after posix_fallocate; for a file another
        promote's copy already took (statvfs counts it either way) it is called inside
        ``lock`` too, since the job's other files may be copying at the same time."""
        entry = self._unstarted.get(job_id)
        if entry is not None:
            self._unstarted[job_id] = (entry[0], max(entry[1] - size, 0))

    # --- what placement, garbage collection and health read ------------------------------

    def inflight_bytes(self, pool: str) -> int:
        """Room promised to promotes into ``pool`` that their copies have not taken yet."""
        return sum(left for p, left in self._unstarted.values() if p == pool)

    def free(self, pool: Pool) -> int:
        """``pool``'s free bytes (a statvfs) less its promises, both read under ``lock``,
        so that no file is counted twice or not at all. Blocking."""
        with self.lock:
            return pool.usage().free - self.inflight_bytes(pool.name)

    def holds(self, pool: str, rel: str) -> bool:
        """Is ``rel`` in ``pool`` a running promote's, or being copied? (Not garbage.)"""
        return (pool, rel) in self._held or (pool, rel) in self.copies

    def copying_into(self, pool: str) -> bool:
        """Is any copy into ``pool`` running? (Its partial file is not an orphan.)"""
        return any(key[0] == pool for key in tuple(self.copies))

    def empty(self) -> bool:
        return not (self._held or self._holds or self._unstarted)

    # --- repair --------------------------------------------------------------------------

    def clear_stale(self, running: set[int]) -> list[str]:
        """Drop what no running promote (job ids in ``running``) owns: a bug's leak must not
        hold a pool's room until restart. Returns what was dropped, for a person."""
        dropped = []
        for job_id in sorted((set(self._holds) | set(self._unstarted)) - running):
            pool = self._holds.get(job_id, self._unstarted.get(job_id, ("?", 0)))[0]
            self.unreserve(job_id)
            dropped.append(f"job {job_id} in pool {pool}")
        # Whatever the counter holds beyond the running promotes' files is a stray too.
        owned = Counter((pool, rel) for pool, rels in self._holds.values() for rel in rels)
        strays = sorted(set(self._held) - set(owned))
        dropped += [f"{rel} in pool {pool}" for pool, rel in strays]
        self._held = owned
        return dropped
