"""The models dir: what the inference server reads, and the truth about where each file lives.

Every DATA file of every model is a symlink at ``<models_dir>/<rel>`` pointing either at
``<cold_root>/<rel>`` or at ``<pool_root>/<rel>``. Swaps are atomic (a new symlink under a
temporary name, renamed over the old one), so a reader sees the old target or the new one,
never a missing file, and never a partial copy (pool copies are renamed into place only
after they are complete and verified).
"""

from __future__ import annotations

import json
import logging
import secrets
import stat
import threading
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .catalog.types import FileRole, ModelFile, ScanResult
from .errors import Failed
from .paths import check_rel, is_within
from .roots import Entry, Root, ensure_trusted_dir
from .tiers import COLD

log = logging.getLogger(__name__)

MARKER = ".speedloader-models-dir"
LINK_TMP_MARKER = ".sl-link-"
META_TMP_MARKER = ".sl-meta-"
MANAGED_META = ".speedloader-meta.json"
_MANAGED_LIMIT = 64 << 20  # the list of descriptors we wrote: ~100 bytes per model


def _tmp_name(name: str, marker: str) -> str:
    """A fresh temporary name beside ``name``: the marker and random hex, nothing of ``name``
    itself, so it fits NAME_MAX (255 bytes) however long the final name is (a cold-storage
    file may be named with 250 characters). Recovery finds it by the marker alone."""
    del name  # kept in the signature: callers say what the temporary name stands for
    return f"{marker}{secrets.token_hex(8)}"


@dataclass(frozen=True, slots=True)
class Where:
    """Where one DATA link points: ``COLD``, a pool name, or None (missing/foreign)."""

    tier: str | None
    target: str | None
    exists: bool

    def problem(self, mounted: Collection[str]) -> str:
        """Why this link does not serve its file, as the end of a sentence that starts
        "link <rel> "; "" when it does. The one rule of a valid link: it points at exactly
        ``<root>/<rel>`` of cold storage or of a mounted pool, and the file is there."""
        if self.tier is None and self.target is None:
            return "is missing"
        if self.tier is None:
            return f"points outside every configured root ({self.target})"
        if not self.exists:
            return f"points at a missing file ({self.target})"
        if self.tier != COLD and self.tier not in mounted:
            return f"points into pool {self.tier}, which is not mounted"
        return ""

    def valid(self, mounted: Collection[str]) -> bool:
        return not self.problem(mounted)

    def in_pool(self, mounted: Collection[str]) -> bool:
        """A valid link into a pool: the file is served from RAM."""
        return self.tier != COLD and self.valid(mounted)


@dataclass(frozen=True, slots=True)
class Conflict:
    """An entry a sync left as it is: a file it did not make is in the way, or a descriptor
    could not be copied. Logged, and a Health finding until a sync no longer meets it."""

    rel: str
    problem: str  # a sentence that says what is wrong and what to do


@dataclass(slots=True)
class SyncReport:
    created: int = 0
    repointed_to_cold: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)


