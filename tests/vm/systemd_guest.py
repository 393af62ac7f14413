"""One QEMU guest booting Debian 12 with systemd as PID 1, for tests/test_vm_systemd.py.

The disk image is built once by ``tests/vm/systemd-image`` (mmdebstrap, Debian's kernel and
initramfs) into $SPEEDLOADER_VM_CACHE/systemd and booted per session through a qcow2
copy-on-write overlay, so the cached image is never changed. The session gives the guest what
is per run over a read-only 9p share ("seed"), read by the image's sl-seed.service before sshd
starts: an SSH host key and root's authorized key (nothing secret is cached), and a wheelhouse
(the project's wheel, built from this checkout, and its dependencies) so that the guest can
``pip install`` the project without any network.

Networking touches nothing but loopback: QEMU user networking with ``restrict=on`` and one
hostfwd to 127.0.0.1 for SSH. TCG only (``-accel tcg``): this machine's /dev/kvm does not boot
a stock kernel.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko

from .guests import CannotBoot, cache_dir, free_port, keygen

REPO = Path(__file__).resolve().parents[2]
IMAGE_SCRIPT = Path(__file__).with_name("systemd-image")
MEMORY_MB = 1024
BOOT_TIMEOUT = 600.0  # a TCG boot of a full systemd: ~1 min idle, much more under load
VENV = Path(sys.prefix)  # the host's test venv: its pip builds the wheels


@dataclass
class Result:
    rc: int
    out: str
    err: str


def preflight() -> None:
    if os.geteuid() != 0:
        raise CannotBoot("the systemd guest needs root (mmdebstrap builds its image)")
    for tool in ("qemu-system-x86_64", "qemu-img", "mmdebstrap", "mke2fs", "ssh-keygen"):
        if shutil.which(tool) is None:
            raise CannotBoot(f"{tool} is not installed (scripts/setup installs it)")


def image_dir() -> Path:
    return cache_dir() / "systemd"


def build_image() -> float:
    """Run tests/vm/systemd-image (a stamp check when up to date); return seconds taken."""
    t0 = time.monotonic()
    env = dict(os.environ, SPEEDLOADER_VM_CACHE=str(cache_dir()))
    r = subprocess.run([str(IMAGE_SCRIPT)], capture_output=True, text=True, env=env, check=False)
    if r.returncode == 3:
        raise CannotBoot("tests/vm/systemd-image: " + (r.stderr.strip().splitlines() or ["?"])[-1])
    if r.returncode != 0:
        raise RuntimeError(f"tests/vm/systemd-image failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return time.monotonic() - t0


def _dependencies_key() -> str:
    return hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:16]


def wheelhouse(seed: Path) -> None:
    """``seed/wheels``: the project's wheel from this checkout's files (tracked and new, as
    they are now) and its dependencies' wheels (cached per pyproject.toml: pip fetches them
    once from the package index)."""
    src = seed.parent / "src"
    shutil.rmtree(src, ignore_errors=True)
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    src.mkdir()
    for name in filter(None, files):
        rel = Path(os.fsdecode(name))
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    out = seed / "wheels"
    out.mkdir(parents=True)
    deps = cache_dir() / "systemd" / f"wheels-{_dependencies_key()}"
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "wheel", "-q"]
    if not deps.is_dir():
        tmp = deps.with_name(deps.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run([*pip, "-w", str(tmp), str(src)], check=True, capture_output=True)
        for w in tmp.glob("speedloader-*.whl"):
            w.unlink()
        tmp.rename(deps)
    for w in deps.glob("*.whl"):
        shutil.copy2(w, out / w.name)
    subprocess.run(
        [*pip, "--no-deps", "--no-build-isolation", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
    )
    shutil.rmtree(src)


BOOT_SH = """\
set -e
install -d -m 0700 /root/.ssh
install -m 0600 /seed/authorized_keys /root/.ssh/authorized_keys
install -m 0600 /seed/ssh_host_ed25519_key /etc/ssh/ssh_host_ed25519_key
install -m 0644 /seed/ssh_host_ed25519_key.pub /etc/ssh/ssh_host_ed25519_key.pub
install -m 0755 /seed/sl-with-agent /seed/vt-type /usr/local/bin/
"""

# A keyboard for the guest's virtual consoles (polkit counts a session as local only when it
# has a seat, and only the VTs belong to seat0; a serial or SSH login has none). TIOCSTI
# puts the bytes in the console's input queue; root may (CAP_SYS_ADMIN, kernel 6.1).
VT_TYPE = """\
#!/usr/bin/python3
import fcntl, os, sys, termios
fd = os.open(f"/dev/tty{sys.argv[1]}", os.O_RDWR | os.O_NOCTTY)
for b in sys.argv[2].encode():
    fcntl.ioctl(fd, termios.TIOCSTI, bytes([b]))
