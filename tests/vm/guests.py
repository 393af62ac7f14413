"""Two QEMU guests with a real kernel, nvmet and sshd: "remote" (target) and "local" (host).

The kernel and the base initramfs come from ``vmlab/build`` (cached outside the repository,
in $SPEEDLOADER_VM_CACHE, default /var/cache/speedloader-vm). Keys are made per run: an SSH
client key and one host key per guest, appended to the base initrd as a second cpio archive,
so nothing secret is ever cached or committed, and the test's known_hosts holds exactly the
guests' keys (host key checking stays on).

Networking touches nothing but loopback: eth0 is QEMU user networking with ``restrict=on``
(the guest cannot reach out) and one hostfwd to 127.0.0.1 for SSH; eth1, the fabric, is a
UDP socket pair between the two QEMU processes on 127.0.0.1.

The "local" guest also sees this machine's /usr, the test venv and the checkout over 9p,
read-only (``share_host``), so the daemon's own code runs there on Debian's python3; it
holds the client key and a known_hosts naming the remote guest's fabric address, as an
admin's machine would (/etc/speedloader/known_hosts).

TCG only (``-accel tcg``): this machine's /dev/kvm does not boot a stock kernel.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "vmlab" / "build"
READY = "SPEEDLOADER-GUEST-READY"
FABRIC = {"remote": "192.168.100.1", "local": "192.168.100.2"}
MEMORY_MB = 512
BOOT_TIMEOUT = 300.0  # TCG boots take 20-30 s on an idle 2-core box; much more under load
VENV = Path(sys.prefix)  # the venv running the tests: its python is Debian's /usr/bin/python3
# 9p shares of the local guest: mount tag -> (path here = path in the guest)
SHARES = {"hostusr": Path("/usr"), "venv": VENV, "project": REPO}
PROJECT_IN_GUEST = "/project"


class CannotBoot(Exception):
    """This machine cannot run the guests; the message says what is missing."""


def cache_dir() -> Path:
    return Path(os.environ.get("SPEEDLOADER_VM_CACHE", "/var/cache/speedloader-vm"))


def preflight() -> None:
    """Raise CannotBoot naming what is missing (root, qemu, tools)."""
    if os.geteuid() != 0:
        raise CannotBoot("the VM tests need root (they build an initramfs with host binaries)")
    for tool in ("qemu-system-x86_64", "ssh-keygen", "cpio"):
        if shutil.which(tool) is None:
            raise CannotBoot(f"{tool} is not installed (see tests/vm/README.md for packages)")


def build_image() -> tuple[Path, float]:
    """Run vmlab/build (a no-op when up to date); return the cache dir and seconds taken."""
    t0 = time.monotonic()
    env = dict(os.environ, SPEEDLOADER_VM_CACHE=str(cache_dir()))
    r = subprocess.run([str(BUILD)], capture_output=True, text=True, env=env, check=False)
    if r.returncode == 3:
        raise CannotBoot("vmlab/build: " + (r.stderr.strip().splitlines() or ["?"])[-1])
    if r.returncode != 0:
        raise RuntimeError(f"vmlab/build failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return cache_dir(), time.monotonic() - t0


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path, comment: str) -> str:
    """A new ed25519 key pair at ``path`` (replacing any old one); returns the public key line."""
    for old in (path, path.with_suffix(".pub")):
        old.unlink(missing_ok=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return path.with_suffix(".pub").read_text().strip()


def overlay_initrd(base: Path, out: Path, files: dict[str, tuple[bytes, int]], work: Path) -> None:
    """``out`` = ``base`` + a cpio archive of ``files`` (path -> (content, mode)).

    The kernel unpacks concatenated archives in order, later files winning. An uncompressed
    archive must start on a 4-byte boundary, so the base is padded with zeros (skipped).
    """
    stage = work / "stage"
    shutil.rmtree(stage, ignore_errors=True)
    names = set()
    for rel, (content, mode) in files.items():
        p = stage / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content)
        p.chmod(mode)
        parts = Path(rel).parts
        names.update(str(Path(*parts[: i + 1])) for i in range(len(parts)))
    (stage / "root").chmod(0o700)
    (stage / "root" / ".ssh").chmod(0o700)
    listing = "".join(n + "\n" for n in sorted(names))
    archive = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet", "--owner", "0:0"],
        input=listing.encode(),
        cwd=stage,
        capture_output=True,
        check=True,
    ).stdout
    data = base.read_bytes()
    data += b"\0" * (-len(data) % 512)
    out.write_bytes(data + archive)


@dataclass
class Guest:
    name: str
    ssh_port: int
    console: Path
    proc: subprocess.Popen[bytes]
    ready_after: float = 0.0  # seconds from start to the READY line on the console

    def console_tail(self, n: int = 30) -> str:
        try:
            lines = self.console.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no console output)"
        return "\n".join(lines[-n:])

    def wait_ready(self, deadline: float, started: float) -> None:
        """Wait for the init's READY line (sshd is started just before it)."""
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"guest {self.name}: qemu exited with {self.proc.returncode}\n"
                    + self.console_tail()
                )
            if self.console.exists() and READY in self.console.read_text(errors="replace"):
                self.ready_after = time.monotonic() - started
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"guest {self.name} did not boot in time\n{self.console_tail()}")
            time.sleep(0.2)

    def kill(self) -> None:
        """Pull the plug: SIGKILL, no shutdown of anything in the guest."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # RAM-only guests: nothing to flush
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Pair:
    remote: Guest
    local: Guest
    client_key: Path
    known_hosts: Path
    boot_seconds: float
    build_seconds: float
    guests: list[Guest] = field(default_factory=list)


def _qemu_argv(
    cache: Path,
    initrd: Path,
    name: str,
    index: int,
    ssh_port: int,
    link_local: int,
    link_peer: int,
    console: Path,
) -> list[str]:
    append = f"console=ttyS0 panic=-1 quiet loglevel=4 sl.name={name} sl.ip1={FABRIC[name]}/24"
    shares = []
    if name == "local":
        for tag, path in SHARES.items():
            shares += ["-virtfs", f"local,path={path},mount_tag={tag},security_model=none,"
                                  "readonly=on"]  # fmt: skip
    return [
        "qemu-system-x86_64",
        "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "1", "-m", str(MEMORY_MB),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(cache / "vmlinuz"), "-initrd", str(initrd), "-append", append,
        "-serial", f"file:{console}",
        "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{ssh_port}-:22",
        "-device", f"virtio-net-pci,netdev=n0,mac=52:54:00:5e:00:{index:02x}",
        "-netdev", f"socket,id=n1,udp=127.0.0.1:{link_peer},localaddr=127.0.0.1:{link_local}",
        "-device", f"virtio-net-pci,netdev=n1,mac=52:54:00:5e:01:{index:02x}",
        "-device", "virtio-rng-pci",
        *shares,
    ]  # fmt: skip


def share_host(runner) -> None:  # noqa: ANN001 - an SshRunner into the local guest
    """Mount the 9p shares in the local guest: this machine's /usr over the guest's (the
    same binaries the initramfs copied, plus python3), the venv and the checkout; then
    build the guest's library cache."""
    r = runner.run(["modprobe", "-a", "9pnet_virtio", "9p"])
    assert r.returncode == 0, r.stderr
    for tag, path in SHARES.items():
        where = PROJECT_IN_GUEST if tag == "project" else str(path)
        if runner.run(["mountpoint", "-q", where]).returncode == 0:
            continue
        opts = "trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose"
        r = runner.run(["/bin/mkdir", "-p", where])
        assert r.returncode == 0, r.stderr
        r = runner.run(["/bin/mount", "-t", "9p", "-o", opts, tag, where])
        assert r.returncode == 0, f"mount {tag} at {where}: {r.stderr}"
    # A library cache as on any Debian host (ctypes.util.find_library, e.g. pyudev's libudev,
    # asks `/sbin/ldconfig -p`); the guest's /sbin is the initramfs's own.
    for argv in (["ln", "-sf", "/usr/sbin/ldconfig", "/sbin/ldconfig"], ["/sbin/ldconfig"]):
        r = runner.run(argv)
        assert r.returncode == 0, f"{argv}: {r.stderr}"


