"""The space ledger alone: any sequence of reserve, allocate, unreserve and stale-clearing
keeps each promoted file counted once, as promised or as taken.

A model of the pools stands beside the ledger: each promote's files, each either not yet
started (promised) or preallocated (taken, which the pool's statvfs counts). After every
step the free room placement sees must be the pool's size less every running promote's
whole size: a file counted twice (promised and taken) or not at all would show there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from speedloaderd.ledger import SpaceLedger
from speedloaderd.pools import PoolUsage

POOLS = ("fast", "slow")
SIZE = 1 << 40  # large enough that no test overfills it: the arithmetic is what is checked
RELS = tuple(f"blobs/sha256-{i}" for i in range(6))


@dataclass
class FakePool:
    """What the ledger reads of a pool: its name and a statvfs that counts taken files."""

    name: str
    taken: int = 0

    def usage(self) -> PoolUsage:
        return PoolUsage(SIZE, self.taken, SIZE - self.taken)


@dataclass
class Promote:
    pool: str
    files: dict[str, int]  # rel -> size
    allocated: set[str] = field(default_factory=set)


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ledger = SpaceLedger()
        self.pools = {name: FakePool(name) for name in POOLS}
        self.promotes: dict[int, Promote] = {}
        self.next_id = 1

    @rule(
        pool=st.sampled_from(POOLS),
        files=st.dictionaries(st.sampled_from(RELS), st.integers(0, 1 << 30), max_size=4),
    )
    def reserve(self, pool: str, files: dict[str, int]) -> None:
        job_id, self.next_id = self.next_id, self.next_id + 1
        self.promotes[job_id] = Promote(pool, files)
        self.ledger.reserve(job_id, pool, files, sum(files.values()))

    @precondition(lambda self: any(p.files.keys() - p.allocated for p in self.promotes.values()))
    @rule(data=st.data())
    def allocate(self, data: st.DataObject) -> None:
        """A copy preallocates one file: statvfs counts it from now on."""
        job_id = data.draw(
            st.sampled_from(
                sorted(j for j, p in self.promotes.items() if p.files.keys() - p.allocated)
            )
        )
        p = self.promotes[job_id]
        rel = data.draw(st.sampled_from(sorted(p.files.keys() - p.allocated)))
        with self.ledger.lock:  # as the copy thread does, around posix_fallocate
            self.pools[p.pool].taken += p.files[rel]
            self.ledger.allocated(job_id, p.files[rel])
        p.allocated.add(rel)

    @precondition(lambda self: self.promotes)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        """A promote ends and the ledger forgets it. Modelled as a failure, its copies
        collected (a success leaves them taken by links, which is the pool's business)."""
        job_id = data.draw(st.sampled_from(sorted(self.promotes)))
        p = self.promotes.pop(job_id)
        self.ledger.unreserve(job_id)
        self.pools[p.pool].taken -= sum(p.files[r] for r in p.allocated)

    @rule(data=st.data())
    def clear_stale(self, data: st.DataObject) -> None:
        """Health's repair: the promotes not in ``running`` leaked (a bug ended them without
        an unreserve); their promises and holds go, the running ones' stay."""
        running = (
            data.draw(st.sets(st.sampled_from(sorted(self.promotes)))) if self.promotes else set()
        )
        dropped = self.ledger.clear_stale(running)
        assert len(dropped) == len(self.promotes) - len(running)
        for job_id in set(self.promotes) - running:
            p = self.promotes.pop(job_id)
            self.pools[p.pool].taken -= sum(p.files[r] for r in p.allocated)

    @invariant()
    def each_file_counted_once(self) -> None:
        for name, pool in self.pools.items():
            whole = sum(sum(p.files.values()) for p in self.promotes.values() if p.pool == name)
            assert self.ledger.free(pool) == SIZE - whole

    @invariant()
    def running_promotes_hold_their_files(self) -> None:
        for name in POOLS:
            for rel in RELS:
                held = any(p.pool == name and rel in p.files for p in self.promotes.values())
                assert self.ledger.holds(name, rel) == held, (name, rel)
        assert self.ledger.empty() == (not self.promotes)


TestLedger = LedgerMachine.TestCase
TestLedger.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)


def test_a_copy_under_way_is_held_and_marks_its_pool():
    import asyncio

    ledger = SpaceLedger()
    loop = asyncio.new_event_loop()
    try:
        ledger.copies[("fast", RELS[0])] = loop.create_future()
        assert ledger.holds("fast", RELS[0]) and not ledger.holds("slow", RELS[0])
        assert ledger.copying_into("fast") and not ledger.copying_into("slow")
        assert ledger.empty()  # a copy is not a promise: its promote's reserve is
    finally:
        loop.close()
