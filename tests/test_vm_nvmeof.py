"""Remote RAM pools for real: two QEMU guests with Debian's kernel, nvmet and sshd.

The first tests drive the plans the daemon uses, over paramiko with host key checking:
the export half against the "remote" guest, the attach half inside the "local" guest
(this machine's kernel has no nvme-fabrics). The ``test_daemon_*`` tests run the whole daemon
inside the "local" guest (a private system bus, polkitd and speedloaderd, driven over
D-Bus by tests/vm/daemon_agent.py, all on this machine's python over 9p), configured
with remoteTiers entries that point at the "remote" guest: Connect, promote, read through
the models dir, fabric loss, remote host killed, Disconnect. Data crosses the virtual
fabric link.

Needs root and the Debian packages listed in tests/vm/README.md. Without them the tests
are skipped with a banner saying why; with SPEEDLOADER_VM_REQUIRED=1 (CI) they fail instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import subprocess
import time
import warnings
from collections.abc import Iterator

import pytest

from speedloader_lab.modelgen import make_gguf
from speedloaderd.config import RemoteHostConfig
from speedloaderd.errors import NoSpace
from speedloaderd.remote.auth import FabricAuth, local_host_id, new_key
from speedloaderd.remote.nvmeof import (
    RemotePoolSpec,
    attach_steps,
    connect_plan,
    disconnect_plan,
    export_steps,
    grow_plan,
)
from speedloaderd.remote.plan import Plan, PlanFailed, execute, execute_teardown
from speedloaderd.remote.pool import RemotePoolLink
from speedloaderd.remote.probe import Probe, probe
from speedloaderd.remote.runners import HostKeyError, SshRunner
from speedloaderd.remote.sysfs import controllers_of
from speedloaderd.remote.values import SshTarget, fabric_address

from .vm.guests import FABRIC, CannotBoot, DaemonAgent, Pair, booted_pair, share_host

pytestmark = pytest.mark.vm

POOL_PATH = "/mnt/vmpool"
RAM_SIZE = 64 << 20
PAYLOAD = 8 << 20
FOREIGN_NQN = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-000000000001"


def _say(request: pytest.FixtureRequest, *lines: str, **markup: bool) -> None:
    """Write to the terminal even while pytest captures output."""
    tr = request.config.pluginmanager.getplugin("terminalreporter")
    cm = request.config.pluginmanager.getplugin("capturemanager")
    if tr is None or cm is None:
        return
    with cm.global_and_fixture_disabled():
        tr.write_line("")
        for line in lines:
            tr.write_line(line, **markup)


def _loud_skip(request: pytest.FixtureRequest, reason: str) -> None:
    banner = f"VM TESTS NOT RUN: {reason}"
    _say(request, "!" * len(banner), banner, "!" * len(banner), red=True, bold=True)
    warnings.warn(banner, stacklevel=1)
    if os.environ.get("SPEEDLOADER_VM_REQUIRED") == "1":
        pytest.fail(banner + " (SPEEDLOADER_VM_REQUIRED=1)")
    pytest.skip(banner)


def _report(request: pytest.FixtureRequest, line: str) -> None:
    _say(request, f"[vm] {line}")


@pytest.fixture(scope="session")
def pair(request, tmp_path_factory) -> Iterator[Pair]:
    try:
        with booted_pair(tmp_path_factory.mktemp("vm")) as p:
            _report(request, f"image ready in {p.build_seconds:.1f} s (vmlab/build)")
            _report(request, f"both guests booted to sshd in {p.boot_seconds:.1f} s")
            yield p
    except CannotBoot as err:
        _loud_skip(request, str(err))


def _runner(pair: Pair, guest: str, known_hosts=None) -> SshRunner:
    g = pair.remote if guest == "remote" else pair.local
    return SshRunner(
        SshTarget("root", "127.0.0.1", g.ssh_port),
        pair.client_key,
        known_hosts=[known_hosts or pair.known_hosts],
    )


@pytest.fixture
def runners(pair) -> Iterator[dict[str, SshRunner]]:
    r = {"remote": _runner(pair, "remote"), "local": _runner(pair, "local")}
    yield r
    for runner in r.values():
        runner.close()


def _spec(
    runners,
    transport: str,
    host_nqn: str | None = None,
    auth: FabricAuth | None = None,
    serial: str | None = None,
) -> RemotePoolSpec:
    local = runners["local"]
    return RemotePoolSpec(
        pool="vmpool",
        client=local.read_text("/proc/sys/kernel/hostname").strip(),
        host_nqn=host_nqn or local.read_text("/etc/nvme/hostnqn").strip(),
        ssh=SshTarget("root", FABRIC["remote"]),
        fabric=fabric_address(transport, FABRIC["remote"], 4420),
        size=RAM_SIZE,
        mount_path=POOL_PATH,
        auth=auth,
        serial=serial,
    )


def leftovers(runners) -> list[str]:
    """Everything a remote pool could leave behind, on either guest."""
    remote, local = runners["remote"], runners["local"]
    found = []
    for kind in ("subsystems", "ports", "hosts"):
        found += [
            f"remote nvmet {kind}/{e}" for e in remote.listdir(f"/sys/kernel/config/nvmet/{kind}")
        ]
    loops = remote.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"]).stdout
    found += [f"remote loop device {line}" for line in loops.splitlines() if line.strip()]
    found += [f"remote RAM dir {e}" for e in remote.listdir("/run/speedloader/nvmeof")]
    for name, runner in runners.items():
        for line in runner.read_text("/proc/mounts").splitlines():
            if "/run/speedloader" in line or "/mnt/vm" in line or "/dev/nvme" in line:
                found.append(f"{name} mount {line}")
    found += [f"local nvme controller {c}" for c in local.listdir("/sys/class/nvme")]
    return found


@pytest.fixture
def rxe(runners) -> Iterator[None]:
    """Soft-RoCE on the fabric NIC of both guests (crc32_generic: see MODULES in vmlab/build)."""
    for r in runners.values():
        res = r.run(["modprobe", "-a", "crc32_generic", "rdma_rxe"])
        assert res.returncode == 0, res.stderr
        res = r.run(["rdma", "link", "add", "rxe0", "type", "rxe", "netdev", "eth1"])
        assert res.returncode == 0, f"{r.name}: rdma link add: {res.stderr}"
    yield
    for r in runners.values():
        r.run(["rdma", "link", "delete", "rxe0"])


def _cycle(request, pair: Pair, runners, transport: str) -> None:
    """Through RemotePoolLink, from a remoteTiers entry, as the engine will do it."""
    assert leftovers(runners) == [], "the guests are not clean before the test"
    cfg = RemoteHostConfig.model_validate(
        {
            "ssh": f"root@127.0.0.1:{pair.remote.ssh_port}",  # the hostfwd to the remote guest
            "rdmaIp": FABRIC["remote"],
            "ramdiskSize": RAM_SIZE,
            "transport": transport,
            "path": POOL_PATH,
        }
    )
    marker = f"SPEEDLOADER-VM-MARKER-{transport}-{os.urandom(16).hex()}"
    # on a line of its own: busybox grep compares lines as C strings (stops at a NUL)
    payload = b"\n" + marker.encode() + b"\n" + os.urandom(PAYLOAD)
    steps: list[str] = []

    t0 = time.monotonic()
    with RemotePoolLink(
        "vmpool", cfg, pair.client_key, local=runners["local"], known_hosts=[pair.known_hosts]
    ) as link:
        # the same spec the other tests build by hand: the guest's identity, the fabric IP
        assert link.spec == dataclasses.replace(_spec(runners, transport), ssh=link.spec.ssh)
        try:
            t_connect, t_use = _use_pool(link, payload, marker, steps)
        except BaseException:
            with contextlib.suppress(Exception):  # leave clean guests to the next test
                link.disconnect()
            raise
        link.disconnect()
    t_total = time.monotonic() - t0
    assert leftovers(runners) == []
    assert steps == [s.name for s in connect_plan(link.spec).steps]
    _report(
        request,
        f"{transport} cycle: connect {t_connect:.1f} s, write+verify {len(payload) >> 20} MiB "
        f"{t_use:.1f} s, total with disconnect {t_total:.1f} s",
    )


def _use_pool(link: RemotePoolLink, payload: bytes, marker: str, steps: list[str]):
    remote, local, spec = link.remote, link.local, link.spec
    digest = hashlib.sha256(payload).hexdigest()
    t0 = time.monotonic()
    ctx = link.connect(on_step=lambda i, n, step: steps.append(step.name))
    t_connect = time.monotonic() - t0
    spec = link.spec  # now with the keys and the serial the connect chose
    assert ctx["blockdev"].startswith("/dev/nvme")
    assert ctx["loopdev"].startswith("/dev/loop")
    ctrls = controllers_of(local, spec.subsystem_nqn)
    assert [local.read_text(f"/sys/class/nvme/{c}/transport").strip() for c in ctrls] == [
        spec.fabric.transport.value
    ]
    # the only host allowed is the local guest's NQN, and only with its DH-HMAC-CHAP key
    # (both guests run Debian's 6.12: the link chose keys), in both directions
    sub = f"/sys/kernel/config/nvmet/subsystems/{spec.subsystem_nqn}"
    assert remote.read_text(f"{sub}/attr_allow_any_host").strip() == "0"
    assert remote.listdir(f"{sub}/allowed_hosts") == [spec.host_nqn]
    assert spec.auth is not None
    assert remote.read_text(f"{spec.host_entry}/dhchap_key").strip() == spec.auth.host_key
    assert remote.read_text(f"{spec.host_entry}/dhchap_ctrl_key").strip() == spec.auth.ctrl_key
    kernel_log = local.run(["dmesg"]).stdout
    assert "qid 0: controller authenticated" in kernel_log, kernel_log[-2000:]

    local.write_bytes(f"{POOL_PATH}/model.bin", payload)
    assert local.run(["sync"]).returncode == 0
    # read it back from the remote RAM, not from the local page cache: remount
    assert local.run(["umount", POOL_PATH]).returncode == 0
    assert local.run(["tee", "/proc/sys/vm/drop_caches"], "3").returncode == 0
    r = local.run(["mount", "-t", "ext4", ctx["blockdev"], POOL_PATH])
    assert r.returncode == 0, r.stderr
    r = local.run(["sha256sum", f"{POOL_PATH}/model.bin"])
    assert r.stdout.split()[0] == digest
    # and the bytes really are in the remote guest's tmpfs file
    assert remote.run(["grep", "-q", "-F", marker, spec.backing_file]).returncode == 0
    return t_connect, time.monotonic() - t0 - t_connect


def test_tcp_cycle_connect_write_verify_disconnect(request, pair, runners):
    _cycle(request, pair, runners, "tcp")


def test_rdma_cycle_over_soft_roce(request, pair, runners, rxe):
    _cycle(request, pair, runners, "rdma")


def _fs_bytes(runner: SshRunner, path: str) -> int:
    blocks, size = runner.run(["stat", "-f", "-c", "%b %S", path]).stdout.split()
    return int(blocks) * int(size)


def test_grow_keeps_the_pool_mounted_and_its_files(request, runners):
    spec = _spec(runners, "tcp")
    local = runners["local"]
    payload = os.urandom(PAYLOAD)
    try:
        execute(connect_plan(spec), runners)
        local.write_bytes(f"{POOL_PATH}/model.bin", payload)
        before = _fs_bytes(local, POOL_PATH)
        t0 = time.monotonic()
        execute(grow_plan(spec, 2 * RAM_SIZE), runners)
        _report(request, f"grow {RAM_SIZE >> 20} -> {2 * RAM_SIZE >> 20} MiB online: "
                         f"{time.monotonic() - t0:.1f} s")  # fmt: skip
        after = _fs_bytes(local, POOL_PATH)
        assert before < RAM_SIZE < after <= 2 * RAM_SIZE
        r = local.run(["sha256sum", f"{POOL_PATH}/model.bin"])
        assert r.stdout.split()[0] == hashlib.sha256(payload).hexdigest()
    finally:
        execute_teardown(disconnect_plan(spec), runners)
    assert leftovers(runners) == []


def _wait_until(what: str, predicate, timeout: float = 180.0) -> None:
    """Poll a condition in the guest until it holds (there is no event to wait on over SSH)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def test_fabric_loss_fails_io_and_shows_in_the_probe_then_reconnect_restores(request, runners):
    spec = _spec(runners, "tcp")
    remote, local = runners["remote"], runners["local"]
    payload = os.urandom(PAYLOAD)
    digest = hashlib.sha256(payload).hexdigest()
    model = f"{POOL_PATH}/model.bin"
    try:
        execute(connect_plan(spec), runners)
        local.write_bytes(model, payload)
        assert local.run(["sync"]).returncode == 0
        assert probe(local, spec) == Probe(True, "", ("live",))
        assert local.run(["tee", "/proc/sys/vm/drop_caches"], "3").returncode == 0

        t0 = time.monotonic()
        assert remote.run(["ip", "link", "set", "eth1", "down"]).returncode == 0
        try:
            r = local.run(["sha256sum", model])  # blocks until fast_io_fail_tmo, then EIO
            t_fail = time.monotonic() - t0
            assert r.returncode != 0 and "Input/output error" in r.stderr, r
            lost = probe(local, spec)
            assert not lost.usable
            assert "lost its connection to 192.168.100.1" in lost.reason
        finally:
            assert remote.run(["ip", "link", "set", "eth1", "up"]).returncode == 0
        t1 = time.monotonic()
        _wait_until("the controller to reconnect", lambda: probe(local, spec).usable)
        t_back = time.monotonic() - t1
        r = local.run(["sha256sum", model])
        assert r.returncode == 0 and r.stdout.split()[0] == digest
        _report(request, f"fabric down: read failed after {t_fail:.1f} s; "
                         f"link up: pool usable again after {t_back:.1f} s")  # fmt: skip
    finally:
        execute_teardown(disconnect_plan(spec), runners)
    assert leftovers(runners) == []


