"""Automatic tiering: which models to promote into RAM and which to evict, and why.

Pure code: no D-Bus, no I/O, no clock. The engine feeds it uses and asks for a plan; what
it does with the plan (Jobs, placement, the journal) is the engine's business.

Interface
---------
- ``Access(model, size, when, source)``: a use seen, ``source`` "open" (the kernel saw a
  process open a model file) or "load" (the backend says it loaded the model).
- ``Model(name, size, pool, pinned_pool, protected, resident_since)``: a model as the
  engine sees it now. ``pool`` is where it is in RAM (None: cold only); ``protected`` why
  it must not be evicted ("" if it may be: else "pinned", "loaded", "held", ...);
  ``resident_since`` when its promote finished (None: unknown, e.g. in RAM from before a
  restart; counted as resident long enough).
- ``PoolRoom(name, capacity, used, high, low, speed)``: bytes; watermarks as fractions;
  ``speed`` the pool's configured rating (higher is faster).
- ``Policy(settings)``; ``record(access)``; ``evicted(model, when)`` (an eviction or demote
  finished); ``value(model, now) -> float`` (uses per hour,
  size-neutral, see below); ``why(model, now) -> str`` ("used 14x in 1 h");
  ``plan(models, pools, now) -> list[Promote | Evict]``; ``make_room(models, pool, need,
  now)`` (the evictions that free ``need`` bytes in a pool, for a manual promote, or None);
  ``to_json()`` / ``Policy.from_json(text, settings)`` (raises ``StateError``).

What ``plan`` promises (tests/test_tiering_policy.py checks each on random inputs):
deterministic (same inputs, same list); never evicts a protected or pinned model, nor one
resident for less than ``min_residency``; never promotes automatically a model evicted less
than ``min_residency`` ago (a pin still goes to its pool); a pool above its high watermark
is evicted down to its low one (as far as evictable models allow) and not refilled past
low in the same plan; an eviction comes before the promote it makes room for, and no
promote needs more room than the pool has after the evictions listed before it, nor takes
the pool past its high watermark; a one-off scan promotes and evicts nothing; a pinned
model not in its pool is promoted there. The plan assumes evicting a model frees its
``size``: for Ollama models sharing blobs, pass the bytes only that model holds.

The choice: a GreedyDual-Size-Frequency value, decayed in time, with LRU-2 admission
---------------------------------------------------------------------------------
Read: GDSF (Cherkasova 1998), LRU-K (O'Neil, O'Neil, Weikum 1993), ARC (Megiddo and Modha
2003), and the offline bounds for variable sizes of Berger, Beckmann, Harchol-Balter 2018
(FOO/PFOO), which bench/tiering.py computes as the optimum to compare with.

- GDSF ranks an object by ``L + frequency * cost / size``. What a model in RAM saves is
  load time, ``size * (1/cold - 1/pool)`` per load, so with cost = that saving the size
  cancels: a model's worth per byte of RAM is its frequency. Size still decides twice: a
  promote is compared with everything it displaces in bytes (``value * size`` on each
  side: one 70 GB model only displaces ten 7 GB ones used less than it per byte), and a
  model larger than a pool's room above its watermark is never planned there.
- GDSF ages by its inflation term ``L`` (the value of the last eviction). Here evictions
  are a few per day, so ``L`` would hardly move and a model hot last month would stay;
  instead the count decays in wall time (half-life, LRFU-style), which the daily-cycle and
  shifting traces need.
- Two counts, as a short and a long window (the idea of ARC's two lists, and of
  TinyLFU's window beside its main cache): the slow one (the half-life, 12 h) is a steady
  model's rate, exact enough that two models close in worth are told apart; the fast one
  (2 h, ``history.FAST_HALF_LIFE``) sees a model that just became popular within a few
  uses, where the slow one needs most of a day and the model waits outside meanwhile.
  A model's value is the higher of the two rates, the fast one less its noise (one square
  root of its count: history.py ``Uses.rate`` has the figures for why).
- LRU-K's lesson, taken with K=2: a model seen once is no evidence. Nothing is promoted
  automatically before ``admit_accesses`` uses within about a half-life, so a scan (one
  open of each model) promotes and evicts nothing. This is also the economics: a copy from
  disk (1.73 GB/s) costs about as long as one load from disk saves against the pool
  (1/1.73 - 1/12.3 s per GB), so a promote pays back only if the model is loaded again.
- ARC's ghost lists (history of what was evicted) come free: models are few, the history
  keeps every model's uses (bounded, history.py). ARC itself counts pages, not bytes, and
  its adaptivity tunes a recency/frequency split that the decay already gives.
- Against thrash: the minimum residency, and a promote must beat what it displaces by a
  margin (``DISPLACE_MARGIN``).

Bench (bench/tiering.py: 200 models of 1.3-70 GB, pool 20 % of the catalog, 14 days, a
load a minute; README.md "Benchmarks" has the table; seed 13). Byte hit ratio as a
fraction of the offline optimum's (PFOO-L): Zipf 0.91, shifting popularity 0.84, daily
cycle 0.79, Zipf with scans 0.87; LRU 0.78/0.70/0.70/0.70. It copied 1.1-1.9 TB in the 14
days where LRU copied 70-88 TB and the offline schedule 17-21 TB; thrash 0; the hot set
wholly in RAM after each scan (LRU kept 14 % of it). Perfect LFU (counts over the whole
trace, every miss admitted) matched it on byte hits (0.698/0.555/0.582/0.613 against
0.703/0.608/0.573/0.621) while copying 59-69 TB. What is left to the optimum is mostly
knowing the order of the loads: an oracle that knows the popularity each load is drawn
from, the most an online policy can expect, reaches 0.93/0.90/0.93/0.90 of it (at a 10 %
pool 0.92/0.87/0.89/0.90), and the best fixed set per day, chosen knowing that day's
loads, 0.94/0.92/0.87/0.92.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .history import MAX_NAME, RECENT, History, StateError, Uses
from .settings import Settings

__all__ = [
    "DISPLACE_MARGIN",
    "Access",
    "Action",
    "Evict",
    "Model",
    "Policy",
    "PoolRoom",
    "Promote",
    "StateError",
]

DISPLACE_MARGIN = 1.5
"""A promote that evicts must bring this many times the value (uses per hour times bytes)
it displaces, so two models of about the same worth do not swap places at each use. In the
bench (6 h half-life; fraction of the optimum, Zipf / shifting; thrash on the four traces): 1.0 gave
0.895/0.826 and 26-44 thrash per trace, copying 6-9 TB; 1.25 0.901/0.829, 1-10; 1.5
0.904/0.832, 0-2 (0 with the eviction stamp), 1.9-3.8 TB; 2.0 0.906/0.832 but 0.773 on the
daily trace against 0.780."""

SOURCES = ("open", "load")


@dataclass(frozen=True)
class Access:
    model: str
    size: int  # what the opener read, for the engine's metrics; the plan takes Model.size
    when: float
    source: str = "open"


@dataclass(frozen=True)
class Model:
    name: str
    size: int
    pool: str | None = None
    pinned_pool: str | None = None
    protected: str = ""
    resident_since: float | None = None


@dataclass(frozen=True)
class PoolRoom:
    name: str
    capacity: int
    used: int
    high: float
    low: float
    speed: int = 0


@dataclass(frozen=True)
class Promote:
    model: str
    pool: str
    reason: str


@dataclass(frozen=True)
class Evict:
    model: str
    reason: str


Action = Promote | Evict


class _Room:
    """A pool's bytes as the plan changes them."""

    def __init__(self, pool: PoolRoom) -> None:
        self.pool = pool
        self.used = pool.used
        self.limit = min(pool.capacity, int(pool.capacity * pool.high))
        """Bytes an automatic promote may fill the pool to."""

    def fits(self, size: int) -> bool:
        return self.used + size <= self.limit


