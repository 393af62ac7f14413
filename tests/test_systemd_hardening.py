"""systemd/speedloaderd.service, hardened and measured.

1. The exposure figure of `systemd-analyze security --offline=yes` is a regression guard:
   a change that loosens the unit fails here (and the README's table must follow).
2. Why the unit has no ProtectSystem=/ReadWritePaths=/PrivateTmp= (nor any setting that
   gives the daemon a mount namespace): reproduced with the kernel, step by step as
   systemd 252 sets a unit's namespace up (src/core/namespace.c, setup_namespace()).
3. The daemon still works under what the unit does set: the real daemon on the test bus,
   started through ``confine()`` below, which applies the unit's own lines the way
   systemd does (bounding set and no_new_privs by setpriv, then umask, MDWE and a seccomp
   filter built from the unit's SystemCallFilter= and RestrictAddressFamilies=), promotes
   a model into a tmpfs pool it mounted and demotes it again.
There is no systemd PID 1 on the test machine, so these are the closest experiments.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

# This checkout's unit (also when this file runs as the --confine launcher, outside pytest).
UNIT = Path(__file__).resolve().parent.parent / "systemd" / "speedloaderd.service"
# Where this unit stood when its hardening was measured (README, "Hardening"). Lower it
# when you tighten the unit; never raise it without a line in that table saying why.
EXPOSURE_AT_MOST = 4.8

# Settings that make systemd give the unit a mount namespace of its own (systemd 252,
# src/core/execute.c, exec_needs_mount_namespace()).
NAMESPACE_SETTINGS = {
    "ProtectSystem",
    "ProtectHome",
    "PrivateTmp",
    "PrivateDevices",
    "PrivateMounts",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ProtectProc",
    "ProcSubset",
    "ReadWritePaths",
    "ReadOnlyPaths",
    "InaccessiblePaths",
    "ExecPaths",
    "NoExecPaths",
    "BindPaths",
    "BindReadOnlyPaths",
    "TemporaryFileSystem",
    "RootDirectory",
    "RootImage",
    "MountImages",
    "ExtensionImages",
    "PrivateNetwork",
    "PrivateIPC",
    "MountFlags",
    "LogNamespace",
}


def analyze() -> str:
    found = shutil.which("systemd-analyze")
    assert found, "systemd-analyze missing: scripts/setup installs the systemd package"
    return found


def unit_for(tmp_path: Path) -> Path:
    """The shipped unit, with ExecStart at this venv's daemon (verify wants it to exist)."""
    daemon = Path(sys.executable).with_name("speedloaderd")
    assert daemon.exists(), daemon
    unit = tmp_path / "speedloaderd.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/speedloaderd", str(daemon)))
    return unit