def test_second_disconnect_is_harmless(runners):
    spec = _spec(runners, "tcp")
    execute_teardown(disconnect_plan(spec), runners)
    assert leftovers(runners) == []


def test_other_hosts_are_refused_and_the_failed_connect_is_undone(runners):
    """Export for the local guest's NQN, connect claiming another one: refused, rolled back."""
    allowed = _spec(runners, "tcp")
    impostor = _spec(runners, "tcp", host_nqn=FOREIGN_NQN)
    plan = Plan("connect as an impostor", tuple(export_steps(allowed) + attach_steps(impostor)))
    with pytest.raises(PlanFailed) as exc:
        execute(plan, runners)
    assert exc.value.step.name == "connect"
    assert exc.value.rollback_errors == []
    assert leftovers(runners) == []


def test_connect_asking_more_ram_than_the_remote_has_is_refused_and_leaves_nothing(
    request, pair, runners
):
    """1 GiB from a 512 MiB guest: refused before anything is created on either guest."""
    assert leftovers(runners) == []
    cfg = RemoteHostConfig.model_validate(
        {"ssh": f"root@127.0.0.1:{pair.remote.ssh_port}", "rdmaIp": FABRIC["remote"],
         "ramdiskSize": "1G", "transport": "tcp", "path": POOL_PATH}
    )  # fmt: skip
    with (
        RemotePoolLink(
            "vmpool", cfg, pair.client_key, local=runners["local"], known_hosts=[pair.known_hosts]
        ) as link,
        pytest.raises(NoSpace) as exc,
    ):
        link.connect()
    msg = str(exc.value)
    assert "remote host 127.0.0.1 cannot lend 1G of RAM for pool 'vmpool'" in msg
    assert "available and keeps 256M for itself" in msg
    assert leftovers(runners) == []
    remote = runners["remote"]
    assert remote.listdir("/sys/kernel/config/nvmet/subsystems") == []
    assert remote.run(["losetup", "--list", "--noheadings"]).stdout.strip() == ""
    assert remote.run(["test", "-d", link.spec.ram_dir]).returncode != 0  # nor its tmpfs
    _report(request, f"oversized connect refused: {msg}")


