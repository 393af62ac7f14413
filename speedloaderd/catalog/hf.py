"""vLLM / Hugging Face layouts: plain model directories and the hub cache.

**Model directory**: a directory holding ``config.json`` and at least one weight file
(:data:`WEIGHT_SUFFIXES`) directly inside it. Its rel path is the model name (``org/name``);
every regular file below it (hidden ones skipped) is DATA. The walk does not look for more
models inside a model directory.

**Hub cache** (``models--org--name/{blobs,snapshots,refs}``, anywhere below the root, usually
under ``hub/``): the model is ``org/name`` (``models--name`` gives ``name``). Its files:

- every file below ``refs/`` as META, with the bytes the scan read (``refs/main`` holds
  the revision a plain ``from_pretrained`` loads);
- every symlink in the chosen snapshot as LINK, its ``link_target`` the raw relative
  readlink value, which the models dir reproduces verbatim. Other revisions are not served:
  their links would point at blobs the models dir does not carry. A snapshot link is
  accepted only in the one form huggingface_hub writes, ``../`` once per directory between
  the repo and the link, then ``blobs/<name>``, and only if ``blobs/<name>`` is a regular
  file reached through no link at all (see :func:`blob_link_name`). Anything else (absolute,
  through another link, to a directory, to a blob that is itself a link) is a problem and
  is not listed: such a target can resolve physically outside the repo, on cold storage and
  again in the models dir, however innocent it looks when read lexically;
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
import re
import stat
from pathlib import Path

from ..roots import Identity
from .coldfs import ColdEntry, ColdFileError, ColdRoot
from .result import assemble
from .types import FileRole, Model, ModelFile, ModelFormat, Problem, ScanResult

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
HUB_MODEL_PREFIX = "models--"
HUB_OTHER_PREFIXES = ("datasets--", "spaces--")
REF_LIMIT = 4096
_SHA256_RE = re.compile(r"[0-9a-f]{64}")

Entries = list[ColdEntry]


def scan_hf(cold_root: Path | str) -> ScanResult:
    with ColdRoot(cold_root) as cold:
        found: list[tuple[str, Model]] = []
        problems: list[Problem] = []
        _walk(cold, "", found, problems)
    return assemble(found, problems)


def hub_model_name(dir_name: str) -> str:
    """``models--org--name`` -> ``org/name``; ``models--name`` -> ``name``."""
    return dir_name.removeprefix(HUB_MODEL_PREFIX).replace("--", "/", 1)


def is_model_dir(entries: Entries) -> bool:
    names = [e.name for e in entries if not e.is_dir]
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
        if e.is_dir:
            if e.name.startswith(HUB_MODEL_PREFIX):
                found.append((child, _hub_repo(cold, child, hub_model_name(e.name))))
            elif not e.name.startswith(HUB_OTHER_PREFIXES):
                _walk(cold, child, found, problems)
        elif e.is_link and cold.leads_out(child):
            problems.append(Problem(child, f"{child}: {cold.link_escape(child)}"))


def _model_dir(cold: ColdRoot, rel: str, entries: Entries) -> Model:
    files: list[ModelFile] = []
    problems: list[str] = []

    def collect(dir_rel: str, entries: Entries) -> None:
        for e in entries:
            child = f"{dir_rel}/{e.name}"
            if e.is_dir:
                try:
                    collect(child, cold.scandir(child))
                except ColdFileError as exc:
                    problems.append(f"{child}: {exc}")
                continue
            try:
                files.append(_data(child, cold.stat_file(child, entry=e)))
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


def _data(rel: str, st: os.stat_result, digest: str | None = None) -> ModelFile:
    """A DATA file with the identity the scan saw: a copy refuses any other file."""
    return ModelFile(rel, st.st_size, FileRole.DATA, digest=digest, ident=Identity.of(st))


def blob_link_name(dir_in_repo: str, target: str) -> str | None:
    """The blob name if ``target``, read from a link in ``dir_in_repo`` (e.g.
    ``snapshots/<rev>/sub``), is exactly what huggingface_hub writes there, else None.

    huggingface_hub (src/huggingface_hub/file_download.py, ``_create_symlink``) makes each
    snapshot entry with ``os.path.relpath(abs_src, abs_dst_folder)``, the blob
    ``<repo>/blobs/<etag>`` seen from the entry's folder ``<repo>/snapshots/<revision>/...``
    (``_get_pointer_path``): one ``../`` per directory back up to the repo, then
    ``blobs/<etag>``. Nothing else is accepted: with no link in between (the blob is checked
    separately), that string means the same file lexically and physically, on cold storage
    and again where the models dir reproduces it.
    """
    prefix = "../" * (dir_in_repo.count("/") + 1) + "blobs/"
    if not target.startswith(prefix):
        return None
    name = target[len(prefix) :]
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        return None
    return name


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
        snapshots = {e.name: e for e in self._subdir(top, "snapshots") if e.is_dir}
        chosen = self._choose(snapshots, main_rev)
        for rev in sorted(snapshots):
            snap_rel = f"snapshots/{rev}"
            try:
                self._snapshot(snap_rel, self.cold.scandir(f"{self.rel}/{snap_rel}"), rev == chosen)
            except ColdFileError as exc:
                self.problems.append(f"{self.rel}/{snap_rel}: {exc}")

    def _subdir(self, top: dict[str, ColdEntry], name: str) -> Entries:
        """Entries of a top-level directory of the repo; [] if missing, or unusable (a problem)."""
        e = top.get(name)
        where = f"{self.rel}/{name}"
        if e is None:
            return []
        if not e.is_dir:
            what = "a symlink, not followed" if e.is_link else "not a directory"
            self.problems.append(f"{where}: is {what}")
            return []
        try:
            return self.cold.scandir(where)
        except ColdFileError as exc:
            self.problems.append(f"{where}: {exc}")
            return []

    def _refs(self, top: dict[str, ColdEntry]) -> str | None:
        """List every ref as META, with the bytes read; return the revision refs/main names,
        if readable."""
        main_rev = None
        pending = [("refs", self._subdir(top, "refs"))]
        while pending:
            dir_in_repo, entries = pending.pop()
            for e in entries:
                in_repo = f"{dir_in_repo}/{e.name}"
                full = f"{self.rel}/{in_repo}"
                try:
                    if e.is_dir and in_repo != "refs/main":  # refs/main: a file, never a dir
                        pending.append((in_repo, self.cold.scandir(full)))
                        continue
                    read = self.cold.read_small(full, REF_LIMIT)
                    if in_repo == "refs/main":
                        main_rev = read.content.decode("ascii").strip()
                except (ColdFileError, UnicodeDecodeError) as exc:
                    self.problems.append(f"{full}: {exc}")
                    continue
                # The models dir gets these very bytes, with the source's access.
                self.meta.append(
                    ModelFile(
                        full,
                        len(read.content),
                        FileRole.META,
                        content=read.content,
                        mode=stat.S_IMODE(read.st.st_mode),
                        owner=(read.st.st_uid, read.st.st_gid),
                    )
                )
        return main_rev

    def _choose(self, snapshots: dict[str, ColdEntry], main_rev: str | None) -> str | None:
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
        return max(snapshots, key=lambda rev: (self._mtime(f"snapshots/{rev}"), rev))

    def _mtime(self, in_repo: str) -> int:
        """lstat mtime; -1 for an entry that vanished since it was listed: never the newest."""
        return self.cold.mtime_ns(f"{self.rel}/{in_repo}")

    def _snapshot(self, dir_in_repo: str, entries: Entries, chosen: bool) -> None:
        for e in entries:
            in_repo = f"{dir_in_repo}/{e.name}"
            full = f"{self.rel}/{in_repo}"
            if e.is_link:
                self._link(full, dir_in_repo, chosen)
            elif e.is_dir:
                try:
                    self._snapshot(in_repo, self.cold.scandir(full), chosen)
                except ColdFileError as exc:
                    self.problems.append(f"{full}: {exc}")
            elif chosen:
                try:
                    self.data[full] = _data(full, self.cold.stat_file(full))
                except ColdFileError as exc:
                    self.problems.append(f"{full}: {exc}")

    def _link(self, full: str, dir_in_repo: str, chosen: bool) -> None:
        target = self.cold.readlink(full)
        if target is None:
            self.problems.append(f"{full}: the symlink cannot be read (it changed meanwhile)")
            return
        if target.startswith("/"):
            self.problems.append(f"{full}: absolute symlink to {target!r}; expected a relative one")
            return
        blob = blob_link_name(dir_in_repo, target)
        if blob is None:
            expected = "../" * (dir_in_repo.count("/") + 1) + "blobs/<name>"
            self.problems.append(
                f"{full}: symlink to {target!r} is not a link to a blob of {self.rel} "
                f"(expected {expected!r}); not followed"
            )
            return
        if not chosen:
            return
        data_rel = f"{self.rel}/blobs/{blob}"
        if data_rel not in self.data:
            try:
                # No link at all on the way: the blob is physically where the target says.
                st = self.cold.stat_file(data_rel, links=False)
            except ColdFileError as exc:
                self.problems.append(f"{full} -> {data_rel}: {exc}")
                return
            digest = f"sha256:{blob}" if _SHA256_RE.fullmatch(blob) else None
            self.data[data_rel] = _data(data_rel, st, digest)
        self.links.append(
            ModelFile(full, len(os.fsencode(target)), FileRole.LINK, link_target=target)
        )