@contextlib.contextmanager
def booted_pair(work: Path) -> Iterator[Pair]:
    """Build (or reuse) the image, boot both guests, yield; always stop them."""
    preflight()
    cache, build_seconds = build_image()
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o700)
    client_pub = keygen(work / "id_ed25519", "speedloader-vm-test")
    ports = {"remote": free_port(), "local": free_port()}
    links = {"remote": free_port(socket.SOCK_DGRAM), "local": free_port(socket.SOCK_DGRAM)}
    known = []
    guests: list[Guest] = []
    started = time.monotonic()
    try:
        for index, name in enumerate(("remote", "local"), start=1):
            host_pub = keygen(work / f"{name}_host_key", f"{name}-host")
            known.append(f"[127.0.0.1]:{ports[name]} {host_pub.rsplit(' ', 1)[0]}\n")
            initrd = work / f"{name}.initrd"
            files = {
                "etc/ssh/ssh_host_ed25519_key": ((work / f"{name}_host_key").read_bytes(), 0o600),
                "root/.ssh/authorized_keys": (client_pub.encode() + b"\n", 0o600),
            }
            if name == "local":  # the daemon there reaches the remote guest over the fabric
                remote_pub = (work / "remote_host_key.pub").read_text().rsplit(" ", 1)[0]
                files |= {
                    "root/.ssh/id_ed25519": ((work / "id_ed25519").read_bytes(), 0o600),
                    "etc/speedloader/known_hosts": (
                        f"{FABRIC['remote']} {remote_pub}\n".encode(),
                        0o644,
                    ),
                }
            overlay_initrd(cache / "initramfs.gz", initrd, files, work)
            peer = "local" if name == "remote" else "remote"
            console = work / f"{name}.console"
            argv = _qemu_argv(cache, initrd, name, index, ports[name], links[name], links[peer],
                              console)  # fmt: skip
            with open(work / f"{name}.qemu.log", "wb") as log:
                proc = subprocess.Popen(
                    argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )  # fmt: skip
            guests.append(Guest(name, ports[name], console, proc))
        (work / "known_hosts").write_text("".join(known))
        deadline = started + BOOT_TIMEOUT
        for g in guests:
            g.wait_ready(deadline, started)
        yield Pair(
            remote=guests[0],
            local=guests[1],
            client_key=work / "id_ed25519",
            known_hosts=work / "known_hosts",
            boot_seconds=time.monotonic() - started,
            build_seconds=build_seconds,
            guests=guests,
        )
    finally:
        for g in guests:
            g.stop()