def test_growing_past_what_the_remote_can_lend_is_refused_and_the_pool_keeps_working(
    request, pair, runners
):
    spec = _spec(runners, "tcp")
    local, remote = runners["local"], runners["remote"]
    payload = os.urandom(PAYLOAD)
    cfg = RemoteHostConfig.model_validate(
        {"ssh": f"root@127.0.0.1:{pair.remote.ssh_port}", "rdmaIp": FABRIC["remote"],
         "ramdiskSize": RAM_SIZE, "transport": "tcp", "path": POOL_PATH}
    )  # fmt: skip
    with RemotePoolLink(
        "vmpool", cfg, pair.client_key, local=local, known_hosts=[pair.known_hosts]
    ) as link:
        try:
            link.connect()
            local.write_bytes(f"{POOL_PATH}/model.bin", payload)
            before = _fs_bytes(local, POOL_PATH)
            file_before = remote.run(["stat", "-c", "%s", spec.backing_file]).stdout
            with pytest.raises(NoSpace, match="cannot lend 960M of RAM for growing to 1G"):
                link.grow(1 << 30)
            assert _fs_bytes(local, POOL_PATH) == before
            assert remote.run(["stat", "-c", "%s", spec.backing_file]).stdout == file_before
            r = local.run(["sha256sum", f"{POOL_PATH}/model.bin"])
            assert r.stdout.split()[0] == hashlib.sha256(payload).hexdigest()
        finally:
            link.disconnect()
    assert leftovers(runners) == []


