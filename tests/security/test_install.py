"""Issue 9, finding 10c: `slctl install --root DIR` (run as root) must never write, or
unlink, outside DIR through a link planted inside it.

Each test plants a symbolic link (or a file) where the installer would go, pointing at a
victim directory or file the test made, runs the installed `slctl` as a subprocess, and
asserts the attack fails with one line naming the link and a non-zero exit, AND that
nothing changed: the victim (names, content, mode, owner, mtime of every entry and of the
directory itself, so a file made and removed again shows too) and the staging tree.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from speedloader_lab.sandbox import REPO

SLCTL = str(Path(sys.executable).with_name("slctl"))
# The venv's slctl imports the editable install's checkout; this one must run.
ENV = {**os.environ, "PYTHONPATH": str(REPO)}

# Every directory the installer writes into, and the file it writes there.
WRITES = {
    "unit": "etc/systemd/system/speedloaderd.service",
    "dbus policy": "usr/share/dbus-1/system.d/org.speedloader.Speedloader1.conf",
    "dbus activation": "usr/share/dbus-1/system-services/org.speedloader.Speedloader1.service",
    "polkit actions": "usr/share/polkit-1/actions/org.speedloader.policy",
    "polkit rules": "usr/share/polkit-1/rules.d/50-speedloader.rules",
    "tmpfiles": "usr/lib/tmpfiles.d/speedloader.conf",
    "modules-load": "usr/lib/modules-load.d/speedloader.conf",
    "completion": "usr/share/bash-completion/completions/slctl",
    "config": "etc/speedloader/config.json",
}


def snapshot(top: Path) -> dict[str, tuple]:
    """Everything about ``top`` and below that a write through a link could change."""
    seen = {}
    for path in [top, *sorted(top.rglob("*"))]:
        st = path.lstat()
        body = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        link = os.readlink(path) if path.is_symlink() else None
        seen[str(path.relative_to(top))] = (
            st.st_mode,
            st.st_uid,
            st.st_gid,
            st.st_size,
            st.st_mtime_ns,
            body,
            link,
        )
    return seen


def slctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SLCTL, *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=ENV,
        timeout=120,
    )


def install(root: Path) -> subprocess.CompletedProcess:
    return slctl("install", "--root", str(root), "--yes", "--cold", "/srv/models",
                 "--pool-size", "1G")  # fmt: skip


@pytest.fixture
def victim(tmp_path) -> Path:
    """A directory outside the staging tree with a file of each name the installer writes."""
    v = tmp_path / "victim"
    v.mkdir()
    for rel in WRITES.values():
        (v / Path(rel).name).write_text(f"victim's own {Path(rel).name}\n")
        (v / Path(rel).name).chmod(0o600)
    (v / "group").write_text("root:x:0:\n")
    return v


@pytest.fixture
def stage(tmp_path) -> Path:
    root = tmp_path / "stage"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "group").write_text("root:x:0:\n")
    (root / "etc" / "gshadow").write_text("root:*::\n")
    return root


def assert_refused(r: subprocess.CompletedProcess, link: Path) -> None:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: refusing"), r.stderr
    assert str(link) in lines[0] and "symbolic link" in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    assert "wrote" not in r.stdout, "a refused tree must get no file at all"


@pytest.mark.parametrize("place", sorted(WRITES))
def test_a_link_planted_as_a_destination_directory_is_refused(place, stage, victim):
    """DIR/<the directory the installer writes into> -> victim: refused, victim intact."""
    rel_dir = Path(WRITES[place]).parent
    (stage / rel_dir).parent.mkdir(parents=True, exist_ok=True)
    (stage / rel_dir).symlink_to(victim)
    before_victim, before_stage = snapshot(victim), snapshot(stage)

    r = install(stage)

    assert_refused(r, stage / rel_dir)
    assert snapshot(victim) == before_victim
    assert snapshot(stage) == before_stage


@pytest.mark.parametrize("component", ["usr", "usr/share", "etc/systemd"])
def test_a_link_higher_up_the_path_is_refused(component, stage, victim):
    (stage / component).parent.mkdir(parents=True, exist_ok=True)
    (stage / component).symlink_to(victim)
    before_victim, before_stage = snapshot(victim), snapshot(stage)

    r = install(stage)

    assert_refused(r, stage / component)
    assert snapshot(victim) == before_victim
    assert snapshot(stage) == before_stage


@pytest.mark.parametrize("place", sorted(WRITES))
def test_a_link_planted_as_a_destination_file_is_refused(place, stage, victim):
    """DIR/<a file the installer writes> -> the victim's file (a rename would replace the
    link, not write through it, but the tree is not what slctl made: refused all the same)."""
    rel = WRITES[place]
    (stage / rel).parent.mkdir(parents=True, exist_ok=True)
    (stage / rel).symlink_to(victim / Path(rel).name)
    before_victim, before_stage = snapshot(victim), snapshot(stage)

    r = install(stage)

    assert_refused(r, stage / rel)
    assert snapshot(victim) == before_victim
    assert snapshot(stage) == before_stage


@pytest.mark.parametrize("name", ["group", "gshadow", "group.lock", "gshadow-"])
def test_a_link_among_the_group_files_is_refused_before_groupadd_runs(name, stage, victim):
    """groupadd --prefix reads and replaces <DIR>/etc/group* by path: a link there would
    copy the victim into the staging tree. slctl refuses before groupadd starts."""
    (stage / "etc" / name).unlink(missing_ok=True)
    (stage / "etc" / name).symlink_to(victim / "group")
    before_victim = snapshot(victim)

    r = install(stage)

    assert r.returncode == 1 and str(stage / "etc" / name) in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1
    assert snapshot(victim) == before_victim
    assert "wrote" not in r.stdout and "created group" not in r.stdout
    assert os.readlink(stage / "etc" / name) == str(victim / "group")


def test_groupadd_is_refused_when_others_could_swap_the_group_files(stage, victim):
    (stage / "etc").chmod(0o777)
    r = install(stage)
    assert r.returncode == 1 and "refusing to run groupadd" in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1 and "wrote" not in r.stdout
    assert "speedloader" not in (stage / "etc" / "group").read_text()


def test_a_root_that_is_itself_a_link_is_refused(tmp_path, victim):
    stage = tmp_path / "stage-link"
    stage.symlink_to(victim)
    before_victim = snapshot(victim)

    r = install(stage)

    assert_refused(r, stage)
    assert snapshot(victim) == before_victim


def test_uninstall_never_unlinks_through_a_planted_link(stage, victim):
    """After a clean install, DIR/etc/systemd/system is swapped for a link to a victim
    holding a file of the unit's name: uninstall refuses and removes nothing anywhere."""
    assert install(stage).returncode == 0
    unit_dir = stage / "etc" / "systemd" / "system"
    (unit_dir / "speedloaderd.service").unlink()
    unit_dir.rmdir()
    unit_dir.symlink_to(victim)
    before_victim, before_stage = snapshot(victim), snapshot(stage)

    r = slctl("uninstall", "--root", str(stage), "--yes", "--purge")

    assert r.returncode == 1 and str(unit_dir) in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1 and "removed" not in r.stdout
    assert snapshot(victim) == before_victim
    assert snapshot(stage) == before_stage


