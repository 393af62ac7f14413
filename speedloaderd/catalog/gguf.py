"""llama.cpp layout: every ``*.gguf`` below the cold root is a model, named by its rel path.

``qwen/qwen2-7b-q4_k_m.gguf`` is the model ``qwen/qwen2-7b-q4_k_m``. A split model
(``name-00001-of-00003.gguf`` ... ``name-00003-of-00003.gguf``, the names llama.cpp's
gguf-split writes) is one model ``name`` whose DATA files are its parts in order; a part
that is missing, or numbered past the count, is a problem on that model.

The scan only stats: GGUF content is never parsed here (a scan of thousands of files must
stay well under a second or two). Hidden files and directories are skipped, and directory
symlinks are not followed (no loops, no model listed twice); one leading out of cold
storage is reported. A ``.gguf`` symlink is followed when it stays inside cold storage.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..roots import Identity
from .coldfs import ColdFileError, ColdRoot
from .result import assemble
from .types import FileRole, Model, ModelFile, ModelFormat, Problem, ScanResult

SUFFIX = ".gguf"
_SPLIT_RE = re.compile(r"(?P<base>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf")


def split_part_name(base: str, no: int, count: int) -> str:
    """The file name llama.cpp gives part ``no`` (1-based) of ``count`` of model ``base``."""
    return f"{base}-{no:05d}-of-{count:05d}{SUFFIX}"


Seen = tuple[str, os.stat_result | str]
"""A file's rel and its stat, or why it is unusable."""


@dataclass
class _Found:
    """What the walk saw for one model name: single file and/or split parts."""

    rel: str
    single: Seen | None = None
    parts: dict[int, Seen] = field(default_factory=dict)
    counts: set[int] = field(default_factory=set)


def scan_gguf(cold_root: Path | str) -> ScanResult:
    problems: list[Problem] = []
    with ColdRoot(cold_root) as cold:
        files = list(_gguf_files(cold, "", problems))
    by_name: dict[str, _Found] = {}
    for rel, seen in files:
        slash = rel.rfind("/")
        split = _SPLIT_RE.fullmatch(rel, slash + 1)
        if split is None:
            name = rel[: -len(SUFFIX)]
            found = by_name.setdefault(name, _Found(rel))
            found.single = (rel, seen)
            continue
        name = rel[: slash + 1] + split["base"]
        found = by_name.setdefault(name, _Found(rel))
        no, count = int(split["no"]), int(split["count"])
        found.counts.add(count)
        if no in found.parts:  # same number, another count: reported below via counts
            continue
        found.parts[no] = (rel, seen)
    return assemble([(f.rel, _model(name, f)) for name, f in by_name.items()], problems)


def _gguf_files(cold: ColdRoot, rel: str, problems: list[Problem]):
    """Yield (rel, stat or why unusable) for every ``*.gguf`` below ``rel``, sorted walk."""
    try:
        entries = cold.scandir(rel)
    except ColdFileError as exc:
        problems.append(Problem(rel, f"{rel or 'cold storage root'} {exc}"))
        return
    prefix = f"{rel}/" if rel else ""
    for e in entries:
        child = prefix + e.name
        if e.is_dir:
            yield from _gguf_files(cold, child, problems)
        elif e.name.endswith(SUFFIX):
            try:
                yield child, cold.stat_file(child, entry=e)
            except ColdFileError as exc:
                yield child, str(exc)
        elif e.is_link and cold.leads_out(child):
            problems.append(Problem(child, f"{child}: {cold.link_escape(child)}"))


def _model(name: str, found: _Found) -> Model:
    problems: list[str] = []
    files: list[ModelFile] = []
    chosen = [found.single] if found.single else []
    chosen += [found.parts[n] for n in sorted(found.parts)]
    if found.single and found.parts:
        problems.append(
            f"{found.single[0]} and split parts {found.parts[min(found.parts)][0]}... "
            "both claim this model name"
        )
    if len(found.counts) > 1:
        problems.append(f"{name}: split parts disagree on the part count ({sorted(found.counts)})")
    elif found.counts:
        (count,) = found.counts
        for no in sorted(set(range(1, count + 1)) - found.parts.keys()):
            problems.append(f"{split_part_name(name, no, count)}: part {no} of {count} is missing")
        for no in sorted(found.parts.keys() - set(range(1, count + 1))):
            problems.append(f"{found.parts[no][0]}: part number {no} is outside 1..{count}")
    for rel, st in chosen:
        if isinstance(st, str):
            problems.append(f"{rel}: {st}")
        else:
            files.append(ModelFile(rel, st.st_size, FileRole.DATA, ident=Identity.of(st)))
    return Model(name, ModelFormat.GGUF, tuple(files), tuple(problems))
