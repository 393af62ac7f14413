"""A test lab: cold storage, a models dir, state dir and tmpfs pools under one temp dir.

``Lab.seal()`` fingerprints cold storage once the test has built its models; the ``lab``
fixture then asserts at teardown that nothing on cold storage changed, whatever the test did.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from speedloader_lab.modelgen import tree_fingerprint
from speedloaderd.config import Config, parse_config
from speedloaderd.engine import Engine

MiB = 1 << 20
T = TypeVar("T")


@dataclass
class Lab:
    root: Path
    sealed: dict | None = None
    config_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.cold.mkdir(exist_ok=True)
        self.config_path = self.root / "config.json"

    @property
    def cold(self) -> Path:
        return self.root / "cold"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def state(self) -> Path:
        return self.root / "state"

    def pool_path(self, name: str) -> Path:
        return self.root / "pools" / name

    def config(
        self,
        backend: str = "ollama",
        pools: Sequence[tuple[str, int, int]] = (("local", 64 * MiB, 100),),
        strategy: str = "fastest-fit",
        pinned: dict[str, str] | None = None,
    ) -> Config:
        return parse_config(
            {
                "modelsDir": str(self.models),
                "storage": {"path": str(self.cold), "type": "local"},
                "backend": {"type": backend},
                "stateDir": str(self.state),
                "poolsRoot": str(self.root / "pools"),
                "pools": [
                    {"name": n, "path": str(self.pool_path(n)), "size": s, "speed": sp}
                    for n, s, sp in pools
                ],
                "modelPlacement": {"defaultStrategy": strategy, "pinned": pinned or {}},
            }
        )

    async def engine(self, config: Config | None = None) -> Engine:
        engine = Engine(config or self.config(), None)
        await engine.start()
        return engine

    def seal(self) -> None:
        """Cold storage is complete: from now on it must not change by a byte or a timestamp."""
        self.sealed = tree_fingerprint(self.cold)

    def check_cold_unchanged(self) -> None:
        if self.sealed is not None:
            assert tree_fingerprint(self.cold) == self.sealed, "cold storage was modified"

    def pool_files(self, name: str) -> list[str]:
        root = self.pool_path(name)
        return sorted(
            str(Path(d, f).relative_to(root)) for d, _, files in os.walk(root) for f in files
        )

    def link(self, rel: str) -> str:
        return os.readlink(self.models / rel)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)
