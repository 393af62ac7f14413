"""Which models a user asked to be hot: the holders of RAM.

The models dir says where each file lives, but not why: two Ollama tags with the same blobs
(``x:latest`` and ``x:8b``) are both hot once either is promoted. Only a model someone
promoted holds its blobs in RAM; one that is hot merely because another holds its blobs does
not, so demoting the one that was promoted frees the RAM.

Kept in ``<stateDir>/promoted.json`` (a sorted JSON list of names), written through
roots.Root like every other file of the daemon's state. A promote adds its model before its
journal entry is removed and a demote removes it before its own, and recovery replays both,
so a crash at any instant leaves the set right. Without a readable file (first start after an
upgrade), every hot model counts as promoted: nothing held before is freed by surprise.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from .roots import Root

log = logging.getLogger(__name__)

FILE = "promoted.json"
_TMP = ".promoted.json.tmp"
_LIMIT = 64 << 20  # names only: ~30 bytes per promoted model


class Promoted:
    def __init__(self, state_dir: Path):
        self.tree = Root(state_dir, "state dir")
        self.names: set[str] = set()

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def load(self, hot: Callable[[], Iterable[str]]) -> None:
        """Read the set; without a readable one, take the models ``hot()`` names."""
        raw = self.tree.read_own(FILE, _LIMIT)
        try:
            names = json.loads(raw) if raw is not None else None
        except (ValueError, RecursionError):
            names = None
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            self.names = set(names)
            return
        if raw is not None:
            log.warning("%s is unreadable; counting every hot model as promoted", FILE)
        self.names = set(hot())
        self.save()

    def add(self, name: str) -> None:
        if name not in self.names:
            self.names.add(name)
            self.save()

    def discard(self, names: Iterable[str]) -> None:
        gone = self.names.intersection(names)
        if gone:
            self.names -= gone
            self.save()

    def keep_only(self, names: Iterable[str]) -> None:
        """Forget every name not in ``names`` (models gone cold or gone from the catalog)."""
        self.discard(self.names - set(names))

    def save(self) -> None:
        """Persist the set. A full or read-only state dir must not fail the operation that
        changed it: the set in memory stays right, and the next save writes it."""
        try:
            self.tree.write_file(FILE, json.dumps(sorted(self.names)).encode(), _TMP, mode=0o600)
        except OSError as err:
            log.warning("cannot save %s: %s; kept in memory", self.tree.abs(FILE), err.strerror)
