"""Is a connected remote pool still usable? Cheap checks for the daemon's health loop.

Reads sysfs and /proc/mounts only (no I/O to the pool, which could block while the
fabric is down). A pool is usable when a controller of its subsystem is ``live`` and its
filesystem is mounted at the pool's path. While the fabric or the remote host is away
the controller is ``connecting`` (reconnect attempts) and I/O fails after
FAST_IO_FAIL_TMO s; after CTRL_LOSS_TMO s it is deleted and only a new connect helps.
"""

from __future__ import annotations

from dataclasses import dataclass

from .command import Runner
from .nvmeof import RemotePoolSpec
from .sysfs import SYS_NVME, controllers_of


@dataclass(frozen=True)
class Probe:
    usable: bool
    reason: str  # one sentence for the bus when not usable; "" when usable
    controller_states: tuple[str, ...] = ()


def mounted_source(runner: Runner, path: str) -> str | None:
    """The source of the (topmost) mount at ``path`` in /proc/mounts, or None."""
    found = None
    for line in (runner.read_text("/proc/mounts") or "").splitlines():
        fields = line.split()
        if fields[1:2] == [path]:
            found = fields[0]
    return found


def _mounted(runner: Runner, path: str) -> bool:
    return mounted_source(runner, path) is not None


def probe(runner: Runner, spec: RemotePoolSpec) -> Probe:
    """Probe on this machine (``runner`` is where the pool is mounted)."""
    ctrls = controllers_of(runner, spec.subsystem_nqn)
    states = tuple((runner.read_text(f"{SYS_NVME}/{c}/state") or "gone").strip() for c in ctrls)
    where = f"{spec.ssh.host} ({spec.fabric.transport.value} {spec.fabric.traddr})"
    if not ctrls:
        return Probe(False, f"pool {spec.pool!r} has no NVMe-oF controller to {where}")
    if "live" not in states:
        return Probe(
            False,
            f"pool {spec.pool!r} lost its connection to {where}: controller "
            + ", ".join(f"{c} is {s}" for c, s in zip(ctrls, states, strict=True)),
            states,
        )
    if not _mounted(runner, spec.mount_path):
        return Probe(False, f"pool {spec.pool!r} is connected but not mounted at "
                            f"{spec.mount_path}", states)  # fmt: skip
    return Probe(True, "", states)