# --- a link swapped in while the installer works -------------------------------------


def test_a_directory_swapped_for_a_link_right_after_the_installer_made_it(
    stage, victim, monkeypatch
):
    """The race a check-then-open-by-path installer loses, driven: the instant the
    installer's mkdir of DIR/etc/systemd returns, the test moves that directory away and
    puts a link to the victim in its place, before the installer descends into it. The
    installer must refuse the link by name and leave the victim as it was."""
    from speedloader_cli.errors import CliError
    from speedloader_cli.install import Tree

    real_mkdir = os.mkdir
    swapped = []

    def mkdir_then_swap(path, mode=0o777, *, dir_fd=None):
        real_mkdir(path, mode, dir_fd=dir_fd)
        if path == "systemd" and not swapped:
            os.rename(stage / "etc" / "systemd", stage / "etc" / "moved-away")
            (stage / "etc" / "systemd").symlink_to(victim)
            swapped.append(path)

    before_victim = snapshot(victim)
    monkeypatch.setattr(os, "mkdir", mkdir_then_swap)
    with Tree(stage) as tree, pytest.raises(CliError) as refused:
        tree.write(WRITES["unit"], "[Unit]\n")
    monkeypatch.undo()

    assert swapped, "the installer never made etc/systemd: the race was not run"
    assert str(stage / "etc" / "systemd") in str(refused.value)
    assert "symbolic link" in str(refused.value)
    assert snapshot(victim) == before_victim
    assert list((stage / "etc" / "moved-away").iterdir()) == []
