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
