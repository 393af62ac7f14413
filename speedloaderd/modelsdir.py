"""The models dir: what the inference server reads, and the truth about where each file lives.

Every DATA file of every model is a symlink at ``<models_dir>/<rel>`` pointing either at
``<cold_root>/<rel>`` or at ``<pool_root>/<rel>``. Swaps are atomic (a new symlink under a
temporary name, renamed over the old one), so a reader sees the old target or the new one,
never a missing file, and never a partial copy (pool copies are renamed into place only
after they are complete and verified).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .catalog.types import FileRole, Model, ScanResult
from .errors import Failed
from .paths import check_rel, is_within

MARKER = ".speedloader-models-dir"
LINK_TMP_MARKER = ".sl-link-"
META_TMP_MARKER = ".sl-meta-"
MANAGED_META = ".speedloader-meta.json"
COLD = "cold"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(path: Path) -> None:
    """Flush the whole filesystem holding ``path`` in one call (syncfs(2))."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def read_cold(path: Path) -> bytes:
    """Read a small file from cold storage without touching its atime."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOATIME)
    except PermissionError:
        fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class Where:
    """Where one DATA link points: ``COLD``, a pool name, or None (missing/foreign)."""

    tier: str | None
    target: str | None
    exists: bool


@dataclass(slots=True)
class SyncReport:
    created: int = 0
    repointed_to_cold: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)


class ModelsDir:
    def __init__(self, root: Path, cold_root: Path, pool_roots: Mapping[str, Path]):
        self.root = root
        self.cold_root = cold_root
        self.pool_roots = pool_roots  # a live mapping: pools come and go
        # Set while sync() rebuilds the dir: one syncfs at the end instead of an fsync per
        # link (40,000 fsyncs took 15 s for 10,000 models). Per thread, so a promote's swap
        # running meanwhile stays durable on its own.
        self._batch = threading.local()

    def _durable(self, directory: Path) -> None:
        if not getattr(self._batch, "on", False):
            fsync_dir(directory)

    # --- setup -------------------------------------------------------------------------

    def ensure(self) -> None:
        """Create the dir, or adopt one we made before; refuse someone else's non-empty dir."""
        self.root.mkdir(parents=True, exist_ok=True)
        marker = self.root / MARKER
        if marker.exists():
            return
        with os.scandir(self.root) as it:
            if any(True for _ in it):
                raise Failed(
                    f"models dir {self.root} is not empty and was not made by speedloader; "
                    "point modelsDir at an empty or new directory"
                )
        marker.write_text("This directory is managed by speedloaderd. Do not edit by hand.\n")
        fsync_dir(self.root)

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
        try:
            target = os.readlink(self.path(rel))
        except (FileNotFoundError, OSError):
            return Where(None, None, False)
        tier = self.tier_of_target(target)
        # The expected target for a tier is exactly root/rel; anything else is foreign.
        if tier is not None:
            root = self.cold_root if tier == COLD else self.pool_roots[tier]
            if target != str(root / rel):
                tier = None
        return Where(tier, target, os.path.exists(target))

    # --- writing -----------------------------------------------------------------------

    def point(self, rel: str, target: Path) -> None:
        """Atomically make ``rel`` a symlink to ``target`` (a file under cold or a pool)."""
        link = self.path(rel)
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name(f".{link.name}{LINK_TMP_MARKER}{secrets.token_hex(4)}")
        os.symlink(target, tmp)
        try:
            os.rename(tmp, link)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self._durable(link.parent)

    def point_cold(self, rel: str) -> None:
        self.point(rel, self.cold_root / rel)

    def point_pool(self, rel: str, pool: str) -> None:
        self.point(rel, self.pool_roots[pool] / rel)

    def _write_meta(self, rel: str, content: bytes) -> None:
        dst = self.path(rel)
        dst.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if not dst.is_symlink() and dst.read_bytes() == content:
                return
        tmp = dst.with_name(f".{dst.name}{META_TMP_MARKER}{secrets.token_hex(4)}")
        with open(tmp, "wb") as f:
            f.write(content)
            if not getattr(self._batch, "on", False):
                f.flush()
                os.fsync(f.fileno())
        os.rename(tmp, dst)
        self._durable(dst.parent)

    def _ensure_link(self, rel: str, link_target: str) -> bool:
        link = self.path(rel)
        with contextlib.suppress(OSError):
            if os.readlink(link) == link_target:
                return False
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name(f".{link.name}{LINK_TMP_MARKER}{secrets.token_hex(4)}")
        os.symlink(link_target, tmp)
        os.rename(tmp, link)
        return True

    # --- sync with the catalog ----------------------------------------------------------

    def sync(self, scan: ScanResult, mounted_pools: Iterable[str]) -> SyncReport:
        """Make the dir reflect cold storage: create what is missing, keep hot links that are
        still valid, repoint broken ones to cold, remove links of models that are gone."""
        self._batch.on = True
        try:
            return self._sync(scan, mounted_pools)
        finally:
            self._batch.on = False
            syncfs(self.root)

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
                        self._write_meta(f.rel, read_cold(self.cold_root / f.rel))
                    except OSError as err:
                        report.conflicts.append(f"{f.rel}: cannot copy descriptor: {err.strerror}")
                elif f.role is FileRole.LINK:
                    if self._ensure_link(f.rel, f.link_target or ""):
                        report.created += 1
                else:
                    self._sync_data(f.rel, mounted, report)
        self._remove_stale(wanted, meta_rels, report)
        return report

    def _sync_data(self, rel: str, mounted: set[str], report: SyncReport) -> None:
        link = self.path(rel)
        if not os.path.lexists(link):
            self.point_cold(rel)
            report.created += 1
            return
        if not link.is_symlink():
            report.conflicts.append(f"{rel}: a regular file is in the way; left as it is")
            return
        w = self.where(rel)
        if w.tier == COLD and w.exists:
            return
        if w.tier not in (None, COLD) and w.tier in mounted and w.exists:
            return
        self.point_cold(rel)
        report.repointed_to_cold.append(rel)

    def _remove_stale(self, wanted: set[str], meta_rels: set[str], report: SyncReport) -> None:
        """Remove our links and descriptors for models no longer on cold storage.

        Only symlinks into our own roots and descriptors we wrote ourselves are removed,
        so files an inference server put here (e.g. ``ollama pull``) survive."""
        managed_file = self.root / MANAGED_META
        try:
            previous_meta = set(json.loads(managed_file.read_text()))
        except (FileNotFoundError, ValueError):
            previous_meta = set()
        for rel, entry in self.walk():
            if rel in wanted:
                continue
            if entry.is_symlink():
                target = os.readlink(entry)
                if self.tier_of_target(target) is not None or LINK_TMP_MARKER in entry.name:
                    os.unlink(entry)
                    report.removed.append(rel)
            elif rel in previous_meta or META_TMP_MARKER in entry.name:
                os.unlink(entry)
                report.removed.append(rel)
        self._prune_empty_dirs()
        if meta_rels != previous_meta:
            tmp = managed_file.with_name(managed_file.name + ".tmp")
            tmp.write_text(json.dumps(sorted(meta_rels)))
            os.rename(tmp, managed_file)

    def walk(self) -> Iterator[tuple[str, os.DirEntry[str]]]:
        """Every non-directory entry below the root (not following links), with its rel.
        Plain strings and DirEntry, no Path objects: this runs over every file at start."""
        root = str(self.root)
        skip = len(root) + 1
        stack = [root]
        while stack:
            d = stack.pop()
            with os.scandir(d) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    elif d != root or e.name not in (MARKER, MANAGED_META):
                        yield e.path[skip:], e

    def _prune_empty_dirs(self) -> None:
        for dirpath, dirnames, filenames in os.walk(self.root, topdown=False):
            if dirpath != str(self.root) and not dirnames and not filenames:
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)

    def remove_temp_links(self) -> list[str]:
        """Crash leftovers: symlinks/descriptors half-written under a temporary name."""
        removed = []
        for rel, p in self.walk():
            if LINK_TMP_MARKER in p.name or META_TMP_MARKER in p.name:
                os.unlink(p)
                removed.append(rel)
        return removed


def model_tiers(models_dir: ModelsDir, model: Model) -> dict[str, Where]:
    return {f.rel: models_dir.where(f.rel) for f in model.data_files}
