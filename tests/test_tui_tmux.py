"""Black box: the installed ``speedloader-tui`` entry point in a real terminal (tmux),
against the real daemon. The package is installed from this tree into a throwaway venv
(so the console script, the stylesheet and the page template are those a user gets),
which sees the project venv's dependencies through a .pth line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from speedloader_lab.sandbox import REPO

TMUX = shutil.which("tmux")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """``speedloader-tui`` as pip installs it, in a venv of its own."""
    root = tmp_path_factory.mktemp("tui-install")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for pkg in ("speedloaderd", "speedloader_client", "speedloader_cli", "speedloader_tui"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(
        subprocess.check_output(
            [
                str(venv / "bin/python"),
                "-c",
                "import sysconfig; print(sysconfig.get_path('purelib'))",
            ],
            text=True,
        ).strip()
    )
    # The project venv's packages (textual, dbus-fast, pip...), not its editable installs.
    (site / "project-venv.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run(
        [
            str(venv / "bin/python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            str(src),
        ],
        check=True,
        cwd=root,
    )
    script = venv / "bin" / "speedloader-tui"
    assert script.exists(), "pip did not install the speedloader-tui console script"
    return script


class Tmux:
    """A private tmux server; the app's raw output also goes to a FIFO we read as it
    comes, so waiting for text is waiting for bytes, not polling the screen."""

    def __init__(self, tmp: Path):
        self.socket = tmp / "tmux.sock"
        self.fifo = tmp / "pane.fifo"
        os.mkfifo(self.fifo)
        self.seen = b""

    def tmux(self, *args: str, check: bool = True) -> str:
        r = subprocess.run(
            ["tmux", "-f", "/dev/null", "-S", str(self.socket), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and r.returncode != 0:
            raise AssertionError(f"tmux {args}: {r.stderr}")
        return r.stdout

    def start(self, command: str) -> None:
        self.tmux("new-session", "-d", "-s", "t", "-x", "120", "-y", "40", "sh")
        self.tmux("pipe-pane", "-t", "t", "-o", f"cat > {self.fifo}")
        self.reader = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK)
        self.tmux("send-keys", "-t", "t", command, "Enter")

    def wait_for(self, text: str, timeout: float = 60) -> None:
        import select

        needle = text.encode()
        while needle not in self.seen:
            ready, _, _ = select.select([self.reader], [], [], timeout)
            if not ready:
                raise AssertionError(f"{text!r} not drawn within {timeout} s:\n{self.screen()}")
            chunk = os.read(self.reader, 65536)
            if not chunk:
                raise AssertionError(f"the pane closed before {text!r} was drawn")
            self.seen += chunk

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "t", check=False)

    def close(self) -> None:
        self.tmux("kill-server", check=False)
        if hasattr(self, "reader"):
            os.close(self.reader)


def test_installed_entry_point_in_tmux(installed, daemon, tmp_path):
    if TMUX is None:
        pytest.fail(
            "tmux is missing (Debian package tmux; scripts/setup installs it)", pytrace=False
        )
    term = Tmux(tmp_path)
    try:
        term.start(
            f"env DBUS_SYSTEM_BUS_ADDRESS={daemon.address} TERM=xterm-256color "
            f'{installed}; echo "ex""it=$?"'  # typed as ex""it: only the echo matches
        )
        term.wait_for("COLD")
        term.wait_for("team/coder:7b")
        models = term.screen()
        term.tmux("send-keys", "-t", "t", "2")
        term.wait_for("Disconnect")
        tiers = term.screen()
        term.tmux("send-keys", "-t", "t", "q")
        term.wait_for("exit=")  # the shell is back
        after = term.screen()
    finally:
        term.close()
    assert "HOT" in models and "tiny:1b" in models and "small:3b" in models
    assert "local" in tiers and "mounted" in tiers and "speed 100" in tiers
    assert "exit=0" in after, after
    assert "Traceback" not in after
