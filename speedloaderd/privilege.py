"""Which configuration changes are a member's, and which an admin's.

The privilege model in one sentence: members of the ``speedloader`` group move models and
operate the pools the admin configured; only an admin changes anything that names a path, a
host, a key or a size of remote RAM.

For SetConfig that is an allowlist, not a denylist: a member may change only what steers
placement (the strategy, the pins, the pools' speed ratings). Every other difference, in a
key that exists today or one added later, is an admin's. Nothing here knows about D-Bus.
"""

from __future__ import annotations

import copy
from typing import Any

# (top-level key, sub-key) a member may change. Pool speeds are handled per pool below.
_MEMBER_PLACEMENT_KEYS = ("defaultStrategy", "pinned")


def _without_member_keys(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (as dump_config writes it) minus every value a member may change.

    Pools keep their place in the list, so reordering, renaming, adding or removing a pool
    still shows as a difference; only the ``speed`` inside each is dropped.
    """
    masked = copy.deepcopy(config)
    placement = masked.get("modelPlacement")
    if isinstance(placement, dict):
        for key in _MEMBER_PLACEMENT_KEYS:
            placement.pop(key, None)
        if not placement:
            del masked["modelPlacement"]
    for pool in masked.get("pools") or []:
        if isinstance(pool, dict):
            pool.pop("speed", None)
    hosts = (masked.get("remoteTiers") or {}).get("hosts") or {}
    for host in hosts.values():
        if isinstance(host, dict):
            host.pop("speed", None)
    return masked


def admin_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The top-level keys whose change needs an admin, sorted; [] if a member may make it.

    ``old`` is the running config (``{}`` when there is none: then any config is an admin's).
    Both are dump_config() output, so a value the file spells differently but means the
    same (``"64M"`` and ``"64 MiB"``) compares equal.
    """
    a, b = _without_member_keys(old), _without_member_keys(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
