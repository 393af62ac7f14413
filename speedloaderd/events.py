"""What the engine tells its listeners (the bus server, through the daemon) has changed."""

from __future__ import annotations

import enum
from collections.abc import Callable


class EventKind(enum.StrEnum):
    """What an engine listener is told changed; the name is a model, pool or job id."""

    MODEL = "model"
    POOL = "pool"
    JOB = "job"
    CATALOG = "catalog"  # the catalog, cold storage's state or anything else: read it all
    POOL_ADDED = "pool-added"
    POOL_REMOVED = "pool-removed"
    CONFIG = "config"
    BACKEND = "backend"  # the inference server's state (speedloaderd.backends.watch)
    TIERING = "tiering"  # automatic tiering's state on the Manager (speedloaderd.autotiering)


Listener = Callable[[EventKind, str], None]
"""Called on the event loop with (kind, name): a model's, a pool's or a job's (its id)."""
