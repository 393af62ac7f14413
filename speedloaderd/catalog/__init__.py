"""The model catalog: what models cold storage holds, for one backend's layout.

``scan(cold_root, backend)`` only reads cold storage (``O_NOATIME``, never a write, never a
symlink followed out of ``cold_root``) and never raises for what it finds there: damage
becomes ``Model.problems`` (tied to one model) or ``ScanResult.problems`` (tied to none).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..errors import InvalidArgument
from .gguf import scan_gguf
from .hf import scan_hf
from .ollama import scan_ollama
from .types import FileRole, Model, ModelFile, ModelFormat, Problem, ScanResult

SCANNERS: dict[str, Callable[[Path | str], ScanResult]] = {
    "ollama": scan_ollama,
    "llamacpp": scan_gguf,
    "vllm": scan_hf,
    "huggingface": scan_hf,
}
BACKENDS = tuple(SCANNERS)

__all__ = [
    "BACKENDS",
    "FileRole",
    "Model",
    "ModelFile",
    "ModelFormat",
    "Problem",
    "ScanResult",
    "scan",
]


def scan(cold_root: Path, backend: str) -> ScanResult:
    """List the models below ``cold_root`` laid out as ``backend`` lays them out.

    ``backend`` is one of :data:`BACKENDS`; anything else raises InvalidArgument. Models come
    sorted by name; every ``ModelFile.rel`` is relative to ``cold_root``.
    """
    scanner = SCANNERS.get(backend)
    if scanner is None:
        raise InvalidArgument(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if not os.path.isdir(cold_root):
        return ScanResult(
            problems=[Problem("", f"cold storage root {cold_root} is missing or not a directory")]
        )
    return scanner(cold_root)