def settings(unit: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if line.strip() and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_exposure_is_at_most_the_measured_figure_and_the_unit_verifies(tmp_path):
    unit = unit_for(tmp_path)
    r = subprocess.run(
        [analyze(), "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert found, r.stdout + r.stderr
    assert float(found.group(1)) <= EXPOSURE_AT_MOST, r.stdout
    r = subprocess.run([analyze(), "verify", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


def test_the_unit_sets_nothing_that_gives_the_daemon_its_own_mount_namespace(tmp_path):
    """The pools must be mounted in the host's namespace (see the experiment below)."""
    assert set(settings(unit_for(tmp_path))) & NAMESPACE_SETTINGS == set()


def test_the_unit_keeps_only_the_capabilities_the_daemon_uses(tmp_path):
    caps = set(" ".join(settings(unit_for(tmp_path))["CapabilityBoundingSet"]).split())
    assert caps == {"CAP_SYS_ADMIN", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_CHOWN"}


# --- the mount propagation experiment -------------------------------------------------

CLONE_NEWNS = 0x00020000
MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare_mounts() -> None:
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")


def mount(
    source: str | None, target: str | Path, fstype: str | None, flags: int, data: str = ""
) -> None:
    _check(
        _libc.mount(
            source.encode() if source else None,
            str(target).encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {source} {target} {flags:#x}",
    )


def mount_points() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {line.split()[4] for line in f}


def in_child(fn: Callable[[], dict]) -> dict:
    """Run ``fn`` in a forked child (its namespaces die with it); return its JSON answer."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        try:
            answer = {"ok": fn()}
        except BaseException as err:  # noqa: BLE001 - reported to the parent
            answer = {"error": repr(err)}
        os.write(w, json.dumps(answer).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    os.waitpid(pid, 0)
    answer = json.loads(text)
    assert "ok" in answer, answer.get("error")
    return answer["ok"]


def systemd_unit_namespace(unit_root: Path, read_write: Path) -> None:
    """What systemd 252 does for ProtectSystem=strict + ReadWritePaths=<read_write>:
    a new mount namespace, every mount made a slave ("so that nothing now mounted in the
    namespace shows up in the parent"), the whole tree bound recursively onto a staging
    root, the read-write path bound onto itself, the rest made read-only, the staging root
    moved onto /, then everything remounted with the MountFlags= propagation (shared by
    default) -- which, in systemd's words, "will not reestablish propagation from our side
    to the host, since what's disconnected is disconnected"."""
    unshare_mounts()
    mount(None, "/", None, MS_SLAVE | MS_REC)
    mount("/", unit_root, None, MS_BIND | MS_REC)
    inner = f"{unit_root}{read_write}"
    mount(inner, inner, None, MS_BIND | MS_REC)
    mount(None, unit_root, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
    os.chdir(unit_root)
    mount(str(unit_root), "/", None, MS_MOVE)
    os.chroot(".")
    os.chdir("/")
    mount(None, "/", None, MS_SHARED | MS_REC)


def propagation_experiment(base: Path) -> dict:
    """In an emulated host namespace whose / is shared (as systemd makes it at boot), start
    a 'service' in a unit namespace, and see which mounts cross in which direction."""
    unshare_mounts()  # the emulated host: a copy of this machine's tree, nothing leaks out
    mount(None, "/", None, MS_SHARED | MS_REC)
    pools, system = base / "pools", base / "system"
    for d in (pools / "by-service", pools / "by-host", system / "by-host", base / "root"):
        d.mkdir(parents=True)
    to_service_r, to_service_w = os.pipe()
    to_host_r, to_host_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the service
        seen: dict = {}
        try:
            systemd_unit_namespace(base / "root", pools)
            try:
                (system / "probe").write_text("x")
                seen["system_writable"] = True
            except OSError as err:
                seen["system_writable"] = err.strerror
            mount("speedloader-test", pools / "by-service", "tmpfs", 0, "size=1m")
            (pools / "by-service" / "copy").write_text("model bytes")
            seen["own_mount_usable"] = (pools / "by-service" / "copy").read_text()
            os.write(to_host_w, b"mounted\n")
            os.read(to_service_r, 16)  # the host has mounted its two
            points = mount_points()
            seen["sees_host_mount_in_rw_path"] = str(pools / "by-host") in points
            seen["sees_host_mount_in_ro_path"] = str(system / "by-host") in points
            (system / "by-host" / "copy").write_text("model bytes")
            seen["host_mount_in_ro_path_writable"] = True
        except BaseException as err:  # noqa: BLE001 - reported to the host
            seen["error"] = repr(err)
        os.write(to_host_w, json.dumps(seen).encode() + b"\n")
        os._exit(0)
    with os.fdopen(to_host_r) as from_service:
        assert from_service.readline() == "mounted\n", "the service did not get to mount"
        host_sees_service_mount = str(pools / "by-service") in mount_points()
        mount("speedloader-host", pools / "by-host", "tmpfs", 0, "size=1m")
        mount("speedloader-host", system / "by-host", "tmpfs", 0, "size=1m")
        os.write(to_service_w, b"go\n")
        seen = json.loads(from_service.readline())
    os.waitpid(pid, 0)
    return {"host_sees_service_mount": host_sees_service_mount, **seen}


@pytest.fixture
def base():
    d = Path(tempfile.mkdtemp(prefix="sl-propagation-", dir="/var/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)  # the mounts went with the namespaces


def test_a_pool_mounted_inside_a_protectsystem_namespace_never_reaches_the_host(base):
    """The experiment behind the unit's missing ProtectSystem=: inside a namespace set up
    as systemd does, the read-only part is read-only and a tmpfs mounted under the
    ReadWritePaths= path works -- but the host never sees it, so neither would Ollama.
    The other direction holds: mounts the host makes (even under a read-only path) reach
    the service, writable, which is what a future daemon could build on by asking PID 1
    to mount (systemd-mount) instead of calling mount(8) itself."""
    seen = in_child(lambda: propagation_experiment(base))
    assert "error" not in seen, seen
    assert seen["system_writable"] == "Read-only file system"
    assert seen["own_mount_usable"] == "model bytes"
    assert seen["host_sees_service_mount"] is False
    assert seen["sees_host_mount_in_rw_path"] is True
    assert seen["sees_host_mount_in_ro_path"] is True
    assert seen["host_mount_in_ro_path_writable"] is True


def test_without_a_unit_namespace_the_same_mount_reaches_the_host(base):
    """The control: the same service steps minus systemd's namespace (what the shipped unit
    gives the daemon) -- the host sees the pool. So the experiment above can tell."""

    def run() -> dict:
        unshare_mounts()
        mount(None, "/", None, MS_SHARED | MS_REC)
        (base / "pools" / "by-service").mkdir(parents=True)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the service, in the host's namespace
            mount("speedloader-test", base / "pools" / "by-service", "tmpfs", 0, "size=1m")
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        return {"status": status, "seen": str(base / "pools" / "by-service") in mount_points()}

    assert in_child(run) == {"status": 0, "seen": True}


# --- the daemon under the unit's restrictions -----------------------------------------

# systemd.exec: an allow-list always permits these (and the time and sleep calls, which
# @default holds): execve, exit, exit_group, getrlimit, rt_sigreturn, sigreturn.
ALWAYS_ALLOWED = {"execve", "exit", "exit_group", "getrlimit", "rt_sigreturn", "sigreturn"}
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ = 4
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
FAMILIES = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16}


class ScmpArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def expand(names: Sequence[str]) -> set[str]:
    """Syscall names of a SystemCallFilter= list, groups (and the groups they name)
    expanded by systemd itself."""
    calls = {n for n in names if not n.startswith("@")}
    todo, seen = [n for n in names if n.startswith("@")], set()
    while todo:
        group = todo.pop()
        if group in seen:
            continue
        seen.add(group)
        out = subprocess.run(
            [analyze(), "syscall-filter", "--no-pager", group],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for line in out.splitlines()[1:]:  # the first line is the group's own name
            item = line.strip()
            if item.startswith("@"):
                todo.append(item)
            elif item and not item.startswith("#"):
                calls.add(item)
    return calls


def syscall_allow_list(unit: dict[str, list[str]]) -> set[str]:
    """systemd's semantics: the first line allows (no ~), each ~ line then takes away."""
    allowed: set[str] = set()
    for value in unit["SystemCallFilter"]:
        if value.startswith("~"):
            allowed -= expand(value[1:].split())
        else:
            allowed |= expand(value.split())
    return allowed | ALWAYS_ALLOWED


def confine(argv: list[str]) -> None:
    """Apply the shipped unit's umask, MemoryDenyWriteExecute=, SystemCallFilter=,
    SystemCallErrorNumber= and RestrictAddressFamilies= to this process, then exec argv.
    (setpriv, run before this, did NoNewPrivileges= and CapabilityBoundingSet=.)"""
    unit = settings(UNIT)
    os.umask(int(unit["UMask"][0], 8))
    if unit.get("MemoryDenyWriteExecute") == ["yes"]:
        # The kernel's own form of what systemd 252 builds from seccomp rules on mmap and
        # mprotect: no mapping may become writable and executable.
        libc = ctypes.CDLL(None, use_errno=True)
        _check(libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0), "PR_SET_MDWE")
    errno_name = unit["SystemCallErrorNumber"][0]
    import errno

    seccomp = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    seccomp.seccomp_init.restype = ctypes.c_void_p
    seccomp.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    seccomp.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(ScmpArgCmp),
    ]
    ctx = seccomp.seccomp_init(0x00050000 | getattr(errno, errno_name))  # SCMP_ACT_ERRNO
    assert ctx, "seccomp_init failed"
    allowed = syscall_allow_list(unit)
    families = " ".join(unit["RestrictAddressFamilies"]).split()
    for name in sorted(allowed - {"socket"}):
        nr = seccomp.seccomp_syscall_resolve_name(name.encode())
        if nr >= 0:  # not every name exists on this architecture
            _check(seccomp.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, nr, 0, None), name)
    socket_nr = seccomp.seccomp_syscall_resolve_name(b"socket")
    for family in families:  # socket() only for the listed families
        cmp = ScmpArgCmp(0, SCMP_CMP_EQ, FAMILIES[family], 0)
        _check(
            seccomp.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, socket_nr, 1, ctypes.byref(cmp)),
            family,
        )
    _check(seccomp.seccomp_load(ctypes.c_void_p(ctx)), "seccomp_load")
    os.execv(argv[0], argv)


def confined_python(tmp_path: Path) -> Path:
    """An executable that runs ``python ARGS`` under the unit's restrictions: the
    Sandbox starts the daemon with it in place of the interpreter."""
    caps = " ".join(settings(UNIT)["CapabilityBoundingSet"]).split()
    bounding = ",".join(["-all", *(f"+{c.removeprefix('CAP_').lower()}" for c in caps)])
    wrapper = tmp_path / "confined-python"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"exec setpriv --no-new-privs --inh-caps=-all --bounding-set={bounding} -- "
        f'{sys.executable} {Path(__file__).resolve()} --confine {sys.executable} "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


def test_the_daemon_promotes_and_demotes_under_the_units_restrictions(daemon_factory, tmp_path):
    from .buslab import run

    dl = daemon_factory()
    assert not os.path.ismount(dl.lab.pool_path("local"))
    dl.proc = dl.sandbox.start_daemon(dl.lab.config_path, python=str(confined_python(tmp_path)))
    status = proc_status(dl.proc.pid)
    # It really is confined: the filter, no_new_privs, and only the unit's capabilities.
    assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1", status
    assert (
        int(status["CapEff"], 16)
        == int(status["CapBnd"], 16)
        == (
            1 << 21 | 1 << 2 | 1 << 3 | 1 << 0  # SYS_ADMIN, DAC_READ_SEARCH, FOWNER, CHOWN
        )
    ), status

    async def scenario() -> tuple:
        async with await dl.client() as c:
            await c.subscribe()
            promoted = await c.follow_job(await c.promote("small:3b"), timeout=120)
            hot = dl.lab.pool_files("local")
            demoted = await c.follow_job(await c.demote("small:3b"), timeout=120)
            return promoted, hot, demoted

    promoted, hot, demoted = run(scenario())
    assert promoted.success, promoted.message + dl.log()
    assert hot, "nothing was copied into the pool"
    # mount(8) ran under the filter, and its tmpfs is in this (the host's) namespace.
    assert os.path.ismount(dl.lab.pool_path("local"))
    assert demoted.success, demoted.message + dl.log()
    assert dl.proc.poll() is None, dl.log()
    assert "Operation not permitted" not in dl.log(), dl.log()


PROBE = """
import ctypes, os, socket
libc = ctypes.CDLL(None, use_errno=True)
libc.swapon(b"/nonexistent", 0)
print("swapon", os.strerror(ctypes.get_errno()))
try:
    socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
    print("vsock", "made")
except OSError as err:
    print("vsock", err.strerror)
"""


def test_the_confinement_does_refuse_what_the_unit_filters(tmp_path):
    """The control for the test above: the same probe, bare and confined. swapon (@swap,
    filtered out) and an AF_VSOCK socket (not in RestrictAddressFamilies=) work, or fail
    for their own reason, bare; confined, both are refused with EPERM."""
    bare = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
    assert bare.stdout.splitlines() == ["swapon No such file or directory", "vsock made"], (
        bare.stdout + bare.stderr
    )
    wrapper = confined_python(tmp_path)
    confined = subprocess.run([str(wrapper), "-c", PROBE], capture_output=True, text=True)
    assert confined.stdout.splitlines() == [
        "swapon Operation not permitted",
        "vsock Operation not permitted",
    ], confined.stdout + confined.stderr


if __name__ == "__main__":
    if sys.argv[1:2] == ["--confine"]:
        confine(sys.argv[2:])
