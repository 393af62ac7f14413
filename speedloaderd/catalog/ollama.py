"""Ollama models dir: ``manifests/<host>/<namespace>/<model>/<tag>`` and ``blobs/sha256-<hex>``.

A model is one manifest (META, copied as a regular file) plus the config blob and every
layer blob it lists (DATA, each named by its content digest). Blobs are shared between
models by name, so the same blob is the same ``rel`` in every model that uses it; each blob
is examined once per scan however many manifests name it.

Files that cannot be used (missing or dangling blob, a blob that is a directory, a link out
of cold storage) are left out of ``Model.files`` and named in ``Model.problems``; every file
that is listed exists, inside cold storage, with the size given.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from pathlib import Path

from ..roots import Identity
from .coldfs import ColdEntry, ColdFileError, ColdRoot
from .result import assemble
from .types import FileRole, Model, ModelFile, ModelFormat, Problem, ScanResult

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
MANIFEST_LIMIT = 1 << 20
"""A manifest is a few hundred bytes; anything past 1 MiB is not one."""

MANIFEST_NESTING = 32
"""A manifest nests four levels deep; past this many it is not one. Python's json recurses
per level, so a deeply nested document (``[[[[...``) would raise RecursionError, or worse,
exhaust the thread's stack: the depth is measured, without recursion, before it is parsed."""

_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
# What changes the nesting depth of JSON text: brackets, quotes, and escapes inside strings.
_JSON_TOKEN_RE = re.compile(rb'\\.|["\[\]{}]', re.DOTALL)
_LAYOUT_HINT = "manifests live at manifests/<host>/<namespace>/<model>/<tag>"


def model_name(host: str, namespace: str, model: str, tag: str) -> str:
    """The name Ollama shows: ``model:tag``, ``ns/model:tag`` or ``host/ns/model:tag``."""
    if host != DEFAULT_HOST:
        return f"{host}/{namespace}/{model}:{tag}"
    if namespace != DEFAULT_NAMESPACE:
        return f"{namespace}/{model}:{tag}"
    return f"{model}:{tag}"


def blob_rel(digest: str) -> str:
    """``sha256:<hex>`` -> ``blobs/sha256-<hex>``; the digest must be checked already."""
    return "blobs/sha256-" + digest[7:]


def scan_ollama(cold_root: Path | str) -> ScanResult:
    with ColdRoot(cold_root) as cold:
        problems: list[Problem] = []
        blobs = _Blobs(cold)
        found = [
            (rel, _read_model(cold, rel, parts, blobs, e))
            for rel, parts, e in _manifests(cold, problems)
        ]
    return assemble(found, problems)


class _Blobs:
    """The stat (or why unusable) of each blob, looked up once per scan."""

    def __init__(self, cold: ColdRoot) -> None:
        self._cold = cold
        self._known: dict[str, os.stat_result | str] = {}
        # Blobs are reached through blobs/; if that is a link out of cold storage, none is usable.
        self._dir_error = cold.link_escape("blobs") if cold.leads_out("blobs") else None
        self._regular: dict[str, os.stat_result] | None = None

    def _listing(self) -> dict[str, os.stat_result]:
        """The regular files of blobs/, from one listing of its fd (fstatat per entry, no
        path walked again): a resolution per blob made a 10,000-model scan 2.5x slower.
        Anything else there (a link, a FIFO) is looked up on its own, with its reason."""
        if self._regular is None:
            self._regular = {}
            with (
                contextlib.suppress(OSError),
                self._cold.root.directory("blobs") as fd,
                os.scandir(fd) as it,
            ):
                for e in it:
                    if e.is_file(follow_symlinks=False):
                        self._regular[f"blobs/{e.name}"] = e.stat(follow_symlinks=False)
        return self._regular

    def stat(self, rel: str) -> os.stat_result | str:
        known = self._known.get(rel)
        if known is None:
            if self._dir_error:
                known = f"blobs/ {self._dir_error}"
            elif (listed := self._listing().get(rel)) is not None:
                known = listed
            else:
                try:
                    known = self._cold.stat_file(rel)
                except ColdFileError as exc:
                    known = str(exc)
            self._known[rel] = known
        return known


def _manifests(cold: ColdRoot, problems: list[Problem]):
    """Yield (rel, (host, namespace, model, tag)) for every manifest file, in order."""
    if cold.leads_out("manifests"):
        problems.append(Problem("manifests", cold.link_escape("manifests")))
        return

    def walk(rel: str, parts: tuple[str, ...]):
        try:
            entries = cold.scandir(rel)
        except ColdFileError as exc:
            problems.append(Problem(rel, f"{rel} {exc}"))
            return
        leaf = len(parts) == 3
        for e in entries:
            child = f"{rel}/{e.name}"
            if e.is_dir:
                if leaf:
                    problems.append(
                        Problem(child, f"{child}: unexpected directory; {_LAYOUT_HINT}")
                    )
                else:
                    yield from walk(child, (*parts, e.name))
            elif leaf:
                yield child, (*parts, e.name), e
            elif e.is_link:
                problems.append(Problem(child, f"{child}: symlink not followed; {_LAYOUT_HINT}"))
            else:
                problems.append(Problem(child, f"{child}: unexpected file; {_LAYOUT_HINT}"))

    yield from walk("manifests", ())


def _read_model(
    cold: ColdRoot, rel: str, parts: tuple[str, ...], blobs: _Blobs, entry: ColdEntry
) -> Model:
    name = model_name(*parts)
    try:
        read = cold.read_small(rel, MANIFEST_LIMIT, entry)
    except ColdFileError as exc:
        return Model(name, ModelFormat.OLLAMA, (), (f"{rel}: {exc}",))
    data = read.content
    # The models dir gets these very bytes, with the source's access: no second read.
    files = [
        ModelFile(
            rel,
            len(data),
            FileRole.META,
            content=data,
            mode=stat.S_IMODE(read.st.st_mode),
            owner=(read.st.st_uid, read.st.st_gid),
        )
    ]
    problems: list[str] = []
    seen: set[str] = set()
    for what, layer in _descriptors(rel, data, problems):
        digest = layer.get("digest")
        if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
            problems.append(
                f"{rel}: {what} has digest {digest!r}, "
                "expected 'sha256:' and 64 lowercase hex digits"
            )
            continue
        brel = blob_rel(digest)
        if brel in seen:
            continue  # the same blob twice in one manifest is one file
        seen.add(brel)
        st = blobs.stat(brel)
        if isinstance(st, str):
            problems.append(f"{brel} ({what} of {rel}): {st}")
            continue
        size = st.st_size
        files.append(ModelFile(brel, size, FileRole.DATA, digest=digest, ident=Identity.of(st)))
        expected = layer.get("size")
        if expected is not None and (type(expected) is not int or expected != size):
            problems.append(f"{brel}: {size} bytes on disk, but {rel} says {expected!r}")
    return Model(name, ModelFormat.OLLAMA, tuple(files), tuple(problems))


def json_nesting(data: bytes) -> int:
    """The deepest nesting of arrays and objects in JSON text, counted without recursion
    (brackets inside strings do not count). Text that is not JSON gets some number: the
    parser then says what is wrong with it."""
    depth = deepest = 0
    in_string = False
    for m in _JSON_TOKEN_RE.finditer(data):
        token = m.group()
        if token == b'"':
            in_string = not in_string
        elif in_string or token[0] == 0x5C:  # in a string, or an escape (a backslash)
            continue
        elif token in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _descriptors(rel: str, data: bytes, problems: list[str]) -> list[tuple[str, dict]]:
    """The manifest's config and layer descriptors, as (what, descriptor) pairs."""
    # Nesting cannot be deeper than the number of brackets that open it: counting them is
    # C-speed, and a real manifest has about ten, so the token walk runs only for odd ones
    # (it took a quarter of a 10,000-manifest scan when it ran on every one).
    openers = data.count(b"[") + data.count(b"{")
    depth = json_nesting(data) if openers > MANIFEST_NESTING else openers
    if depth > MANIFEST_NESTING:
        problems.append(
            f"{rel}: JSON nested {depth} levels deep, more than the {MANIFEST_NESTING} "
            "a manifest may have; not parsed"
        )
        return []
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError too
        problems.append(f"{rel}: not valid JSON ({exc})")
        return []
    if not isinstance(doc, dict):
        problems.append(f"{rel}: is JSON but not an object")
        return []
    if doc.get("schemaVersion") != 2:
        problems.append(f"{rel}: schemaVersion is {doc.get('schemaVersion')!r}, expected 2")
    found: list[tuple[str, object]] = []
    config = doc.get("config")
    if config is None:
        problems.append(f"{rel}: has no config")
    else:
        found.append(("config", config))
    layers = doc.get("layers")
    if isinstance(layers, list):
        found.extend((f"layer {i}", layer) for i, layer in enumerate(layers))
    else:
        problems.append(f"{rel}: 'layers' is {layers!r}, expected a list")
    good: list[tuple[str, dict]] = []
    for what, desc in found:
        if isinstance(desc, dict):
            good.append((what, desc))
        else:
            problems.append(f"{rel}: {what} is {desc!r}, expected an object")
    return good
