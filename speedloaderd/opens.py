"""File opens of model files, seen by the kernel (fanotify): the usage signal of tiering.

Whatever the backend, a server that loads a model opens its files; an opener reaches them
through the models dir's links and the kernel reports the file opened, on its own mount (a
pool copy on the pool's tmpfs, or the cold file). Each event: the file's (dev, ino) by an
fstat of the fd the kernel opened for us (closed at once; never read, nothing followed),
the pid, and its command from /proc/<pid>/comm (untrusted: escaped by holders.printable).
The daemon's own opens (its copies and scans) are ignored by pid. One :class:`Open` per
(file, process) per window (1 s); at most MAX_PENDING entries pending (then the window is
delivered early). Attribution to models is the caller's (:func:`by_model` with the
engine's FileIndex.models).

Choices, with what decided them (kernel 6.18, 2 shared cores, the machine under the load
of other test suites; ``opener`` = a C loop of open+close over 10,000 files):

- fd events (FAN_CLASS_NOTIF, event fds O_RDONLY|O_LARGEFILE|O_CLOEXEC|O_NOATIME), not
  FAN_REPORT_FID: a file handle is opaque and each filesystem's own; turning it into
  (dev, ino) takes open_by_handle_at (an open of the file after all) or decoding private
  formats (tmpfs and ext4 carry the inode number, NFS and BeeGFS do not), and filesystems
  with a zero fsid cannot share one FID group with the pools. Cost of fd events: the
  kernel opens each event's file inside read() (on NFSv4 an OPEN call), so reading is in
  a thread of its own, never the event loop.
- Cost per event read here: about 5 us of this thread's CPU (read, fstat, close,
  coalesce): 20,500 events/s took 10% of a core. A loop opening files as fast as it can
  gives 200,000 events/s, and even a bare reader (read, fstat, close) keeping up with it
  took 55-67% of a core.
  So reading has a budget, EVENTS_PER_S = 20,000 (about 10% of a core at most): beyond
  it, events wait in the kernel's queue (16,384), which merges repeats of the same file
  by the same process; only a flood over more distinct files than that overflows
  (FAN_Q_OVERFLOW: counted, logged once per burst).
- Pools: a mount mark each (FAN_MARK_MOUNT; only model copies live on a pool's tmpfs).
- Cold storage as a mount of its own: a mount mark too. Cold storage sharing a mount
  (with `/` here): inode marks on the model files only (:class:`ColdFile`). A mount mark
  on `/` would make every open on `/` by anyone an event: the opener ran 2-2.7x slower
  with it (330,000 -> 120,000-150,000 opens/s), the budget would go to unrelated files
  (any local user's loop over /usr drowns the models' opens), and at rest it saw 300-900
  events/s here. With inode marks on 1,000 files, opens of other files on `/` cost
  nothing measurable (395,000 opens/s against 330,000-520,000 unwatched, noise), opens
  of marked files the same as under a mount mark. Marking 10,000 files took 0.13 s
  (openat2 O_PATH beneath the cold root, checked against the scan's Identity, marked
  through its /proc/self/fd link); each mark keeps its inode in memory. FAN_UNLIMITED_MARKS
  (root) lifts the per-user limit. FAN_MARK_FILESYSTEM would see more, not less, and an
  ignore mask cannot say "everything but these files".
- FAN_OPEN only: one event per use (FAN_CLOSE_NOWRITE would double them and says no
  more: a server that maps a model closes it right after).

A queued event holds a reference on its mount (umount: "target is busy"), so removing a
mount mark reads the queue empty before set_mounts() returns, and the fanotify fd is closed
by stop(). Without fanotify (EPERM without CAP_SYS_ADMIN, ENOSYS without CONFIG_FANOTIFY)
the watch is in state "unavailable" with its reason and one log line; nothing raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import functools
import logging
import os
import select
import stat
import threading
import time
from collections.abc import Callable, Collection, Container, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .holders import COMMAND_CHARS, FileKey, printable
from .pools import mount_at
from .roots import Identity, Root, openat2

log = logging.getLogger(__name__)

# <linux/fanotify.h>
FAN_CLASS_NOTIF = 0x0
FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_UNLIMITED_MARKS = 0x20
FAN_OPEN = 0x20
FAN_Q_OVERFLOW = 0x4000
FAN_MARK_ADD = 0x1
FAN_MARK_REMOVE = 0x2
FAN_MARK_DONT_FOLLOW = 0x4
FAN_MARK_ONLYDIR = 0x8
FAN_MARK_MOUNT = 0x10
FAN_MARK_FLUSH = 0x80
FAN_NOFD = -1
FANOTIFY_METADATA_VERSION = 3
_AT_FDCWD = -100
# The kernel's O_LARGEFILE (os.O_LARGEFILE is 0 on 64-bit builds; the kernel sets it
# itself there, and wants it named for a 32-bit reader).
_O_LARGEFILE = os.O_LARGEFILE or 0o100000
_O_PATH = getattr(os, "O_PATH", 0o10000000)
EVENT_FLAGS = os.O_RDONLY | _O_LARGEFILE | os.O_CLOEXEC | os.O_NOATIME


class _Metadata(ctypes.Structure):
    """struct fanotify_event_metadata."""

    _fields_ = [
        ("event_len", ctypes.c_uint32),
        ("vers", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8),
        ("metadata_len", ctypes.c_uint16),
        ("mask", ctypes.c_uint64),
        ("fd", ctypes.c_int32),
        ("pid", ctypes.c_int32),
    ]


_META = ctypes.sizeof(_Metadata)


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
    libc.fanotify_init.restype = ctypes.c_int
    libc.fanotify_mark.argtypes = [
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_uint64,
        ctypes.c_int,
        ctypes.c_char_p,
    ]
    libc.fanotify_mark.restype = ctypes.c_int
    return libc


def fanotify_init(flags: int, event_flags: int) -> int:
    fd = _libc().fanotify_init(flags, event_flags)
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return int(fd)


def fanotify_mark(fd: int, flags: int, mask: int, path: str | None, dirfd: int = _AT_FDCWD) -> None:
    """Mark ``path`` (or, with ``path`` None, the object ``dirfd`` refers to)."""
    name = None if path is None else os.fsencode(path)
    if _libc().fanotify_mark(fd, flags, mask, dirfd, name) < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)


def parse(buf: bytes) -> Iterable[tuple[int, int, int]]:
    """(mask, fd, pid) of each event in one read."""
    off = 0
    while off + _META <= len(buf):
        m = _Metadata.from_buffer_copy(buf, off)
        if m.vers != FANOTIFY_METADATA_VERSION or m.event_len < _META:
            break  # not a layout this code knows: stop rather than misread fds
        yield m.mask, m.fd, m.pid
        off += m.event_len


# --- coalescing: one Open per (file, process) per window ----------------------------------


@dataclass(frozen=True, slots=True)
class Open:
    """Opens of one file by one process within one window."""

    dev: int
    ino: int
    pid: int
    command: str
    """/proc/<pid>/comm when the first of them was read, escaped by holders.printable
    (untrusted: a process names itself); "?" if the process had already gone."""
    first: float
    last: float
    """Wall-clock times (time.time()) of the first and the last of them, as read."""
    count: int
    """Events read: the kernel merges an open into an identical event still queued, so a
    process opening a file in a tight loop counts fewer than its opens (at least one)."""

    @property
    def key(self) -> FileKey:
        return (self.dev, self.ino)


def command_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return printable(f.read(COMMAND_CHARS)) or "?"
    except OSError:
        return "?"


class Coalescer:
    """Pending opens of the current window: once ``cap`` entries are pending (``full``) the
    window is delivered early, so memory is bounded (by ``cap`` plus what one read or one
    drain of the kernel's queue adds: 16,384 events at most) and nothing is dropped here."""

    def __init__(self, cap: int, command: Callable[[int], str] = command_of) -> None:
        self.cap = cap
        self._command = command
        self._pending: dict[tuple[int, int, int], list[float | int | str]] = {}
        self._commands: dict[int, str] = {}  # per window: one read of comm per process

    def add(self, key: FileKey, pid: int, now: float) -> None:
        entry = self._pending.get((key[0], key[1], pid))
        if entry is not None:
            entry[1] = now
            entry[2] = int(entry[2]) + 1
            return
        command = self._commands.get(pid)
        if command is None:
            command = self._commands[pid] = self._command(pid)
        self._pending[(key[0], key[1], pid)] = [now, now, 1, command]

    @property
    def full(self) -> bool:
        return len(self._pending) >= self.cap

    def __len__(self) -> int:
        return len(self._pending)

    def take(self) -> list[Open]:
        out = [
            Open(dev, ino, pid, str(cmd), float(first), float(last), int(count))
            for (dev, ino, pid), (first, last, count, cmd) in self._pending.items()
        ]
        self._pending = {}
        self._commands = {}
        return out


# --- attribution: the lead's FileIndex maps (dev, ino) -> models ---------------------------


@dataclass(frozen=True, slots=True)
class ModelOpens:
    """What one batch of opens says about one model."""

    uses: int
    """Processes that opened any of its files: a loader opening five shards is one use."""
    opens: int
    last: float
    commands: frozenset[str]


def by_model(
    opens: Iterable[Open], models: Mapping[FileKey, Collection[str]]
) -> dict[str, ModelOpens]:
    """Per-model counts of a batch, through a (dev, ino) -> model names map (the engine's
    FileIndex.models). Opens of files no model uses are left out."""
    pids: dict[str, set[int]] = {}
    counts: dict[str, int] = {}
    last: dict[str, float] = {}
    commands: dict[str, set[str]] = {}
    for o in opens:
        for name in models.get(o.key, ()):
            pids.setdefault(name, set()).add(o.pid)
            counts[name] = counts.get(name, 0) + o.count
            last[name] = max(last.get(name, 0.0), o.last)
            commands.setdefault(name, set()).add(o.command)
    return {n: ModelOpens(len(pids[n]), counts[n], last[n], frozenset(commands[n])) for n in pids}


# --- the watch -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ColdFile:
    """A model file on cold storage to watch by an inode mark: ``rel`` under ``root`` (the
    cold storage roots.Root), marked only if it is still the file the scan saw (the
    catalog's ``ident``: a file replaced since may have the old one's inode number)."""

    root: Root
    rel: str
    ident: Identity

    @property
    def key(self) -> FileKey:
        return (self.ident.dev, self.ident.ino)


def own_mount(path: Path | str) -> bool:
    """Whether ``path`` is a mount point: cold storage there is watched by a mount mark (pass
    it in ``mounts``), anywhere else by inode marks on its model files (``files``)."""
    return mount_at(path) is not None


WINDOW = 1.0
STOP_GRACE = 2.0  # seconds stop() waits for the reading thread (see stop())
MAX_PENDING = 4096
EVENTS_PER_S = 20_000
BURST_QUIET = 60.0  # seconds without an overflow that end a burst (for the log)
_READ_EVENTS = 2048  # events per read(): 48 KiB


class OpenWatch:
    """Opens of files on ``mounts`` (mount marks: the pools' tmpfs, cold storage when it is
    a mount of its own) and of ``files`` (inode marks: cold storage's model files when it
    shares a mount), read by one thread; ``on_opens(batch)`` is called on the event loop
    that called start(), once per window with a non-empty batch (earlier if MAX_PENDING
    entries are pending).

    ``set_mounts``/``set_files`` re-mark (a pool added or removed, the catalog rescanned);
    like start(), they resolve paths under the roots and may wait on a slow cold storage:
    call them in a thread. Unmount a pool only after set_mounts() without it returned: an
    event still queued in the kernel holds a reference on its mount (umount: EBUSY), and
    set_mounts() reads the queue empty before it returns.
    """

    def __init__(
        self,
        mounts: Iterable[Path | str],
        on_opens: Callable[[list[Open]], None],
        *,
        files: Iterable[ColdFile] = (),
        window: float = WINDOW,
        max_pending: int = MAX_PENDING,
        events_per_s: int = EVENTS_PER_S,
        ignore_pids: Container[int] = (),
    ) -> None:
        self._want_mounts = [str(m) for m in mounts]
        self._want_files = list(files)
        self._on_opens = on_opens
        self.window = window
        self.events_per_s = events_per_s
        self._ignore = ignore_pids
        self._own = os.getpid()
        self._coalescer = Coalescer(max_pending)
        self._lock = threading.Lock()  # the fanotify fd's reading and the pending entries
        # The marks: start() (in a thread) and a re-mark (in another) once ran together, and
        # a file marked by one before the other's flush stayed counted but unmarked: its
        # opens were never seen (a CI run lost a model's every use that way).
        self._marking = threading.RLock()
        self._fd = -1
        self._wake_r = self._wake_w = -1
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._marked: dict[str, int] = {}  # mount path -> its st_dev when marked
        self._marked_files: dict[FileKey, Identity] = {}
        self._accept: frozenset[int] = frozenset()  # devices of the marked mounts
        self._accept_files: frozenset[FileKey] = frozenset()
        self._last_overflow = -BURST_QUIET  # monotonic time of the last overflow
        self.state = "off"  # "off" | "watching" | "unavailable"
        self.reason = ""
        self.unmarked: dict[str, str] = {}
        """Paths that could not be marked, with why (logged once each)."""
        self.events = 0
        self.ignored = 0
        """Events of the daemon itself (its copies and scans) and of ``ignore_pids``."""
        self.overflows = 0
        """Times the kernel's queue (16384 events) overflowed: opens were lost."""

    # --- lifecycle

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> bool:
        """Open fanotify and mark; False (``state`` "unavailable", one log line) when the
        kernel or the privileges do not allow it. ``loop``: where on_opens runs (by default
        the running one; pass it to start in a thread: ``asyncio.to_thread(w.start, loop)``)."""
        with self._marking:
            return self._start(loop)

    def _start(self, loop: asyncio.AbstractEventLoop | None) -> bool:
        if self.state == "watching":
            return True
        self._loop = loop or asyncio.get_running_loop()
        try:
            self._fd = fanotify_init(
                FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK | FAN_UNLIMITED_MARKS, EVENT_FLAGS
            )
        except OSError as err:
            self.state = "unavailable"
            why = {
                errno.EPERM: "needs CAP_SYS_ADMIN (the daemon runs as root)",
                errno.ENOSYS: "the kernel has no fanotify (CONFIG_FANOTIFY)",
                errno.EINVAL: "the kernel's fanotify lacks a flag used here",
            }.get(err.errno or 0, err.strerror or str(err))
            self.reason = f"fanotify_init: {why}"
            log.warning("file opens are not watched (tiering sees no opens): %s", self.reason)
            return False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self.state = "watching"
        self.reason = ""
        self._apply_mounts(self._want_mounts)
        self._apply_files(self._want_files)
        self._thread = threading.Thread(target=self._run, name="opens", daemon=True)
        self._thread.start()
        return True

    def stop(self) -> None:
        """Stop reading, deliver what is pending (here, on the caller's thread), close the
        fd: the kernel drops every mark and queued event with it."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping = True
        os.write(self._wake_w, b"x")
        thread.join(STOP_GRACE)
        if thread.is_alive():
            # Blocked in read(): the kernel opens each event's file there, and a cold
            # storage that does not answer (a hung FUSE or NFS server) never returns that
            # open. Left behind (a daemon thread, its fds with it): a stop must not hang on
            # it (tests/robustness/test_lifecycle.py, SIGTERM with copies stuck in the kernel).
            log.warning(
                "the open watch is blocked reading an event of a file on storage that does "
                "not answer; left behind"
            )
            self._marked.clear()
            self._marked_files.clear()
            self.state = "off"
            return
        with self._lock:
            batch = self._coalescer.take()
        # A re-mark still running (a thread waiting on a cold storage that does not answer)
        # is not waited for past the grace; the fd is left to it then (closed, its number
        # could be another file's by the time that thread marks).
        marking = self._marking.acquire(timeout=STOP_GRACE)
        try:
            os.close(self._wake_r)
            os.close(self._wake_w)
            if marking:
                os.close(self._fd)
            else:
                log.warning(
                    "the open watch is blocked marking a file on storage that does not answer"
                )
            self._fd = self._wake_r = self._wake_w = -1
            self._marked.clear()
            self._marked_files.clear()
            self.state = "off"
        finally:
            if marking:
                self._marking.release()
        if batch:
            self._on_opens(batch)

    @property
    def mounts_marked(self) -> int:
        return len(self._marked)

    @property
    def files_marked(self) -> int:
        return len(self._marked_files)

    # --- marks

    def set_mounts(self, mounts: Iterable[Path | str]) -> None:
        with self._marking:
            self._want_mounts = [str(m) for m in mounts]
            if self.state == "watching":
                self._apply_mounts(self._want_mounts)

    def set_files(self, files: Iterable[ColdFile]) -> None:
        with self._marking:
            self._want_files = list(files)
            if self.state == "watching":
                self._apply_files(self._want_files)

    def set_marks(
        self, mounts: Iterable[Path | str], files: Iterable[ColdFile]
    ) -> tuple[int, int] | None:
        """set_mounts and set_files as one step: the (mounts, files) marked when it returned,
        which no other re-mark or start can have changed in between; None when not watching
        (the wanted marks are placed by start())."""
        with self._marking:
            self.set_mounts(mounts)
            self.set_files(files)
            if self.state != "watching":
                return None
            return self.mounts_marked, self.files_marked

    def _unmarkable(self, path: str, why: str) -> None:
        if self.unmarked.get(path) != why:
            log.warning("opens on %s are not watched: %s", path, why)
        self.unmarked[path] = why

    def _apply_mounts(self, mounts: list[str]) -> None:
        removed = False
        for path in set(self._marked) - set(mounts):
            dev = self._marked.pop(path)
            try:
                still = os.stat(path).st_dev == dev
            except OSError:
                still = False
            if still:  # else unmounted already: the kernel dropped the mark with the mount
                try:
                    fanotify_mark(
                        self._fd,
                        FAN_MARK_REMOVE | FAN_MARK_MOUNT | FAN_MARK_DONT_FOLLOW,
                        FAN_OPEN,
                        path,
                    )
                except OSError as err:
                    if err.errno != errno.ENOENT:
                        log.warning("unmarking %s: %s", path, err.strerror)
            removed = True
        if removed:
            self._drain()  # what was queued before, counted as the mount was watched
        for path in mounts:
            if path in self._marked:
                continue
            # A mount mark on a directory that is not (yet) a mount point would mark the
            # mount beneath it: `/` for a pool not mounted.
            if mount_at(path) is None:
                self._unmarkable(path, "not a mount point")
                continue
            try:
                dev = os.stat(path).st_dev
                fanotify_mark(
                    self._fd,
                    FAN_MARK_ADD | FAN_MARK_MOUNT | FAN_MARK_DONT_FOLLOW | FAN_MARK_ONLYDIR,
                    FAN_OPEN,
                    path,
                )
            except OSError as err:
                self._unmarkable(path, err.strerror or str(err))
                continue
            self._marked[path] = dev
            self.unmarked.pop(path, None)
        self._accept = frozenset(self._marked.values())

    def _apply_files(self, files: list[ColdFile]) -> None:
        wanted = {f.key: f.ident for f in files}
        if any(wanted.get(k) != ident for k, ident in self._marked_files.items()):
            # Dropping one inode mark needs its file again (by path, which may be gone or
            # another file now): all of them go and the wanted ones are marked afresh.
            # 10,000 files take about 0.1 s; opens of them in between are not seen, so
            # this is done only when a marked file is no longer wanted (or was replaced),
            # not at each re-mark (one follows every promote and demote).
            fanotify_mark(self._fd, FAN_MARK_FLUSH, 0, None)
            self._marked_files = {}
            self._drain()
        bad = 0
        for f in files:
            if self._marked_files.get(f.key) == f.ident:
                continue
            try:
                with f.root.directory() as rfd:
                    fd = openat2(rfd, f.rel, _O_PATH | os.O_CLOEXEC, 0, f.root.resolve)
                try:
                    st = os.fstat(fd)
                    if Identity.of(st) != f.ident or not stat.S_ISREG(st.st_mode):
                        bad += 1  # changed since the scan: the next scan brings it
                        continue
                    # The O_PATH fd's own file, through its /proc link: fanotify_mark
                    # refuses an O_PATH fd itself (EBADF), and a path again could be
                    # another file by now.
                    fanotify_mark(self._fd, FAN_MARK_ADD, FAN_OPEN, f"/proc/self/fd/{fd}")
                finally:
                    os.close(fd)
            except OSError:
                bad += 1
                continue
            self._marked_files[f.key] = f.ident
        if bad:
            log.info("%d cold storage files changed or went since the scan: not watched", bad)
        self._accept_files = frozenset(self._marked_files)

    # --- reading

    def _drain(self) -> None:
        """Read the queue empty now, whatever the budget (a mark was removed: queued events
        hold its mount)."""
        with self._lock:
            while self._read(_READ_EVENTS) == _READ_EVENTS:
                pass

    def _read(self, limit: int) -> int:
        """Read at most ``limit`` events; the number read. Called with the lock held."""
        try:
            buf = os.read(self._fd, max(1, min(limit, _READ_EVENTS)) * _META)
        except (BlockingIOError, InterruptedError):
            return 0
        now = time.time()
        n = 0
        accept, accept_files = self._accept, self._accept_files
        for mask, fd, pid in parse(buf):
            n += 1
            if mask & FAN_Q_OVERFLOW:
                self.overflows += 1
                quiet = time.monotonic() - self._last_overflow
                self._last_overflow = time.monotonic()
                if quiet >= BURST_QUIET:  # once per burst: a flood overflows every second
                    log.warning(
                        "file opens came faster than they are read (the kernel's queue "
                        "overflowed): some were not counted"
                    )
                continue
            if fd < 0:
                continue
            try:
                st = os.fstat(fd)  # the file the kernel opened for us: never read
            except OSError:
                continue
            finally:
                os.close(fd)
            self.events += 1
            if pid == self._own or pid in self._ignore:
                self.ignored += 1
                continue
            key = (st.st_dev, st.st_ino)
            if st.st_dev in accept or key in accept_files:
                self._coalescer.add(key, pid, now)
        return n

    def _run(self) -> None:
        poll = select.poll()
        poll.register(self._wake_r, select.POLLIN)
        poll.register(self._fd, select.POLLIN)
        window_end = time.monotonic() + self.window
        second_end = time.monotonic() + 1.0
        budget = self.events_per_s
        while not self._stopping:
            now = time.monotonic()
            if now >= second_end:
                second_end, budget = now + 1.0, self.events_per_s
            # Over budget, the fd is left alone until the next second: the kernel's queue
            # fills and overflows (counted) instead of this thread taking a core.
            poll.modify(self._fd, select.POLLIN if budget > 0 else 0)
            until = window_end if budget > 0 else min(window_end, second_end)
            ready = dict(poll.poll(max(0.0, until - now) * 1000))
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 64)
            if self._stopping:
                break
            batch: list[Open] = []
            with self._lock:
                if budget > 0 and self._fd in ready:
                    budget -= self._read(budget)
                if time.monotonic() >= window_end or self._coalescer.full:
                    window_end = time.monotonic() + self.window
                    batch = self._coalescer.take()
            if batch and self._loop is not None:
                try:
                    self._loop.call_soon_threadsafe(self._deliver, batch)
                except RuntimeError:
                    return  # the loop is closed: nobody to tell

    def _deliver(self, batch: list[Open]) -> None:
        if self._thread is None:
            return  # stopped meanwhile
        try:
            self._on_opens(batch)
        except Exception:
            log.exception("handling file opens failed")
