"""Shared fixtures. The suite runs as root: it mounts real tmpfs pools under /tmp."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from speedloaderd.pools import mounts_below


def pytest_configure(config):
    if os.geteuid() != 0:
        pytest.exit(
            "the speedloader suite must run as root (it mounts real tmpfs pools); use scripts/test",
            returncode=2,
        )


def unmount_below(root: Path) -> list[str]:
    """Unmount everything at or below ``root``, deepest first; return what could not go."""
    for info in mounts_below(root):
        r = subprocess.run(["umount", info.mount_point], capture_output=True)
        if r.returncode != 0:  # leave nothing behind even if a test leaked an open file
            subprocess.run(["umount", "-l", info.mount_point], capture_output=True)
    return [m.mount_point for m in mounts_below(root)]


@pytest.fixture
def workdir():
    """A world-traversable temp dir under /tmp; anything mounted below it is unmounted after."""
    d = Path(tempfile.mkdtemp(prefix="sl-test-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        leftover = unmount_below(d)
        shutil.rmtree(d, ignore_errors=True)
        assert not leftover, f"could not unmount {leftover}"


@pytest.fixture
def lab(workdir):
    """Cold storage + models dir + pools; asserts at teardown that cold storage is unchanged."""
    from .lab import Lab

    lab = Lab(workdir)
    yield lab
    lab.check_cold_unchanged()


@pytest.fixture(scope="session")
def sandbox():
    """A private system bus with the project's D-Bus policy and a real polkitd with the
    project's actions and rules (plus one test-only rule), and the test users."""
    from speedloader_lab.sandbox import REPO, Sandbox

    from .buslab import ASKER_RULE, check_user_can_run_python, ensure_users

    # The users stay: system accounts without a shell or home, and deleting them at the end
    # of one test session would pull them from under another running at the same time.
    ensure_users()
    extra = Path(tempfile.mkdtemp(prefix="sl-rules-", dir="/tmp"))
    (extra / "90-test-asker.rules").write_text(ASKER_RULE)
    try:
        with Sandbox(
            rules=[*sorted((REPO / "polkit").glob("*.rules")), extra / "90-test-asker.rules"]
        ) as sb:
            check_user_can_run_python(sb.address)
            yield sb
    finally:
        shutil.rmtree(extra, ignore_errors=True)


@pytest.fixture
def daemon_factory(sandbox, workdir):
    """Build (not start) a DaemonLab; stops its daemon and checks cold storage after."""
    from .buslab import DaemonLab

    labs = []

    def make(**kw):
        dl = DaemonLab(sandbox, workdir, **kw)
        labs.append(dl)
        return dl

    yield make
    for dl in labs:
        if dl.proc is not None:
            dl.stop()
        dl.lab.check_cold_unchanged()


@pytest.fixture
def daemon(daemon_factory):
    """speedloaderd running on the test bus over a small Ollama lab."""
    dl = daemon_factory()
    dl.start()
    return dl
