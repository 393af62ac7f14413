"""Is cold storage there? Tell "not mounted, late, glitching" from "every model was deleted".

A scan of an NFS mount point whose mount is late, or of an export whose disk is gone, finds
nothing; syncing the models dir to that would remove every link and orphan every RAM copy.
So before a scan is believed, cold storage's root is looked at (one stat, one statvfs, one
listing of the root: cheap enough to repeat every few seconds) and compared with what the
daemon recorded at the last good scan, in a small JSON file in its state dir:

- the root is missing, not a directory, or cannot be listed: **unavailable**;
- the root is on another filesystem than the recorded one (neither its statvfs ``f_fsid``
  nor its ``st_dev`` match) and holds nothing: **unavailable** (the mount point without
  its mount);
- the root holds no entry at all, while the last scan saw models (or the models dir still
  links into cold storage): **unavailable** (an emptied export looks like this). A person
  who really removed every model says so by leaving any entry there (``ollama rm`` leaves
  ``manifests/`` and ``blobs/``; for other layouts, an empty directory) and rescanning;
- the root is on another filesystem and holds entries: **unavailable** for the daemon's
  own scans (start, the retry loop), since a stray tree under a mount point must not
  replace the catalog; an explicit Rescan, a person asking, adopts it;
- otherwise **available**.

``f_fsid`` is compared first because it survives a remount (NFS derives it from the
server's filesystem id, ext4 and xfs from their UUID), where ``st_dev`` of an NFS or tmpfs
mount is a number handed out at mount time.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

from ..roots import Root

RECORD = "cold-storage.json"
"""The record of the last good scan, in the state dir."""
_RECORD_LIMIT = 4096

AVAILABLE = "available"
UNAVAILABLE = "unavailable"


@dataclass(frozen=True, slots=True)
class ColdLook:
    """What one look at cold storage's root saw."""

    dev: int
    fsid: int
    empty: bool
    """No entry at all in the root, hidden ones included."""


@dataclass(frozen=True, slots=True)
class ColdRecord:
    """What the daemon recorded at the last scan it believed."""

    dev: int
    fsid: int
    models: int

    def same_filesystem(self, look: ColdLook) -> bool:
        if self.fsid and look.fsid:
            return self.fsid == look.fsid
        return self.dev == look.dev


def look(cold_path: Path | str) -> ColdLook | str:
    """Look at the root of cold storage: its filesystem and whether it is empty; or why it
    cannot be used at all (a sentence that starts after the path)."""
    root = Root(cold_path, "cold storage", links=True)
    try:
        with root.directory() as fd:
            st = os.fstat(fd)
            if not stat.S_ISDIR(st.st_mode):  # O_DIRECTORY makes this a bug, not a case
                return "is not a directory"
            fsid = os.fstatvfs(fd).f_fsid
            with os.scandir(fd) as it:
                empty = next(it, None) is None
    except FileNotFoundError:
        return "is missing"
    except NotADirectoryError:
        return "is not a directory"
    except OSError as exc:
        return f"cannot be listed ({exc.strerror})"
    return ColdLook(st.st_dev, fsid, empty)


def judge(seen: ColdLook | str, last: ColdRecord | None, expected: int, *, adopt: bool) -> str:
    """Why cold storage is unavailable, or "" if a scan of it may be believed.

    ``expected`` is how many models the daemon has reason to expect (the record's count, or
    the links into cold storage the models dir still holds); ``adopt`` is True for a Rescan a
    person asked for, which may take a filesystem other than the recorded one.
    """
    if isinstance(seen, str):
        return seen
    other_fs = last is not None and not last.same_filesystem(seen)
    if seen.empty and other_fs:
        return (
            "is an empty directory on another filesystem than at the last scan: "
            "the filesystem that holds the models is not mounted there"
        )
    if seen.empty and expected > 0:
        return (
            f"is empty, but {expected} model(s) were there at the last scan; if every model "
            "was removed on purpose, leave an empty directory in it and rescan"
        )
    if other_fs and not adopt:
        assert last is not None  # other_fs says so
        return (
            f"is on another filesystem (device {_dev(seen.dev)}) than at the last scan "
            f"(device {_dev(last.dev)}); rescan to adopt it if cold storage really moved"
        )
    return ""


def _dev(dev: int) -> str:
    return f"{os.major(dev)}:{os.minor(dev)}"


def load_record(state: Root) -> ColdRecord | None:
    """The record of the last good scan; None if there is none or it is unreadable."""
    raw = state.read_own(RECORD, _RECORD_LIMIT)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
        record = ColdRecord(int(doc["dev"]), int(doc["fsid"]), int(doc["models"]))
    except (ValueError, TypeError, KeyError, RecursionError):
        return None  # written by us; if damaged, the next good scan writes it again
    return record


def save_record(state: Root, record: ColdRecord) -> None:
    state.write_file(
        RECORD,
        json.dumps(asdict(record)).encode(),
        f".sl-meta-{secrets.token_hex(8)}",
        mode=0o644,
    )
