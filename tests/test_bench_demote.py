"""What bench/demote_loaded.py reads of a loaded model's process, checked on a plain mapper
(tests/holder_proc.py): the pages of the copy it has resident, and the moment it lets go of
the mapping, which splits the bench's demote time. Nothing here is timed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.demote_loaded import MappingWatch, resident_in

HOLDER = Path(__file__).with_name("holder_proc.py")
PAGES = 64


def test_the_bench_sees_a_mapper_hold_the_copy_and_let_go(workdir):
    copy = workdir / "copy.gguf"
    copy.write_bytes(b"\x5a" * (PAGES * 4096))
    holder = subprocess.Popen(
        [sys.executable, str(HOLDER), "map", str(copy)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert holder.stdout.readline() == b"ready\n"  # mapped, every page touched
        assert resident_in(holder.pid, copy) == PAGES * 4096
        assert resident_in(holder.pid, workdir) == 0  # another inode: none of its pages
        held = MappingWatch(holder.pid, copy).start()
        assert held.stop() is None  # still mapped when the watch ended: no let-go seen
        watch = MappingWatch(holder.pid, copy).start()
        holder.stdin.close()  # the mapper exits, its mapping with it
        assert holder.wait(timeout=30) == 0
        watch.thread.join(timeout=30)
        assert not watch.thread.is_alive()
        assert watch.stop() is not None  # the let-go was seen, by the watch itself
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
