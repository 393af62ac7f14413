"""What the policy remembers of each model's uses: a decayed count and the last few times.

Per model, O(1) numbers and at most ``RECENT`` timestamps, for at most
``Settings.max_tracked`` models (the least valuable history is dropped beyond it), so
memory and the persisted state stay bounded whatever the openers do. Models that are not in
RAM keep their history too: that is ARC's ghost list, free here because models are few.

Time is always passed in (seconds, any epoch, the caller's clock): nothing here reads a
clock, so a trace replays at full speed and a test is exact.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FAST_HALF_LIFE", "RECENT", "STATE_VERSION", "History", "StateError", "Uses"]

FAST_HALF_LIFE = 2 * 3600.0
"""The half-life of the second, fast count (``Uses.fast``), or the settings' half-life if
that is shorter (then it adds nothing). See ``Uses.rate`` for why and the bench figures."""

RECENT = 32
"""Timestamps kept per model: enough to say "used 14x in 1 h" and to apply LRU-K's
admission for any K the settings allow (at most 16)."""

STATE_VERSION = 2
"""2 added each model's fast count (``Uses.fast``); a version 1 state still loads, its fast
counts rebuilt from the recent uses."""
MAX_NAME = 4096
MAX_STATE_BYTES = 64 << 20
"""A state file larger than this is refused unread (10,000 models take about 2 MB)."""


class StateError(ValueError):
    """The persisted state cannot be used; the message says why in one sentence. The daemon
    logs it and starts with an empty history (it only costs the policy its memory)."""


@dataclass
class Uses:
    heat: float = 0.0
    """Decayed count of uses, as of ``at``: each use adds 1, halving every half-life."""
    at: float = 0.0
    """Time of the last counted use (the one ``heat`` is measured at)."""
    last: float = 0.0
    """Time of the last use seen, counted or coalesced into the previous one."""
    count: int = 0
    """Counted uses since the history began."""
    evicted: float | None = None
    """When the engine last evicted it (``History.evicted``): the minimum residency holds
    both ways, so it is not promoted again within ``min_residency`` of that."""
    recent: list[float] = field(default_factory=list)
    """The last RECENT counted uses, oldest first."""
    fast: float = 0.0
    """Decayed count as ``heat`` but with the fast half-life (``History.fast_half_life``),
    as of ``at``."""

    def heat_at(self, now: float, half_life: float) -> float:
        # A clock that went back (now < at) must not make a model hotter than it was.
        return self.heat * 2.0 ** (-max(0.0, now - self.at) / half_life)

    def rate(self, now: float, half_life: float, fast_half_life: float) -> float:
        """Uses per second: the decayed count over the decay kernel's width (half_life /
        ln 2), or, if higher, the fast count's rate less its noise.

        The slow count alone needs most of a half-life to see that a model became popular
        (a model released today), while the models it should replace keep their rate for as
        long. The fast count (2 h) sees it within a few uses, but on its own it is noisy: a
        model used once an hour scores 0 to 4 uses per 2 h by chance, and taking the higher
        of the two rates as it is swapped models on chance bursts (bench, pool 20 %, seed 13,
        fraction of the optimum zipf / shifting / daily: 0.894/0.834/0.787 against
        0.908/0.829/0.792, copying 7-9 TB instead of 1-2, and a scan displaced 18 % of the
        hot set). So the fast count is taken one square root below itself (its standard
        deviation is about sqrt(count / 2) for Poisson uses, so about 1.4 of them): a model
        used steadily five times an hour counts 14.4 and is taken at 10.6 (73 % of its
        rate), a burst of three uses at 1.3. With it: 0.909/0.838/0.795, and at a 10 % pool
        shifting 0.809 against 0.784, the hot set intact (seed 13; with seed 7 a scan left
        91 % of it in RAM against 96 % before; README has both seeds).

        Measuring a young model over the time it was watched instead (so that a model
        released today is not undervalued) was tried in the bench: no better on the
        shifting trace (0.823 against 0.829 of the optimum) and it added thrash."""
        slow = self.heat_at(now, half_life) * math.log(2) / half_life
        fast = self.fast * 2.0 ** (-max(0.0, now - self.at) / fast_half_life)
        fast = max(0.0, fast - math.sqrt(fast)) * math.log(2) / fast_half_life
        return max(slow, fast)


class History:
    def __init__(self, half_life: float, coalesce: float, max_tracked: int) -> None:
        self.half_life = half_life
        self.fast_half_life = min(FAST_HALF_LIFE, half_life)
        self.coalesce = coalesce
        self.max_tracked = max_tracked
        self.models: dict[str, Uses] = {}
        self.resident: dict[str, float] = {}
        """When each model now in RAM got there (its promote's end, wall clock), for the
        minimum residency; kept in the state so a restart does not forget it (a model in RAM
        whose time is unknown counts as resident long enough, and could be evicted at once)."""

    def record(self, model: str, when: float) -> bool:
        """Count a use of ``model`` at ``when``; False if it was coalesced into the last one."""
        uses = self.models.get(model)
        if uses is None:
            if len(self.models) >= self.max_tracked:
                self._drop_least_valuable(when)
            uses = self.models[model] = Uses()
        elif uses.count and abs(when - uses.recent[-1]) < self.coalesce:
            uses.last = max(uses.last, when)
            return False
        if when >= uses.at:
            uses.heat = uses.heat_at(when, self.half_life) + 1.0
            uses.fast = uses.fast * 2.0 ** (-(when - uses.at) / self.fast_half_life) + 1.0
            uses.at = when
        else:  # an event that arrives late counts as much as it would have then
            uses.heat += 2.0 ** (-(uses.at - when) / self.half_life)
            uses.fast += 2.0 ** (-(uses.at - when) / self.fast_half_life)
        uses.last = max(uses.last, when) if uses.count else when
        uses.count += 1
        uses.recent.append(when)
        uses.recent.sort()
        del uses.recent[:-RECENT]
        return True

    def evicted(self, model: str, when: float) -> None:
        uses = self.models.get(model)
        if uses is None:
            if len(self.models) >= self.max_tracked:
                self._drop_least_valuable(when)
            uses = self.models[model] = Uses()
        uses.evicted = when if uses.evicted is None else max(uses.evicted, when)

    def heat(self, model: str, now: float) -> float:
        uses = self.models.get(model)
        return uses.heat_at(now, self.half_life) if uses else 0.0

    def _drop_least_valuable(self, now: float) -> None:
        victim = min(self.models, key=lambda n: (self.models[n].heat_at(now, self.half_life), n))
        del self.models[victim]

    # -- persistence --------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": STATE_VERSION,
                "models": {
                    name: [u.heat, u.at, u.last, u.count, u.evicted, u.recent, u.fast]
                    for name, u in sorted(self.models.items())
                },
                "resident": dict(sorted(self.resident.items())),
            },
            separators=(",", ":"),
        )

    def load_json(self, text: str | bytes) -> None:
        """Replace the history with the one in ``text``, or raise StateError and keep it."""
        if len(text) > MAX_STATE_BYTES:
            raise StateError(
                f"the tiering state is {len(text)} bytes, more than the {MAX_STATE_BYTES} "
                "it can be; it was ignored."
            )
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise StateError(f"the tiering state is not JSON ({e}); it was ignored.") from None
        version = data.get("version") if isinstance(data, dict) else None
        if type(version) is not int or version not in (1, STATE_VERSION):  # JSON true is no 1
            raise StateError(
                f"the tiering state is not version 1 or {STATE_VERSION} of the format; "
                "it was ignored."
            )
        models = data.get("models")
        if not isinstance(models, dict):
            raise StateError("the tiering state has no models table; it was ignored.")
        if len(models) > self.max_tracked:
            raise StateError(
                f"the tiering state holds {len(models)} models, more than maxTracked "
                f"({self.max_tracked}); it was ignored."
            )
        loaded = {}
        for name, row in models.items():
            uses = loaded[name] = _uses(name, row, version)
            if version == 1:
                # The fast count forgets within hours: the last RECENT uses hold nearly all
                # of it (all unless a model was used more than RECENT times in a few hours).
                uses.fast = sum(
                    2.0 ** (-max(0.0, uses.at - t) / self.fast_half_life) for t in uses.recent
                )
        resident = data.get("resident", {})  # version 1 had none
        if not isinstance(resident, dict) or len(resident) > self.max_tracked:
            raise StateError(
                "the tiering state's resident table is not a table of at most maxTracked "
                f"({self.max_tracked}) models; it was ignored."
            )
        for name, when in resident.items():
            if not name or len(name) > MAX_NAME or "\0" in name or not _finite(when):
                raise StateError(
                    f"the tiering state's resident time of {name[:80]!r} is not a model and a "
                    "finite number; it was ignored."
                )
        self.models = loaded
        self.resident = {name: float(when) for name, when in resident.items()}


def _uses(name: str, row: Any, version: int) -> Uses:
    def bad(why: str) -> StateError:
        return StateError(f"the tiering state's entry for {name[:80]!r} {why}; it was ignored.")

    if not name or len(name) > MAX_NAME or "\0" in name:
        raise bad("has an invalid model name")
    fields = "heat, at, last, count, evicted, recent" + ("" if version == 1 else ", fast")
    if not isinstance(row, list) or len(row) != fields.count(",") + 1:
        raise bad(f"is not [{fields}]")
    if version == 1:
        row = [*row, 0.0]  # the caller rebuilds it
    heat, at, last, count, evicted, recent, fast = row
    numbers = [heat, at, last, fast] + ([] if evicted is None else [evicted])
    if not all(_finite(x) for x in numbers):
        raise bad("has a value that is not a finite number")
    if heat < 0 or fast < 0:
        raise bad("has a negative heat")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise bad("has a count that is not a whole number >= 0")
    if (
        not isinstance(recent, list)
        or len(recent) > RECENT
        or len(recent) > count
        or not all(_finite(t) for t in recent)
        or recent != sorted(recent)
        or (count > 0) != bool(recent)
    ):
        raise bad("has a list of recent uses that cannot be")
    if recent and (at < recent[0] or last < recent[-1]):
        raise bad("has times that are out of order")
    return Uses(
        float(heat),
        float(at),
        float(last),
        count,
        None if evicted is None else float(evicted),
        [float(t) for t in recent],
        float(fast),
    )


def _finite(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
