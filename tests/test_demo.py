"""The README's product command works as written: scripts/demo, non-interactive."""

from __future__ import annotations

import os
import subprocess

import pytest

from speedloader_lab.sandbox import REPO
from speedloaderd.pools import mounts_below


@pytest.mark.parametrize("backend", ["ollama", "llamacpp", "huggingface"])
def test_demo_tour_runs_and_cleans_up(backend):
    before = {m.mount_point for m in mounts_below("/tmp")}
    r = subprocess.run(
        [str(REPO / "scripts" / "demo"), "--scripted", "--backend", backend],
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr
    assert r.stdout.count("promoted ") == 2 and "demoted " in r.stdout
    assert "healthy" in r.stdout and "demo: stopping and cleaning up" in r.stdout
    after = {m.mount_point for m in mounts_below("/tmp")}
    assert not {m for m in after - before if "sl-demo-" in m}, "the demo left a mount"
    cold = next(line.split()[-2] for line in r.stdout.splitlines() if "writing sample" in line)
    assert not os.path.exists(cold), "the demo left its files"
