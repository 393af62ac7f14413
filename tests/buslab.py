"""The bus lab: speedloaderd running as root on a private system bus with a real polkitd,
driven by root and by unprivileged users the tests create.

Users (made when missing, and kept: see the ``sandbox`` fixture):
- ``sl-test-admin``: in the ``speedloader`` group, which polkit/50-speedloader.rules grants
- ``sl-test-guest``: in no group; the policy's defaults refuse it
- ``sl-test-asker``: a test-only rule answers AUTH_ADMIN for it, i.e. "authentication
  required" with no agent to ask
"""

from __future__ import annotations

import asyncio
import functools
import grp
import hashlib
import json
import os
import pwd
import signal
import subprocess
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from speedloader_client.client import Client
from speedloader_lab.modelgen import OLLAMA_LAYER_TYPES, Blob, make_ollama_model
from speedloader_lab.sandbox import REPO, Sandbox
from speedloaderd.config import save_config

from .lab import Lab

T = TypeVar("T")
MiB = 1 << 20
GROUP = "speedloader"
ADMIN, GUEST, ASKER = "sl-test-admin", "sl-test-guest", "sl-test-asker"
TEST_USERS = (ADMIN, GUEST, ASKER)
BUSCLIENT = REPO / "tests" / "busclient.py"

ASKER_RULE = f"""// Test only: this user must authenticate, and there is no agent to ask.
polkit.addRule(function(action, subject) {{
    if (action.id.indexOf("org.speedloader.") == 0 && subject.user == "{ASKER}") {{
        return polkit.Result.AUTH_ADMIN;
    }}
}});
"""


def _exists(kind: str, name: str) -> bool:
    try:
        (pwd.getpwnam if kind == "user" else grp.getgrnam)(name)
        return True
    except KeyError:
        return False


def ensure_users() -> list[str]:
    """Create the group and test users that do not exist yet; return what was created."""
    made = []
    if not _exists("group", GROUP):
        subprocess.run(["groupadd", "--system", GROUP], check=True)
        made.append(f"group:{GROUP}")
    for user in TEST_USERS:
        if not _exists("user", user):
            subprocess.run(
                [
                    "useradd",
                    "--system",
                    "--user-group",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    user,
                ],
                check=True,
            )
            made.append(f"user:{user}")
    subprocess.run(["usermod", "-aG", GROUP, ADMIN], check=True)
    return made


def as_user(user: str | None, argv: list[str], address: str) -> list[str]:
    """``argv`` run as ``user`` (None: root) with a clean environment on the test bus."""
    env = [
        "env",
        f"DBUS_SYSTEM_BUS_ADDRESS={address}",
        f"PYTHONPATH={REPO}",
        "PATH=/usr/local/bin:/usr/bin:/bin",
        "LANG=C.UTF-8",
    ]
    if user is None:
        return [*env, *argv]
    pw = pwd.getpwnam(user)
    return [
        "setpriv",
        f"--reuid={pw.pw_uid}",
        f"--regid={pw.pw_gid}",
        "--init-groups",
        "--reset-env",
        "--",
        *env,
        *argv,
    ]


def check_user_can_run_python(address: str) -> None:
    """Unprivileged users run the project from this tree with this venv's python; say
    plainly if they cannot (a python inside root's home, a tree under a 0700 directory)."""
    r = subprocess.run(
        as_user(GUEST, [sys.executable, "-c", "import speedloader_client.client"], address),
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise RuntimeError(
            f"user {GUEST} cannot run {sys.executable} on {REPO}: {r.stderr.strip()[-300:]}\n"
            "run the suite with scripts/test (a venv from Debian's /usr/bin/python3) from a "
            "checkout every user can read"
        )


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@functools.cache
def zeros_sha256(size: int) -> str:
    h = hashlib.sha256()
    chunk = bytes(16 * MiB)
    left = size
    while left:
        n = min(left, len(chunk))
        h.update(chunk[:n])
        left -= n
    return "sha256:" + h.hexdigest()


def write_zero_blob(root: Path, size: int) -> Blob:
    """A big Ollama model layer that costs no disk: a sparse file of zeros."""
    blob = Blob(zeros_sha256(size), size, OLLAMA_LAYER_TYPES[0])
    path = root / blob.rel
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return blob


class DaemonLab:
    """A lab (cold storage, models dir, tmpfs pool) served by a real speedloaderd."""

    def __init__(self, sandbox: Sandbox, workdir: Path, big: int = 0, pool_size: int = 0):
        self.sandbox = sandbox
        self.lab = Lab(workdir)
        cold = self.lab.cold
        tiny = make_ollama_model(cold, "tiny:1b", (256 * 1024, 300))
        make_ollama_model(cold, "small:3b", (tiny.layers[0], 512 * 1024, 200))
        make_ollama_model(cold, "team/coder:7b", (1 * MiB,))
        self.big = "big:70b" if big else None
        if big:
            make_ollama_model(cold, "big:70b", (write_zero_blob(cold, big), 100))
        self.lab.seal()
        self.pool_size = pool_size or max(256 * MiB, 2 * big)
        self.config = self.lab.config(pools=(("local", self.pool_size, 100),))
        save_config(self.config, self.lab.config_path)
        self.proc: subprocess.Popen | None = None
        self._log_start = 0

    @property
    def address(self) -> str:
        return self.sandbox.address

    def start(self) -> None:
        self._log_start = len(self.log())  # the log file is appended to by each start
        self.proc = self.sandbox.start_daemon(self.lab.config_path)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        rc = self.sandbox.stop_daemon(self.proc, sig)
        self.proc = None
        return rc

    def log(self) -> str:
        return self.sandbox.daemon_log()

    def log_of_this_run(self) -> str:
        """What the daemon started last has logged (a line of an earlier run says nothing
        of this one: a test once took the first run's "watching" line for the second's)."""
        return self.log()[self._log_start :]

    async def client(self) -> Client:
        return await Client.connect(self.address)

    def run_as(self, user: str | None, steps: list[dict]) -> list[dict]:
        """Run ``steps`` through tests/busclient.py as ``user`` (None: root)."""
        r = subprocess.run(
            as_user(user, [sys.executable, str(BUSCLIENT), json.dumps(steps)], self.address),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, f"busclient as {user}: {r.stderr}"
        return json.loads(r.stdout)

    def state(self) -> dict[str, Any]:
        """Everything a client can see, plus what is in the pool and models dir on disk."""

        async def read() -> dict[str, Any]:
            async with await self.client() as c:
                return {
                    "objects": await c.managed_objects(),
                    "config": await c.manager("GetConfig"),
                }

        seen = run(read())
        seen["pool_files"] = (
            self.lab.pool_files("local") if self.lab.pool_path("local").exists() else None
        )
        seen["links"] = {
            str(p.relative_to(self.lab.models)): os.readlink(p)
            for p in sorted(self.lab.models.rglob("*"))
            if p.is_symlink()
        }
        return seen


def mounts_below(root: Path) -> list[str]:
    """Mount points at or below ``root``, from the kernel's own table."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == str(root) or point.startswith(str(root) + "/"):
            found.append(point)
    return sorted(found)
