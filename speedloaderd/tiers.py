"""Tiers, and the states a model is in across them.

A tier is where a file is served from: cold storage, or a pool by its name. Cold storage's
tier is the reserved word ``cold``: no pool may be named so (the configuration refuses it,
and every pool comes from the configuration), or a promote into that pool would read as a
link to cold storage: the links would stay on cold storage and health would call the
copies orphans (a repair would delete them).
"""

from __future__ import annotations

import enum

from .errors import InvalidArgument

COLD = "cold"
"""The tier of a file served from cold storage; never a pool's name."""

RESERVED_POOL_NAMES = frozenset({COLD})


def check_not_reserved(pool: str) -> str:
    """``pool`` if a pool may take that name, else InvalidArgument (any case: "Cold" would
    read as cold storage to a person, if not to a program)."""
    if pool.casefold() in RESERVED_POOL_NAMES:
        raise InvalidArgument(
            f"{pool!r} cannot name a pool: it is the tier name of cold storage (a model "
            "whose tier is cold is served from cold storage); choose another name"
        )
    return pool


class ModelState(enum.StrEnum):
    """A model's State on the bus."""

    COLD = "cold"  # every file served from cold storage
    HOT = "hot"  # every file served from a mounted pool
    PROMOTING = "promoting"
    DEMOTING = "demoting"
    DEGRADED = "degraded"  # a link is broken, or the catalog found a problem
