"""The tiering policy's settings: what config ``autoTiering {...}`` turns into.

Plain data, validated on construction (an ``InvalidArgument`` naming the setting and the
range it takes), so the config layer can wrap it in its camelCase pydantic model and the
bench and tests can build one directly. Each default says why it is what it is; the bench
figures behind them are in README.md "Benchmarks" (bench/tiering.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InvalidArgument

__all__ = ["POLICIES", "Settings"]

POLICIES = ("gdsf", "lru")
"""``gdsf``: the size-aware value of policy.py (the default). ``lru``: the same planner
(pins, watermarks, minimum residency, admission) ranking models by their last use only,
for an admin who wants the simplest rule he can predict."""


@dataclass(frozen=True)
class Settings:
    enabled: bool = False
    """Off by default (issue 13): nothing moves by itself until an admin says so."""

    policy: str = "gdsf"

    high_watermark: float = 0.95
    """Automatic promotes fill a pool up to this fraction of its size; above it (a manual
    promote, a shrunk pool) the plan evicts down to ``low_watermark``. 5 % stays free for a
    manual promote of a small model and the pool's own metadata. In the bench, 0.95 rather
    than 1.0 cost 0.6-1.5 points of the optimum's byte hit ratio."""

    low_watermark: float = 0.85
    """Where an eviction pass stops: ten points below ``high_watermark`` so that one pass
    frees room for several promotes instead of one eviction per promote."""

    min_residency: float = 600.0
    """Seconds a model stays in RAM after its promote before it may be evicted. A promote of
    a 70 GB model from disk takes ~40 s (1.73 GB/s, README promote bench); ten minutes is
    long enough that no model is copied in and thrown out before a second load could use it."""

    half_life: float = 12 * 3600.0
    """Seconds after which a use counts half as much. Twelve hours remembers the day's
    favourites overnight and lets last week's fade. In the bench (fraction of the offline
    optimum's byte hit ratio, zipf / shifting / daily): 1 h 0.86/0.79/0.76, 6 h
    0.90/0.83/0.78, 12 h 0.91/0.83/0.79 with half the copies of 6 h, 48 h 0.90/0.75/0.79.
    With the fast count beside it (policy.py), at 20 % 24 h did better than 12 h
    (0.911/0.846/0.802 against 0.909/0.838/0.795) but lost zipf at a 10 % pool (0.881 of
    the optimum against 0.899; seed 7 0.861 against 0.896): for its first day a 24 h count
    is still filling, so the noisier fast count chooses the first set and the displacement
    margin keeps it. Twelve hours stays."""

    admit_accesses: int = 2
    """Uses within about one half-life before a model is promoted automatically (LRU-2's
    admission). Two: a one-off scan, which touches each model once, never promotes anything,
    and the copy pays back only if the model is loaded again (a copy at 1.73 GB/s costs about
    one load from disk, see policy.py)."""

    coalesce: float = 60.0
    """Seconds in which further uses of a model count as the same use: a split GGUF opens
    several files, a vLLM load every shard, and the backend's telemetry reports the load the
    kernel's open events already saw."""

    max_tracked: int = 10_000
    """Models whose history is kept (and persisted); beyond it the least valuable history is
    dropped. Bounds memory and the state file to about 2 MB."""

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise InvalidArgument(
                f"autoTiering policy {self.policy!r} is unknown: use one of {', '.join(POLICIES)}."
            )
        for name in ("high_watermark", "low_watermark", "min_residency", "half_life", "coalesce"):
            if not math.isfinite(getattr(self, name)):
                raise InvalidArgument(f"autoTiering {name} must be a finite number.")
        if not 0 < self.low_watermark < self.high_watermark <= 1:
            raise InvalidArgument(
                "autoTiering watermarks must satisfy 0 < lowWatermark < highWatermark <= 1 "
                f"(got low {self.low_watermark}, high {self.high_watermark})."
            )
        if not 0 <= self.min_residency <= 7 * 86_400:
            raise InvalidArgument("autoTiering minResidency must be 0 to 604800 seconds.")
        if not 60 <= self.half_life <= 30 * 86_400:
            raise InvalidArgument("autoTiering halfLife must be 60 to 2592000 seconds.")
        if not 1 <= self.admit_accesses <= 16:
            raise InvalidArgument("autoTiering admitAccesses must be 1 to 16.")
        if not 0 <= self.coalesce <= 3600:
            raise InvalidArgument("autoTiering coalesce must be 0 to 3600 seconds.")
        if not 1 <= self.max_tracked <= 1_000_000:
            raise InvalidArgument("autoTiering maxTracked must be 1 to 1000000.")
