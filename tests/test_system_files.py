"""The files an install puts in /usr/share and /etc, checked by the tools that read them."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from speedloader_lab.sandbox import REPO
from speedloaderd.bus.names import (
    ACTION_ADMINISTER,
    ACTION_CONFIGURE,
    ACTION_DEMOTE,
    ACTION_MANAGE_POOLS,
    ACTION_PIN,
    ACTION_PROMOTE,
    BUS_NAME,
)

MEMBER_ACTIONS = [ACTION_PROMOTE, ACTION_DEMOTE, ACTION_PIN, ACTION_MANAGE_POOLS, ACTION_CONFIGURE]
# The admin action asks every time: no "keep" window in which a hijacked session of an
# admin who just authenticated could repoint a root path.
ACTIONS = {a: "auth_admin_keep" for a in MEMBER_ACTIONS} | {ACTION_ADMINISTER: "auth_admin"}


def test_polkit_declares_every_action_with_safe_defaults(sandbox):
    """pkaction asks the real polkitd, which parsed polkit/org.speedloader.policy."""
    for action, active in ACTIONS.items():
        r = subprocess.run(
            ["pkaction", "--verbose", "--action-id", action],
            env=sandbox.env,
            capture_output=True,
            text=True,
            check=True,
        )
        lines = {
            k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in r.stdout.splitlines())
        }
        assert lines["implicit any"] == "no", r.stdout
        assert lines["implicit inactive"] == "no", r.stdout
        assert lines["implicit active"] == active, r.stdout
        assert lines["description"], r.stdout


def test_activation_file_names_the_bus_name_and_unit():
    service = configparser.ConfigParser()
    service.optionxform = str
    service.read(REPO / "dbus" / f"{BUS_NAME}.service")
    section = service["D-BUS Service"]
    assert section["Name"] == BUS_NAME
    assert section["User"] == "root"
    assert section["SystemdService"] == "speedloaderd.service"
    unit = (REPO / "systemd" / "speedloaderd.service").read_text()
    assert "Type=dbus" in unit and f"BusName={BUS_NAME}" in unit
    assert Path(section["Exec"]).name == "speedloaderd"
    assert f"ExecStart={section['Exec']}" in unit


def test_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    unit = (REPO / "systemd" / "speedloaderd.service").read_text()
    daemon = Path(sys.executable).with_name("speedloaderd")
    assert daemon.exists(), daemon
    (tmp_path / "speedloaderd.service").write_text(
        unit.replace("/usr/local/bin/speedloaderd", str(daemon))
    )
    r = subprocess.run(
        [analyze, "verify", str(tmp_path / "speedloaderd.service")], capture_output=True, text=True
    )
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


def test_tmpfiles_entry_parses():
    """Each line is type, path, mode, user, group, age (tmpfiles.d(5))."""
    lines = [
        ln.split()
        for ln in (REPO / "systemd" / "speedloader.tmpfiles.conf").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert ["d", "/var/lib/speedloader", "0755", "root", "root", "-"] in lines
    assert all(len(ln) == 6 and ln[1].startswith("/") for ln in lines)
