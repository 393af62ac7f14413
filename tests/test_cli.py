"""slctl, the real program in a subprocess, against the real daemon on the test bus: as root,
as a member of the speedloader group and as an outsider. The JSON contract, exit codes,
one-line errors (never a traceback) and that a refused or bad command changes nothing."""

from __future__ import annotations

import json
import os
import pty
import pwd
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from speedloader_client.client import ROOT

from .buslab import ADMIN, GUEST, MiB, as_user

SLCTL = str(Path(sys.executable).with_name("slctl"))


def slctl(dl, *args: str, user: str | None = None, input: str | None = None, env=None):
    r = subprocess.run(
        as_user(user, [SLCTL, *args], dl.address),
        capture_output=True,
        text=True,
        timeout=300,
        input=input,
        env=env,
    )
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    return r


def one_error_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: "), r.stderr
    return lines[0]


# --- the JSON contract ---------------------------------------------------------------------


def test_status_json_contract(daemon):
    r = slctl(daemon, "status", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert set(data) == {"backend", "coldStorage", "scanProblems", "pools", "models", "jobs"}
    assert data["backend"] == {"type": "ollama", "apiUrl": None}
    cold = {"path": str(daemon.lab.cold), "state": "available", "problem": None}
    assert data["coldStorage"] == cold and data["scanProblems"] == []
    [pool] = data["pools"]
    assert set(pool) == {
        "name", "kind", "state", "path", "sizeBytes", "usedBytes", "speed", "heldBytes",
    }  # fmt: skip
    assert pool["heldBytes"] == 0
    assert pool["name"] == "local" and pool["kind"] == "tmpfs" and pool["state"] == "mounted"
    assert pool["path"] == str(daemon.lab.pool_path("local")) and pool["sizeBytes"] > 0
    names = {m["name"]: m for m in data["models"]}
    assert set(names) == {"tiny:1b", "small:3b", "team/coder:7b"}
    for m in data["models"]:
        assert set(m) == {
            "name", "format", "sizeBytes", "tier", "pinnedPool", "state", "problems",
            "loaded", "holders", "lastUsed", "loadCount", "useCount", "value", "why",
        }  # fmt: skip
        assert m["useCount"] == 0 and m["value"] == 0 and m["why"] == ""
        assert m["loaded"] is False and m["holders"] == []
        assert m["lastUsed"] is None and m["loadCount"] == 0  # no backend answers here
        assert m["problems"] == []
        assert m["tier"] == "cold" and m["state"] == "cold" and m["format"] == "ollama"
        assert m["sizeBytes"] > 0 and m["pinnedPool"] is None
    assert data["jobs"] == []


def test_promote_demote_round_trip_as_group_member(daemon):
    r = slctl(daemon, "promote", "tiny:1b", "small:3b", user=ADMIN)
    assert r.returncode == 0, r.stderr
    assert "promoted tiny:1b to pool local" in r.stdout
    assert "promoted small:3b to pool local" in r.stdout
    data = json.loads(slctl(daemon, "status", "--json", user=GUEST).stdout)
    tiers = {m["name"]: (m["tier"], m["state"]) for m in data["models"]}
    assert tiers["tiny:1b"] == ("local", "hot") and tiers["small:3b"] == ("local", "hot")
    assert data["pools"][0]["usedBytes"] > 0
    r = slctl(daemon, "demote", "tiny:1b", "small:3b", user=ADMIN)
    assert r.returncode == 0, r.stderr
    assert "demoted tiny:1b" in r.stdout
    data = json.loads(slctl(daemon, "status", "--json").stdout)
    assert all(m["tier"] == "cold" for m in data["models"])
    assert daemon.lab.pool_files("local") == []


def test_no_wait_prints_the_job_id_and_jobs_lists_it(daemon):
    r = slctl(daemon, "promote", "--no-wait", "team/coder:7b", user=ADMIN)
    assert r.returncode == 0, r.stderr
    job = int(r.stdout.strip())
    r = slctl(daemon, "jobs", "watch", "--until-idle")
    assert r.returncode == 0, r.stderr
    jobs = json.loads(slctl(daemon, "jobs", "--json").stdout)
    mine = [j for j in jobs if j["id"] == job]
    assert mine and mine[0]["operation"] == "promote" and mine[0]["state"] == "succeeded"
    assert mine[0]["model"] == "team/coder:7b" and mine[0]["bytesDone"] == mine[0]["bytesTotal"]
    assert mine[0]["startedByUid"] == pwd.getpwnam(ADMIN).pw_uid  # who may cancel it


def test_pin_unpin_and_pool_lifecycle(daemon):
    extra = daemon.lab.root / "pools" / "extra"
    # Adding and removing a pool is an admin's (root); the rest is the member's.
    steps = [
        (ADMIN, "pin", "small:3b", "local"),
        (ADMIN, "unpin", "small:3b"),
        (None, "pool", "add", "extra", "--size", "64M", "--speed", "50"),
        (ADMIN, "pool", "resize", "extra", "96M"),
        (ADMIN, "promote", "tiny:1b", "--pool", "extra"),
        (ADMIN, "pool", "disconnect", "extra"),
        (ADMIN, "pool", "connect", "extra"),
        (ADMIN, "pool", "disconnect", "extra"),
        (None, "pool", "remove", "extra"),
        (ADMIN, "rescan"),
        (ADMIN, "init"),
    ]
    for user, *step in steps:
        r = slctl(daemon, *step, user=user)
        assert r.returncode == 0, (step, r.stderr)
        if step[:2] == ["pool", "add"]:  # no --path: the daemon's <poolsRoot>/<name>
            assert f"at {extra}" in r.stdout, r.stdout
    data = json.loads(slctl(daemon, "status", "--json").stdout)
    assert [p["name"] for p in data["pools"]] == ["local"]
    tiny = next(m for m in data["models"] if m["name"] == "tiny:1b")
    assert tiny["tier"] == "cold", "disconnecting the pool must have demoted it"


def test_config_get_set_validate_path(daemon):
    r = slctl(daemon, "config", "get", "modelPlacement.defaultStrategy")
    assert (r.returncode, r.stdout.strip()) == (0, "fastest-fit")
    r = slctl(daemon, "config", "set", "modelPlacement.defaultStrategy", "round-robin", user=ADMIN)
    assert r.returncode == 0, r.stderr
    assert (
        slctl(daemon, "config", "get", "modelPlacement.defaultStrategy").stdout.strip()
        == "round-robin"
    )
    path = slctl(daemon, "config", "path").stdout.strip()
    assert path == str(daemon.lab.config_path)
    assert json.loads(Path(path).read_text())["modelPlacement"]["defaultStrategy"] == "round-robin"
    r = slctl(daemon, "config", "validate")
    assert r.returncode == 0 and r.stdout.strip() == f"{path}: valid"
    assert json.loads(slctl(daemon, "config", "show").stdout)["storage"]["path"] == str(
        daemon.lab.cold
    )


def test_health_json_and_exit_code(daemon):
    r = slctl(daemon, "health", "--json", user=GUEST)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] is True and isinstance(report["findings"], list)
    # Damage the models dir: a link pointing nowhere is found, and repaired with --repair.
    link = next(p for p in daemon.lab.models.rglob("sha256-*") if p.is_symlink())
    link.unlink()
    r = slctl(daemon, "health")
    assert r.returncode == 1 and "unhealthy" in r.stdout
    r = slctl(daemon, "health", "--repair", user=GUEST)
    assert r.returncode == 4
    r = slctl(daemon, "health", "--repair", user=ADMIN)
    assert r.returncode in (0, 1), r.stderr
    assert slctl(daemon, "health").returncode == 0
    assert link.is_symlink() and link.resolve().is_file()