AGENT_TIMEOUT = 600.0  # one request: a connect over TCG under load takes a minute or two


class DaemonAgent:
    """tests/vm/daemon_agent.py in the local guest (a private bus, polkitd, speedloaderd
    and a bus client): one JSON line per request, one per answer."""

    def __init__(self, runner, config: str, log: str):  # noqa: ANN001 - SshRunner
        self.runner, self.log = runner, log
        env = f"PYTHONPATH={PROJECT_IN_GUEST} PYTHONDONTWRITEBYTECODE=1"
        command = (
            f"cd {PROJECT_IN_GUEST} && {env} {VENV}/bin/python -m tests.vm.daemon_agent "
            f"{config} 2>>{log}"
        )
        self.chan = runner._client.get_transport().open_session()
        self.chan.settimeout(AGENT_TIMEOUT)
        self.chan.exec_command(command)
        self.stdin = self.chan.makefile_stdin("wb")
        self.stdout = self.chan.makefile("r")
        self.ready = self._answer()

    def _answer(self) -> dict:
        import json

        line = self.stdout.readline()
        if not line:
            tail = self.runner.run(["tail", "-n", "30", self.log]).stdout
            raise RuntimeError(f"the daemon agent in the guest exited; its log ends:\n{tail}")
        return json.loads(line)

    def __call__(self, op: str, **args: object) -> dict:
        import json

        self.stdin.write((json.dumps({"op": op, **args}) + "\n").encode())
        self.stdin.flush()
        return self._answer()

    def close(self) -> dict:
        """Stop the daemon (SIGTERM) and the bus; the answer has the daemon's exit status."""
        try:
            return self("quit")
        finally:
            self.chan.close()
