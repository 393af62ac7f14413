"""Find the block device of a connected NVMe-oF subsystem from sysfs, without udev.

``/sys/class/nvme/nvmeX/subsysnqn`` names each controller's subsystem. The namespaces
appear inside the controller's directory as ``nvmeXnY`` (no multipath) or as
``nvmeScXnY`` (native multipath: a *path* of subsystem instance S). With multipath the
block device is the head ``/dev/nvmeSnY``, never the path name, which has no device node.
"""

from __future__ import annotations

import re

from .command import Runner

_CTRL_RE = re.compile(r"^nvme\d+$")
_NS_RE = re.compile(r"^nvme(\d+)(?:c\d+)?n(\d+)$")

SYS_NVME = "/sys/class/nvme"
SYS_BLOCK = "/sys/class/block"


def block_name(ns_entry: str) -> str | None:
    """``nvme0c1n1`` -> ``nvme0n1``; ``nvme2n1`` -> ``nvme2n1``; anything else -> None."""
    m = _NS_RE.match(ns_entry)
    return f"nvme{m.group(1)}n{m.group(2)}" if m else None


def controllers_of(runner: Runner, nqn: str) -> list[str]:
    """Controller names (``nvme0``...) connected to subsystem ``nqn``."""
    found = []
    for ctrl in sorted(runner.listdir(SYS_NVME)):
        if not _CTRL_RE.match(ctrl):
            continue
        text = runner.read_text(f"{SYS_NVME}/{ctrl}/subsysnqn")
        if text is not None and text.strip() == nqn:
            found.append(ctrl)
    return found


SECTOR = 512  # /sys/class/block/*/size counts 512-byte sectors, whatever the LBA size


def find_namespace_device(runner: Runner, nqn: str, min_bytes: int = 1) -> str | None:
    """``/dev/nvmeXnY`` of the first namespace of ``nqn`` of at least ``min_bytes``."""
    for ctrl in controllers_of(runner, nqn):
        for entry in sorted(runner.listdir(f"{SYS_NVME}/{ctrl}")):
            name = block_name(entry)
            if name is None:
                continue
            size = runner.read_text(f"{SYS_BLOCK}/{name}/size")
            if size is not None and size.strip().isdigit() and int(size) * SECTOR >= min_bytes:
                return f"/dev/{name}"
    return None