# --- refusals and bad input: one line, the right code, nothing changed ------------------------


REFUSED = [
    ("promote", "tiny:1b"),
    ("demote", "tiny:1b"),
    ("pin", "tiny:1b", "local"),
    ("unpin", "tiny:1b"),
    ("pool", "resize", "local", "128M"),
    ("pool", "disconnect", "local"),
    ("pool", "connect", "local"),
    ("pool", "add", "x", "--path", "/tmp/sl-cli-x", "--size", "8M"),
    ("pool", "remove", "local"),
    ("config", "set", "modelPlacement.defaultStrategy", "fill-first"),
    ("rescan",),
    ("health", "--repair"),
]


@pytest.mark.parametrize("args", REFUSED, ids=[" ".join(a) for a in REFUSED])
def test_outsider_is_refused_with_exit_4(daemon, args):
    before = daemon.state()
    r = slctl(daemon, *args, user=GUEST)
    assert r.returncode == 4, (r.returncode, r.stderr)
    line = one_error_line(r)
    assert "not authorized" in line and "speedloader" in line
    assert daemon.state() == before


ADMIN_ONLY = [
    ("pool", "add", "x", "--size", "8M"),
    ("pool", "remove", "local"),
    ("config", "set", "modelsDir", "/tmp/sl-cli-elsewhere"),
    ("config", "set", "sshKeyPath", "/tmp/sl-cli-key"),
]


