"""slctl install --root: every file it writes, checked by the program that reads it."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from speedloader_lab.sandbox import REPO, Sandbox, SandboxError
from speedloaderd.config import parse_config

SLCTL = str(Path(sys.executable).with_name("slctl"))
# The venv's slctl imports the editable install's checkout (maybe another worktree):
# the code under test is this checkout's.
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
DAEMON = str(Path(sys.executable).with_name("speedloaderd"))
UNIT = "etc/systemd/system/speedloaderd.service"
BUS_CONF = "usr/share/dbus-1/system.d/org.speedloader.Speedloader1.conf"
ACTIVATION = "usr/share/dbus-1/system-services/org.speedloader.Speedloader1.service"
POLICY = "usr/share/polkit-1/actions/org.speedloader.policy"
RULES = "usr/share/polkit-1/rules.d/50-speedloader.rules"
TMPFILES = "usr/lib/tmpfiles.d/speedloader.conf"
MODULES = "usr/lib/modules-load.d/speedloader.conf"
COMPLETION = "usr/share/bash-completion/completions/slctl"
CONFIG = "etc/speedloader/config.json"
ALL = [UNIT, BUS_CONF, ACTIVATION, POLICY, RULES, TMPFILES, MODULES, COMPLETION, CONFIG]


def install(root: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            SLCTL,
            "install",
            "--root",
            str(root),
            "--yes",
            "--cold",
            "/srv/models",
            "--pool-size",
            "2G",
            *extra,
        ],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=ENV,
    )


@pytest.fixture
def staged(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "group").write_text("root:x:0:\n")
    (root / "etc" / "gshadow").write_text("root:*::\n")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    r = install(root)
    assert r.returncode == 0, r.stderr
    return root, r


def test_install_writes_every_file(staged):
    root, r = staged
    for rel in ALL:
        assert (root / rel).is_file(), rel
        assert f"/{rel}" in r.stdout
    assert "speedloader:x:" in (root / "etc" / "group").read_text()
    assert "systemd is not running here" in r.stdout


def test_unit_verifies_and_runs_the_installed_daemon(staged):
    root, _ = staged
    unit = (root / UNIT).read_text()
    assert f"ExecStart={DAEMON}" in unit and "Type=dbus" in unit
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze missing: scripts/setup installs the systemd package"
    r = subprocess.run([analyze, "verify", str(root / UNIT)], capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


def test_activation_file_points_at_the_daemon(staged):
    root, _ = staged
    service = configparser.ConfigParser()
    service.optionxform = str
    service.read(root / ACTIVATION)
    assert service["D-BUS Service"]["Exec"] == DAEMON


def test_xml_files_are_well_formed(staged):
    root, _ = staged
    xmllint = shutil.which("xmllint")
    assert xmllint, "xmllint missing: scripts/setup installs libxml2-utils"
    for rel in (POLICY, BUS_CONF):
        r = subprocess.run([xmllint, "--noout", str(root / rel)], capture_output=True, text=True)
        assert r.returncode == 0, (rel, r.stderr)


def test_dbus_daemon_and_polkitd_accept_the_installed_files(staged):
    """A bus with the installed policy starts; polkitd loads the installed actions."""
    root, _ = staged
    with Sandbox(policy=[root / BUS_CONF], actions=[root / POLICY], rules=[root / RULES]) as sb:
        r = subprocess.run(
            ["pkaction", "--action-id", "org.speedloader.promote", "--verbose"],
            env=sb.env,
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0 and "auth_admin_keep" in r.stdout, r.stdout + r.stderr


def test_a_broken_bus_policy_is_refused_by_dbus_daemon(tmp_path):
    """The check above can fail: dbus-daemon does refuse a bad policy file."""
    bad = tmp_path / "bad.conf"
    bad.write_text("<busconfig><policy user='root'><allow own=</policy></busconfig>")
    with pytest.raises(SandboxError, match="refused"), Sandbox(policy=[bad], polkit=False):
        pass


def test_first_config_validates_and_is_kept_on_reinstall(staged):
    root, _ = staged
    data = json.loads((root / CONFIG).read_text())
    config = parse_config(data)
    assert str(config.storage.path) == "/srv/models" and config.ramdisk.size == 2 << 30
    (root / CONFIG).write_text(json.dumps(data | {"_note": "mine"}))
    r = install(root)
    assert r.returncode == 0 and "kept /etc/speedloader/config.json" in r.stdout
    assert json.loads((root / CONFIG).read_text())["_note"] == "mine"


def test_bad_answers_are_refused(tmp_path):
    r = subprocess.run(
        [SLCTL, "install", "--root", str(tmp_path), "--yes", "--pool-size", "12Q"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=ENV,
    )
    assert r.returncode == 2 and r.stderr.startswith("error: pool size:") and "12Q" in r.stderr
    assert not (tmp_path / CONFIG).exists()
    r = subprocess.run(
        [SLCTL, "install", "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=ENV,
    )
    assert r.returncode == 2 and "--yes" in r.stderr


def test_uninstall_removes_what_install_wrote_but_keeps_config(staged):
    root, _ = staged
    models = root / "var" / "lib" / "speedloader" / "models"
    models.mkdir(parents=True)
    (models / "keep").write_text("x")
    r = subprocess.run(
        [SLCTL, "uninstall", "--root", str(root), "--yes"],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert r.returncode == 0, r.stderr
    for rel in ALL[:-1]:
        assert not (root / rel).exists(), rel
    assert (root / CONFIG).exists() and (models / "keep").exists()
    r = subprocess.run(
        [SLCTL, "uninstall", "--root", str(root), "--yes", "--purge"],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert r.returncode == 0 and not (root / CONFIG).exists()
    assert "speedloader:" not in (root / "etc" / "group").read_text()
    assert (models / "keep").exists()
