"""Blobs whose digest a copy verified, and the cold file as it was then: verify once.

A verified promote hashes every byte it copies (sha256 on one core, ~1.5 GB/s here: the
bound of a verified promote). With the same models moving again and again, the same blob
would be hashed again each time although its cold file has not changed. So each verified
copy records the digest with the cold file's stamp as it was read — device, inode, size,
mtime and ctime, taken from the copy's own open descriptor — and a later copy of the same
digest whose source, opened and fstat'ed the same way, has exactly that stamp is copied
without hashing. Any write to the file changes its ctime (and a writer cannot set ctime
back: only the kernel sets it, and on NFS the server), a replaced file has another inode or
ctime, so any change means verify again; a copy that skips the hash also checks that the
stamp did not change while it read.

Kept in ``<stateDir>/verified.json``, written through roots.Root (atomic, never following a
link) after each new record; at most MAX_RECORDS (the oldest dropped first). A file that is
unreadable, too big, of another shape or a symlink is not used: nothing is trusted, one log
line says why, and the next record replaces it. ``slctl health --verify`` hashes every hot
blob and drops every record (``clear``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from .roots import Root

log = logging.getLogger(__name__)

FILE = "verified.json"
_TMP = ".verified.json.tmp"
VERSION = 1
MAX_RECORDS = 200_000
"""Blobs remembered at most: a catalog of 100,000 models of one or two data files each."""
LIMIT = 64 << 20  # a record is ~200 bytes: 200,000 fit


@dataclass(frozen=True, slots=True)
class Stamp:
    """The cold file as a copy saw it (fstat of its open descriptor)."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Stamp:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


_Digest = Annotated[str, StringConstraints(pattern=r"^sha256:[0-9a-f]{64}$")]
_N = Annotated[int, Field(ge=0, le=(1 << 64) - 1)]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dev: _N
    ino: _N
    size: _N
    mtime_ns: _N = Field(alias="mtimeNs")
    ctime_ns: _N = Field(alias="ctimeNs")


class _File(BaseModel):
    model_config = ConfigDict(extra="ignore")
    version: Literal[1]
    blobs: dict[_Digest, _Record] = Field(max_length=MAX_RECORDS)


class Verified:
    """The verified blobs; safe to call from the copy threads."""

    def __init__(self, state_dir: Path) -> None:
        self.tree = Root(state_dir, "state dir")
        self._blobs: dict[str, Stamp] = {}  # insertion order: the oldest first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._blobs)

    def known(self, digest: str, st: os.stat_result) -> bool:
        """Was ``digest`` verified from a file with exactly ``st``'s stamp?"""
        with self._lock:
            return self._blobs.get(digest.lower()) == Stamp.of(st)

    def add(self, digest: str, st: os.stat_result) -> None:
        """Record a verification (in a copy thread: the write is small and fsynced)."""
        with self._lock:
            key = digest.lower()
            self._blobs.pop(key, None)
            self._blobs[key] = Stamp.of(st)
            while len(self._blobs) > MAX_RECORDS:
                del self._blobs[next(iter(self._blobs))]
            self._write()

    def clear(self) -> int:
        """Trust nothing any more (``slctl health --verify``); returns how many were dropped."""
        with self._lock:
            n = len(self._blobs)
            self._blobs = {}
            self._write()
            return n

    def load(self) -> None:
        with self._lock:
            self._blobs = {}
            why = self._read()
        if why:
            log.warning(
                "%s %s; no blob is taken as verified (it is replaced at the next record)",
                self.tree.abs(FILE),
                why,
            )

    def _read(self) -> str:
        raw, why = self.tree.read_state(FILE, LIMIT)
        if raw is None:
            return why
        try:
            data = _File.model_validate_json(raw)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "the file"
            return f"is not a verified-blobs file ({where}: {first['msg']})"
        except RecursionError:
            return "is not a verified-blobs file (nested too deep)"
        self._blobs = {
            d: Stamp(r.dev, r.ino, r.size, r.mtime_ns, r.ctime_ns) for d, r in data.blobs.items()
        }
        return ""

    def _write(self) -> None:
        blobs = {
            d: {"dev": s.dev, "ino": s.ino, "size": s.size, "mtimeNs": s.mtime_ns,
                "ctimeNs": s.ctime_ns}
            for d, s in self._blobs.items()
        }  # fmt: skip
        content = json.dumps({"version": VERSION, "blobs": blobs}, separators=(",", ":"))
        try:
            self.tree.replace_state(FILE, content.encode(), _TMP)
        except OSError as err:
            # Not fatal: the record stays in memory; the blob is hashed again after a restart.
            log.warning("cannot save %s: %s", self.tree.abs(FILE), err.strerror or err)
