"""speedloaderd/opens.py against the real kernel: fanotify marks on real tmpfs mounts, opens
made by real child processes. Each wait is for the event the test expects, with a timeout."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from speedloaderd import opens as opens_mod
from speedloaderd.opens import Coalescer, ColdFile, Open, OpenWatch, by_model, own_mount
from speedloaderd.roots import Identity, Root

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 10.0
# The child: names itself (argv[1], as bytes with escapes), opens each path given on stdin
# line by line, says "done" per line, and exits when stdin closes: it is alive while the
# test waits for its opens to be read (its command is read from /proc then).
CHILD = r"""
import ast, sys
with open("/proc/self/comm", "wb") as f:
    f.write(ast.literal_eval(sys.argv[1]))
for line in sys.stdin:
    times, path = line.rstrip("\n").split(" ", 1)
    for _ in range(int(times)):
        with open(path, "rb"):
            pass
    print("done", flush=True)
"""


class Child:
    def __init__(self, name: bytes = b"opener") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, repr(name)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = self.proc.pid

    def open(self, path: Path, times: int = 1) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{times} {path}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline() == "done\n"

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(TIMEOUT)
        self.proc.stdout.close()


@pytest.fixture
def child() -> Iterator[Child]:
    c = Child()
    yield c
    c.close()


def mount_tmpfs(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "sl-opens-test", str(path)],
                   check=True)  # fmt: skip
    return path


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    made: list[Path] = []

    def make(name: str) -> Path:
        made.append(mount_tmpfs(tmp_path / name))
        return made[-1]

    yield make
    for p in reversed(made):
        subprocess.run(["umount", "-l", str(p)], capture_output=True)


def ident(p: Path) -> Identity:
    return Identity.of(os.stat(p))


def key(p: Path) -> tuple[int, int]:
    st = os.stat(p)
    return (st.st_dev, st.st_ino)


class Seen:
    """Every batch on_opens got, and a way to wait for an Open the test expects."""

    def __init__(self) -> None:
        self.batches: list[list[Open]] = []
        self._changed = asyncio.Event()

    def __call__(self, batch: list[Open]) -> None:
        self.batches.append(batch)
        self._changed.set()

    @property
    def opens(self) -> list[Open]:
        return [o for b in self.batches for o in b]

    async def until(self, cond: Callable[[list[Open]], bool]) -> list[Open]:
        async def wait() -> None:
            while not cond(self.opens):
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), TIMEOUT)
        return self.opens


def by(pid: int, k: tuple[int, int]) -> Callable[[list[Open]], bool]:
    return lambda opens: any(o.pid == pid and o.key == k for o in opens)


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_opens_by_a_child_are_seen_with_its_pid_and_escaped_command(tmpfs):
    pool = tmpfs("pool")
    f = pool / "blob"
    f.write_bytes(b"x" * 4096)

    async def go() -> list[Open]:
        seen = Seen()
        watch = OpenWatch([pool], seen, window=0.05)
        assert watch.start() and watch.state == "watching"
        c = Child(b"evil\x1b[31m\x07")
        try:
            c.open(f, 3)
            return [o for o in await seen.until(by(c.pid, key(f))) if o.pid == c.pid]
        finally:
            c.close()
            watch.stop()

    found = asyncio.run(go())
    assert {o.key for o in found} == {key(f)}
    assert {o.command for o in found} == {"evil\\x1b[31m\\x07"}
    # The kernel merges identical events still queued: at most the 3 opens, at least one.
    assert 1 <= sum(o.count for o in found) <= 3
    assert all(o.first <= o.last for o in found)


def test_the_readers_own_opens_are_ignored(tmpfs, child):
    pool = tmpfs("pool")
    mine, theirs = pool / "mine", pool / "theirs"
    mine.write_bytes(b"m")
    theirs.write_bytes(b"t")

    async def go() -> tuple[list[Open], OpenWatch]:
        seen = Seen()
        watch = OpenWatch([pool], seen, window=0.05)
        assert watch.start()
        try:
            for _ in range(5):
                mine.read_bytes()  # this process: the daemon's own copies and scans
            # Queued after this process's: once it is read, theirs have been too.
            child.open(theirs)
            return await seen.until(by(child.pid, key(theirs))), watch
        finally:
            watch.stop()

    opens, watch = asyncio.run(go())
    assert watch.ignored >= 1
    assert [o for o in opens if o.pid == os.getpid() or o.key == key(mine)] == []


def test_an_open_through_a_symlink_is_seen_on_the_targets_mount(tmp_path, tmpfs, child):
    """An inference server opens the models dir's link; the kernel reports the pool copy.
    The link's own directory (here on `/`, not marked) says nothing."""
    pool = tmpfs("pool")
    copy = pool / "model.gguf"
    copy.write_bytes(b"g" * 100)
    models = tmp_path / "models"
    models.mkdir()
    (models / "model.gguf").symlink_to(copy)
    elsewhere = models / "unmarked"
    elsewhere.write_bytes(b"u")

    async def go() -> list[Open]:
        seen = Seen()
        watch = OpenWatch([pool], seen, window=0.05)
        assert watch.start()
        try:
            child.open(elsewhere)
            child.open(models / "model.gguf")
            return await seen.until(by(child.pid, key(copy)))
        finally:
            watch.stop()

    opens = asyncio.run(go())
    assert {o.key for o in opens} == {key(copy)}


