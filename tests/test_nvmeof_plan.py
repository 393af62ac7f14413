"""The NVMe-oF connect/disconnect plans: what runs, in what order, and what a failure undoes.

These are tests of plans (data). The runner here records argv lists instead of running
them; the same plans run for real against two kernels in tests/test_vm_nvmeof.py.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from speedloaderd.config import RemoteHostConfig
from speedloaderd.errors import Failed, InvalidArgument, NoSpace
from speedloaderd.remote.auth import FabricAuth, check_key, keys_for, new_key
from speedloaderd.remote.capacity import parse_meminfo
from speedloaderd.remote.command import Completed
from speedloaderd.remote.nvmeof import (
    RemotePoolSpec,
    connect_plan,
    disconnect_plan,
    grow_plan,
    spec_from_config,
)
from speedloaderd.remote.plan import (
    Command,
    ControllerAttr,
    Plan,
    PlanFailed,
    Ref,
    Secret,
    Step,
    TeardownIncomplete,
    execute,
    execute_teardown,
)
from speedloaderd.remote.pool import local_identity
from speedloaderd.remote.sysfs import block_name, find_namespace_device
from speedloaderd.remote.values import (
    check_nqn,
    check_ram_size,
    fabric_address,
    parse_ssh_target,
)

HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:6e0c1d1e-8a43-4a4c-9a55-0b5b3c1f7d2e"
SUB = "nqn.2024-01.org.speedloader:gpu1:big"
CFS = "/sys/kernel/config/nvmet"
S = f"{CFS}/subsystems/{SUB}"
H = f"{CFS}/hosts/{HOSTNQN}"
P = f"{CFS}/ports/4420"
D = "/run/speedloader/nvmeof/gpu1.big"
MiB = 1 << 20


def make_spec(transport: str = "tcp") -> RemotePoolSpec:
    cfg = RemoteHostConfig.model_validate(
        {
            "ssh": "root@ram-host:2222",
            "rdmaIp": "10.0.0.7",
            "ramdiskSize": "64M",
            "transport": transport,
            "path": "/mnt/pools/big",
        }
    )
    return spec_from_config("big", cfg, client="gpu1", host_nqn=HOSTNQN)


def expected_connect(tr: str) -> list[tuple[str, str]]:
    """(host, command) for every step of connect, as Plan.show() spells them."""
    return [
        ("remote", f"modprobe -a loop nvmet nvmet-{tr}"),
        ("remote", f"mkdir -p {D}"),
        ("remote", f"mount -t tmpfs -o size={65 * MiB},mode=0700,nosuid,nodev,noexec "
                   f"speedloader-nvmeof-big {D}"),
        ("remote", f"fallocate --length {64 * MiB} {D}/ram"),
        ("remote", f"losetup --find --show {D}/ram"),
        ("remote", f"mkdir {S}"),
        ("remote", f"tee {S}/attr_allow_any_host <<< 0"),
        ("remote", f"mkdir -p {H}"),
        ("remote", f"ln -s {H} {S}/allowed_hosts/{HOSTNQN}"),
        ("remote", f"mkdir {S}/namespaces/1"),
        ("remote", f"tee {S}/namespaces/1/device_path <<< {{loopdev}}"),
        ("remote", f"tee {S}/namespaces/1/enable <<< 1"),
        ("remote", f"mkdir {P}"),
        ("remote", f"tee {P}/addr_trtype <<< {tr}"),
        ("remote", f"tee {P}/addr_adrfam <<< ipv4"),
        ("remote", f"tee {P}/addr_traddr <<< 10.0.0.7"),
        ("remote", f"tee {P}/addr_trsvcid <<< 4420"),
        ("remote", f"ln -s {S} {P}/subsystems/{SUB}"),
        ("local", f"modprobe nvme-{tr}"),
        ("local", f"nvme connect --transport {tr} --traddr 10.0.0.7 --trsvcid 4420 "
                  f"--nqn {SUB} --hostnqn {HOSTNQN} --ctrl-loss-tmo 600 --reconnect-delay 2"),
        ("local", f"wait for the block device of {SUB} (/sys/class/nvme/*/subsysnqn)"),
        ("local", f"tee /sys/class/nvme/<each controller of {SUB}>/fast_io_fail_tmo <<< 5"),
        ("local", "mkfs.ext4 -q -F -m 0 -E lazy_itable_init=0,lazy_journal_init=0 {blockdev}"),
        ("local", "mkdir -p /mnt/pools/big"),
        ("local", "mount -t ext4 -o nosuid,nodev,noatime {blockdev} /mnt/pools/big"),
    ]  # fmt: skip


# The undos of connect, last first: (host, guard or None, what runs if the guard passes).
EXPECTED_TEARDOWN = [
    ("local", "mountpoint -q /mnt/pools/big", "umount /mnt/pools/big"),
    ("local", None, f"nvme disconnect --nqn {SUB}  (if /sys/class/nvme/*/subsysnqn lists it)"),
    ("remote", f"test -L {P}/subsystems/{SUB}", f"rm {P}/subsystems/{SUB}"),
    ("remote", f"test -d {P}", f"rmdir {P}"),
    ("remote", f"test -d {S}/namespaces/1", f"rmdir {S}/namespaces/1"),
    ("remote", f"test -L {S}/allowed_hosts/{HOSTNQN}", f"rm {S}/allowed_hosts/{HOSTNQN}"),
    ("remote", f"test -d {H}", f"rmdir {H}  (kept while another pool uses it)"),
    ("remote", f"test -d {S}", f"rmdir {S}"),
    ("remote", None, "losetup --list --noheadings --output NAME --associated "
                     f"{D}/ram | losetup --detach <each>"),
    ("remote", f"test -e {D}/ram", f"rm -f {D}/ram"),
    ("remote", f"mountpoint -q {D}", f"umount {D}"),
    ("remote", f"test -d {D}", f"rmdir {D}"),
]  # fmt: skip


@dataclass
class RecordingRunner:
    """Test double for a Runner: records each argv; fails the first command after ``arm()``.

    ``files`` is a tiny sysfs (path -> text); directories are implied by the paths.
    ``exists`` answers guards (``test``, ``mountpoint``): True means the object is there.
    """

    name: str
    log: list[tuple[str, tuple[str, ...], str | None]]
    files: dict[str, str] = field(default_factory=dict)
    exists: bool = True
    outputs: dict[str, str] = field(default_factory=dict)  # argv[0..1] joined -> stdout
    armed: bool = False
    # The host across the fabric: the serial number given to a subsystem here is what its
    # controller nvme0 reports there (as nvmet does).
    peer: RecordingRunner | None = None

    def arm(self) -> None:
        self.armed = True

    def run(self, argv: Sequence[str], stdin: str | None = None) -> Completed:
        argv = tuple(argv)
        self.log.append((self.name, argv, stdin))
        if argv[0] in ("test", "mountpoint"):
            return Completed(0 if self.exists else 1, "", "")
        if self.armed:
            self.armed = False
            return Completed(1, "", f"{argv[0]}: injected failure\n")
        if self.peer is not None and argv[0] == "tee" and argv[1].endswith("/attr_serial"):
            self.peer.files["/sys/class/nvme/nvme0/serial"] = f"{stdin}\n"
        return Completed(0, self.outputs.get(" ".join(argv[:2]), ""), "")

    def read_text(self, path: str) -> str | None:
        return self.files.get(path)

    def listdir(self, path: str) -> list[str]:
        prefix = path.rstrip("/") + "/"
        return sorted({p[len(prefix) :].split("/")[0] for p in self.files if p.startswith(prefix)})


def connected_sysfs(nqn: str = SUB) -> dict[str, str]:
    """What /sys shows after nvme connect with native multipath (path nvme0c0n1)."""
    return {
        "/sys/class/nvme/nvme0/subsysnqn": nqn + "\n",
        "/sys/class/nvme/nvme0/nvme0c0n1/size": "131072\n",
        "/sys/class/block/nvme0n1/size": "131072\n",
    }


def make_runners(log: list, sysfs: dict[str, str] | None = None) -> dict[str, RecordingRunner]:
    remote = RecordingRunner(
        "remote",
        log,
        outputs={"losetup --find": "/dev/loop3\n", "losetup --list": "/dev/loop3\n"},
    )
    local = RecordingRunner("local", log, files=connected_sysfs() if sysfs is None else sysfs)
    remote.peer = local
    return {"remote": remote, "local": local}


def show(host: str, argv: tuple[str, ...], stdin: str | None) -> tuple[str, str]:
    line = shlex.join(argv)
    return (host, line if stdin is None else f"{line} <<< {stdin}")


# --------------------------------------------------------------------------- the plans


@pytest.mark.parametrize("tr", ["tcp", "rdma"])
def test_connect_plan_lists_every_step_for_the_transport(tr):
    plan = connect_plan(make_spec(tr))
    shown = [(s.host, s.do.show()) for s in plan.steps]
    assert shown == expected_connect(tr)


@pytest.mark.parametrize("tr", ["tcp", "rdma"])
def test_connect_runs_the_resolved_commands_in_order(tr):
    log: list = []
    ctx = execute(connect_plan(make_spec(tr)), make_runners(log))
    assert ctx == {"loopdev": "/dev/loop3", "blockdev": "/dev/nvme0n1"}
    resolved = [
        (
            h,
            c.replace("{loopdev}", "/dev/loop3")
            .replace("{blockdev}", "/dev/nvme0n1")
            .replace(f"<each controller of {SUB}>", "nvme0"),
        )
        for h, c in expected_connect(tr)
        if not c.startswith("wait for")  # reads sysfs, runs no command
    ]
    assert [show(*e) for e in log] == resolved


@pytest.mark.parametrize("tr", ["tcp", "rdma"])
def test_disconnect_is_every_undo_in_reverse_each_behind_its_guard(tr):
    plan = disconnect_plan(make_spec(tr))
    assert [(s.host, s.only_if.show() if s.only_if else None, s.do.show()) for s in plan.steps] == [
        (h, g, c) for h, g, c in EXPECTED_TEARDOWN
    ]


def test_disconnect_runs_guards_then_undos_with_values_found_at_run_time():
    log: list = []
    execute_teardown(disconnect_plan(make_spec()), make_runners(log))
    ran = [show(*e) for e in log]
    assert ran == [
        ("local", "mountpoint -q /mnt/pools/big"),
        ("local", "umount /mnt/pools/big"),
        ("local", f"nvme disconnect --nqn {SUB}"),
        ("remote", f"test -L {P}/subsystems/{SUB}"),
        ("remote", f"rm {P}/subsystems/{SUB}"),
        ("remote", f"test -d {P}"),
        ("remote", f"rmdir {P}"),
        ("remote", f"test -d {S}/namespaces/1"),
        ("remote", f"rmdir {S}/namespaces/1"),
        ("remote", f"test -L {S}/allowed_hosts/{HOSTNQN}"),
        ("remote", f"rm {S}/allowed_hosts/{HOSTNQN}"),
        ("remote", f"test -d {H}"),
        ("remote", f"rmdir {H}"),
        ("remote", f"test -d {S}"),
        ("remote", f"rmdir {S}"),
        ("remote", f"losetup --list --noheadings --output NAME --associated {D}/ram"),
        ("remote", "losetup --detach /dev/loop3"),
        ("remote", f"test -e {D}/ram"),
        ("remote", f"rm -f {D}/ram"),
        ("remote", f"mountpoint -q {D}"),
        ("remote", f"umount {D}"),
        ("remote", f"test -d {D}"),
        ("remote", f"rmdir {D}"),
    ]


def test_disconnect_of_nothing_changes_nothing():
    """A second disconnect (or one after a failed connect) only asks; it removes nothing."""
    log: list = []
    runners = make_runners(log, sysfs={})
    runners["remote"].outputs = {}  # no loop device is backed by the file
    for r in runners.values():
        r.exists = False
    execute_teardown(disconnect_plan(make_spec()), runners)
    mutating = [argv for _, argv, _ in log if argv[0] not in ("test", "mountpoint")]
    assert mutating == [("losetup", "--list", "--noheadings", "--output", "NAME",
                         "--associated", f"{D}/ram")]  # fmt: skip


def test_teardown_keeps_going_and_reports_every_failure():
    log: list = []
    runners = make_runners(log)
    runners["local"].arm()  # the first local command after the guard: umount
    with pytest.raises(TeardownIncomplete) as exc:
        execute_teardown(disconnect_plan(make_spec()), runners)
    assert "umount /mnt/pools/big" in str(exc.value)
    assert ("remote", f"rmdir {D}") in [show(*e) for e in log]  # the rest still ran


# --------------------------------------------------------------------------- rollback


def runs_command(step: Step) -> bool:
    """One command per do, with the recording runner's sysfs (one controller)."""
    return isinstance(step.do, Command | ControllerAttr)


