"""The README's product command works as written: scripts/demo, non-interactive, and in a
terminal with --keep."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from speedloader_lab.sandbox import REPO
from speedloaderd.pools import mounts_below

from .test_tui_tmux import Tmux


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


def test_demo_keep_in_a_terminal_outlives_the_dashboard(tmp_path):
    """In a terminal the demo opens the dashboard, whose subtitle says how another terminal
    reaches the daemon; with --keep, quitting the dashboard leaves the daemon serving (slctl
    from another shell, through the env file, sees the models) until Ctrl-C, which then
    cleans up."""
    if shutil.which("tmux") is None:
        pytest.fail("tmux is missing (Debian package tmux; scripts/setup installs it)")
    before = {m.mount_point for m in mounts_below("/tmp")}
    term = Tmux(tmp_path)
    try:
        term.start(f"{REPO / 'scripts' / 'demo'} --keep; echo demo-exited-$?")
        term.wait_for("another terminal: . /tmp/sl-demo-", timeout=600)
        term.wait_for("llama3:8b", timeout=120)  # the dashboard has the daemon's models
        term.tmux("send-keys", "-t", "t", "q")
        term.wait_for("still running (--keep)", timeout=120)
        text = term.seen.decode(errors="replace")
        (env_file,) = set(re.findall(r"\. (/tmp/sl-demo-[^/\s]+/env)\s", text))
        r = subprocess.run(
            ["sh", "-c", f". {env_file} && slctl status"],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        assert r.returncode == 0 and "llama3:8b" in r.stdout, r.stdout + r.stderr
        term.tmux("send-keys", "-t", "t", "C-c")
        term.wait_for("demo-exited-0", timeout=120)
    finally:
        term.close()
    assert "demo: stopping and cleaning up" in term.seen.decode(errors="replace")
    assert not os.path.exists(env_file), "the demo left its files"
    after = {m.mount_point for m in mounts_below("/tmp")}
    assert not {m for m in after - before if "sl-demo-" in m}, "the demo left a mount"


def test_demo_help_says_it_all():
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "Everything is removed at exit (with --keep, once you stop it)." in text, r.stdout
    assert "--web" in text and "--keep" in text and "--scripted" in text