def test_many_opens_coalesce_into_one_open_per_file_and_process_per_window(tmpfs, child):
    pool = tmpfs("pool")
    files = [pool / f"shard-{i}" for i in range(50)]
    for f in files:
        f.write_bytes(b"s")

    async def go() -> tuple[list[list[Open]], OpenWatch]:
        seen = Seen()
        watch = OpenWatch([pool], seen, window=0.2)
        assert watch.start()
        try:
            for f in files:
                child.open(f, 20)
            await seen.until(by(child.pid, key(files[-1])))
            return seen.batches, watch
        finally:
            watch.stop()

    batches, watch = asyncio.run(go())
    theirs = [[o for o in b if o.pid == child.pid] for b in batches]
    for batch in theirs:
        assert len({o.key for o in batch}) == len(batch)  # one entry per file per window
    assert {o.key for b in theirs for o in b} == {key(f) for f in files}
    assert 50 <= sum(o.count for b in theirs for o in b) <= 50 * 20


def test_the_coalescer_counts_and_stays_bounded():
    c = Coalescer(cap=3, command=lambda pid: f"p{pid}")
    for i in range(1000):
        c.add((1, i % 2), 7, float(i))
    c.add((1, 0), 8, 5000.0)
    assert len(c) == 3 and c.full
    got = sorted(c.take(), key=lambda o: (o.ino, o.pid))
    assert [(o.ino, o.pid, o.command, o.count, o.first, o.last) for o in got] == [
        (0, 7, "p7", 500, 0.0, 998.0),
        (0, 8, "p8", 1, 5000.0, 5000.0),
        (1, 7, "p7", 500, 1.0, 999.0),
    ]
    assert len(c) == 0 and c.take() == []


def test_a_burst_larger_than_the_kernels_queue_is_counted_logged_once_and_survived(
    tmpfs, child, caplog
):
    """17,000 distinct files opened while the reader is held: the kernel's queue (16,384)
    overflows. The overflow is counted, logged once, and the watch goes on seeing opens."""
    queue = int(Path("/proc/sys/fs/fanotify/max_queued_events").read_text())
    pool = tmpfs("pool")
    n = queue + 600
    files = [pool / f"f{i}" for i in range(n)]
    for f in files:
        f.write_bytes(b"")  # before the watch: these opens are not queued
    listing = pool / "list"
    listing.write_text("".join(f"1 {f}\n" for f in files))
    after = pool / "after"
    after.write_bytes(b"a")

    async def go() -> OpenWatch:
        seen = Seen()
        watch = OpenWatch([pool], seen, window=0.05, max_pending=n + 10)
        assert watch.start()
        try:
            with watch._lock:  # the reader cannot read: the burst stays in the kernel
                burst = subprocess.run(
                    [sys.executable, "-c", CHILD, repr(b"burst")],
                    stdin=listing.open(),
                    capture_output=True,
                    text=True,
                )
                assert burst.stdout.count("done") == n
            watch._drain()  # read it all now (the thread would too, in its own time)
            assert watch.overflows >= 1
            child.open(after)
            await seen.until(by(child.pid, key(after)))
            return watch
        finally:
            watch.stop()

    with caplog.at_level(logging.WARNING, logger="speedloaderd.opens"):
        watch = asyncio.run(go())
    assert watch.overflows >= 1
    assert watch.events >= queue - 1  # the queue's worth was read, each fd closed
    assert caplog.text.count("queue overflowed") == 1


