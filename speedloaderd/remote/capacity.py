"""How much RAM a remote host can lend: its /proc/meminfo, read over the SSH session.

A remote pool is a tmpfs file that is fallocate'd in full, so its pages are taken at once
and can never be reclaimed (there is rarely swap on a RAM server, and swapping a RAM disk
would defeat it anyway). Asking for more than the host can spare does not fail cleanly:
its OOM killer starts killing processes, sshd among them, and the pages we took stay
taken. So connect and grow ask first and refuse, before anything is created there.

The margin kept for the host is the larger of 10% of its RAM and 256 MiB: 256 MiB is the
most the kernel itself keeps free (min_free_kbytes is capped at 262144), and 10% leaves
its page cache, nvmet's queues, sshd and whatever else the host runs room to breathe.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import Failed, NoSpace
from ..sizes import format_size
from .command import Runner

MEMINFO = "/proc/meminfo"
MARGIN_FRACTION = 10  # keep MemTotal / 10 ...
MARGIN_FLOOR = 256 << 20  # ... or 256 MiB, whichever is larger


@dataclass(frozen=True)
class RemoteMemory:
    total: int  # MemTotal, bytes
    available: int  # MemAvailable, bytes

    @property
    def margin(self) -> int:
        return max(self.total // MARGIN_FRACTION, MARGIN_FLOOR)

    @property
    def lendable(self) -> int:
        """What a pool may take now without eating into the margin (never negative)."""
        return max(self.available - self.margin, 0)


def parse_meminfo(text: str, where: str) -> RemoteMemory:
    """MemTotal and MemAvailable from /proc/meminfo text (values are in kB)."""
    found: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if key in ("MemTotal", "MemAvailable") and fields and fields[0].isdigit():
            found[key] = int(fields[0]) * 1024
    if len(found) != 2:
        raise Failed(
            f"{where}: {MEMINFO} has no MemTotal and MemAvailable lines; cannot tell how much "
            "RAM the host can lend (a Linux 3.14 or newer kernel has both)"
        )
    return RemoteMemory(total=found["MemTotal"], available=found["MemAvailable"])


def read_memory(runner: Runner) -> RemoteMemory:
    text = runner.read_text(MEMINFO)
    if text is None:
        raise Failed(f"{runner.name}: {MEMINFO} does not exist; is this a Linux host?")
    return parse_meminfo(text, runner.name)


def check_can_lend(runner: Runner, host: str, pool: str, asked: int, what: str) -> RemoteMemory:
    """Raise NoSpace unless ``host`` can lend ``asked`` more bytes of RAM; change nothing.

    ``what`` says what the bytes are for, e.g. "a new pool" or "growing the pool by".
    """
    mem = read_memory(runner)
    if asked > mem.lendable:
        raise NoSpace(
            f"remote host {host} cannot lend {format_size(asked)} of RAM for {what} "
            f"{pool!r}: it has {format_size(mem.available)} available and keeps "
            f"{format_size(mem.margin)} for itself, so at most {format_size(mem.lendable)} "
            "can go to a pool; ask for less or free RAM there"
        )
    return mem


__all__ = [
    "MARGIN_FLOOR",
    "RemoteMemory",
    "check_can_lend",
    "parse_meminfo",
    "read_memory",
]