class Policy:
    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        s = self.settings
        self.history = History(s.half_life, s.coalesce, s.max_tracked)

    # -- uses ---------------------------------------------------------------------------

    def record(self, access: Access) -> None:
        if access.source not in SOURCES:
            raise ValueError(f"an access's source is one of {SOURCES}, not {access.source!r}")
        if not math.isfinite(access.when):
            raise ValueError("an access's time must be a finite number")
        if not 0 < len(access.model) <= MAX_NAME or "\0" in access.model:
            raise ValueError("an access names no model, or one too long to keep")
        self.history.record(access.model, access.when)

    def evicted(self, model: str, when: float) -> None:
        """Tell the policy an eviction (automatic or a manual demote) finished at ``when``."""
        if not math.isfinite(when):
            raise ValueError("an eviction's time must be a finite number")
        self.history.evicted(model, when)

    def value(self, model: str | Model, now: float) -> float:
        """The model's worth per byte of RAM: its estimated uses per hour (history.py's
        ``Uses.rate``). For ``lru``: the same scale, from the last use only."""
        name = model.name if isinstance(model, Model) else model
        return self._value(self.history.models.get(name), now)

    def _value(self, uses: Uses | None, now: float) -> float:
        if uses is None:
            return 0.0
        hl = self.settings.half_life
        if self.settings.policy == "lru":
            return 3600.0 * math.log(2) / hl * 2.0 ** (-max(0.0, now - uses.last) / hl)
        return 3600.0 * uses.rate(now, hl, self.history.fast_half_life)

    def _values(
        self, models: Sequence[Model], now: float
    ) -> tuple[dict[str, float], dict[str, float]]:
        """value() and the decayed count of each model, at once (the plan's hot loop)."""
        hl = self.settings.half_life
        h = self.history.models
        values, heats = {}, {}
        for m in models:
            uses = h.get(m.name)
            heats[m.name] = uses.heat_at(now, hl) if uses else 0.0
            values[m.name] = self._value(uses, now)
        return values, heats

    def admitted(self, model: str, now: float) -> bool:
        """Seen ``admit_accesses`` times within about a half-life (LRU-K's K): the decayed
        count is at least K - 1/2, i.e. two uses at most one half-life apart, and recent."""
        return self.history.heat(model, now) >= self.settings.admit_accesses - 0.5

    def why(self, model: str | Model, now: float) -> str:
        """One sentence for the dashboard: "pinned to fast", "in use (loaded)", or the uses."""
        if isinstance(model, Model):
            if model.pinned_pool is not None:
                return f"pinned to {model.pinned_pool}"
            if model.protected:
                return f"in use ({model.protected})"
            name = model.name
        else:
            name = model
        uses = self.history.models.get(name)
        if uses is None or uses.count == 0:
            return "not used since tiering began"
        for window, label in ((3600, "1 h"), (86_400, "24 h"), (7 * 86_400, "7 d")):
            n = sum(1 for t in uses.recent if now - window < t <= now)
            if n >= 2:  # the shortest window that shows a habit, not one use
                more = "+" if n == len(uses.recent) == RECENT else ""
                return f"used {n}{more}x in {label}"
        return f"last used {_ago(now - uses.last)} ago"

    # -- plans --------------------------------------------------------------------------

    def plan(self, models: Iterable[Model], pools: Iterable[PoolRoom], now: float) -> list[Action]:
        """What to do now, in order: pools above their high watermark evicted to their low
        one, pinned models into their pools, then promotes by value, each after the
        evictions it needs."""
        models = sorted(models, key=lambda m: m.name)
        rooms = {p.name: _Room(p) for p in sorted(pools, key=lambda p: p.name)}
        values, heats = self._values(models, now)
        admit = self.settings.admit_accesses - 0.5
        actions: list[Action] = []
        gone: set[str] = set()  # evicted by this plan
        # Per pool, what may be evicted, least valuable first; ties: the larger (frees
        # more), then by name. Sorted once: a plan only ever removes from these lists.
        by_pool: dict[str, list[Model]] = {name: [] for name in rooms}
        for m in models:
            if m.pool in by_pool and self.may_evict(m, now):
                by_pool[m.pool].append(m)
        for ok in by_pool.values():
            ok.sort(key=lambda m: (values[m.name], -m.size, m.name))

        def evictable(pool: str) -> list[Model]:
            return [m for m in by_pool[pool] if m.name not in gone] if gone else by_pool[pool]

        def evict(m: Model, reason: str) -> None:
            assert m.pool is not None
            actions.append(Evict(m.name, reason))
            rooms[m.pool].used -= m.size
            gone.add(m.name)

        # 1. Watermarks: above high, evict the least valuable down to low; and this plan
        # fills that pool no further than low, or it would evict to promote what is worth
        # less than what it evicted.
        for name, room in rooms.items():
            cap = room.pool.capacity
            if room.used <= cap * room.pool.high:
                continue
            for v in evictable(name):
                if room.used <= cap * room.pool.low:
                    break
                evict(
                    v,
                    f"pool {name} above its high watermark ({room.pool.high:.0%}): "
                    f"least valuable, {self.why(v.name, now)}",
                )
            room.limit = min(room.limit, int(cap * room.pool.low))

        # 2. Pins are hard: a pinned model goes to its pool, evicting what must go.
        pinned = [m for m in models if m.pinned_pool in rooms and m.pool != m.pinned_pool]
        for m in sorted(pinned, key=lambda m: (-values[m.name], m.name)):
            assert m.pinned_pool is not None
            room = rooms[m.pinned_pool]
            victims = self._victims(room, evictable(m.pinned_pool), m.size)
            if victims is None:
                continue  # the pin cannot be honoured now; the engine's pin says NoSpace
            for v in victims:
                evict(v, f"made room for {m.name}, pinned to {m.pinned_pool}")
            actions.append(Promote(m.name, m.pinned_pool, f"pinned to {m.pinned_pool}"))
            room.used += m.size

        # 3. Promotes: the most valuable cold models first, fastest pool with room first.
        order = sorted(rooms.values(), key=lambda r: (-r.pool.speed, r.pool.name))
        candidates = [
            m
            for m in models
            if m.pool is None
            and m.pinned_pool is None
            and values[m.name] > 0
            and heats[m.name] >= admit
            and not self._evicted_lately(m.name, now)
        ]
        for m in sorted(candidates, key=lambda m: (-values[m.name], m.size, m.name)):
            worth = values[m.name] * m.size
            for room in order:
                ok = evictable(room.pool.name)
                short = m.size - (room.limit - room.used)  # bytes to free first
                if short > 0 and (not ok or values[ok[0].name] * short * DISPLACE_MARGIN >= worth):
                    continue  # even the least valuable bytes there are worth too much
                victims = self._victims(room, ok, m.size)
                if victims is None:
                    continue
                displaced = sum(values[v.name] * v.size for v in victims)
                if victims and worth <= DISPLACE_MARGIN * displaced:
                    continue
                for v in victims:
                    evict(
                        v,
                        f"made room for {m.name} ({self.why(m.name, now)}); "
                        f"{v.name} {self.why(v.name, now)}",
                    )
                actions.append(Promote(m.name, room.pool.name, f"auto: {self.why(m.name, now)}"))
                room.used += m.size
                break
        return actions

    def make_room(
        self, models: Iterable[Model], pool: PoolRoom, need: int, now: float
    ) -> list[Evict] | None:
        """The evictions (least valuable first) that let ``need`` more bytes into ``pool``
        without passing its high watermark; [] if they fit already, None if they cannot.
        For a manual promote when tiering is on: it makes room the way the plan does."""
        ok = self.evictable([m for m in models if m.pool == pool.name], now)
        victims = self._victims(_Room(pool), ok, need)
        if victims is None:
            return None
        return [Evict(v.name, f"made room for a promote into {pool.name}") for v in victims]

    def evictable(self, models: Iterable[Model], now: float) -> list[Model]:
        """The models in a pool that may be evicted now, least valuable first (ties: the
        larger, then by name), as make_room takes them; the first is the next eviction."""
        ok = [m for m in models if m.pool is not None and self.may_evict(m, now)]
        return sorted(ok, key=lambda m: (self.value(m.name, now), -m.size, m.name))

    def _evicted_lately(self, model: str, now: float) -> bool:
        uses = self.history.models.get(model)
        when = uses.evicted if uses else None
        return when is not None and now - when < self.settings.min_residency

    def may_evict(self, m: Model, now: float) -> bool:
        """Neither protected, pinned, nor resident for less than the minimum residency."""
        if m.protected or m.pinned_pool is not None:
            return False
        since = m.resident_since
        return since is None or now - since >= self.settings.min_residency

    @staticmethod
    def _victims(room: _Room, evictable: Sequence[Model], size: int) -> list[Model] | None:
        """The first of ``evictable`` that, evicted, let ``size`` bytes in under the pool's
        high watermark: [] if it fits already, None if even all of them are not enough."""
        if size > room.limit:
            return None
        victims: list[Model] = []
        used = room.used
        for v in evictable:
            if used + size <= room.limit:
                break
            victims.append(v)
            used -= v.size
        return victims if used + size <= room.limit else None

    # -- state --------------------------------------------------------------------------

    def to_json(self) -> str:
        return self.history.to_json()

    @classmethod
    def from_json(cls, text: str | bytes, settings: Settings | None = None) -> Policy:
        """A policy with the persisted history; StateError (one sentence) if it is bad."""
        policy = cls(settings)
        policy.history.load_json(text)
        return policy


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, length in (("d", 86_400), ("h", 3600), ("min", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f} {unit}"
    return f"{seconds:.0f} s"