def steps_with_undo_before(plan: Plan, k: int) -> list[Step]:
    return [s for s in plan.steps[:k] if s.undo is not None]


@pytest.mark.parametrize("tr", ["tcp", "rdma"])
@pytest.mark.parametrize("k", range(len(connect_plan(make_spec()).steps)))
def test_failure_at_step_k_undoes_steps_before_k_in_reverse(tr, k):
    spec = make_spec(tr)
    plan = connect_plan(spec, wait_timeout=0)
    log: list = []
    failing = plan.steps[k]
    # at "wait for block device" the controller is there but its disk never appears
    sysfs = (
        {"/sys/class/nvme/nvme0/subsysnqn": SUB + "\n"}
        if failing.name == "wait for block device"
        else None
    )
    runners = make_runners(log, sysfs)

    def on_step(i: int, n: int, step: Step) -> None:
        if i == k and runs_command(step):  # the wait fails by itself (no disk)
            runners[step.host].arm()

    with pytest.raises(PlanFailed) as exc:
        execute(plan, runners, on_step=on_step)
    assert exc.value.step is failing
    assert failing.name in str(exc.value)
    assert exc.value.rollback_errors == []

    # What ran: the do-commands of steps 0..k, then the rollback.
    do_count = sum(1 for s in plan.steps[: k + 1] if runs_command(s))
    rollback = [show(*e) for e in log[do_count:]]
    expected: list[tuple[str, str]] = []
    for s in reversed(steps_with_undo_before(plan, k)):
        if s.undo_if is not None:
            expected.append((s.host, s.undo_if.show()))
        if s.name == "attach loop device":
            expected.append(("remote", f"losetup --list --noheadings --output NAME "
                                       f"--associated {D}/ram"))  # fmt: skip
            expected.append(("remote", "losetup --detach /dev/loop3"))
        elif s.name == "connect":
            expected.append(("local", f"nvme disconnect --nqn {SUB}"))
        elif s.name == "create host entry":
            expected.append(("remote", f"rmdir {H}"))
        else:
            expected.append((s.host, s.undo.show()))
    assert rollback == expected
    # and nothing after the failed step ever ran
    later = {s.do.show() for s in plan.steps[k + 1 :] if isinstance(s.do, Command)}
    assert not later & {c for _, c in rollback}


