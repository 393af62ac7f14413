"""Placement: which pool a promoted model goes to. Pure functions, no I/O.

The engine builds one ``Candidate`` per configured pool, in configured order, with the
bytes the model still needs in that pool (blobs already there do not count), and asks
``place`` for a decision. Errors carry one sentence an admin can act on.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import Failed, InvalidArgument, NoSpace, NoSuchPool
from .sizes import format_size

__all__ = ["Candidate", "Decision", "Strategy", "fits", "place"]


class Strategy(enum.StrEnum):
    FASTEST_FIT = "fastest-fit"
    """The fastest pool with room; ties go to the one configured first."""
    FILL_FIRST = "fill-first"
    """The first pool in configured order with room."""
    ROUND_ROBIN = "round-robin"
    """The next pool with room after the one chosen last time, wrapping around."""


@dataclass(frozen=True)
class Candidate:
    name: str
    speed: int
    free: int
    """Free bytes in the pool."""
    need: int
    """Bytes this model still needs in this pool (shared blobs already there don't count)."""
    online: bool


@dataclass(frozen=True)
class Decision:
    pool: str
    rr_cursor: int
    """Round-robin cursor to pass to the next ``place`` call: the index chosen by a
    round-robin placement, otherwise the cursor that was passed in, unchanged."""


def fits(candidate: Candidate) -> bool:
    """True if the model can go to this pool now."""
    return candidate.online and candidate.need <= candidate.free


def place(
    candidates: Sequence[Candidate],
    strategy: Strategy | str,
    *,
    pinned: str | None = None,
    requested: str | None = None,
    rr_cursor: int = 0,
) -> Decision:
    """Choose a pool for one model.

    ``pinned`` (the model's pin) and ``requested`` (a pool the user named) are hard: the
    model goes there or the call fails; it never lands elsewhere. Round-robin starts
    *after* ``rr_cursor`` (taken modulo the number of candidates), so pass ``-1`` to start
    at the first pool.
    """
    try:
        strategy = Strategy(strategy)
    except ValueError:
        choices = ", ".join(s.value for s in Strategy)
        raise InvalidArgument(
            f"{strategy!r} is not a placement strategy; use one of {choices}"
        ) from None
    by_name: dict[str, Candidate] = {}
    for c in candidates:
        if c.name in by_name:
            raise InvalidArgument(f"pool {c.name!r} is listed twice")
        by_name[c.name] = c

    if pinned is not None:
        if pinned not in by_name:
            raise NoSuchPool(f"model is pinned to pool {pinned!r}, which does not exist")
        if requested is not None and requested != pinned:
            raise InvalidArgument(
                f"model is pinned to {pinned!r}; unpin it or promote to {pinned!r}"
            )
        return _place_on(by_name[pinned], rr_cursor, pinned=True)
    if requested is not None:
        if requested not in by_name:
            raise NoSuchPool(f"pool {requested!r} does not exist")
        return _place_on(by_name[requested], rr_cursor, pinned=False)

    online = [c for c in candidates if c.online]
    if not online:
        if not candidates:
            raise Failed("no pool is connected (none is configured)")
        raise Failed("no pool is connected")
    fitting = [i for i, c in enumerate(candidates) if fits(c)]
    if not fitting:
        roomiest = max(online, key=lambda c: c.free)  # first of equals: configured order
        raise NoSpace(
            f"no connected pool has room: the most free space is {format_size(roomiest.free)} "
            f"in pool {roomiest.name!r}, and the model needs {format_size(roomiest.need)} there"
        )

    if strategy is Strategy.FASTEST_FIT:
        best = max(candidates[i].speed for i in fitting)
        chosen = next(i for i in fitting if candidates[i].speed == best)
        return Decision(candidates[chosen].name, rr_cursor)
    if strategy is Strategy.FILL_FIRST:
        return Decision(candidates[fitting[0]].name, rr_cursor)
    n = len(candidates)
    start = rr_cursor % n
    for step in range(1, n + 1):
        i = (start + step) % n
        if fits(candidates[i]):
            return Decision(candidates[i].name, i)
    raise AssertionError("unreachable: a fitting pool exists")  # pragma: no cover


def _place_on(c: Candidate, rr_cursor: int, *, pinned: bool) -> Decision:
    """The hard rule for a pinned or requested pool: there, or a clear error."""
    if not c.online:
        if pinned:
            raise Failed(f"model is pinned to pool {c.name!r}, which is not connected")
        raise Failed(f"pool {c.name!r} is not connected; connect it first")
    if c.need > c.free:
        where = f"model is pinned to pool {c.name!r}, which" if pinned else f"pool {c.name!r}"
        raise NoSpace(
            f"{where} has {format_size(c.free)} free; the model needs {format_size(c.need)} there"
        )
    return Decision(c.name, rr_cursor)
