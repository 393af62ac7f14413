"""The plans that connect and disconnect a remote RAM pool over NVMe-oF.

Remote host (over SSH), for pool P of client C (this machine):

    tmpfs at /run/speedloader/nvmeof/C.P sized for the pool   (pools differ in size and can
    a file of ramdiskSize bytes in it, fallocate'd            grow: brd's size is a module
    a loop device on that file                                parameter shared by all disks)
    nvmet subsystem nqn...:C:P, allow_any_host=0, only C's host NQN allowed,
    and, where both kernels have it, only with its DH-HMAC-CHAP host key (auth.py),
    namespace 1 = the loop device, port <trsvcid> (tcp|rdma, traddr, adrfam), linked.

This machine: modprobe nvme-<transport>, nvme connect (the keys on its stdin), wait for
/dev/nvmeXnY (sysfs), mkfs.ext4, mount at the pool's path.

Disconnect is the undos of all that, last first, each guarded so that it is harmless when
its object is already gone. Every argv is built from values checked in values.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..config import RemoteHostConfig
from ..errors import InvalidArgument
from ..paths import check_pool_name
from .auth import DHCHAP_DHGROUP, DHCHAP_HASH, FabricAuth
from .plan import (
    Action,
    CheckSerial,
    Command,
    ControllerAttr,
    DetachLoop,
    Disconnect,
    Host,
    Plan,
    Ref,
    RemoveIfUnused,
    Secret,
    Step,
    WaitForNamespace,
    cmd,
    write,
)
from .values import (
    FabricAddress,
    SshTarget,
    Transport,
    check_nqn,
    check_ram_size,
    fabric_address,
    parse_ssh_target,
)

NQN_PREFIX = "nqn.2024-01.org.speedloader"
NVMET = "/sys/kernel/config/nvmet"
RAM_ROOT = "/run/speedloader/nvmeof"
TMPFS_SLACK = 1 << 20  # room for the backing file's inode and tmpfs rounding
NSID = "1"
MOUNT_OPTIONS = "nosuid,nodev,noatime"
DEVICE_TIMEOUT = 60.0  # nvme connect returns before the namespace scan has made the disk
# When the fabric or the remote host goes away the controller keeps reconnecting every
# RECONNECT_DELAY s for CTRL_LOSS_TMO s, then is deleted. Meanwhile I/O fails after
# FAST_IO_FAIL_TMO s instead of hanging (the kernel default is to queue it up to 600 s),
# so a model load from a dead pool errors out and the daemon can fall back to cold storage.
CTRL_LOSS_TMO = 600
RECONNECT_DELAY = 2
FAST_IO_FAIL_TMO = 5


@dataclass(frozen=True)
class RemotePoolSpec:
    """Everything the plans need, all validated. Build it with ``spec_from_config``."""

    pool: str
    client: str  # this machine's name: part of the subsystem NQN and of the remote paths
    host_nqn: str  # this machine's NVMe host NQN (/etc/nvme/hostnqn): the only host allowed
    ssh: SshTarget
    fabric: FabricAddress
    size: int
    mount_path: str
    # DH-HMAC-CHAP keys for this connect, chosen just before it (auth.keys_for); None: the
    # target admits the host NQN alone. Disconnect and grow need none.
    auth: FabricAuth | None = None
    # A random serial number given to the subsystem at export and checked on the controller
    # before mkfs: only the export we made over SSH is formatted and mounted, not whatever
    # answers at the fabric address. Chosen with the keys; None: not checked (teardown).
    serial: str | None = None

    def __post_init__(self) -> None:
        check_pool_name(self.pool)
        check_pool_name(self.client)
        check_nqn(self.host_nqn)
        check_ram_size(self.size)
        check_nqn(self.subsystem_nqn)
        if not self.mount_path.startswith("/") or ".." in self.mount_path.split("/"):
            raise InvalidArgument(f"{self.mount_path!r} is not an absolute path without '..'")

    @property
    def subsystem_nqn(self) -> str:
        return f"{NQN_PREFIX}:{self.client}:{self.pool}"

    @property
    def ram_dir(self) -> str:
        return f"{RAM_ROOT}/{self.client}.{self.pool}"

    @property
    def backing_file(self) -> str:
        return f"{self.ram_dir}/ram"

    @property
    def host_entry(self) -> str:
        """The target's configfs entry for this machine's host NQN (shared by our pools)."""
        return f"{NVMET}/hosts/{self.host_nqn}"

    @property
    def port_id(self) -> str:
        # One nvmet port per listening address; the port number doubles as its id, so a
        # second pool on the same remote host and port is refused at "create port" (EEXIST)
        # rather than silently sharing (give it its own ``port``).
        return str(self.fabric.trsvcid)


def check_host_config(
    pool: str, cfg: RemoteHostConfig
) -> tuple[SshTarget, FabricAddress, int, str]:
    """Validate a ``remoteTiers.hosts.<pool>`` entry, naming the bad key: (ssh, fabric, size,
    mount path). Needs nothing from this machine, so the engine checks entries at start."""
    check_pool_name(pool)
    ssh = parse_ssh_target(cfg.ssh)
    ip = cfg.rdma_ip or ssh.host
    try:
        fabric = fabric_address(cfg.transport, ip, cfg.port)
    except InvalidArgument as err:
        if cfg.rdma_ip is None:
            raise InvalidArgument(
                f"remoteTiers.hosts.{pool}: set rdmaIp, the address the fabric listens on "
                f"(the ssh host {ssh.host!r} is not an IP address)"
            ) from None
        raise InvalidArgument(f"remoteTiers.hosts.{pool}.rdmaIp: {err}") from None
    if cfg.path is None:
        raise InvalidArgument(f"remoteTiers.hosts.{pool}.path: the local mount path is required")
    try:
        size = check_ram_size(cfg.ramdisk_size)
    except InvalidArgument as err:
        raise InvalidArgument(f"remoteTiers.hosts.{pool}.ramdiskSize: {err}") from None
    return ssh, fabric, size, str(cfg.path)


def spec_from_config(
    pool: str, cfg: RemoteHostConfig, *, client: str, host_nqn: str
) -> RemotePoolSpec:
    """Validate a ``remoteTiers.hosts.<pool>`` entry into a spec, naming the bad key."""
    ssh, fabric, size, path = check_host_config(pool, cfg)
    return RemotePoolSpec(
        pool=pool,
        client=client,
        host_nqn=host_nqn,
        ssh=ssh,
        fabric=fabric,
        size=size,
        mount_path=path,
    )


def _test(*args: str) -> Command:
    return cmd("test", *args)


def _steps_on(host: Host) -> Callable[..., Step]:
    """A Step maker for one host: name, action, then optionally its undo, the check that
    says whether the undo is needed, and the name to capture the output under."""

    def step(
        name: str,
        do: Action,
        undo: Action | None = None,
        undo_if: Command | None = None,
        capture: str | None = None,
    ) -> Step:
        return Step(name, host, do, undo, undo_if, capture)

    return step


def export_steps(spec: RemotePoolSpec) -> list[Step]:
    """Remote host: RAM-backed loop device exported through nvmet configfs to one host NQN."""
    tr = spec.fabric.transport.value
    sub = f"{NVMET}/subsystems/{spec.subsystem_nqn}"
    ns = f"{sub}/namespaces/{NSID}"
    host = spec.host_entry
    allowed = f"{sub}/allowed_hosts/{spec.host_nqn}"
    port = f"{NVMET}/ports/{spec.port_id}"
    link = f"{port}/subsystems/{spec.subsystem_nqn}"
    d, f = spec.ram_dir, spec.backing_file
    tmpfs_options = f"size={spec.size + TMPFS_SLACK},mode=0700,nosuid,nodev,noexec"

    r = _steps_on("remote")

    # The keys are set before the host is allowed in, so there is no moment in which the
    # subsystem admits the bare NQN. No undos: they go with the host entry.
    auth = []
    if spec.auth is not None:
        auth = [
            r("set auth hash", write(f"{host}/dhchap_hash", DHCHAP_HASH)),
            r("set auth DH group", write(f"{host}/dhchap_dhgroup", DHCHAP_DHGROUP)),
            r("set host key", write(f"{host}/dhchap_key", Secret("host key", spec.auth.host_key))),
            r("set controller key",
              write(f"{host}/dhchap_ctrl_key", Secret("controller key", spec.auth.ctrl_key))),
        ]  # fmt: skip

    serial = []
    if spec.serial is not None:
        serial = [r("set serial number", write(f"{sub}/attr_serial", spec.serial))]

    # fmt: off
    return [
        r("load modules", cmd("modprobe", "-a", "loop", "nvmet", f"nvmet-{tr}")),
        r("create RAM directory", cmd("mkdir", "-p", d), cmd("rmdir", d), _test("-d", d)),
        r("mount RAM tmpfs",
          cmd("mount", "-t", "tmpfs", "-o", tmpfs_options, f"speedloader-nvmeof-{spec.pool}", d),
          cmd("umount", d), cmd("mountpoint", "-q", d)),
        r("allocate RAM", cmd("fallocate", "--length", str(spec.size), f),
          cmd("rm", "-f", f), _test("-e", f)),
        r("attach loop device", cmd("losetup", "--find", "--show", f),
          DetachLoop(f), capture="loopdev"),
        r("create subsystem", cmd("mkdir", sub), cmd("rmdir", sub), _test("-d", sub)),
        r("refuse unknown hosts", write(f"{sub}/attr_allow_any_host", "0")),
        *serial,
        r("create host entry", cmd("mkdir", "-p", host), RemoveIfUnused(host), _test("-d", host)),
        *auth,
        r("allow this host", cmd("ln", "-s", host, allowed),
          cmd("rm", allowed), _test("-L", allowed)),
        r("create namespace", cmd("mkdir", ns), cmd("rmdir", ns), _test("-d", ns)),
        r("set namespace device", write(f"{ns}/device_path", Ref("loopdev"))),
        r("enable namespace", write(f"{ns}/enable", "1")),
        r("create port", cmd("mkdir", port), cmd("rmdir", port), _test("-d", port)),
        r("set port transport", write(f"{port}/addr_trtype", tr)),
        r("set port address family", write(f"{port}/addr_adrfam", spec.fabric.adrfam)),
        r("set port address", write(f"{port}/addr_traddr", spec.fabric.traddr)),
        r("set port service", write(f"{port}/addr_trsvcid", str(spec.fabric.trsvcid))),
        r("export subsystem on port", cmd("ln", "-s", sub, link), cmd("rm", link),
          _test("-L", link)),
    ]
    # fmt: on


def attach_steps(spec: RemotePoolSpec, wait_timeout: float = DEVICE_TIMEOUT) -> list[Step]:
    """This machine: connect, find the block device, make a filesystem, mount it."""
    tr = spec.fabric.transport.value
    nqn = spec.subsystem_nqn
    path = spec.mount_path
    fabric = spec.fabric

    loc = _steps_on("local")

    connect = cmd("nvme", "connect", "--transport", tr, "--traddr", fabric.traddr,
                  "--trsvcid", str(fabric.trsvcid), "--nqn", nqn, "--hostnqn", spec.host_nqn,
                  "--ctrl-loss-tmo", str(CTRL_LOSS_TMO),
                  "--reconnect-delay", str(RECONNECT_DELAY))  # fmt: skip
    if spec.auth is not None:
        # The keys go in a JSON config on stdin: a command line is readable by every user.
        # /proc/self/fd/0, not /dev/stdin: a host without udev has no /dev/stdin link.
        config = spec.auth.connect_config(spec.host_nqn, nqn, tr, fabric.traddr, fabric.trsvcid)
        connect = Command((*connect.argv, "--config", "/proc/self/fd/0"), Secret("keys", config))

    # fmt: off
    return [
        loc("load nvme host driver", cmd("modprobe", f"nvme-{tr}")),
        loc("connect", connect, Disconnect(nqn)),
        loc("wait for block device", WaitForNamespace(nqn, wait_timeout), capture="blockdev"),
        *([loc("check it is our export", CheckSerial(nqn, spec.serial))] if spec.serial else []),
        loc("fail I/O fast while reconnecting",
            ControllerAttr(nqn, "fast_io_fail_tmo", str(FAST_IO_FAIL_TMO))),
        loc("create filesystem",
            cmd("mkfs.ext4", "-q", "-F", "-m", "0",
                "-E", "lazy_itable_init=0,lazy_journal_init=0", Ref("blockdev"))),
        loc("create mount point", cmd("mkdir", "-p", path)),
        loc("mount", cmd("mount", "-t", "ext4", "-o", MOUNT_OPTIONS, Ref("blockdev"), path),
            cmd("umount", path), cmd("mountpoint", "-q", path)),
    ]
    # fmt: on


def connect_plan(spec: RemotePoolSpec, wait_timeout: float = DEVICE_TIMEOUT) -> Plan:
    return Plan(
        f"connect pool {spec.pool!r} ({spec.fabric.transport.value} to {spec.ssh.host})",
        tuple(export_steps(spec) + attach_steps(spec, wait_timeout)),
    )


def grow_plan(spec: RemotePoolSpec, new_size: int, wait_timeout: float = DEVICE_TIMEOUT) -> Plan:
    """Grow a connected pool to ``new_size`` bytes, online, keeping its files.

    Every layer grows in place: tmpfs limit, RAM file, loop device, nvmet namespace (which
    tells the host with an async event), then ext4 online. Forward only and each step
    idempotent: after a failure the pool still works at its old size and running the plan
    again finishes the job, so there are no undos. Shrinking is refused: ext4 cannot
    shrink while mounted, and the RAM behind live blocks cannot be taken away.
    """
    new_size = check_ram_size(new_size)
    if new_size < spec.size:
        raise InvalidArgument(
            f"pool {spec.pool!r} cannot shrink from {spec.size} to {new_size} bytes while "
            "connected; demote its models, disconnect it and connect it with the new size"
        )
    d, f = spec.ram_dir, spec.backing_file
    ns = f"{NVMET}/subsystems/{spec.subsystem_nqn}/namespaces/{NSID}"
    tmpfs_options = f"remount,size={new_size + TMPFS_SLACK}"
    query = ("losetup", "--list", "--noheadings", "--output", "NAME", "--associated", f)
    # fmt: off
    steps = [
        Step("grow RAM tmpfs", "remote", cmd("mount", "-o", tmpfs_options, d)),
        Step("grow RAM file", "remote", cmd("fallocate", "--length", str(new_size), f)),
        Step("find loop device", "remote", cmd(*query), capture="loopdev"),
        Step("grow loop device", "remote", cmd("losetup", "--set-capacity", Ref("loopdev"))),
        Step("grow namespace", "remote", write(f"{ns}/revalidate_size", "1")),
        Step("wait for the new capacity", "local",
             WaitForNamespace(spec.subsystem_nqn, wait_timeout, min_bytes=new_size),
             capture="blockdev"),
        Step("grow filesystem", "local", cmd("resize2fs", Ref("blockdev"))),
    ]
    # fmt: on
    return Plan(f"grow pool {spec.pool!r} to {new_size} bytes", tuple(steps))


def disconnect_plan(spec: RemotePoolSpec) -> Plan:
    """Undo everything connect does (or the part of it that exists), last step first."""
    return connect_plan(spec).teardown(
        f"disconnect pool {spec.pool!r} ({spec.fabric.transport.value} from {spec.ssh.host})"
    )


def detach_plan(spec: RemotePoolSpec) -> Plan:
    """The local half of disconnect (unmount, ``nvme disconnect``): needs no network, so it
    runs first and also when the remote host is dead. Then ``unexport_plan`` does the rest."""
    return Plan("", tuple(attach_steps(spec))).teardown(
        f"detach pool {spec.pool!r} from {spec.mount_path}"
    )


def unexport_plan(spec: RemotePoolSpec) -> Plan:
    """The remote half of disconnect: the nvmet export and the RAM behind it."""
    return Plan("", tuple(export_steps(spec))).teardown(
        f"remove the export of pool {spec.pool!r} on {spec.ssh.host}"
    )


__all__ = [
    "NQN_PREFIX",
    "RemotePoolSpec",
    "Transport",
    "attach_steps",
    "check_host_config",
    "connect_plan",
    "detach_plan",
    "disconnect_plan",
    "export_steps",
    "grow_plan",
    "spec_from_config",
    "unexport_plan",
]