def test_a_removed_mount_is_unmarked_and_can_be_unmounted(tmpfs, child):
    """set_mounts() without a pool: its opens are no longer seen, and the events already
    queued for it (they hold the mount: umount says busy) are read before it returns.
    events_per_s=0: the reader thread never reads, so only that drain can have read them."""
    a, b = tmpfs("a"), tmpfs("b")
    fa, fb = a / "f", b / "f"
    fa.write_bytes(b"a")
    fb.write_bytes(b"b")
    kb = key(fb)

    async def go() -> list[Open]:
        seen = Seen()
        watch = OpenWatch([a, b], seen, window=0.05, events_per_s=0)
        assert watch.start()
        try:
            child.open(fb)  # queued, unread
            busy = subprocess.run(["umount", str(b)], capture_output=True)
            assert busy.returncode != 0  # the queued event holds the mount
            watch.set_mounts([a])
            subprocess.run(["umount", str(b)], check=True)
            child.open(fa)
        finally:
            watch.stop()  # delivers what is pending
        return seen.opens

    opens = asyncio.run(go())
    assert {o.key for o in opens if o.pid == child.pid} == {kb}  # read by the drain


def test_unmarked_mounts_and_remarking(tmp_path, tmpfs, child):
    a = tmpfs("a")
    not_mounted = tmp_path / "not-mounted"
    not_mounted.mkdir()
    fa = a / "f"
    fa.write_bytes(b"a")
    b = tmp_path / "b"

    async def go() -> tuple[list[Open], OpenWatch]:
        seen = Seen()
        watch = OpenWatch([not_mounted], seen, window=0.05)
        assert watch.start()
        try:
            assert watch.unmarked == {str(not_mounted): "not a mount point"}
            mount_tmpfs(b)
            fb = b / "f"
            fb.write_bytes(b"b")
            watch.set_mounts([a, b])  # pools added
            child.open(fa)
            child.open(fb)
            await seen.until(lambda o: by(child.pid, key(fa))(o) and by(child.pid, key(fb))(o))
            watch.set_mounts([b])
            child.open(fa)
            child.open(fb, 2)
            await seen.until(lambda o: sum(x.count for x in o if x.key == key(fb)) >= 2)
            return seen.opens, watch
        finally:
            watch.stop()
            subprocess.run(["umount", "-l", str(b)], capture_output=True)

    opens, watch = asyncio.run(go())
    assert sum(o.count for o in opens if o.key == key(fa)) == 1  # once, before its removal
    assert str(a) not in watch.unmarked
    assert own_mount(a) and not own_mount(not_mounted)


def test_a_full_window_is_delivered_early(tmpfs, child):
    """max_pending bounds what waits: a window of 30 s is cut short once 10 are pending."""
    pool = tmpfs("pool")
    files = [pool / f"f{i}" for i in range(25)]
    for f in files:
        f.write_bytes(b"")

    async def go() -> list[list[Open]]:
        seen = Seen()
        watch = OpenWatch([pool], seen, window=30.0, max_pending=10)
        assert watch.start()
        try:
            for f in files:
                child.open(f)
            await seen.until(lambda o: len(o) >= 10)  # well before the 30 s window ends
            return list(seen.batches)
        finally:
            watch.stop()

    early = asyncio.run(go())
    assert early and all(10 <= len(b) <= 10 + 2048 for b in early)