def _attach_with(runners, exported: RemotePoolSpec, connecting: RemotePoolSpec) -> PlanFailed:
    """Export as ``exported`` says, attach as ``connecting`` says: the plan must fail, and
    its rollback must leave both guests clean."""
    plan = Plan("mismatched connect", tuple(export_steps(exported) + attach_steps(connecting)))
    with pytest.raises(PlanFailed) as exc:
        execute(plan, runners)
    assert exc.value.rollback_errors == []
    assert leftovers(runners) == []
    return exc.value


def test_dhchap_a_wrong_or_missing_host_key_is_refused_by_the_target_the_right_one_works(
    request, runners
):
    """Someone on the fabric who spoofs our host NQN, with no key or a guessed one, is
    refused by the target's kernel; the connect with the key set over SSH gets in."""
    assert leftovers(runners) == []
    host_id = local_host_id(runners["local"])
    auth = FabricAuth(new_key(), new_key(), host_id)
    good = _spec(runners, "tcp", auth=auth, serial="5eed0000000000000001")

    t0 = time.monotonic()
    spoofed = _attach_with(runners, good, dataclasses.replace(good, auth=None))
    t_bare = time.monotonic() - t0
    assert spoofed.step.name == "connect"

    t0 = time.monotonic()
    guessed = dataclasses.replace(good, auth=dataclasses.replace(auth, host_key=new_key()))
    wrong = _attach_with(runners, good, guessed)
    t_wrong = time.monotonic() - t0
    assert wrong.step.name == "connect"
    for err in (spoofed, wrong):  # the keys never show in a message
        assert auth.host_key not in str(err) and auth.ctrl_key not in str(err)

    try:
        ctx = execute(connect_plan(good), runners)
        assert ctx["blockdev"].startswith("/dev/nvme")
        assert "qid 0: controller authenticated" in runners["local"].run(["dmesg"]).stdout
        modes = runners["remote"].run(
            ["stat", "-c", "%a %n", f"{good.host_entry}/dhchap_key",
             f"{good.host_entry}/dhchap_ctrl_key"]
        ).stdout.split("\n")  # fmt: skip
    finally:
        execute_teardown(disconnect_plan(good), runners)
    assert leftovers(runners) == []
    _report(request, f"DH-HMAC-CHAP: no key refused in {t_bare:.1f} s, a wrong key in "
                     f"{t_wrong:.1f} s, the right one connected; target key modes: "
                     f"{'; '.join(m for m in modes if m)}")  # fmt: skip