@pytest.mark.parametrize("args", ADMIN_ONLY, ids=[" ".join(a) for a in ADMIN_ONLY])
def test_member_is_refused_admin_changes_with_exit_4(daemon, args):
    before, file_before = daemon.state(), daemon.lab.config_path.read_bytes()
    r = slctl(daemon, *args, user=ADMIN)
    assert r.returncode == 4, (r.returncode, r.stderr)
    line = one_error_line(r)
    assert "org.speedloader.administer" in line and "needs an administrator" in line, line
    assert "run slctl as root" in line, line
    assert daemon.state() == before
    assert daemon.lab.config_path.read_bytes() == file_before


BAD = [
    (("promote", "no-such:model"), 2, "no-such:model"),
    (("promote", "tiny:1b", "--pool", "nowhere"), 2, "nowhere"),
    (("promote", "../../etc/passwd"), 2, "../../etc/passwd"),
    (("demote", "no-such:model"), 2, "no-such:model"),
    (("pin", "tiny:1b", "nowhere"), 2, "nowhere"),
    (("pin", "tiny:1b", "../x"), 2, "../x"),
    (("unpin", "tiny:1b"), 2, "not pinned"),
    (("pool", "resize", "local", "12Q"), 2, "12Q"),
    (("pool", "resize", "local", "--", "-1G"), 2, "-1G"),
    (("pool", "resize", "nowhere", "1G"), 2, "nowhere"),
    (("pool", "connect", "../x"), 2, "../x"),
    (("pool", "add", "x", "--path", "/tmp/sl-cli-x", "--size", "12Q"), 2, "12Q"),
    (("pool", "add", "../x", "--path", "/tmp/sl-cli-x", "--size", "8M"), 2, "../x"),
    (("pool", "remove", "nowhere"), 2, "nowhere"),
    (("jobs", "cancel", "999999"), 2, "999999"),
    (("config", "get", "no.such.key"), 2, "no.such.key"),
    (("config", "set", "pools.0.size", "12Q"), 2, "12Q"),
    (("config", "validate", "/nonexistent/config.json"), 2, "/nonexistent/config.json"),
]


