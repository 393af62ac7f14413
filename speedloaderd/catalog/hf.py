"""vLLM / Hugging Face layouts: plain model directories and the hub cache.

**Model directory**: a directory holding ``config.json`` and at least one weight file
(:data:`WEIGHT_SUFFIXES`) directly inside it. Its rel path is the model name (``org/name``);
every regular file below it (hidden ones skipped) is DATA. The walk does not look for more
models inside a model directory.

**Hub cache** (``models--org--name/{blobs,snapshots,refs}``, anywhere below the root, usually
under ``hub/``): the model is ``org/name`` (``models--name`` gives ``name``). Its files:

- every file below ``refs/`` as META (``refs/main`` holds the revision a plain
  ``from_pretrained`` loads);
- every symlink in the chosen snapshot as LINK, its ``link_target`` the raw relative
  readlink value. Other revisions are not served: their links would point at blobs the
  models dir does not carry. A link that is absolute or leads out of the repo directory
  (checked lexically) is a problem and is not listed;
- the blobs that the *chosen* snapshot's links point to, as DATA, with digest
  ``sha256:<hash>`` when the blob name is 64 hex digits (an LFS file), else None (a git
  blob, named by its SHA-1). Regular files inside the chosen snapshot (a cache made without
  symlinks) are DATA too.

The chosen snapshot is the one ``refs/main`` names; without a usable ``refs/main``, the only
snapshot; with several and no ``refs/main``, the most recently modified snapshot directory
(lstat mtime, ties broken by the greater name). A ``refs/main`` naming a snapshot that is
not there is a problem. ``datasets--*`` and ``spaces--*`` are not models and are skipped.

Directory symlinks are never followed; inside a model they are a problem (the model would
be incomplete), elsewhere they are skipped (reported when they lead out of cold storage).
"""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path

from .coldfs import ColdFileError, ColdRoot
from .result import assemble
from .types import FileRole, Model, ModelFile, ModelFormat, Problem, ScanResult

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
HUB_MODEL_PREFIX = "models--"
HUB_OTHER_PREFIXES = ("datasets--", "spaces--")
REF_LIMIT = 4096
_SHA256_RE = re.compile(r"[0-9a-f]{64}")

Entries = list[os.DirEntry[str]]


def scan_hf(cold_root: Path | str) -> ScanResult:
    cold = ColdRoot(cold_root)
    found: list[tuple[str, Model]] = []
    problems: list[Problem] = []
    _walk(cold, "", found, problems)
    return assemble(found, problems)


def hub_model_name(dir_name: str) -> str:
    """``models--org--name`` -> ``org/name``; ``models--name`` -> ``name``."""
    return dir_name.removeprefix(HUB_MODEL_PREFIX).replace("--", "/", 1)


def is_model_dir(entries: Entries) -> bool:
    names = [e.name for e in entries if not e.is_dir(follow_symlinks=False)]
    return "config.json" in names and any(n.endswith(WEIGHT_SUFFIXES) for n in names)


def _walk(cold: ColdRoot, rel: str, found: list[tuple[str, Model]], problems: list[Problem]):
    try:
        entries = cold.scandir(rel)
    except ColdFileError as exc:
        problems.append(Problem(rel, f"{rel or 'cold storage root'} {exc}"))
        return
    if is_model_dir(entries):
        if rel:
            found.append((rel, _model_dir(cold, rel, entries)))
        else:
            problems.append(
                Problem(
                    rel,
                    "cold storage root is itself a model directory (config.json and weights); "
                    "point cold storage at the directory above it",
                )
            )
        return
    prefix = f"{rel}/" if rel else ""
    for e in entries:
        child = prefix + e.name
        if e.is_dir(follow_symlinks=False):
            if e.name.startswith(HUB_MODEL_PREFIX):
                found.append((child, _hub_repo(cold, child, hub_model_name(e.name))))
            elif not e.name.startswith(HUB_OTHER_PREFIXES):
                _walk(cold, child, found, problems)
        elif e.is_symlink() and cold.resolve(child) is None:
            problems.append(Problem(child, f"{child}: {cold.link_escape(child)}"))


def _model_dir(cold: ColdRoot, rel: str, entries: Entries) -> Model:
    files: list[ModelFile] = []
    problems: list[str] = []

    def collect(dir_rel: str, entries: Entries) -> None:
        for e in entries:
            child = f"{dir_rel}/{e.name}"
            if e.is_dir(follow_symlinks=False):
                try:
                    collect(child, cold.scandir(child))
                except ColdFileError as exc:
                    problems.append(f"{child}: {exc}")
                continue
            try:
                files.append(ModelFile(child, cold.stat_file(child, e), FileRole.DATA))
            except ColdFileError as exc:
                problems.append(f"{child}: {exc}")

    collect(rel, entries)
    files.sort(key=lambda f: f.rel)
    return Model(rel, ModelFormat.SAFETENSORS, tuple(files), tuple(problems))


def _hub_repo(cold: ColdRoot, rel: str, name: str) -> Model:
    repo = _HubRepo(cold, rel)
    try:
        repo.scan()
    except ColdFileError as exc:
        repo.problems.append(f"{rel}: {exc}")
    files = (
        sorted(repo.meta, key=_by_rel)
        + sorted(repo.links, key=_by_rel)
        + sorted(repo.data.values(), key=_by_rel)
    )
    return Model(name, ModelFormat.HF_HUB, tuple(files), tuple(repo.problems))


def _by_rel(f: ModelFile) -> str:
    return f.rel


