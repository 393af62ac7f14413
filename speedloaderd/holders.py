"""Who still holds pool files that are gone: deleted copies kept alive by a mapping or an fd.

A demote unlinks a pool copy, but tmpfs frees its pages only when the last mapping or open
file of it goes: an inference server that mapped the model (llama.cpp does by default) keeps
that RAM until it exits or unloads. The kernel lists such files in ``/proc/<pid>/maps`` and
``/proc/<pid>/fd`` with a `` (deleted)`` suffix; this reads them (as root, every process's),
so Health can name the process and the RAM it holds. Read-only, and nothing here opens a
file under a root: ``/proc`` only.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

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


def _command(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read(64).decode(errors="replace").strip()
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
