"""Path safety: every path the engine touches is a validated relative path under a configured root.

Relative paths ("rel") are '/'-separated, never absolute, never contain '..' or empty parts,
and are the same under cold storage, the models dir and every pool: a file lives at
``<root>/<rel>`` in each of them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import InvalidArgument

# Model names as users type them: "llama3:8b", "org/name", "host/ns/model:tag", "qwen2-7b-q4".
_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:@+\-/]{0,254}$")
_POOL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,62}$")


def check_rel(rel: str) -> str:
    """Return ``rel`` if it is a safe relative path, else raise InvalidArgument."""
    if not rel or "\0" in rel:
        raise InvalidArgument(f"{rel!r} is not a valid relative path")
    if rel.startswith("/"):
        raise InvalidArgument(f"{rel!r} is absolute; expected a path relative to a root")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise InvalidArgument(f"{rel!r} contains '..', '.' or an empty component")
    return rel


def is_within(root: Path, path: str | Path) -> bool:
    """True if the absolute ``path`` is ``root`` or lies below it, lexically."""
    root_s = os.path.normpath(str(root))
    path_s = os.path.normpath(str(path))
    return path_s == root_s or path_s.startswith(root_s.rstrip("/") + "/")


def check_model_name(name: str) -> str:
    if not isinstance(name, str) or not _MODEL_NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"{name!r} is not a valid model name (letters, digits and _ . : @ + - /, "
            "at most 255 characters)"
        )
    if any(p in ("", ".", "..") for p in name.split("/")):
        raise InvalidArgument(f"{name!r} is not a valid model name: it contains '..' or '//'")
    return name


def check_pool_name(name: str) -> str:
    if not isinstance(name, str) or not _POOL_NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"{name!r} is not a valid pool name (letters, digits, '_' and '-', "
            "starting with a letter or digit, at most 63 characters)"
        )
    return name


def overlapping(a: Path, b: Path) -> bool:
    """True if one of the two directories contains the other (or they are the same)."""
    return is_within(a, b) or is_within(b, a)