class ModelsDir:
    def __init__(self, root: Path, cold_root: Path, pool_roots: Mapping[str, Path]):
        self.root = root
        self.cold_root = cold_root
        self.pool_roots = pool_roots  # a live mapping: pools come and go
        self.tree = Root(root, "models dir")
        self.cold = Root(cold_root, "cold storage", links=True)
        # Set while sync() rebuilds the dir: one syncfs at the end instead of an fsync per
        # link (40,000 fsyncs took 15 s for 10,000 models). Per thread, so a promote's swap
        # running meanwhile stays durable on its own.
        self._batch = threading.local()
        self.conflicts: list[Conflict] = []  # those of the last sync, for Health

    def _durable(self) -> bool:
        return not getattr(self._batch, "on", False)

    def pool(self, name: str) -> Root:
        return Root(self.pool_roots[name], f"pool {name}")

    # --- setup -------------------------------------------------------------------------

    def ensure(self) -> None:
        """Create the dir, or adopt one we made before; refuse someone else's non-empty dir.

        The dir must be root's alone along its whole path (else UnsafePath): then only root
        can have made the marker, and no link inside can be planted by anyone else."""
        ensure_trusted_dir(self.root, "modelsDir")
        st = self.tree.lstat(MARKER)
        if st is not None and stat.S_ISREG(st.st_mode) and st.st_uid == 0:
            return
        if self.tree.walk() or self.tree.directories():
            raise Failed(
                f"models dir {self.root} is not empty and was not made by speedloader; "
                "point modelsDir at an empty or new directory"
            )
        self.tree.write_file(
            MARKER,
            b"This directory is managed by speedloaderd. Do not edit by hand.\n",
            _tmp_name(MARKER, META_TMP_MARKER),
        )

    # --- reading -----------------------------------------------------------------------

    def path(self, rel: str) -> Path:
        return self.root / check_rel(rel)

    def tier_of_target(self, target: str) -> str | None:
        if is_within(self.cold_root, target):
            return COLD
        for name, root in self.pool_roots.items():
            if is_within(root, target):
                return name
        return None

    def where(self, rel: str) -> Where:
        check_rel(rel)
        target = self.tree.readlink(rel)
        if target is None:
            return Where(None, None, False)
        tier = self.tier_of_target(target)
        # The expected target for a tier is exactly root/rel; anything else is foreign.
        if tier is None:
            return Where(None, target, False)
        root = self.cold_root if tier == COLD else self.pool_roots[tier]
        if target != str(root / rel):
            return Where(None, target, False)
        # Whether it exists is asked of the tier's root, never by following the link.
        tree = self.cold if tier == COLD else self.pool(tier)
        return Where(tier, target, tree.stat_file(rel) is not None)

    # --- writing -----------------------------------------------------------------------

    def point(self, rel: str, target: Path) -> None:
        """Atomically make ``rel`` a symlink to ``target`` (a file under cold or a pool)."""
        check_rel(rel)
        name = rel.rpartition("/")[2]
        self.tree.symlink(
            rel,
            str(target),
            _tmp_name(name, LINK_TMP_MARKER),
            durable=self._durable(),
            like=self.cold,
        )

    def point_cold(self, rel: str) -> None:
        self.point(rel, self.cold_root / rel)

    def point_pool(self, rel: str, pool: str) -> None:
        self.point(rel, self.pool_roots[pool] / rel)

    def _write_meta(self, f: ModelFile) -> None:
        """Write the descriptor the scan read (never a second read of cold storage), with at
        most its source's access."""
        content = f.content
        if content is None:  # every scanner reads its descriptors; this would be a bug
            raise Failed(f"{f.rel} was not read by the scan; run a rescan")
        mode = stat.S_IMODE(f.mode) & 0o555
        st = self.tree.lstat(f.rel)
        if (
            st is not None
            and stat.S_ISREG(st.st_mode)
            and stat.S_IMODE(st.st_mode) == mode
            and (st.st_uid, st.st_gid) == f.owner
            and self.tree.read_own(f.rel, len(content)) == content
        ):
            return
        self.tree.write_file(
            f.rel,
            content,
            _tmp_name(f.rel.rpartition("/")[2], META_TMP_MARKER),
            mode=mode,
            owner=f.owner,
            durable=self._durable(),
            like=self.cold,
        )

    def _ensure_link(self, rel: str, link_target: str) -> bool:
        if self.tree.readlink(rel) == link_target:
            return False
        name = rel.rpartition("/")[2]
        self.tree.symlink(
            rel, link_target, _tmp_name(name, LINK_TMP_MARKER), durable=False, like=self.cold
        )
        return True

    # --- sync with the catalog ----------------------------------------------------------

    def sync(self, scan: ScanResult, mounted_pools: Iterable[str]) -> SyncReport:
        """Make the dir reflect cold storage: create what is missing, keep hot links that are
        still valid, repoint broken ones to cold, remove links of models that are gone.

        A models dir deleted while the daemon runs is made again, marker first, so the next
        start adopts it instead of refusing a directory speedloader did not mark."""
        self.ensure()
        self._batch.on = True
        try:
            report = self._sync(scan, mounted_pools)
        finally:
            self._batch.on = False
            self.tree.syncfs()
        known = set(self.conflicts)
        for c in report.conflicts:
            if c not in known:  # once, not at every rescan while it lasts
                log.warning("models dir: %s: %s", self.root / c.rel, c.problem)
        self.conflicts = report.conflicts
        return report

    def _sync(self, scan: ScanResult, mounted_pools: Iterable[str]) -> SyncReport:
        report = SyncReport()
        mounted = set(mounted_pools)
        wanted: set[str] = set()
        meta_rels: set[str] = set()
        for model in scan.models.values():
            for f in model.files:
                if f.rel in wanted:
                    continue
                wanted.add(f.rel)
                if f.role is FileRole.META:
                    meta_rels.add(f.rel)
                    try:
                        self._write_meta(f)
                    except (OSError, Failed) as err:
                        why = err.strerror if isinstance(err, OSError) else str(err)
                        problem = f"cannot copy the descriptor from cold storage ({why})"
                        report.conflicts.append(Conflict(f.rel, problem))
                elif f.role is FileRole.LINK:
                    if self._ensure_link(f.rel, f.link_target or ""):
                        report.created += 1
                else:
                    self._sync_data(f.rel, mounted, report)
        self._remove_stale(wanted, meta_rels, report)
        return report

    def _sync_data(self, rel: str, mounted: set[str], report: SyncReport) -> None:
        st = self.tree.lstat(rel)
        if st is None:
            self.point_cold(rel)
            report.created += 1
            return
        if not stat.S_ISLNK(st.st_mode):
            problem = (
                "something speedloader did not make (not a link) is where the model's link "
                "belongs; it is left as it is: move it away, then rescan"
            )
            report.conflicts.append(Conflict(rel, problem))
            return
        if self.where(rel).valid(mounted):
            return
        self.point_cold(rel)
        report.repointed_to_cold.append(rel)

    def _remove_stale(self, wanted: set[str], meta_rels: set[str], report: SyncReport) -> None:
        """Remove our links and descriptors for models no longer on cold storage.

        Only symlinks into our own roots and descriptors we wrote ourselves are removed,
        so files an inference server put here (e.g. ``ollama pull``) survive."""
        raw = self.tree.read_own(MANAGED_META, _MANAGED_LIMIT)
        try:
            previous_meta = set(json.loads(raw)) if raw is not None else set()
        except (ValueError, TypeError):
            previous_meta = set()
        for e in self.walk():
            rel = e.rel
            if rel in wanted:
                continue
            name = rel.rpartition("/")[2]
            if e.is_link:
                target = self.tree.readlink(rel) or ""
                if self.tier_of_target(target) is not None or LINK_TMP_MARKER in name:
                    self.tree.unlink(rel)
                    report.removed.append(rel)
            elif rel in previous_meta or META_TMP_MARKER in name:
                self.tree.unlink(rel)
                report.removed.append(rel)
        self.tree.prune_empty()
        if meta_rels != previous_meta:
            self.tree.write_file(
                MANAGED_META,
                json.dumps(sorted(meta_rels)).encode(),
                _tmp_name(MANAGED_META, META_TMP_MARKER),
                durable=False,
            )

    def walk(self) -> list[Entry]:
        """Every non-directory entry below the root, links not followed, but our own two."""
        return [e for e in self.tree.walk() if e.rel not in (MARKER, MANAGED_META)]

    def remove_temp_links(self) -> list[str]:
        """Crash leftovers: symlinks/descriptors half-written under a temporary name."""
        removed = []
        for e in self.walk():
            name = e.rel.rpartition("/")[2]
            if LINK_TMP_MARKER in name or META_TMP_MARKER in name:
                self.tree.unlink(e.rel)
                removed.append(e.rel)
        return removed
