"""Who still holds pool files that are gone: deleted copies kept alive by a mapping or an fd.

A demote unlinks a pool copy, but tmpfs frees its pages only when the last mapping or open
file of it goes: an inference server that mapped the model (llama.cpp does by default) keeps
that RAM until it exits or unloads. The kernel lists such files in ``/proc/<pid>/maps`` and
``/proc/<pid>/fd`` with a `` (deleted)`` suffix; this reads them (as root, every process's),
so Health can name the process and the RAM it holds. Read-only, and nothing here opens a
file under a root: ``/proc`` only.

The bus's view (``scan``, ``HolderWatch``): who holds each model's files, live or deleted,
matched by (device, inode) — from the maps line itself and from ``fdinfo`` — and the RAM
each pool's deleted copies keep. Everything read from /proc is untrusted text (a process
names itself): commands are escaped and bounded by :func:`printable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import Callable, Collection, Container, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .watching import woken

log = logging.getLogger(__name__)

_DELETED = " (deleted)"


@dataclass(frozen=True, slots=True)
class Holder:
    pid: int
    command: str
    pool: str
    rel: str
    """The copy's path relative to its pool, as it was before it was deleted."""
    size: int
    """Bytes of the deleted file: RAM its pool cannot reuse while this process holds it."""
    how: str  # "mapped" | "open"


def _pool_of(path: str, roots: Mapping[str, Path]) -> tuple[str, str] | None:
    for name, root in roots.items():
        prefix = str(root).rstrip("/") + "/"
        if path.startswith(prefix):
            return name, path[len(prefix) :]
    return None


COMMAND_CHARS = 64  # the kernel's comm is at most 15 bytes; escaped, at most 4 chars each