@pytest.mark.parametrize(("args", "code", "mentions"), BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_input_one_line_and_nothing_changed(daemon, args, code, mentions):
    before = daemon.state()
    r = slctl(daemon, *args)
    assert r.returncode == code, (r.returncode, r.stderr)
    assert mentions in one_error_line(r)
    assert daemon.state() == before


def test_usage_errors_exit_2(daemon):
    for args in (
        ("promote",),
        ("pool", "resize", "local"),
        ("jobs", "cancel", "abc"),
        ("frobnicate",),
    ):
        r = slctl(daemon, *args)
        assert r.returncode == 2, (args, r.stderr)
        assert "Usage:" in r.stderr or "Error:" in r.stderr


def test_daemon_stopped_exits_3(daemon):
    daemon.stop()
    for args in (("status",), ("promote", "tiny:1b"), ("pool", "list")):
        r = slctl(daemon, *args)
        assert r.returncode == 3, r.stderr
        line = one_error_line(r)
        assert "speedloaderd is not running" in line and "systemctl start speedloaderd" in line


def test_no_bus_at_all_exits_3(daemon):
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/nonexistent/bus"}
    r = subprocess.run([SLCTL, "status"], capture_output=True, text=True, env=env)
    assert r.returncode == 3 and "not running" in one_error_line(r)


def test_help_everywhere_has_examples():
    for args in (
        (),
        ("status",),
        ("promote",),
        ("demote",),
        ("pin",),
        ("pool",),
        ("pool", "resize"),
        ("jobs",),
        ("config",),
        ("health",),
        ("install",),
        ("completion",),
        ("tiering",),
        ("tiering", "status"),
    ):
        r = subprocess.run([SLCTL, *args, "--help"], capture_output=True, text=True)
        assert r.returncode == 0, (args, r.stderr)
        assert "Usage: slctl" in r.stdout
    top = subprocess.run([SLCTL, "--help"], capture_output=True, text=True).stdout
    assert "Examples:" in top and "Exit codes" in top


def test_shell_completion_offers_model_and_pool_names(daemon):
    for shell in ("bash", "zsh", "fish"):
        r = slctl(daemon, "completion", shell)
        assert r.returncode == 0 and "_SLCTL_COMPLETE" in r.stdout
    offered = bash_complete(daemon, "slctl promote ti", 2)
    assert "plain,tiny:1b" in offered, offered
    offered = bash_complete(daemon, "slctl pool resize lo", 3)
    assert "plain,local" in offered, offered


def bash_complete(daemon, words: str, cword: int) -> list[str]:
    """What bash's completion of slctl offers for ``words`` (click's ``type,value`` lines),
    with the daemon on the test bus to ask for names."""
    env = {
        **os.environ,
        "DBUS_SYSTEM_BUS_ADDRESS": daemon.address,
        "_SLCTL_COMPLETE": "bash_complete",
        "COMP_WORDS": words,
        "COMP_CWORD": str(cword),
    }
    return subprocess.run([SLCTL], capture_output=True, text=True, env=env).stdout.splitlines()


# --- progress and Ctrl-C on a terminal --------------------------------------------------------


def run_on_tty(dl, args: list[str], on_output) -> tuple[int, str]:
    """Run slctl on a pseudo-terminal; ``on_output(text_so_far, fd)`` may type or signal."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec slctl with the test bus
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = dl.address
        os.environ["COLUMNS"] = "160"
        os.execv(SLCTL, [SLCTL, *args])
    out = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
            on_output(out.decode(errors="replace"), fd, pid)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def ctrl_c_then(answer: bytes):
    """An on_output for run_on_tty: once the progress line shows, press Ctrl-C (SIGINT to
    the process, as the terminal would) and give ``answer`` to the cancel-or-detach prompt."""
    sent = {"int": False, "answer": False}

    def on_output(text: str, fd: int, pid: int) -> None:
        if not sent["int"] and "%" in text and "ETA" in text:
            sent["int"] = True
            os.kill(pid, signal.SIGINT)
        if sent["int"] and not sent["answer"] and "[c]ancel" in text:
            sent["answer"] = True
            os.write(fd, answer)

    return on_output, sent


def test_progress_bar_then_ctrl_c_cancels(daemon_factory):
    dl = daemon_factory(big=1024 * MiB)
    dl.start()
    on_output, sent = ctrl_c_then(b"c\n")
    code, out = run_on_tty(dl, ["promote", dl.big], on_output)
    assert sent["int"] and sent["answer"], out
    assert "cancel" in out.lower() and code == 1, (code, out)
    assert dl.lab.pool_files("local") == []
    data = json.loads(slctl(dl, "status", "--json").stdout)
    assert next(m for m in data["models"] if m["name"] == dl.big)["tier"] == "cold"


def test_ctrl_c_detach_lets_the_job_finish(daemon_factory):
    dl = daemon_factory(big=1024 * MiB)
    dl.start()
    on_output, sent = ctrl_c_then(b"d\n")
    code, out = run_on_tty(dl, ["promote", dl.big], on_output)
    assert sent["answer"] and code == 130 and "detached from job" in out, (code, out)
    r = slctl(dl, "jobs", "watch", "--until-idle")
    assert r.returncode == 0
    data = json.loads(slctl(dl, "status", "--json").stdout)
    assert next(m for m in data["models"] if m["name"] == dl.big)["tier"] == "local"


def test_remote_pool_add_connect_failure_and_remove(daemon):
    from .test_bus_remote_pool import closed_port

    port = closed_port()
    far = str(daemon.lab.pool_path("far"))
    # Adding a remote tier is an admin's (root); connecting it is the member's.
    r = slctl(daemon, "pool", "add", "far", "--remote", f"root@127.0.0.1:{port}",
              "--address", "127.0.0.1", "--transport", "tcp", "--size", "64M",
              "--path", far)  # fmt: skip
    assert r.returncode == 0 and "slctl pool connect far" in r.stdout, r.stderr
    pools = {p["name"]: p for p in json.loads(slctl(daemon, "pool", "list", "--json").stdout)}
    assert pools["far"]["kind"] == "nvmeof" and pools["far"]["state"] == "unmounted"
    before = daemon.state()
    r = slctl(daemon, "pool", "connect", "far", user=ADMIN)
    assert r.returncode == 1 and "cannot connect over SSH" in r.stderr, r.stderr
    assert daemon.state()["objects"][f"{ROOT}/pools/far"] == before["objects"][f"{ROOT}/pools/far"]
    r = slctl(daemon, "pool", "add", "far", "--remote", "root@127.0.0.1", "--address",
              "127.0.0.1", "--size", "64M")  # fmt: skip
    assert r.returncode == 2 and "already exists" in one_error_line(r)
    assert slctl(daemon, "pool", "remove", "far").returncode == 0
    assert "far" not in json.loads(daemon.lab.config_path.read_text()).get("remoteTiers", {}).get(
        "hosts", {}
    )


REMOTE_BAD = [
    (("pool", "add", "x", "--path", "/tmp/sl-cli-x", "--size", "8M"), "poolsRoot"),
    (("pool", "add", "x", "--remote", "root@h", "--size", "8M"), "--address"),
    (
        (
            "pool",
            "add",
            "x",
            "--remote",
            "root@h;rm -rf /",
            "--address",
            "127.0.0.1",
            "--size",
            "8M",
        ),
        "root@h;rm -rf /",
    ),
    (
        ("pool", "add", "x", "--remote", "root@h", "--address", "not-an-ip", "--size", "8M"),
        "not-an-ip",
    ),
    (("pool", "add", "x", "--remote", "root@h", "--address", "127.0.0.1", "--size", "12Q"), "12Q"),
]


@pytest.mark.parametrize(("args", "mentions"), REMOTE_BAD, ids=[a[1] for a in REMOTE_BAD])
def test_bad_remote_pool_is_refused_and_not_saved(daemon, args, mentions):
    before = daemon.state()
    r = slctl(daemon, *args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert mentions in one_error_line(r)
    assert daemon.state() == before