"""

# A person's terminal with a polkit agent, as systemctl does it: pkttyagent registers for
# this process ($$; it closes its notify fd once registered), which then becomes slctl (exec:
# same pid and start time, so polkit finds the agent for slctl's bus name) and the agent asks
# on the terminal. Registered for a parent instead, polkit finds no agent for slctl.
WITH_AGENT = """\
#!/bin/bash
exec 4< <(pkttyagent --process $$ --notify-fd 3 --fallback 3>&1 1>/dev/tty)
read -r -u 4 _ || true
exec slctl "$@"
"""


@dataclass
class SystemdGuest:
    ssh_port: int
    console: Path
    proc: subprocess.Popen[bytes]
    client: paramiko.SSHClient
    known_hosts: Path
    client_key: Path
    sshd_after: float  # seconds from qemu's start to sshd answering

    def console_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.console.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no console output)"

    def run(self, script: str, timeout: float = 600.0, check: bool = True) -> Result:
        """``script`` in root's bash; ``check``: a non-zero exit fails with its output."""
        _in, out, err = self.client.exec_command(f"bash -c {_quote(script)}", timeout=timeout)
        o = out.read().decode(errors="replace")
        e = err.read().decode(errors="replace")
        rc = out.channel.recv_exit_status()
        if check and rc != 0:
            raise AssertionError(f"in the guest, exit {rc}: {script}\n{o}\n{e}")
        return Result(rc, o, e)

    def screen(self, vt: int) -> str:
        """The text on virtual console ``vt`` now, one line per row (/dev/vcsa: rows and
        columns in its first two bytes, then a character and an attribute per cell)."""
        raw = base64.b64decode(self.run(f"base64 -w0 /dev/vcsa{vt}").out)
        rows, cols = raw[0], raw[1]
        cells = raw[4::2]
        return "\n".join(
            cells[r * cols : (r + 1) * cols].decode("cp437").rstrip() for r in range(rows)
        )

    def wait_screen(self, vt: int, pattern: str, after: str = "", timeout: float = 300.0) -> str:
        """Until the regex ``pattern`` matches the screen (below the last ``after``, if
        given); returns the screen."""
        deadline = time.monotonic() + timeout
        while True:
            shown = self.screen(vt)
            below = shown.rpartition(after)[2] if after else shown
            if (not after or after in shown) and re.search(pattern, below):
                return shown
            if time.monotonic() > deadline:
                raise AssertionError(f"tty{vt}: no {pattern!r} in time; the screen:\n{shown}")
            time.sleep(1)

    def type(self, vt: int, text: str) -> None:
        """Type ``text`` on virtual console ``vt``, as its keyboard would (vt-type)."""
        self.run(f"vt-type {vt} {_quote(text)}")

    def reboot(self, timeout: float = BOOT_TIMEOUT) -> float:
        """``systemctl reboot`` (the overlay keeps what was installed); reconnect once sshd
        answers again. Returns seconds from the reboot's start to a new SSH connection."""
        boot_id = self.run("cat /proc/sys/kernel/random/boot_id").out
        t0 = time.monotonic()
        with contextlib.suppress(Exception):
            self.run("systemctl reboot", timeout=30, check=False)
        self.client.close()
        deadline = t0 + timeout
        while True:
            with contextlib.suppress(Exception):
                _wait_ssh(self.ssh_port, self.proc, self.console, deadline)
                self.client = _connect(self.ssh_port, "root", self.known_hosts, self.client_key)
                if self.run("cat /proc/sys/kernel/random/boot_id").out != boot_id:
                    return time.monotonic() - t0
                self.client.close()  # still the old boot, going down
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the guest did not come back from reboot\n{self.console_tail()}"
                )
            time.sleep(2)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()  # the overlay is thrown away: nothing to flush
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _connect(port: int, user: str, known_hosts: Path, key: Path) -> paramiko.SSHClient:
    """An SSH connection to the guest, its host key checked against ``known_hosts``."""
    c = paramiko.SSHClient()
    c.load_host_keys(str(known_hosts))
    c.set_missing_host_key_policy(paramiko.RejectPolicy())
    c.connect(
        "127.0.0.1", port=port, username=user, key_filename=str(key), look_for_keys=False,
        allow_agent=False, timeout=60, banner_timeout=120, auth_timeout=120,
    )  # fmt: skip
    return c


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def _wait_ssh(port: int, proc: subprocess.Popen[bytes], console: Path, deadline: float) -> None:
    """Until sshd sends its banner on the forwarded port (QEMU accepts before it does)."""
    while True:
        if proc.poll() is not None:
            tail = console.read_text(errors="replace")[-3000:] if console.exists() else ""
            raise RuntimeError(f"qemu exited with {proc.returncode}\n{tail}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 5) as s:
            s.settimeout(10)
            if s.recv(4).startswith(b"SSH-"):
                return
        if time.monotonic() > deadline:
            tail = console.read_text(errors="replace")[-3000:] if console.exists() else ""
            raise RuntimeError(f"the systemd guest did not start sshd in time\n{tail}")
        time.sleep(1)


@contextlib.contextmanager
def booted(work: Path, extra_seed: dict[str, bytes] | None = None) -> Iterator[SystemdGuest]:
    """Build (or reuse) the image, boot it over a fresh overlay, yield; always stop it."""
    preflight()
    build_image()
    img = image_dir()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    work.chmod(0o700)
    seed = work / "seed"
    seed.mkdir()
    client_pub = keygen(work / "id_ed25519", "speedloader-systemd-test")
    host_pub = keygen(seed / "ssh_host_ed25519_key", "systemd-guest")
    (seed / "authorized_keys").write_text(client_pub + "\n")
    (seed / "boot.sh").write_text(BOOT_SH)
    (seed / "sl-with-agent").write_text(WITH_AGENT)
    (seed / "vt-type").write_text(VT_TYPE)
    for name, data in (extra_seed or {}).items():
        (seed / name).write_bytes(data)
    wheelhouse(seed)
    port = free_port()
    (work / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub.rsplit(' ', 1)[0]}\n")
    overlay = work / "overlay.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(img / "root.img"),
         str(overlay)],
        check=True,
    )  # fmt: skip
    console = work / "console"
    append = "root=LABEL=root rw console=ttyS0 net.ifnames=0 panic=-1 quiet loglevel=4"
    argv = [
        "qemu-system-x86_64",
        "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "1", "-m", str(MEMORY_MB),
        "-nodefaults", "-no-user-config", "-display", "none",
        "-kernel", str(img / "vmlinuz"), "-initrd", str(img / "initrd.img"), "-append", append,
        "-drive", f"file={overlay},if=virtio,format=qcow2,cache=unsafe",
        "-serial", f"file:{console}",
        "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22",
        "-device", "virtio-net-pci,netdev=n0",
        "-device", "virtio-rng-pci",
        "-virtfs", f"local,path={seed},mount_tag=seed,security_model=none,readonly=on",
    ]  # fmt: skip
    started = time.monotonic()
    with open(work / "qemu.log", "wb") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    guest: SystemdGuest | None = None
    try:
        _wait_ssh(port, proc, console, started + BOOT_TIMEOUT)
        sshd_after = time.monotonic() - started
        client = _connect(port, "root", work / "known_hosts", work / "id_ed25519")
        guest = SystemdGuest(
            port, console, proc, client, work / "known_hosts", work / "id_ed25519",
            sshd_after,
        )  # fmt: skip
        yield guest
    finally:
        if guest is not None:
            guest.stop()
        elif proc.poll() is None:
            proc.kill()
            proc.wait()


__all__ = ["CannotBoot", "Result", "SystemdGuest", "booted"]