def printable(raw: bytes, limit: int = COMMAND_CHARS) -> str:
    """Text from /proc for the bus and a terminal: any process names itself (prctl), so a
    command is untrusted. Undecodable bytes and control characters become ``\\xNN``,
    and the result is at most ``limit`` characters."""
    text = raw.decode(errors="backslashreplace").rstrip("\n")
    out = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _command(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return printable(f.read(COMMAND_CHARS)) or "?"
    except OSError:
        return "?"


def deleted_pool_files(roots: Mapping[str, Path]) -> list[Holder]:
    """Every process holding a deleted file under one of ``roots`` (pool name -> path),
    once per process and file. Processes that end while being read are skipped."""
    found: dict[tuple[int, int, int], Holder] = {}  # (pid, dev, ino)
    for pid in _pids():
        for how, path, st in _held(pid):
            where = _pool_of(path, roots)
            if where is None or st is None or not stat.S_ISREG(st.st_mode):
                continue
            key = (int(pid), st.st_dev, st.st_ino)
            if key not in found:
                found[key] = Holder(int(pid), _command(pid), where[0], where[1], st.st_size, how)
    return sorted(found.values(), key=lambda h: (h.pool, h.rel, h.pid))


def _pids() -> Iterable[str]:
    try:
        with os.scandir("/proc") as it:
            return [e.name for e in it if e.name.isdigit()]
    except OSError:
        return []


def _held(pid: str) -> Iterable[tuple[str, str, os.stat_result | None]]:
    """(how, path without the suffix, stat of the file itself) for each deleted file."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            maps = f.read().decode(errors="replace").splitlines()
    except OSError:
        maps = []
    for line in maps:
        if not line.endswith(_DELETED):
            continue
        parts = line.split(maxsplit=5)
        if len(parts) < 6:
            continue
        # map_files/<range> is the mapped file itself, whatever its name now (root only).
        yield "mapped", parts[5][: -len(_DELETED)], _stat(f"/proc/{pid}/map_files/{parts[0]}")
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.endswith(_DELETED):
            yield "open", target[: -len(_DELETED)], _stat(f"/proc/{pid}/fd/{fd}")


def _stat(proc_link: str) -> os.stat_result | None:
    try:
        return os.stat(proc_link)
    except OSError:
        return None


# --- holders by (device, inode): who has a model's files, live or deleted -----------------

FileKey = tuple[int, int]  # (st_dev, st_ino)


@dataclass(frozen=True, slots=True, order=True)
class Process:
    pid: int
    command: str
    """/proc/<pid>/comm, escaped by :func:`printable`."""


@dataclass(frozen=True, slots=True)
class HolderScan:
    """One look at every process: who holds which of the watched files."""

    holders: Mapping[FileKey, frozenset[Process]]
    """Every watched file (live or deleted) someone maps or has open, with who."""
    deleted: Mapping[FileKey, int]
    """Deleted files on a pool's device still held, with the bytes they keep in the pool."""
    processes: int = 0
    seconds: float = 0.0
    unreadable: int = 0
    """Processes whose open files could not be read (their mappings were): without
    CAP_SYS_PTRACE, root may read another uid's /proc/<pid>/maps but not its fdinfo."""


EMPTY = HolderScan({}, {})


def _mount_devices() -> dict[str, int]:
    """mount id -> st_dev, from /proc/self/mountinfo (fdinfo names a file's mount by id)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        parts = line.split(maxsplit=3)
        if len(parts) >= 3 and ":" in parts[2]:
            major, _, minor = parts[2].partition(":")
            if major.isdigit() and minor.isdigit():
                out[parts[0]] = os.makedev(int(major), int(minor))
    return out


def _maps_entries(pid: str, devices: Container[int]) -> Iterable[tuple[FileKey, str, bool]]:
    """((dev, ino), the maps address range, deleted) for each mapping of a watched device.
    The device and inode come from the maps line itself: nothing is stat'ed."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or parts[4] == "0":
            continue
        major, _, minor = parts[3].partition(":")
        try:
            dev, ino = os.makedev(int(major, 16), int(minor, 16)), int(parts[4])
        except ValueError:
            continue
        if dev in devices:
            yield (dev, ino), parts[0], line.endswith(_DELETED)


class _Denied(Exception):
    """/proc/<pid>/fdinfo refused: another uid's process, and no CAP_SYS_PTRACE."""


def _fd_entries(
    pid: str, devices: Container[int], mounts: Mapping[str, int]
) -> Iterable[tuple[FileKey, str]]:
    """((dev, ino), fd) for each open file of a watched device, from /proc/<pid>/fdinfo
    (``mnt_id`` and ``ino``, Linux 5.14+): the file itself is not stat'ed, so an fd on a
    hung NFS cold storage cannot stall the scan."""
    try:
        fds = os.listdir(f"/proc/{pid}/fdinfo")
    except PermissionError:
        raise _Denied from None
    except OSError:
        return
    for fd in fds:
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
                info = f.read(4096).decode(errors="replace")
        except OSError:
            continue
        fields = dict(line.partition(":")[::2] for line in info.splitlines())
        dev = mounts.get(fields.get("mnt_id", "").strip())
        ino = fields.get("ino", "").strip()
        if dev is not None and dev in devices and ino.isdigit():
            yield (dev, int(ino)), fd


def _deleted_bytes(link: str) -> int | None:
    """RAM a deleted pool file keeps, or None when the file is not deleted: its allocated
    blocks (st_blocks), stat'ed through the /proc link (a file on a pool's tmpfs: a stat
    there cannot block). This, not the mappings' Rss: the pool's tmpfs keeps every page of
    the file until the last holder goes, touched by this process or not, and that is what
    the pool's UsedBytes counts; Rss counts only the pages a process touched, per process."""
    try:
        st = os.stat(link)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 0:
        return None
    return st.st_blocks * 512


def scan(
    files: Container[FileKey], devices: Collection[int], pool_devices: Container[int]
) -> HolderScan:
    """Who holds any of ``files`` (and any deleted file on ``pool_devices``), looking only at
    mappings and fds on ``devices``. Read-only, /proc only; processes that end while being
    read are skipped."""
    started = time.monotonic()
    mounts = _mount_devices()
    holders: dict[FileKey, set[Process]] = {}
    deleted: dict[FileKey, int] = {}
    pids = list(_pids())
    own = str(os.getpid())
    unreadable = 0
    for pid in pids:
        if pid == own:
            continue
        found: dict[FileKey, str] = {}  # key -> a /proc link to it, for a deleted one's size
        for key, where, _deleted in _maps_entries(pid, devices):
            found.setdefault(key, f"/proc/{pid}/map_files/{where}")
        try:
            for key, fd in _fd_entries(pid, devices, mounts):
                found.setdefault(key, f"/proc/{pid}/fd/{fd}")
        except _Denied:
            unreadable += 1
        if not found:
            continue
        who = Process(int(pid), _command(pid))
        for key, link in found.items():
            if key in files:
                holders.setdefault(key, set()).add(who)
            elif key[0] in pool_devices:
                # On a pool's device but no model's copy: held only if it is deleted (an
                # orphan or a copy under way is not RAM a demote freed).
                if key not in deleted:
                    size = _deleted_bytes(link)
                    if size is None:
                        continue
                    deleted[key] = size
                holders.setdefault(key, set()).add(who)
    return HolderScan(
        {k: frozenset(v) for k, v in holders.items()},
        deleted,
        len(pids),
        time.monotonic() - started,
        unreadable,
    )


@dataclass(frozen=True, slots=True)
class FileIndex:
    """The files the holders scan looks for, built by the engine from its catalog and links."""

    models: Mapping[FileKey, tuple[str, ...]]
    """Each model's cold files and pool copies by (dev, ino): the names of the models using it."""
    pool_devices: Mapping[int, str]
    """Each mounted pool's st_dev: its own tmpfs (or remote) mount."""

    def scan(self) -> HolderScan:
        devices = {dev for dev, _ in self.models} | set(self.pool_devices)
        return scan(self.models, devices, self.pool_devices)


@dataclass(frozen=True, slots=True)
class Held:
    """What one scan means for the bus: each model's holders, each pool's held bytes."""

    models: Mapping[str, tuple[Process, ...]]
    pools: Mapping[str, int]

    @classmethod
    def of(cls, index: FileIndex, found: HolderScan) -> Held:
        models: dict[str, set[Process]] = {}
        for key, who in found.holders.items():
            for name in index.models.get(key, ()):
                models.setdefault(name, set()).update(who)
        pools: dict[str, int] = {}
        for (dev, _ino), size in found.deleted.items():
            pool = index.pool_devices.get(dev)
            if pool is not None:
                pools[pool] = pools.get(pool, 0) + size
        return cls({n: tuple(sorted(p)) for n, p in models.items()}, pools)


NOTHING_HELD = Held({}, {})


# How often the holders are looked at: a scan of /proc with 200 processes took 24 ms (median
# of 20 here, 30 ms at most, 2 shared cores). Every EVERY s that is 0.5% of a core; every
# HELD_EVERY s while a deleted copy is held it makes the pool's HeldBytes and UsedBytes
# right within a second or two of its last holder going. A poll, not pidfd: a pidfd says a
# process ended, not that it unmapped the file (llama.cpp's router unloads without exiting).
EVERY = 5.0
HELD_EVERY = 1.0
MIN_GAP = 0.5


class HolderWatch:
    """Looks at the holders every EVERY s (HELD_EVERY while RAM is held), in a thread;
    ``on_change(models, pools)`` is called on the event loop with what changed."""

    def __init__(
        self,
        index: Callable[[], FileIndex | None],
        on_change: Callable[[set[str], set[str]], None],
    ) -> None:
        self._index = index
        self._on_change = on_change
        self.index: FileIndex = FileIndex({}, {})
        self.held: Held = NOTHING_HELD
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._warned = False
        self._stale = True  # the index must be (re)built before the next scan
        self._stopped = False

    async def check(self) -> Held:
        try:
            index: FileIndex | None = self.index
            if self._stale:
                # Rebuilt only after a change (a link of 100,000 models is a readlink and a
                # stat each): the scan itself runs against the index as it is.
                index = await asyncio.to_thread(self._index)
                self._stale = False
            found = EMPTY if index is None else await asyncio.to_thread(index.scan)
            held = NOTHING_HELD if index is None else Held.of(index, found)
        except Exception:
            log.exception("looking at the holders of the models' files failed")
            return self.held
        if found.unreadable and not self._warned:
            self._warned = True  # once: it is how the daemon runs, not an event
            log.warning(
                "the open files of %d processes of other users cannot be read "
                "(/proc/<pid>/fdinfo needs CAP_SYS_PTRACE): their mappings are seen, files "
                "they only hold open are not",
                found.unreadable,
            )
        old, self.held = self.held, held
        if index is not None:
            self.index = index
        models = {
            n
            for n in old.models.keys() | held.models.keys()
            if old.models.get(n) != held.models.get(n)
        }
        pools = {
            n for n in old.pools.keys() | held.pools.keys() if old.pools.get(n) != held.pools.get(n)
        }
        if models or pools:
            self._on_change(models, pools)
        return held

    def poke(self, reindex: bool = True) -> None:
        """Look again soon: a job ended, a pool or the catalog changed (``reindex``: the
        files to look for may have changed too)."""
        self._stale = self._stale or reindex
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._stopped = False
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while not self._stopped:
            self._wake.clear()
            await self.check()
            every = HELD_EVERY if any(self.held.pools.values()) else EVERY
            # However often it is poked (a burst of demotes ending), one scan per MIN_GAP.
            await asyncio.sleep(MIN_GAP)
            await woken(self._wake, every - MIN_GAP)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            self._stopped = True  # ends the loop even if the cancel is swallowed (watching.py)
            self._wake.set()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
