"""Write-ahead journal of operations in flight.

One small JSON file per operation, written (temp, fsync, rename, fsync dir) before the
operation changes anything, removed once it is done. After a crash, the entries left are
exactly the operations that may be half-done; recovery finishes or rolls back each.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .modelsdir import fsync_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Entry:
    id: str
    op: str  # "promote" | "demote"
    model: str
    pool: str | None
    rels: tuple[str, ...]


class Journal:
    def __init__(self, directory: Path):
        self.dir = directory

    def open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _path(self, entry_id: str) -> Path:
        return self.dir / f"{entry_id}.json"

    def write(self, entry: Entry) -> None:
        data = json.dumps(asdict(entry)).encode()
        final = self._path(entry.id)
        tmp = final.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
        fsync_dir(self.dir)

    def remove(self, entry_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(entry_id))
            fsync_dir(self.dir)

    def pending(self) -> list[Entry]:
        """Entries left by an interrupted run, oldest first. Unreadable ones are dropped:
        an entry that never finished being written describes an op that never started."""
        entries = []
        for p in sorted(self.dir.glob("*"), key=lambda p: p.name):
            if p.suffix != ".json":
                p.unlink(missing_ok=True)
                continue
            try:
                raw = json.loads(p.read_text())
                entries.append(
                    Entry(
                        id=str(raw["id"]),
                        op=str(raw["op"]),
                        model=str(raw["model"]),
                        pool=raw.get("pool"),
                        rels=tuple(raw["rels"]),
                    )
                )
            except (ValueError, KeyError, TypeError) as err:
                log.warning("dropping unreadable journal entry %s: %s", p.name, err)
                p.unlink(missing_ok=True)
        return entries