def test_rollback_reports_undos_that_fail_too():
    plan = connect_plan(make_spec(), wait_timeout=0)
    log: list = []
    runners = make_runners(log, sysfs={})  # fails at "wait for block device"
    original = runners["remote"].run

    def run_failing_rm(argv, stdin=None):  # the first remote undo: unlink port -> subsystem
        if tuple(argv) == ("rm", f"{P}/subsystems/{SUB}"):
            runners["remote"].log.append(("remote", tuple(argv), stdin))
            return Completed(1, "", "rm: Operation not permitted\n")
        return original(argv, stdin)

    runners["remote"].run = run_failing_rm  # type: ignore[method-assign]
    with pytest.raises(PlanFailed) as exc:
        execute(plan, runners)
    assert len(exc.value.rollback_errors) == 1
    assert "Operation not permitted" in exc.value.rollback_errors[0]
    assert "undoing the earlier steps also failed" in str(exc.value)
    assert ("remote", f"rmdir {D}") in [show(*e) for e in log]


def test_undo_may_not_depend_on_a_captured_value():
    bad = Plan("x", (Step("s", "local", Command(("true",)), Command(("rm", Ref("v")))),))
    with pytest.raises(ValueError, match="captured value"):
        bad.teardown()


# --------------------------------------------------------------------------- values


