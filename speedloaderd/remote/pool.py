"""Remote pools for the engine: ``RemotePool`` (what the engine holds, beside TmpfsPool)
and ``RemotePoolLink`` (one SSH session and the plans of one pool).

Each link reads this machine's identity (hostname, NVMe host NQN), validates the pool's
``remoteTiers.hosts.<name>`` entry into a spec, opens SSH to the remote host (host key
checked) and runs the plan on both hosts. Blocking: run it in a worker thread; pass
``on_step`` to follow the named steps (a Job's progress).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from ..config import RemoteHostConfig
from ..errors import Busy, Failed, InvalidArgument
from ..paths import check_pool_name
from ..pools import PoolState, PoolUsage, statvfs_usage
from ..roots import ensure_trusted_dir
from ..sizes import format_size
from .auth import keys_for
from .capacity import check_can_lend
from .nvmeof import (
    RemotePoolSpec,
    check_host_config,
    connect_plan,
    detach_plan,
    disconnect_plan,
    grow_plan,
    spec_from_config,
    unexport_plan,
)
from .plan import Plan, Runner, StepHook, cmd, execute, execute_teardown
from .probe import Probe, mounted_source, probe
from .runners import KNOWN_HOSTS, LocalRunner, SshRunner
from .sysfs import controllers_of
from .values import check_nqn, check_ram_size, parse_ssh_target

log = logging.getLogger(__name__)

# Where a remote pool is mounted when its remoteTiers entry names no ``path``.
DEFAULT_MOUNT_ROOT = "/run/speedloader/pools"

HOSTNQN_FILE = "/etc/nvme/hostnqn"


def local_identity(runner: Runner) -> tuple[str, str]:
    """(client name, host NQN) of the machine ``runner`` runs on."""
    hostname = (runner.read_text("/proc/sys/kernel/hostname") or "").strip().split(".")[0]
    nqn = runner.read_text(HOSTNQN_FILE)
    if nqn is None:
        raise Failed(
            f"{runner.name}: {HOSTNQN_FILE} does not exist; create this host's NQN with "
            f"`nvme gen-hostnqn > {HOSTNQN_FILE}` (package nvme-cli)"
        )
    return check_pool_name(hostname), check_nqn(nqn.strip())


class RemotePoolLink:
    """The runners and spec of one remote pool; use as a context manager (closes SSH)."""

    def __init__(
        self,
        name: str,
        cfg: RemoteHostConfig,
        ssh_key_path: Path | None,
        *,
        local: Runner | None = None,
        known_hosts: Sequence[Path] = KNOWN_HOSTS,
        remote: Runner | None = None,
    ):
        self.local = local or LocalRunner()
        client, host_nqn = local_identity(self.local)
        self.spec: RemotePoolSpec = spec_from_config(name, cfg, client=client, host_nqn=host_nqn)
        # ``remote`` replaces SSH in the plan unit tests (a recording runner)
        self.remote = remote or SshRunner(parse_ssh_target(cfg.ssh), ssh_key_path, known_hosts)

    def close(self) -> None:
        close = getattr(self.remote, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> RemotePoolLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def runners(self) -> dict[str, Runner]:
        return {"remote": self.remote, "local": self.local}

    def run(self, plan: Plan, on_step: StepHook | None = None) -> dict[str, str]:
        return execute(plan, self.runners, on_step)

    def prepare_connect(self) -> RemotePoolSpec:
        """Before a connect: refuse (NoSpace, nothing changed anywhere) unless the remote host
        can lend the pool's RAM; then load the fabric modules on both hosts, choose the
        DH-HMAC-CHAP keys (None where a kernel lacks it) and the export's serial number.
        Sets and returns ``self.spec``."""
        spec = self.spec
        check_can_lend(self.remote, spec.ssh.host, spec.pool, spec.size, "pool")
        tr = spec.fabric.transport.value
        cmd("modprobe", "-a", "nvmet", f"nvmet-{tr}").execute(self.remote, {}, "load modules")
        cmd("modprobe", "nvme-fabrics").execute(self.local, {}, "load nvme-fabrics")
        auth = keys_for(self.remote, self.local, spec.host_entry)
        self.spec = dataclasses.replace(spec, auth=auth, serial=secrets.token_hex(10))
        return self.spec

    def connect(self, on_step: StepHook | None = None) -> dict[str, str]:
        """Export RAM there, mount it here; on failure everything done so far is undone.

        Refused before anything is created if the remote host cannot lend the RAM."""
        return self.run(connect_plan(self.prepare_connect()), on_step)

    def disconnect(self) -> None:
        """Unmount, disconnect, tear down the export; harmless if (partly) done already.

        The caller demotes the pool's models first: this unmounts whatever is there.
        """
        execute_teardown(disconnect_plan(self.spec), self.runners)

    def grow(self, new_size: int, on_step: StepHook | None = None) -> None:
        """Grow online; refused before anything changes if the remote host cannot lend
        the extra RAM (the RAM the pool has is taken already: only the growth counts)."""
        plan = grow_plan(self.spec, new_size)  # refuses shrinking and odd sizes first
        growth = new_size - self.spec.size
        if growth > 0:
            check_can_lend(self.remote, self.spec.ssh.host, self.spec.pool, growth,
                           f"growing to {format_size(new_size)} the pool")  # fmt: skip
        self.run(plan, on_step)


StepReport = Callable[[int, int, str], None]
"""``(steps done, steps in all, name of the step starting now)``: a Job's progress."""


