"""What a model is, independent of the backend that lays it out.

Every file of a model is named by its path relative to the cold storage root (``rel``).
The same ``rel`` names it in the models dir and in every pool, so a blob shared between
models is one file per pool and one symlink in the models dir.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ..roots import Identity


class FileRole(enum.Enum):
    DATA = "data"
    """Model content: a symlink in the models dir, to cold storage or to a pool copy."""
    META = "meta"
    """Small descriptor copied as a regular file into the models dir (Ollama manifest, HF ref)."""
    LINK = "link"
    """A relative symlink the backend expects, reproduced verbatim (HF snapshot entry)."""


@dataclass(frozen=True, slots=True)
class ModelFile:
    rel: str
    size: int
    role: FileRole
    digest: str | None = None
    """Expected content digest as ``"sha256:<hex>"`` when the file's name promises one."""
    link_target: str | None = None
    """For LINK files: the relative target, e.g. ``../../blobs/<hash>``."""
    ident: Identity | None = None
    """For DATA files: the device and inode the scan saw. A copy opens the file again and
    refuses any other (a cold-storage writer may swap it for a link after the scan)."""
    content: bytes | None = None
    """For META files: the bytes the scan read. The models dir gets exactly these: a second
    read could meet another file (a link to a root-only file, a FIFO, /dev/zero)."""
    mode: int = 0o644
    owner: tuple[int, int] = (0, 0)
    """For META files: the source's permission bits and (uid, gid); the copy keeps them."""


class ModelFormat(str, enum.Enum):
    OLLAMA = "ollama"
    GGUF = "gguf"
    SAFETENSORS = "safetensors"
    HF_HUB = "hf-hub"


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    format: ModelFormat
    files: tuple[ModelFile, ...]
    problems: tuple[str, ...] = ()
    """Why this model cannot be served or promoted (missing blob, bad manifest...)."""

    @property
    def data_files(self) -> tuple[ModelFile, ...]:
        return tuple(f for f in self.files if f.role is FileRole.DATA)

    @property
    def size(self) -> int:
        """Bytes that a promote moves into RAM (each shared blob counted once)."""
        seen: dict[str, int] = {}
        for f in self.data_files:
            seen[f.rel] = f.size
        return sum(seen.values())

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(slots=True)
class Problem:
    """Something wrong on cold storage that is not tied to one model."""

    rel: str
    message: str


@dataclass(slots=True)
class ScanResult:
    models: dict[str, Model] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