def test_every_argument_is_a_plain_token():
    """Built from validated values, no argv element needs shell quoting at all."""
    for tr in ("tcp", "rdma"):
        spec = make_spec(tr)
        for plan in (connect_plan(spec), disconnect_plan(spec)):
            for step in plan.steps:
                for action in (step.do, step.undo, step.only_if, step.undo_if):
                    if isinstance(action, Command):
                        for a in action.argv:
                            if isinstance(a, str):
                                assert shlex.quote(a) == a, (step.name, a)


@pytest.mark.parametrize(
    "pool", ["a b", "a;b", "..", "../x", "a/b", "", "-rf", "x$(id)", "big\n", "é"]
)
def test_hostile_pool_names_are_refused(pool):
    cfg = RemoteHostConfig.model_validate(
        {"ssh": "root@h", "rdmaIp": "10.0.0.7", "ramdiskSize": "64M", "path": "/mnt/p"}
    )
    with pytest.raises(InvalidArgument):
        spec_from_config(pool, cfg, client="gpu1", host_nqn=HOSTNQN)


@pytest.mark.parametrize("client", ["gpu 1", "gpu;1", "..", "a.b", ""])
def test_hostile_client_names_are_refused(client):
    cfg = RemoteHostConfig.model_validate(
        {"ssh": "root@h", "rdmaIp": "10.0.0.7", "ramdiskSize": "64M", "path": "/mnt/p"}
    )
    with pytest.raises(InvalidArgument):
        spec_from_config("big", cfg, client=client, host_nqn=HOSTNQN)


@pytest.mark.parametrize(
    "nqn",
    [
        "nqn.2014-08.org.nvmexpress:uuid:x y",
        "nqn.2014-08.org.nvmexpress:uuid:x;reboot",
        "nqn.2014-08.org.nvmexpress:../../etc",
        "nqn.2014-08.org.nvmexpress:$(id)",
        "nqn.2014-13.org.x:y",
        "iqn.2014-08.org.x:y",
        "nqn.2014-08.org.x",
        "nqn.2014-08.org.x:" + "a" * 300,
    ],
)
def test_hostile_nqns_are_refused(nqn):
    with pytest.raises(InvalidArgument):
        check_nqn(nqn)
    cfg = RemoteHostConfig.model_validate(
        {"ssh": "root@h", "rdmaIp": "10.0.0.7", "ramdiskSize": "64M", "path": "/mnt/p"}
    )
    with pytest.raises(InvalidArgument):
        spec_from_config("big", cfg, client="gpu1", host_nqn=nqn)


def test_the_nqns_we_use_are_accepted():
    assert check_nqn(HOSTNQN) == HOSTNQN
    assert check_nqn(make_spec().subsystem_nqn) == SUB


@pytest.mark.parametrize(
    "ip",
    [
        "192.168.1.300",
        "1.2.3.4; rm -rf /",
        "1.2.3.4 ",
        "fe80::1%eth0",
        "fe80::1%a;b",
        "0.0.0.0",
        "::",
        "224.0.0.1",
        "",
        "ram-host",
        "$(id)",
    ],
)
def test_bad_ips_are_refused(ip):
    with pytest.raises(InvalidArgument):
        fabric_address("tcp", ip, 4420)


def test_ips_are_normalised():
    a = fabric_address("rdma", "fd00:0:0::0007", 4420)
    assert (a.traddr, a.adrfam, a.transport.value) == ("fd00::7", "ipv6", "rdma")