def test_cold_files_on_a_shared_mount_are_watched_by_inode_marks(tmp_path, child):
    """Cold storage on `/` (as here): only the model files are marked, never the mount.
    A file swapped since the scan is not marked."""
    cold = tmp_path / "cold"
    (cold / "sub").mkdir(parents=True)
    model, other, swapped = cold / "sub" / "m.gguf", cold / "other.gguf", cold / "s.gguf"
    for f in (model, other, swapped):
        f.write_bytes(b"c")
    root = Root(cold, "cold storage", links=True)
    old = ident(swapped)
    (cold / "s.new").write_bytes(b"new")
    (cold / "s.new").rename(swapped)  # another inode (the old one is still in use meanwhile)

    async def go() -> tuple[list[Open], OpenWatch]:
        seen = Seen()
        files = [ColdFile(root, "sub/m.gguf", ident(model)), ColdFile(root, "s.gguf", old)]
        watch = OpenWatch([], seen, files=files, window=0.05)
        assert watch.start()
        try:
            child.open(other)
            child.open(swapped)
            child.open(model)
            await seen.until(by(child.pid, key(model)))
            watch.set_files([ColdFile(root, "other.gguf", ident(other))])
            child.open(model)
            child.open(other)
            await seen.until(by(child.pid, key(other)))
            return seen.opens, watch
        finally:
            watch.stop()

    opens, watch = asyncio.run(go())
    mine = [o for o in opens if o.pid == child.pid]
    assert sum(o.count for o in mine if o.key == key(model)) == 1  # before set_files
    assert {o.key for o in mine} == {key(model), key(other)}


def test_re_marking_the_same_files_loses_no_open(tmp_path, child, monkeypatch):
    """Autotiering re-marks after every promote and demote, mostly the same cold files: that
    drops no mark (no FAN_MARK_FLUSH) and so no open, here 40 opens each waited for while
    another thread re-marks without pause."""
    cold = tmp_path / "cold"
    cold.mkdir()
    paths = [cold / f"m{i}.gguf" for i in range(20)]
    for p in paths:
        p.write_bytes(b"c")
    root = Root(cold, "cold storage", links=True)
    files = [ColdFile(root, p.name, ident(p)) for p in paths]
    flushes = []
    real_mark = opens_mod.fanotify_mark

    def mark(fd, flags, mask, path):
        if flags & opens_mod.FAN_MARK_FLUSH:
            flushes.append(path)
        return real_mark(fd, flags, mask, path)

    monkeypatch.setattr(opens_mod, "fanotify_mark", mark)

    async def go() -> int:
        seen = Seen()
        watch = OpenWatch([], seen, files=files, window=0.02)
        assert watch.start()
        stop = threading.Event()

        def remark() -> None:
            while not stop.is_set():
                watch.set_files(files)

        t = threading.Thread(target=remark)
        t.start()
        try:
            target = key(paths[7])
            for n in range(1, 41):
                child.open(paths[7])
                await seen.until(lambda o, n=n: sum(x.count for x in o if x.key == target) >= n)
            return sum(o.count for o in seen.opens if o.key == target)
        finally:
            stop.set()
            t.join()
            watch.stop()

    assert asyncio.run(go()) == 40
    assert flushes == []


def test_a_start_and_a_re_mark_together_leave_every_file_marked(tmp_path, child, monkeypatch):
    """The daemon starts the watch in one thread while a re-mark of the catalog's files may
    run in another: whichever goes first, every file is marked and counted once, and its
    open is seen (a file counted but not marked was never seen again). Marking is slowed
    (1 ms per file, after the mark and before it is counted) so that the two overlap."""
    cold = tmp_path / "cold"
    cold.mkdir()
    paths = [cold / f"m{i}.gguf" for i in range(30)]
    for p in paths:
        p.write_bytes(b"c")
    root = Root(cold, "cold storage", links=True)
    files = [ColdFile(root, p.name, ident(p)) for p in paths]
    real_mark = opens_mod.fanotify_mark
    calls = []
    begun = threading.Event()

    def slow(*args):
        done = real_mark(*args)
        calls.append(args)
        if len(calls) == 5:
            begun.set()  # the start is marking: the re-mark goes now
        time.sleep(0.001)
        return done

    monkeypatch.setattr(opens_mod, "fanotify_mark", slow)

    def remark(watch: OpenWatch) -> None:
        begun.wait(TIMEOUT)
        watch.set_marks([], files)

    async def go() -> tuple[int, list[Open]]:
        seen = Seen()
        watch = OpenWatch([], seen, files=files, window=0.02)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.gather(
                asyncio.to_thread(watch.start, loop), asyncio.to_thread(remark, watch)
            )
            marked = watch.files_marked
            for p in paths:
                child.open(p)
            want = {key(p) for p in paths}
            found = await seen.until(lambda o: want <= {x.key for x in o if x.pid == child.pid})
            return marked, found
        finally:
            watch.stop()

    marked, found = asyncio.run(go())
    assert marked == len(paths)
    assert {o.key for o in found if o.pid == child.pid} == {key(p) for p in paths}