class RemotePool:
    """RAM on another host, exported over NVMe-oF and mounted at ``path``; kind "nvmeof".

    The interface the engine uses for every pool (see TmpfsPool): ``mount()`` connects
    (export there, ``nvme connect``, mkfs, mount here), ``unmount()`` disconnects,
    ``resize()`` grows online or refuses to shrink, ``state()`` says whether it is usable.

    ``state()`` never touches the pool's files (I/O to a lost pool can hang): it reads sysfs
    and /proc/mounts. MOUNTED: a live controller and our mount. DEGRADED: the health watch
    gave the pool up (``lost``), or it was connected and is not usable now, or leftovers
    of it exist here (a controller, a mount). UNMOUNTED: nothing of it here.

    Blocking methods, serialized by a lock: run them in a worker thread.
    """

    kind = "nvmeof"

    def __init__(
        self,
        name: str,
        cfg: RemoteHostConfig,
        ssh_key_path: Path | None,
        *,
        local: Runner | None = None,
        known_hosts: Sequence[Path] = KNOWN_HOSTS,
        remote: Runner | None = None,
    ):
        if cfg.path is None:  # the legacy format has no path for remote tiers
            cfg = cfg.model_copy(update={"path": Path(DEFAULT_MOUNT_ROOT) / name})
        check_host_config(name, cfg)  # InvalidArgument naming the key, before anything runs
        self.name = check_pool_name(name)
        self.cfg = cfg
        self.ssh_key_path = ssh_key_path
        self.known_hosts = known_hosts
        self.local = local or LocalRunner()
        self._remote = remote
        assert cfg.path is not None  # check_host_config requires it
        self.path = Path(cfg.path)
        self.size = cfg.ramdisk_size
        self.speed = cfg.speed
        self.connected = False  # connected or adopted by this process, not disconnected since
        self.lost = ""  # why the health watch gave the pool up; cleared by connect/disconnect
        self.authenticated = False  # the last connect of this process used DH-HMAC-CHAP
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"RemotePool({self.name!r}, {self.cfg.ssh!r}, {str(self.path)!r})"

    # ---- inspection (no I/O to the pool)

    def spec(self) -> RemotePoolSpec:
        client, host_nqn = local_identity(self.local)
        return spec_from_config(self.name, self.cfg, client=client, host_nqn=host_nqn)

    def probe(self) -> Probe:
        """Is the pool usable right now? sysfs and /proc/mounts only: safe while it is lost."""
        try:
            spec = self.spec()
        except Failed as err:
            return Probe(False, str(err))
        return probe(self.local, spec)

    def _leftovers(self) -> bool:
        if mounted_source(self.local, str(self.path)) is not None:
            return True
        try:
            return bool(controllers_of(self.local, self.spec().subsystem_nqn))
        except Failed:
            return False

    def state(self) -> PoolState:
        if self.probe().usable and not self.lost:
            return PoolState.MOUNTED
        if self.lost or self.connected or self._leftovers():
            return PoolState.DEGRADED
        return PoolState.UNMOUNTED

    @property
    def problem(self) -> str:
        return self.lost

    def takes_links(self) -> bool:
        """A controller reconnecting at this instant (seen under TCG guests after a long
        copy) does not stop a promote's swap: the remote watch is the one judge of loss, and
        it repoints every link to cold, under the engine lock, when it gives a pool up."""
        return self.connected and not self.lost

    def describe(self) -> str:
        return (
            f"connected to {self.cfg.ssh.split('@')[-1]} over {self.cfg.transport} and "
            f"mounted at {self.path} ({format_size(self.size)})"
        )

    def usage(self) -> PoolUsage:
        """Size, used and free bytes of the mounted filesystem (statvfs: no I/O to the disk)."""
        with self._lock:
            if self.state() is not PoolState.MOUNTED:
                raise Failed(f"cannot report usage of pool {self.name!r}: it is not connected")
            return statvfs_usage(self.path)

    # ---- lifecycle

    def _link(self) -> RemotePoolLink:
        return RemotePoolLink(
            self.name,
            self.cfg,
            self.ssh_key_path,
            local=self.local,
            known_hosts=self.known_hosts,
            remote=self._remote,
        )

    def startup(self) -> None:
        """At daemon start: adopt the pool if it is still connected and mounted; never
        connect (that is an explicit Connect: it takes RAM on another host)."""
        with self._lock:
            found = self.probe()
            if found.usable:
                self.connected = True
                log.info("adopted connected remote pool %s at %s", self.name, self.path)
            elif self._leftovers():
                log.warning(
                    "remote pool %s is degraded (%s); Connect it again or Disconnect it",
                    self.name,
                    found.reason,
                )

    def mount(self, on_step: StepReport | None = None) -> None:
        """Connect: export RAM there, mount it here. A usable pool is adopted as it is.

        Anything left of an earlier connect (a lost fabric, a crash) is torn down first,
        on both hosts, so a connect always starts clean; on failure every step done is undone.
        """
        with self._lock:
            spec = self.spec()
            if probe(self.local, spec).usable and not self.lost:
                self.connected = True
                log.info("remote pool %s is already connected; adopted", self.name)
                return
            source = mounted_source(self.local, spec.mount_path)
            if source is not None and not source.startswith("/dev/nvme"):
                raise Busy(
                    f"cannot connect pool {self.name!r}: {source} is mounted at {self.path}; "
                    "unmount it or give the pool another path"
                )
            if source is None:
                # The mount point must be root's alone along its path, like a tmpfs pool's.
                ensure_trusted_dir(self.path, f"pool {self.name!r} path")
            if source is None and os.path.isdir(self.path) and os.listdir(self.path):
                raise Busy(
                    f"cannot connect pool {self.name!r}: {self.path} is not empty and not a "
                    "mount; refusing to hide its files (move them away or choose another path)"
                )
            with self._link() as link:
                if self.lost or self.connected or self._leftovers():
                    log.info("pool %s: removing what is left of its last connect", self.name)
                execute_teardown(disconnect_plan(spec), link.runners)
                hook = None if on_step is None else _plan_hook(on_step)
                link.connect(hook)
                self.authenticated = link.spec.auth is not None
            self.connected, self.lost = True, ""
            log.info(
                "connected remote pool %s: %s over %s from %s (%s), mounted at %s",
                self.name,
                format_size(self.size),
                spec.fabric.transport.value,
                spec.ssh.host,
                "DH-HMAC-CHAP" if self.authenticated else "NOT authenticated",
                self.path,
            )

    def unmount(self) -> None:
        """Disconnect: unmount and ``nvme disconnect`` here, then remove the export there.

        The local half needs no network and runs first, so a pool whose host is dead is
        still detached here; the message then says what is left on the remote host."""
        with self._lock:
            spec = self.spec()
            execute_teardown(detach_plan(spec), {"local": self.local})
            self.connected, self.lost = False, ""
            try:
                with self._link() as link:
                    execute_teardown(unexport_plan(spec), link.runners)
            except Failed as err:
                raise Failed(
                    f"pool {self.name!r} is disconnected here, but its export on "
                    f"{spec.ssh.host} was not removed ({err}); Disconnect again once the "
                    "host is reachable"
                ) from None
            log.info("disconnected remote pool %s", self.name)

    def resize(self, new_size: int) -> None:
        """Grow online (every layer, files kept); shrinking a connected pool is refused."""
        with self._lock:
            new_size = check_ram_size(new_size)
            state = self.state()
            if state is PoolState.UNMOUNTED:
                self._set_size(new_size)  # takes effect at the next connect
                return
            if state is PoolState.DEGRADED:
                raise Failed(f"pool {self.name!r} is degraded; Connect it again before resizing it")
            if new_size < self.size:
                raise InvalidArgument(
                    f"pool {self.name!r} cannot shrink from {format_size(self.size)} to "
                    f"{format_size(new_size)} while connected (ext4 cannot shrink mounted, "
                    "and the RAM under its blocks cannot be taken away); demote its models, "
                    "Disconnect, Resize, then Connect"
                )
            with self._link() as link:
                link.grow(new_size)
            self._set_size(new_size)
            log.info("grew remote pool %s to %s", self.name, format_size(new_size))

    def _set_size(self, size: int) -> None:
        self.size = size
        self.cfg = self.cfg.model_copy(update={"ramdisk_size": size})


def _plan_hook(report: StepReport) -> StepHook:
    def hook(i: int, n: int, step) -> None:  # noqa: ANN001 - plan.Step
        report(i, n, step.name)

    return hook