def test_without_rdma_ip_the_ssh_host_must_be_an_address():
    cfg = RemoteHostConfig.model_validate(
        {"ssh": "root@ram-host", "ramdiskSize": "64M", "path": "/mnt/p"}
    )
    with pytest.raises(InvalidArgument, match="set rdmaIp"):
        spec_from_config("big", cfg, client="gpu1", host_nqn=HOSTNQN)
    cfg = RemoteHostConfig.model_validate(
        {"ssh": "root@10.1.2.3:22", "ramdiskSize": "64M", "path": "/mnt/p"}
    )
    assert spec_from_config("big", cfg, client="gpu1", host_nqn=HOSTNQN).fabric.traddr == "10.1.2.3"


@pytest.mark.parametrize(
    "size", [0, 1, -1, 15 * MiB, 64 * MiB + 1, 1 << 50, (16 << 40) + MiB, True, 1.5, "64M", None]
)
def test_bad_sizes_are_refused(size):
    with pytest.raises(InvalidArgument):
        check_ram_size(size)


@pytest.mark.parametrize(
    "target",
    [
        "root@host;reboot",
        "root@",
        "@host",
        "a b@host",
        "root@host:99999",
        "root@host:0",
        "root@host:22:33",
        "root@[::1",
        "root@[::1]x",
        "root@[nothost]:22",
        "root@-oProxyCommand=x",
        "root@host name",
        "root@@host",
        "host",
    ],
)
def test_bad_ssh_targets_are_refused(target):
    with pytest.raises(InvalidArgument):
        parse_ssh_target(target)


def test_ssh_targets_parse():
    assert str(parse_ssh_target("root@ram-2.lab")) == "root@ram-2.lab:22"
    assert str(parse_ssh_target("sl@10.0.0.2:2222")) == "sl@10.0.0.2:2222"
    t = parse_ssh_target("root@[fd00::0002]:22")
    assert (t.host, t.port) == ("fd00::2", 22)


# --------------------------------------------------------------------------- sysfs


def test_block_names_with_and_without_multipath():
    assert block_name("nvme0c0n1") == "nvme0n1"
    assert block_name("nvme3c12n2") == "nvme3n2"
    assert block_name("nvme2n1") == "nvme2n1"
    assert block_name("subsysnqn") is None
    assert block_name("nvme0n1p1") is None


def test_find_namespace_device_picks_our_subsystem_only():
    other = "nqn.2024-01.org.speedloader:gpu1:other"
    files = {
        "/sys/class/nvme/nvme0/subsysnqn": other + "\n",
        "/sys/class/nvme/nvme0/nvme0c0n1/size": "1\n",
        "/sys/class/block/nvme0n1/size": "2048\n",
        "/sys/class/nvme/nvme1/subsysnqn": SUB + "\n",
        "/sys/class/nvme/nvme1/nvme1c1n1/size": "1\n",
        "/sys/class/block/nvme1n1/size": "131072\n",
    }
    runner = RecordingRunner("local", [], files=files)
    assert find_namespace_device(runner, SUB) == "/dev/nvme1n1"
    assert find_namespace_device(runner, other) == "/dev/nvme0n1"


def test_find_namespace_device_waits_for_a_non_empty_disk():
    files = connected_sysfs()
    files["/sys/class/block/nvme0n1/size"] = "0\n"  # namespace scanned, capacity not yet
    assert find_namespace_device(RecordingRunner("local", [], files=files), SUB) is None
    del files["/sys/class/block/nvme0n1/size"]
    assert find_namespace_device(RecordingRunner("local", [], files=files), SUB) is None


# --------------------------------------------------------------------------- grow


def test_grow_plan_grows_every_layer_in_place():
    plan = grow_plan(make_spec(), 128 * MiB, wait_timeout=0)
    assert [(s.host, s.do.show()) for s in plan.steps] == [
        ("remote", f"mount -o remount,size={129 * MiB} {D}"),
        ("remote", f"fallocate --length {128 * MiB} {D}/ram"),
        ("remote", f"losetup --list --noheadings --output NAME --associated {D}/ram"),
        ("remote", "losetup --set-capacity {loopdev}"),
        ("remote", f"tee {S}/namespaces/1/revalidate_size <<< 1"),
        ("local", f"wait until the block device of {SUB} has {128 * MiB} bytes"),
        ("local", "resize2fs {blockdev}"),
    ]
    assert all(s.undo is None for s in plan.steps)  # forward only: see grow_plan's doc


