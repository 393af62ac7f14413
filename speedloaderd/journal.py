"""Write-ahead journal of operations in flight.

One small JSON file per operation, written (temp, fsync, rename, fsync dir) before the
operation changes anything, removed once it is done. After a crash, the entries left are
exactly the operations that may be half-done; recovery finishes or rolls back each.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import Failed
from .paths import check_rel
from .roots import Root, ensure_trusted_dir

log = logging.getLogger(__name__)

_ENTRY_LIMIT = 1 << 20
# Entry ids are made here ("promote-12-a1b2c3", "demote-a1b2c3d4"); any other name in the
# directory is not ours and is left alone.
_ID_RE = re.compile(r"[a-z]+-[0-9a-z-]{1,64}")


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
        self.tree = Root(directory, "journal")

    def open(self) -> None:
        ensure_trusted_dir(self.dir, "journal (stateDir/journal)", mode=0o700)

    def write(self, entry: Entry) -> None:
        """Record ``entry`` durably. Raises Failed (nothing recorded) if the state dir
        cannot take it, so the operation it guards does not start."""
        data = json.dumps(asdict(entry)).encode()
        try:
            self.tree.write_file(f"{entry.id}.json", data, f"{entry.id}.tmp", mode=0o600)
        except OSError as err:
            raise Failed(
                f"cannot write the journal in {self.dir} ({err.strerror}); the {entry.op} of "
                f"{entry.model} did not start: make room in stateDir or make it writable"
            ) from None

    def remove(self, entry_id: str) -> None:
        self.tree.unlink(f"{entry_id}.json", durable=True)

    def pending(self) -> list[Entry]:
        """Entries left by an interrupted run, oldest first. Unreadable ones are dropped:
        an entry that never finished being written describes an op that never started.
        Only our own names are read or removed; anything else is reported and left."""
        entries = []
        for e in sorted(self.tree.walk(), key=lambda e: e.rel):
            stem, dot, suffix = e.rel.rpartition(".")
            if "/" in e.rel or not e.is_file or not dot or not _ID_RE.fullmatch(stem):
                log.warning("journal: %s is not a journal entry; left alone", self.dir / e.rel)
                continue
            if suffix == "tmp":  # an entry whose writing was interrupted
                self.tree.unlink(e.rel)
                continue
            if suffix != "json":
                log.warning("journal: %s is not a journal entry; left alone", self.dir / e.rel)
                continue
            try:
                entries.append(_entry(json.loads(self.tree.read_own(e.rel, _ENTRY_LIMIT) or b"")))
            except (ValueError, KeyError, TypeError, RecursionError) as err:
                # Replaying it could only fail (or touch what it must not), at every start.
                log.warning("dropping unreadable journal entry %s: %s", e.rel, err)
                self.tree.unlink(e.rel)
        return entries


def _entry(raw: Any) -> Entry:
    """An Entry from its JSON, checked as strictly as it was written: recovery repoints
    every rel in it, so each must be a plain relative path (no '..', not absolute)."""
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    op, model, pool, rels = raw["op"], raw["model"], raw.get("pool"), raw["rels"]
    if op not in ("promote", "demote"):
        raise ValueError(f"unknown operation {op!r}")
    if not isinstance(model, str) or not (pool is None or isinstance(pool, str)):
        raise ValueError("model and pool must be strings")
    if not isinstance(rels, list) or not all(isinstance(r, str) for r in rels):
        raise ValueError("rels must be a list of paths")
    for rel in rels:
        check_rel(rel)  # InvalidArgument is a ValueError
    return Entry(id=str(raw["id"]), op=op, model=model, pool=pool, rels=tuple(rels))