def test_a_target_that_is_not_our_export_is_never_formatted(request, runners):
    """Something else answers at the fabric address: an export we did not make (here: made
    by hand, asking for no key at all, which the host kernel accepts even though it holds a
    controller key). Its serial is not the one we chose, so nothing is formatted."""
    assert leftovers(runners) == []
    auth = FabricAuth(new_key(), new_key(), local_host_id(runners["local"]))
    ours = _spec(runners, "tcp", auth=auth, serial="5eed0000000000000002")
    rogue = dataclasses.replace(ours, auth=None, serial="0123456789abcdef0123")
    err = _attach_with(runners, rogue, ours)
    assert err.step.name == "check it is our export"
    assert "reports serial '0123456789abcdef0123', not the '5eed0000000000000002'" in str(err)
    _report(request, "a target asking no key is accepted by the host kernel; the serial "
                     "check refused it before mkfs")  # fmt: skip


def _fingerprint(pub: str) -> str:
    out = subprocess.run(["ssh-keygen", "-lf", pub], capture_output=True, text=True, check=True)
    return out.stdout.split()[1]


def test_unknown_host_key_is_refused_naming_its_fingerprint(pair, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(HostKeyError) as exc:
        _runner(pair, "remote", known_hosts=empty)
    fp = _fingerprint(str(pair.client_key.parent / "remote_host_key.pub"))
    assert fp in str(exc.value)
    assert f"[127.0.0.1]:{pair.remote.ssh_port}" in str(exc.value)


def test_changed_host_key_is_refused(pair, tmp_path):
    """known_hosts lists the *local* guest's key for the remote guest's address."""
    local_pub = (pair.client_key.parent / "local_host_key.pub").read_text().rsplit(" ", 1)[0]
    lying = tmp_path / "known_hosts"
    lying.write_text(f"[127.0.0.1]:{pair.remote.ssh_port} {local_pub}\n")
    with pytest.raises(HostKeyError, match="CHANGED") as exc:
        _runner(pair, "remote", known_hosts=lying)
    assert _fingerprint(str(pair.client_key.parent / "remote_host_key.pub")) in str(exc.value)


# --------------------------------------------------------------------------- the daemon
# speedloaderd runs in the "local" guest with two remote pools on the "remote" guest, one
# per transport, reached over the fabric (SSH to 192.168.100.1, host key in known_hosts).

GUEST_ROOT = "/srv/speedloader"
GUEST_CONFIG = f"{GUEST_ROOT}/config.json"
GUEST_LOG = f"{GUEST_ROOT}/engine.log"
GUEST_COLD = f"{GUEST_ROOT}/cold"
GUEST_KNOWN_HOSTS = "/etc/speedloader/known_hosts"
ENGINE_POOLS = {"vmtcp": ("tcp", 4420), "vmrdma": ("rdma", 4421)}
MODELS = ("tcp-model", "rdma-model", "cut-model")


@dataclasses.dataclass
class DaemonGuest:
    local: SshRunner
    models: dict[str, tuple[str, tuple[str, ...]]]  # name -> (sha256, tensor names)


@pytest.fixture(scope="session")
def daemon_guest(request, pair, tmp_path_factory) -> Iterator[DaemonGuest]:
    """The local guest with this machine's python (9p), a config and cold GGUF models."""
    local = _runner(pair, "local")
    share_host(local)
    config = {
        "modelsDir": f"{GUEST_ROOT}/models",
        "storage": {"path": GUEST_COLD, "type": "local"},
        "backend": {"type": "llamacpp"},
        "stateDir": f"{GUEST_ROOT}/state",
        "sshKeyPath": "/root/.ssh/id_ed25519",
        "remoteTiers": {
            "hosts": {
                name: {
                    "ssh": f"root@{FABRIC['remote']}",
                    "rdmaIp": FABRIC["remote"],
                    "ramdiskSize": RAM_SIZE,
                    "transport": transport,
                    "port": port,
                    "path": f"/mnt/{name}",
                }
                for name, (transport, port) in ENGINE_POOLS.items()
            }
        },
    }
    assert local.run(["mkdir", "-p", GUEST_COLD]).returncode == 0
    local.write_bytes(GUEST_CONFIG, json.dumps(config).encode())
    work = tmp_path_factory.mktemp("models")
    models = {}
    for name in MODELS:
        made = make_gguf(work / f"{name}.gguf", n_tensors=2, tensor_bytes=2 << 20)
        data = (work / f"{name}.gguf").read_bytes()
        local.write_bytes(f"{GUEST_COLD}/{name}.gguf", data)
        models[name] = (hashlib.sha256(data).hexdigest(), tuple(made.tensor_names))
    yield DaemonGuest(local, models)
    local.close()


@pytest.fixture
def agent(request, daemon_guest) -> Iterator[DaemonAgent]:
    t0 = time.monotonic()
    a = DaemonAgent(daemon_guest.local, GUEST_CONFIG, GUEST_LOG)
    _report(request, f"bus, polkitd and daemon up in the local guest in "
                     f"{time.monotonic() - t0:.1f} s")  # fmt: skip
    assert a.ready["ok"]
    yield a
    bye = a.close()
    assert bye.get("daemon_exit") == 0, bye  # SIGTERM: a clean stop, jobs ended


def _ok(answer: dict) -> dict:
    assert answer["ok"], answer.get("error", answer)
    return answer


def _read_back(daemon_guest: DaemonGuest, agent: DaemonAgent, model: str) -> str:
    """Read the model through the models dir with the GGUF reader; return the link target."""
    got = _ok(agent("read", rel=f"{model}.gguf"))
    assert (got["sha256"], tuple(got["tensors"])) == daemon_guest.models[model]
    return got["target"]


def _drop_caches(runner: SshRunner) -> None:
    """So that the next read of a pool file crosses the fabric, not the local page cache."""
    assert runner.run(["sync"]).returncode == 0
    assert runner.run(["tee", "/proc/sys/vm/drop_caches"], "3").returncode == 0


def _connect(agent: DaemonAgent, runners, pool: str) -> dict:
    transport = ENGINE_POOLS[pool][0]
    answer = _ok(agent("connect", pool=pool))
    # The Job's Step named the plan's steps in order (signals are coalesced at <= 10 Hz, so
    # a client may miss some) and it ended with every step done. Both guests have
    # DH-HMAC-CHAP, so the daemon's plan has the key steps and the serial check.
    some_keys = FabricAuth(new_key(), new_key())
    spec = _spec(runners, transport, auth=some_keys, serial="0")
    names = [s.name for s in connect_plan(spec).steps]
    seen = iter(names)
    assert answer["steps"] and all(step in seen for step in answer["steps"]), answer["steps"]
    assert answer["progress"] == 1.0
    assert f"pool {pool} connected to {FABRIC['remote']} over {transport}" in answer["message"]
    # the daemon authenticated: the target's entry for the guest holds the key it set
    host_key = runners["remote"].read_text(f"{spec.host_entry}/dhchap_key")
    assert host_key is not None and host_key.startswith("DHHC-1:00:"), host_key
    st = _ok(agent("status"))["pools"][pool]
    assert (st["kind"], st["state"], st["path"]) == ("nvmeof", "mounted", f"/mnt/{pool}")
    assert 0 < st["size"] <= RAM_SIZE
    return answer


def _engine_cycle(request, runners, daemon_guest, agent, pool: str, model: str) -> None:
    assert leftovers(runners) == [], "the guests are not clean before the test"
    local = runners["local"]
    t0 = time.monotonic()
    _connect(agent, runners, pool)
    t_connect = time.monotonic() - t0

    _ok(agent("promote", model=model, pool=pool))
    m = _ok(agent("status"))["models"][model]
    assert (m["state"], m["tier"]) == ("hot", pool)
    _drop_caches(local)
    assert _read_back(daemon_guest, agent, model) == f"/mnt/{pool}/{model}.gguf"

    t1 = time.monotonic()
    done = _ok(agent("disconnect", pool=pool))
    t_disconnect = time.monotonic() - t1
    assert "1 model(s) now served from cold storage" in done["message"]
    st = _ok(agent("status"))
    assert st["pools"][pool]["state"] == "unmounted"
    assert (st["models"][model]["state"], st["models"][model]["tier"]) == ("cold", "cold")
    assert _read_back(daemon_guest, agent, model) == f"{GUEST_COLD}/{model}.gguf"
    assert leftovers(runners) == []
    _report(
        request,
        f"daemon {ENGINE_POOLS[pool][0]} cycle: Connect {t_connect:.1f} s, "
        f"Disconnect (auto-demote) {t_disconnect:.1f} s, total {time.monotonic() - t0:.1f} s",
    )


def test_daemon_refuses_a_remote_host_with_the_wrong_key(pair, runners, daemon_guest, agent):
    """known_hosts in the local guest names another key for the remote's fabric address."""
    local = runners["local"]
    good = local.read_text(GUEST_KNOWN_HOSTS)
    impostor = (pair.client_key.parent / "local_host_key.pub").read_text().rsplit(" ", 1)[0]
    local.write_bytes(GUEST_KNOWN_HOSTS, f"{FABRIC['remote']} {impostor}\n".encode())
    try:
        answer = agent("connect", pool="vmtcp")
    finally:
        local.write_bytes(GUEST_KNOWN_HOSTS, good.encode())
    assert not answer["ok"]
    assert "CHANGED" in answer["error"]
    assert _fingerprint(str(pair.client_key.parent / "remote_host_key.pub")) in answer["error"]
    assert _ok(agent("status"))["pools"]["vmtcp"]["state"] == "unmounted"
    assert leftovers(runners) == []


def test_daemon_tcp_cycle_connect_promote_read_disconnect(request, runners, daemon_guest, agent):
    _engine_cycle(request, runners, daemon_guest, agent, "vmtcp", "tcp-model")


def test_daemon_rdma_cycle_over_soft_roce(request, runners, daemon_guest, agent, rxe):
    _engine_cycle(request, runners, daemon_guest, agent, "vmrdma", "rdma-model")


def test_daemon_fabric_cut_falls_back_to_cold_and_connect_restores(
    request, runners, daemon_guest, agent
):
    remote, local = runners["remote"], runners["local"]
    model, pool = "cut-model", "vmtcp"
    assert leftovers(runners) == []
    _connect(agent, runners, pool)
    _ok(agent("promote", model=model, pool=pool))
    assert _read_back(daemon_guest, agent, model) == f"/mnt/{pool}/{model}.gguf"

    t0 = time.monotonic()
    assert remote.run(["ip", "link", "set", "eth1", "down"]).returncode == 0
    try:
        st = _ok(agent("wait_pool", pool=pool, state="degraded", timeout=180))
        t_detect = time.monotonic() - t0
        assert (st["models"][model]["state"], st["models"][model]["tier"]) == ("cold", "cold")
        # loads keep working, from cold storage, while the pool is gone
        assert _read_back(daemon_guest, agent, model) == f"{GUEST_COLD}/{model}.gguf"
        log = agent.ready["log"]  # the daemon's log, in the sandbox while it runs
        lost = local.run(["grep", "-c", f"lost pool {pool}:", log]).stdout.strip()
        assert lost == "1"
    finally:
        assert remote.run(["ip", "link", "set", "eth1", "up"]).returncode == 0
    t1 = time.monotonic()
    _connect(agent, runners, pool)  # cleans up what the lost connect left, connects anew
    t_restore = time.monotonic() - t1
    _ok(agent("promote", model=model, pool=pool))
    _drop_caches(local)
    assert _read_back(daemon_guest, agent, model) == f"/mnt/{pool}/{model}.gguf"
    _ok(agent("disconnect", pool=pool))
    assert leftovers(runners) == []
    _report(request, f"daemon fabric cut: pool degraded and models cold after {t_detect:.1f} s; "
                     f"Connect restored it in {t_restore:.1f} s")  # fmt: skip


def test_daemon_remote_host_killed_mid_use_last_of_all(request, pair, runners, daemon_guest, agent):
    """The remote guest is killed (SIGKILL to its QEMU) while a model is hot on it: the
    model falls back to cold, the pool is degraded, and Disconnect detaches it here and
    says the remote export could not be removed. Runs last: the remote does not return."""
    local = runners["local"]
    model, pool = "cut-model", "vmtcp"
    assert leftovers(runners) == []
    _connect(agent, runners, pool)
    _ok(agent("promote", model=model, pool=pool))
    assert _read_back(daemon_guest, agent, model) == f"/mnt/{pool}/{model}.gguf"

    t0 = time.monotonic()
    pair.remote.kill()
    st = _ok(agent("wait_pool", pool=pool, state="degraded", timeout=180))
    t_detect = time.monotonic() - t0
    assert (st["models"][model]["state"], st["models"][model]["tier"]) == ("cold", "cold")
    assert _read_back(daemon_guest, agent, model) == f"{GUEST_COLD}/{model}.gguf"

    t1 = time.monotonic()
    gone = agent("disconnect", pool=pool)
    t_disconnect = time.monotonic() - t1
    assert not gone["ok"]
    assert (
        f"pool '{pool}' is disconnected here, but its export on {FABRIC['remote']} was not "
        "removed" in gone["error"]
    )
    assert "Disconnect again once the host is reachable" in gone["error"]
    assert _ok(agent("status"))["pools"][pool]["state"] == "unmounted"
    mounts = local.read_text("/proc/mounts")
    assert f"/mnt/{pool}" not in mounts and "/dev/nvme" not in mounts
    assert local.listdir("/sys/class/nvme") == []
    _report(
        request,
        f"daemon remote killed: pool degraded and models cold after {t_detect:.1f} s; "
        f"Disconnect detached it here in {t_disconnect:.1f} s",
    )