def test_grow_waits_for_the_new_capacity_before_resizing_the_filesystem():
    log: list = []
    runners = make_runners(log)  # the disk still shows its old 64 MiB
    with pytest.raises(PlanFailed) as exc:
        execute(grow_plan(make_spec(), 128 * MiB, wait_timeout=0), runners)
    assert exc.value.step.name == "wait for the new capacity"
    assert not [argv for _, argv, _ in log if argv[0] == "resize2fs"]
    runners["local"].files["/sys/class/block/nvme0n1/size"] = str(128 * MiB // 512)
    log.clear()
    execute(grow_plan(make_spec(), 128 * MiB, wait_timeout=0), runners)
    assert show(*log[-1]) == ("local", "resize2fs /dev/nvme0n1")


@pytest.mark.parametrize("size", [32 * MiB, 64 * MiB + 4096, 0])
def test_grow_refuses_to_shrink_or_to_odd_sizes(size):
    with pytest.raises(InvalidArgument):
        grow_plan(make_spec(), size)


# --------------------------------------------------------------------------- identity


def test_local_identity_reads_hostname_and_host_nqn():
    files = {"/proc/sys/kernel/hostname": "gpu1.lab.example\n", "/etc/nvme/hostnqn": HOSTNQN + "\n"}
    assert local_identity(RecordingRunner("local", [], files=files)) == ("gpu1", HOSTNQN)


def test_local_identity_without_host_nqn_says_how_to_make_one():
    files = {"/proc/sys/kernel/hostname": "gpu1\n"}
    with pytest.raises(Failed, match="nvme gen-hostnqn"):
        local_identity(RecordingRunner("local", [], files=files))


def test_local_identity_refuses_a_hostile_host_nqn():
    files = {"/proc/sys/kernel/hostname": "gpu1\n", "/etc/nvme/hostnqn": "nqn.2014-08.x:a b\n"}
    with pytest.raises(InvalidArgument):
        local_identity(RecordingRunner("local", [], files=files))


# --------------------------------------------------------------------------- RAM to lend

GiB = 1 << 30


def meminfo(total: int, available: int) -> str:
    """/proc/meminfo as the kernel writes it (kB), with the lines around ours."""
    return (
        f"MemTotal:       {total // 1024} kB\n"
        f"MemFree:        {available // 2048} kB\n"
        f"MemAvailable:   {available // 1024} kB\n"
        "Buffers:           1234 kB\n"
    )


@pytest.mark.parametrize(
    ("total", "available", "margin"),
    [
        (64 * GiB, 60 * GiB, int(6.4 * GiB)),  # a RAM server: 10% of it is kept
        (1 * GiB, 900 * MiB, 256 * MiB),  # a small host: the 256 MiB floor
    ],
)
def test_what_a_host_can_lend_is_available_ram_minus_its_margin(total, available, margin):
    mem = parse_meminfo(meminfo(total, available), "root@ram-host:22")
    assert (mem.total, mem.available) == (total, available)
    assert abs(mem.margin - margin) <= 1024  # kB rounding of MemTotal
    assert mem.lendable == mem.available - mem.margin


def test_meminfo_without_mem_available_is_refused():
    with pytest.raises(Failed, match="no MemTotal and MemAvailable"):
        parse_meminfo("MemTotal: 1000 kB\nMemFree: 10 kB\n", "root@ram-host:22")


def link_for(size: str, mem: str, log: list | None = None):
    """A RemotePoolLink on the recording runners, the remote host showing ``mem``."""
    from speedloaderd.remote.pool import RemotePoolLink

    log = [] if log is None else log
    runners = make_runners(log)
    runners["local"].files |= {
        "/proc/sys/kernel/hostname": "gpu1\n",
        "/etc/nvme/hostnqn": HOSTNQN + "\n",
    }
    runners["remote"].files = {"/proc/meminfo": mem}
    cfg = RemoteHostConfig.model_validate(
        {"ssh": "root@ram-host:2222", "rdmaIp": "10.0.0.7", "ramdiskSize": size,
         "transport": "tcp", "path": "/mnt/pools/big"}
    )  # fmt: skip
    link = RemotePoolLink("big", cfg, None, local=runners["local"], remote=runners["remote"])
    return link, runners, log


def test_connect_asking_more_than_the_host_can_lend_is_refused_before_anything_runs():
    link, _, log = link_for("8G", meminfo(16 * GiB, 9 * GiB))  # lends 9 - 1.6 = 7.4G
    with pytest.raises(NoSpace) as exc:
        link.connect()
    msg = str(exc.value)
    assert "remote host ram-host cannot lend 8G of RAM for pool 'big'" in msg
    assert "it has 9G available and keeps 1.6G for itself, so at most 7.4G" in msg
    assert "\n" not in msg
    assert log == []  # not a command on either host: nothing created, not even a module


def test_connect_within_what_the_host_can_lend_runs_the_plan():
    link, _, log = link_for("64M", meminfo(16 * GiB, 9 * GiB))
    ctx = link.connect()
    assert ctx["blockdev"] == "/dev/nvme0n1"
    assert [show(*e) for e in log[:2]] == [
        ("remote", "modprobe -a nvmet nvmet-tcp"),
        ("local", "modprobe nvme-fabrics"),
    ]
    assert link.spec.auth is None  # this runner's nvme-fabrics lists no dhchap options


def test_grow_counts_only_the_growth_and_refuses_more_than_the_host_can_lend():
    # the pool's 64M are taken already; 556M available - 256M margin = 300M more to lend
    link, runners, log = link_for("64M", meminfo(1 * GiB, 556 * MiB))
    with pytest.raises(
        NoSpace, match=r"cannot lend 448M of RAM for growing to 512M the pool 'big'"
    ):
        link.grow(512 * MiB)
    assert log == []
    runners["local"].files["/sys/class/block/nvme0n1/size"] = str(128 * MiB // 512)
    link.grow(128 * MiB)  # +64M fits
    assert ("remote", f"fallocate --length {128 * MiB} {D}/ram") in [show(*e) for e in log]


def test_absurd_sizes_are_refused_by_the_config_check():
    from speedloaderd.remote.pool import RemotePool

    for size in ("1P", "17T"):
        cfg = RemoteHostConfig.model_validate(
            {"ssh": "root@h", "rdmaIp": "10.0.0.7", "ramdiskSize": size, "path": "/mnt/p"}
        )
        with pytest.raises(InvalidArgument, match=r"remoteTiers.hosts.p.ramdiskSize.*16T"):
            RemotePool("p", cfg, None)
    assert check_ram_size(16 << 40) == 16 << 40


# --------------------------------------------------------------------------- DH-HMAC-CHAP

FABRICS_OPTIONS = (
    "instance=-1,cntlid=-1,transport=%s,traddr=%s,trsvcid=%s,nqn=%s,hostnqn=%s,"
    "dhchap_secret=%s,dhchap_ctrl_secret=%s,fast_io_fail_tmo=%d\n"
)
AUTH = FabricAuth(new_key(), new_key(), "6e0c1d1e-8a43-4a4c-9a55-0b5b3c1f7d2e")


def auth_spec() -> RemotePoolSpec:
    return dataclasses.replace(make_spec(), auth=AUTH)


def test_keys_are_what_the_kernel_and_nvme_cli_read():
    key = new_key()
    assert check_key(key, "here") == key
    assert key != new_key()
    nvme = shutil.which("nvme")
    if nvme is not None:  # nvme-cli's own check (format, length, crc32)
        r = subprocess.run([nvme, "check-dhchap-key", f"--key={key}"], capture_output=True)
        assert r.returncode == 0, r.stderr
    raw = bytearray(base64.b64decode(key.split(":")[2]))
    raw[0] ^= 1  # one bit off: the crc32 no longer matches
    bad = f"DHHC-1:00:{base64.b64encode(bytes(raw)).decode()}:"
    for value in (bad, "DHHC-1:00:short:", key + "x", "DHHC-1:07:" + key[10:]):
        with pytest.raises(Failed, match="not valid"):
            check_key(value, "here")


def test_with_auth_the_keys_are_set_before_the_host_is_allowed_and_never_shown():
    plan = connect_plan(auth_spec())
    names = [s.name for s in plan.steps]
    i = names.index("create host entry")
    assert names[i + 1 : i + 6] == [
        "set auth hash", "set auth DH group", "set host key", "set controller key",
        "allow this host",
    ]  # fmt: skip
    shown = "\n".join(plan.show() + disconnect_plan(auth_spec()).show())
    assert f"tee {H}/dhchap_key <<< <host key>" in shown
    assert f"tee {H}/dhchap_ctrl_key <<< <controller key>" in shown
    assert f"tee {H}/dhchap_hash <<< 'hmac(sha256)'" in shown
    assert f"tee {H}/dhchap_dhgroup <<< ffdhe2048" in shown
    assert "--config /proc/self/fd/0 <<< <keys>" in shown
    for key in (AUTH.host_key, AUTH.ctrl_key):
        assert key not in shown and key not in repr(plan) and key not in repr(auth_spec())
    # the teardown is the same with or without keys: they go with the host entry
    assert disconnect_plan(auth_spec()) == disconnect_plan(make_spec())


def test_with_auth_no_key_is_ever_on_a_command_line():
    log: list = []
    execute(connect_plan(auth_spec()), make_runners(log))
    for _, argv, _ in log:
        assert not any(AUTH.host_key in a or AUTH.ctrl_key in a for a in argv), argv
    stdin = {argv[-1] if argv[0] == "tee" else argv[1]: s for _, argv, s in log if s}
    assert stdin[f"{H}/dhchap_key"] == AUTH.host_key
    assert stdin[f"{H}/dhchap_ctrl_key"] == AUTH.ctrl_key
    config = json.loads(stdin["connect"])
    assert config == [{
        "hostnqn": HOSTNQN, "hostid": AUTH.host_id, "dhchap_key": AUTH.host_key,
        "subsystems": [{"nqn": SUB, "ports": [{
            "transport": "tcp", "traddr": "10.0.0.7", "trsvcid": "4420",
            "dhchap_ctrl_key": AUTH.ctrl_key}]}],
    }]  # fmt: skip
    with pytest.raises(ValueError, match="secret on the command line"):
        Command(("nvme", "connect", Secret("k", "v")))


def test_a_failed_key_step_names_the_step_but_never_the_key():
    plan = connect_plan(auth_spec(), wait_timeout=0)
    log: list = []
    runners = make_runners(log)
    k = [s.name for s in plan.steps].index("set host key")

    def on_step(i: int, n: int, step: Step) -> None:
        if i == k:
            runners["remote"].arm()

    with pytest.raises(PlanFailed) as exc:
        execute(plan, runners, on_step=on_step)
    assert "set host key" in str(exc.value)
    assert AUTH.host_key not in str(exc.value) and AUTH.ctrl_key not in str(exc.value)


def auth_runners(*, host: bool = True, target: bool = True, entry: dict | None = None):
    log: list = []
    runners = make_runners(log)
    local, remote = runners["local"], runners["remote"]
    local.files = {"/etc/nvme/hostid": AUTH.host_id + "\n"}
    if host:
        local.outputs["cat /dev/nvme-fabrics"] = FABRICS_OPTIONS
    if not target:  # grep finds no nvmet_auth_set_key in /proc/kallsyms
        remote.run = lambda argv, stdin=None: Completed(1, "", "")  # type: ignore[method-assign]
    remote.files = {f"{H}/{k}": v for k, v in (entry or {}).items()}
    return remote, local


def test_new_keys_when_both_kernels_have_auth_and_no_entry_exists():
    remote, local = auth_runners()
    auth = keys_for(remote, local, H)
    assert auth is not None and auth.host_id == AUTH.host_id
    assert check_key(auth.host_key, "x") and check_key(auth.ctrl_key, "x")
    assert auth.host_key != auth.ctrl_key


def test_a_live_host_entry_keeps_its_keys():
    """Another pool of ours on that target reconnects with the entry's keys: never change them."""
    entry = {"dhchap_key": AUTH.host_key + "\n", "dhchap_ctrl_key": AUTH.ctrl_key + "\n"}
    remote, local = auth_runners(entry=entry)
    assert keys_for(remote, local, H) == AUTH


@pytest.mark.parametrize(
    ("host", "target", "entry", "why"),
    [
        (False, True, None, "this kernel's nvme-fabrics has no DH-HMAC-CHAP"),
        (True, False, None, "its nvmet has no DH-HMAC-CHAP"),
        (True, True, {"dhchap_key": "\n"}, "in use without DH-HMAC-CHAP keys"),
    ],
)
def test_without_auth_on_a_side_the_pool_connects_unauthenticated_and_says_so(
    host, target, entry, why, caplog
):
    remote, local = auth_runners(host=host, target=target, entry=entry)
    assert keys_for(remote, local, H) is None
    assert why in caplog.text


def test_a_corrupt_key_in_the_host_entry_is_refused():
    remote, local = auth_runners(entry={"dhchap_key": "DHHC-1:00:AAAA:\n"})
    with pytest.raises(Failed, match="not valid; remove that host entry"):
        keys_for(remote, local, H)


# --------------------------------------------------------------------------- our export only


def test_only_the_export_we_made_is_formatted_whatever_answers_at_the_address():
    """The serial given to the subsystem over SSH must come back from the controller."""
    spec = dataclasses.replace(make_spec(), serial="5e1ecab1e0000000beef")
    plan = connect_plan(spec, wait_timeout=0)
    shown = plan.show()
    assert f"remote: set serial number: tee {S}/attr_serial <<< 5e1ecab1e0000000beef" in shown
    names = [s.name for s in plan.steps]
    assert names.index("check it is our export") == names.index("wait for block device") + 1
    assert names.index("check it is our export") < names.index("create filesystem")

    log: list = []
    runners = make_runners(log)
    runners["remote"].peer = None  # another machine answers: it never got our serial
    runners["local"].files["/sys/class/nvme/nvme0/serial"] = "ROGUE-0001\n"
    with pytest.raises(PlanFailed) as exc:
        execute(plan, runners)
    assert exc.value.step.name == "check it is our export"
    assert "reports serial 'ROGUE-0001', not the '5e1ecab1e0000000beef'" in str(exc.value)
    assert not [argv for h, argv, _ in log if h == "local" and argv[0] in ("mkfs.ext4", "mount")]
    assert exc.value.rollback_errors == []

    log.clear()
    runners["remote"].peer = runners["local"]  # the real export: its serial comes back
    assert execute(plan, runners)["blockdev"] == "/dev/nvme0n1"


def test_target_auth_is_found_by_its_module_or_else_by_its_symbol():
    from speedloaderd.remote.auth import target_supports_auth

    log: list = []
    remote = RecordingRunner("remote", log)  # ``test -e`` of nvme-auth's holder succeeds
    assert target_supports_auth(remote)
    assert [argv[0] for _, argv, _ in log] == ["test"]  # no slow grep of /proc/kallsyms

    grep = {"rc": 0}

    def no_holder(argv, stdin=None):
        log.append(("remote", tuple(argv), stdin))
        return Completed(1 if argv[0] == "test" else grep["rc"], "", "")

    remote.run = no_holder  # type: ignore[method-assign]
    for rc, found in ((0, True), (1, False)):
        grep["rc"] = rc
        log.clear()
        assert target_supports_auth(remote) is found
        assert log[-1][1] == ("grep", "-q", "-w", "nvmet_auth_set_key", "/proc/kallsyms")
