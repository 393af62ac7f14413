"""The transfers under way in a pool, as the Models strip and the Tiers cards show them
beside the pool's usage bar."""

from __future__ import annotations

from rich.text import Text

from speedloader_client.records import Job, Pool

from ..state import DaemonState


def pool_jobs(state: DaemonState, pool: Pool) -> list[Job]:
    """The running transfers into or out of ``pool`` (not its own lifecycle jobs)."""
    return sorted(
        (
            j
            for j in state.jobs.values()
            if j.running and j.pool == pool.name and not j.operation.startswith("pool-")
        ),
        key=lambda j: j.id,
    )


def transfers_text(jobs: list[Job]) -> Text:
    """What the pool is receiving or giving up now, e.g. "⟳ promote big:70b 45%".

    Shown beside the usage bar because the bar is the daemon's UsedBytes, a statvfs
    reading published now and then, not byte by byte: a copy takes its whole room when
    it starts (posix_fallocate), and the reading that shows it may come seconds later
    (measured: 5 s into a 12 s copy of 3 GiB). The job's progress is live."""
    text = Text()
    for j in jobs:
        text.append(f"  ⟳ {j.operation} ", style="bold yellow")
        text.append(j.model)  # the daemon's name: literal
        if j.bytes_total:
            text.append(f" {j.progress * 100:.0f}%", style="yellow")
    return text