class _HubRepo:
    """The files and problems of one ``models--*`` directory, gathered by :meth:`scan`."""

    def __init__(self, cold: ColdRoot, rel: str) -> None:
        self.cold = cold
        self.rel = rel
        self.meta: list[ModelFile] = []
        self.links: list[ModelFile] = []
        self.data: dict[str, ModelFile] = {}
        self.problems: list[str] = []

    def scan(self) -> None:
        top = {e.name: e for e in self.cold.scandir(self.rel)}
        main_rev = self._refs(top)
        snapshots = {
            e.name: e for e in self._subdir(top, "snapshots") if e.is_dir(follow_symlinks=False)
        }
        chosen = self._choose(snapshots, main_rev)
        for rev in sorted(snapshots):
            snap_rel = f"snapshots/{rev}"
            try:
                self._snapshot(snap_rel, self.cold.scandir(f"{self.rel}/{snap_rel}"), rev == chosen)
            except ColdFileError as exc:
                self.problems.append(f"{self.rel}/{snap_rel}: {exc}")

    def _subdir(self, top: dict[str, os.DirEntry[str]], name: str) -> Entries:
        """Entries of a top-level directory of the repo; [] if missing, or unusable (a problem)."""
        e = top.get(name)
        where = f"{self.rel}/{name}"
        if e is None:
            return []
        if not e.is_dir(follow_symlinks=False):
            what = "a symlink, not followed" if e.is_symlink() else "not a directory"
            self.problems.append(f"{where}: is {what}")
            return []
        try:
            return self.cold.scandir(where)
        except ColdFileError as exc:
            self.problems.append(f"{where}: {exc}")
            return []

    def _refs(self, top: dict[str, os.DirEntry[str]]) -> str | None:
        """List every ref as META; return the revision refs/main names, if readable."""
        main_rev = None
        pending = [("refs", self._subdir(top, "refs"))]
        while pending:
            dir_in_repo, entries = pending.pop()
            for e in entries:
                in_repo = f"{dir_in_repo}/{e.name}"
                full = f"{self.rel}/{in_repo}"
                try:
                    if in_repo == "refs/main":  # the one ref we read; a file, never a directory
                        data = self.cold.read_small(full, REF_LIMIT, e)
                        main_rev = data.decode("ascii").strip()
                        size = len(data)
                    elif e.is_dir(follow_symlinks=False):
                        pending.append((in_repo, self.cold.scandir(full)))
                        continue
                    else:
                        size = self.cold.stat_file(full, e)
                except (ColdFileError, UnicodeDecodeError) as exc:
                    self.problems.append(f"{full}: {exc}")
                    continue
                self.meta.append(ModelFile(full, size, FileRole.META))
        return main_rev

    def _choose(self, snapshots: dict[str, os.DirEntry[str]], main_rev: str | None) -> str | None:
        if main_rev is not None:
            if main_rev in snapshots:
                return main_rev
            self.problems.append(
                f"{self.rel}/refs/main: names revision {main_rev!r}, "
                f"but snapshots/{main_rev} is not there"
            )
        if not snapshots:
            if main_rev is None:
                self.problems.append(f"{self.rel}: has no snapshot to serve")
            return None
        return max(snapshots.values(), key=_newest).name

    def _snapshot(self, dir_in_repo: str, entries: Entries, chosen: bool) -> None:
        for e in entries:
            in_repo = f"{dir_in_repo}/{e.name}"
            full = f"{self.rel}/{in_repo}"
            if e.is_symlink():
                self._link(full, in_repo, chosen)
            elif e.is_dir(follow_symlinks=False):
                try:
                    self._snapshot(in_repo, self.cold.scandir(full), chosen)
                except ColdFileError as exc:
                    self.problems.append(f"{full}: {exc}")
            elif chosen:
                try:
                    self.data[full] = ModelFile(full, self.cold.stat_file(full, e), FileRole.DATA)
                except ColdFileError as exc:
                    self.problems.append(f"{full}: {exc}")

    def _link(self, full: str, in_repo: str, chosen: bool) -> None:
        try:
            target = os.readlink(self.cold.abs(full))
        except OSError as exc:
            self.problems.append(f"{full}: cannot read the symlink ({exc.strerror})")
            return
        if posixpath.isabs(target):
            self.problems.append(f"{full}: absolute symlink to {target!r}; expected a relative one")
            return
        target_in_repo = posixpath.normpath(posixpath.join(posixpath.dirname(in_repo), target))
        if target_in_repo in (".", "..") or target_in_repo.startswith("../"):
            self.problems.append(
                f"{full}: symlink to {target!r} leads outside {self.rel}; not followed"
            )
            return
        if not chosen:
            return
        self.links.append(
            ModelFile(full, len(os.fsencode(target)), FileRole.LINK, link_target=target)
        )
        data_rel = f"{self.rel}/{target_in_repo}"
        if data_rel in self.data:
            return
        try:
            size = self.cold.stat_file(data_rel)
        except ColdFileError as exc:
            self.problems.append(f"{full} -> {data_rel}: {exc}")
            return
        blob = posixpath.basename(target_in_repo)
        digest = (
            f"sha256:{blob}"
            if posixpath.dirname(target_in_repo) == "blobs" and _SHA256_RE.fullmatch(blob)
            else None
        )
        self.data[data_rel] = ModelFile(data_rel, size, FileRole.DATA, digest=digest)


def _newest(entry: os.DirEntry[str]) -> tuple[int, str]:
    try:
        return entry.stat(follow_symlinks=False).st_mtime_ns, entry.name
    except OSError:  # vanished since it was listed: never the newest
        return -1, entry.name
