"""The words the daemon's state is told in: tiers, model states, engine events.

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


class EventKind(enum.StrEnum):
    """What an engine listener is told changed; the name is a model, pool or job id."""

    MODEL = "model"
    POOL = "pool"
    JOB = "job"
    CATALOG = "catalog"  # the catalog, cold storage's state or anything else: read it all
    POOL_ADDED = "pool-added"
    POOL_REMOVED = "pool-removed"
    CONFIG = "config"
