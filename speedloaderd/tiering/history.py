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

__all__ = ["RECENT", "STATE_VERSION", "History", "StateError", "Uses"]

RECENT = 32
"""Timestamps kept per model: enough to say "used 14x in 1 h" and to apply LRU-K's
admission for any K the settings allow (at most 16)."""

STATE_VERSION = 1
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

    def heat_at(self, now: float, half_life: float) -> float:
        # A clock that went back (now < at) must not make a model hotter than it was.
        return self.heat * 2.0 ** (-max(0.0, now - self.at) / half_life)

    def rate(self, now: float, half_life: float) -> float:
        """Uses per second: the decayed count over the decay kernel's width (half_life /
        ln 2). Measuring a young model over the time it was watched instead (so that a
        model released today is not undervalued) was tried in the bench: no better on the
        shifting trace (0.823 against 0.829 of the optimum) and it added thrash."""
        return self.heat_at(now, half_life) * math.log(2) / half_life


class History:
    def __init__(self, half_life: float, coalesce: float, max_tracked: int) -> None:
        self.half_life = half_life
        self.coalesce = coalesce
        self.max_tracked = max_tracked
        self.models: dict[str, Uses] = {}

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
            uses.at = when
        else:  # an event that arrives late counts as much as it would have then
            uses.heat += 2.0 ** (-(uses.at - when) / self.half_life)
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
                    name: [u.heat, u.at, u.last, u.count, u.evicted, u.recent]
                    for name, u in sorted(self.models.items())
                },
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
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise StateError(
                f"the tiering state is not version {STATE_VERSION} of the format; it was ignored."
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
            loaded[name] = _uses(name, row)
        self.models = loaded


def _uses(name: str, row: Any) -> Uses:
    def bad(why: str) -> StateError:
        return StateError(f"the tiering state's entry for {name[:80]!r} {why}; it was ignored.")

    if not name or len(name) > MAX_NAME or "\0" in name:
        raise bad("has an invalid model name")
    if not isinstance(row, list) or len(row) != 6:
        raise bad("is not [heat, at, last, count, evicted, recent]")
    heat, at, last, count, evicted, recent = row
    numbers = [heat, at, last] + ([] if evicted is None else [evicted])
    if not all(_finite(x) for x in numbers):
        raise bad("has a value that is not a finite number")
    if heat < 0:
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
    )


def _finite(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