def test_no_fd_leaks_and_stop_is_clean(tmpfs):
    pool = tmpfs("pool")
    files = [pool / f"f{i}" for i in range(200)]
    for f in files:
        f.write_bytes(b"")

    async def go() -> tuple[int, int, int, Seen, OpenWatch]:
        seen = Seen()
        before = fds()
        watch = OpenWatch([pool], seen, window=30.0)  # nothing delivered before stop()
        c = Child()
        assert fds() == before + 2  # its stdin and stdout
        assert watch.start()
        during = fds() - 2
        try:
            for f in files:
                c.open(f, 3)
            # Every event read now (each one an fd the kernel opened for us), then counted.
            watch._drain()
            assert _queued(watch) == 0
            loaded = fds() - 2
        finally:
            c.close()
        watch.stop()
        assert fds() == before
        return before, during, loaded, seen, watch

    before, during, loaded, seen, watch = asyncio.run(go())
    assert during == before + 3  # the fanotify fd and the wake pipe
    assert loaded == during
    assert watch.state == "off" and watch._thread is None
    assert len(seen.batches) == 1  # what was pending, delivered by stop()
    assert {o.key for o in seen.batches[0]} == {key(f) for f in files}
    assert watch.events >= 200


def _queued(watch: OpenWatch) -> int:
    """Bytes the kernel holds for the fanotify fd (FIONREAD)."""
    import fcntl
    import struct
    import termios

    return struct.unpack("i", fcntl.ioctl(watch._fd, termios.FIONREAD, b"\0" * 4))[0]


def test_fanotify_refused_is_a_state_and_one_log_line(tmpfs):
    """Without CAP_SYS_ADMIN (the bounding set dropped, as root) fanotify_init says EPERM:
    start() is False, the state says why, one warning; nothing raises."""
    pool = tmpfs("pool")
    code = (
        "import asyncio, logging\n"
        "from speedloaderd.opens import OpenWatch\n"
        "logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')\n"
        "async def go():\n"
        f"    w = OpenWatch([{str(pool)!r}], print)\n"
        "    print(w.start(), w.state, w.reason)\n"
        "    w.stop()\n"
        "asyncio.run(go())\n"
    )
    out = subprocess.run(
        ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin", sys.executable,
         "-c", code],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False unavailable fanotify_init: needs CAP_SYS_ADMIN " \
        "(the daemon runs as root)"  # fmt: skip
    assert out.stderr.count("WARNING") == 1 and "not watched" in out.stderr


def test_by_model_counts_uses_not_shards():
    opens = [
        Open(1, 10, 100, "llama", 1.0, 2.0, 3),
        Open(1, 11, 100, "llama", 1.5, 3.0, 1),  # another shard, same loader: one use
        Open(1, 10, 200, "cat", 4.0, 4.0, 1),
        Open(1, 99, 100, "llama", 5.0, 5.0, 1),  # no model's file
    ]
    index = {(1, 10): ("a", "b"), (1, 11): ("a",)}  # a shared blob: both models
    got = by_model(opens, index)
    assert set(got) == {"a", "b"}
    assert (got["a"].uses, got["a"].opens, got["a"].last) == (2, 5, 4.0)
    assert got["a"].commands == {"llama", "cat"}
    assert (got["b"].uses, got["b"].opens) == (2, 4)
