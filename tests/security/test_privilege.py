"""The privilege model, attacked: a ``speedloader`` group member moves models and operates
the pools the admin configured, and nothing more. Whatever names a path, a host, a key or a
size of remote RAM is an admin's (polkit action ``org.speedloader.administer``).

Each test runs the real daemon as root on the test bus with the real polkitd, and calls it
as the member (sl-test-admin) through tests/busclient.py. An attack must fail with a named
error AND change nothing: the victim files the test planted (content, mode, owner), the
config file (byte for byte), the mounts, and the daemon must still be serving.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
from pathlib import Path

import pytest

from speedloader_client.client import JOB, MANAGER, MODEL, POOL, ROOT
from speedloaderd.config import dump_config

from ..buslab import ADMIN, MiB, mounts_below, run

MEMBER = ADMIN  # sl-test-admin is the group member; "admin" in its name is historical
FAR = f"{ROOT}/pools/far"


def call(member: str, sig: str = "", *args, path: str = ROOT, iface: str = MANAGER) -> dict:
    return {"path": path, "iface": iface, "member": member, "sig": sig, "args": list(args)}


def member_uid() -> int:
    return pwd.getpwnam(MEMBER).pw_uid


def give_to_member(*paths: Path) -> None:
    uid = member_uid()
    for p in paths:
        os.chown(p, uid, uid, follow_symlinks=False)


def fingerprint(path: Path) -> tuple[bytes, int, int, int]:
    """What an attack on a victim file would change: content, mode, owner, group."""
    st = os.stat(path, follow_symlinks=False)
    return path.read_bytes(), st.st_mode, st.st_uid, st.st_gid


def make_victim(where: Path, name: str = "victim", text: str = "root's own file\n") -> Path:
    where.mkdir(parents=True, exist_ok=True)
    victim = where / name
    victim.write_text(text)
    victim.chmod(0o600)
    return victim


def config_with(dl, **changes) -> str:
    """The daemon's current config with top-level keys replaced, as SetConfig's argument."""
    data = json.loads(dl.state()["config"])
    data.update(changes)
    return json.dumps(data)


def still_serving(dl) -> None:
    """The daemon answers, and it still serves the lab it started with."""

    async def read():
        async with await dl.client() as c:
            return await c.get_all(ROOT, MANAGER)

    props = run(read())
    assert props["ModelsDir"] == str(dl.lab.models) and props["ConfigValid"], props
    assert dl.proc is not None and dl.proc.poll() is None


def refused_and_unchanged(dl, user: str | None, steps: list[dict], error: str) -> list[dict]:
    """Run ``steps`` as ``user``; each must fail with ``error`` and the daemon's visible
    state and its config file must be exactly as before."""
    before, file_before = dl.state(), dl.lab.config_path.read_bytes()
    results = dl.run_as(user, steps)
    for step, result in zip(steps, results, strict=True):
        assert result.get("error") == error, (step["member"], step["args"][:1], result)
        assert "Traceback" not in result["message"]
    assert dl.lab.config_path.read_bytes() == file_before, "the config file changed"
    assert dl.state() == before
    still_serving(dl)
    return results


# --- finding 1: modelsDir pointed at a directory the member owns --------------------------


def test_member_cannot_move_the_models_dir_into_its_own_directory(daemon, workdir):
    victim = make_victim(workdir / "etc-like")
    victim_before = fingerprint(victim)
    trap = workdir / "trap"
    manifests = trap / "manifests" / "registry.ollama.ai" / "library" / "tiny"
    manifests.mkdir(parents=True)
    (trap / ".speedloader-models-dir").write_text("")  # the marker, planted by the member
    (manifests / "1b").symlink_to(victim)  # where the daemon would write tiny:1b's manifest
    give_to_member(trap, *trap.rglob("*"))

    [result] = refused_and_unchanged(
        daemon, MEMBER, [call("SetConfig", "s", config_with(daemon, modelsDir=str(trap)))],
        "NotAuthorized",
    )  # fmt: skip
    assert "modelsDir" in result["message"]
    assert fingerprint(victim) == victim_before
    assert os.readlink(manifests / "1b") == str(victim)


# --- finding 2: stateDir whose journal is a link to a victim directory ---------------------


def test_member_cannot_move_the_state_dir_onto_a_victim_directory(daemon, workdir):
    victims = workdir / "victims"
    files = [make_victim(victims, f"file{i}.db", f"row {i}\n") for i in range(3)]
    before = {f: fingerprint(f) for f in files}
    state = workdir / "evil-state"
    state.mkdir()
    (state / "journal").symlink_to(victims)
    give_to_member(state, state / "journal")

    refused_and_unchanged(
        daemon, MEMBER, [call("SetConfig", "s", config_with(daemon, stateDir=str(state)))],
        "NotAuthorized",
    )  # fmt: skip
    assert sorted(victims.iterdir()) == sorted(files)
    assert {f: fingerprint(f) for f in files} == before


# --- finding 7: AddPool wherever a member names ---------------------------------------------


def pool_attack_paths(dl, workdir: Path) -> dict[str, Path]:
    """Three places a pool must never be made: inside a root-only directory, over an
    existing (empty) directory someone else made, and through a link into cold storage."""
    root_only = workdir / "root-only"
    root_only.mkdir(mode=0o700)
    empty = workdir / "someones-dir"
    empty.mkdir()
    give_to_member(empty)
    into_cold = workdir / "to-cold"
    into_cold.symlink_to(dl.lab.cold)
    return {
        "inside a root-only dir": root_only / "pool",
        "over an existing empty dir": empty,
        "through a link into cold storage": into_cold / "pool",
    }


def test_member_cannot_add_a_pool_anywhere(daemon, workdir):
    paths = pool_attack_paths(daemon, workdir)
    mounted = mounts_below(workdir)
    steps = [call("AddPool", "sssu", "evil", str(p), "64M", 100) for p in paths.values()]
    results = refused_and_unchanged(daemon, MEMBER, steps, "NotAuthorized")
    assert all("administer" in r["message"] for r in results), results
    assert mounts_below(workdir) == mounted
    assert list((workdir / "root-only").iterdir()) == []
    assert list((workdir / "someones-dir").iterdir()) == []
    # Cold storage is fingerprinted by the lab: the daemon_factory fixture checks it after.


def test_even_root_adds_local_pools_only_under_the_pools_root(daemon, workdir):
    paths = pool_attack_paths(daemon, workdir)
    mounted = mounts_below(workdir)
    steps = [call("AddPool", "sssu", "evil", str(p), "64M", 100) for p in paths.values()]
    results = refused_and_unchanged(daemon, None, steps, "InvalidArgument")
    expected = daemon.lab.root / "pools" / "evil"
    for r in results:
        assert "poolsRoot" in r["message"] and str(expected) in r["message"], r
    assert mounts_below(workdir) == mounted
    # The one place it may go: <poolsRoot>/<name>, which an empty path means.
    [added] = daemon.run_as(None, [call("AddPool", "sssu", "extra", "", "64M", 100)])
    assert added == {"ok": f"{ROOT}/pools/extra"}, added
    assert str(daemon.lab.root / "pools" / "extra") in mounts_below(workdir)


# --- finding 9 (who may): remote tiers are an admin's -----------------------------------------


@pytest.fixture
def remote_daemon(daemon_factory):
    """The lab plus a configured (never connected) remote tier ``far``, set by root."""
    dl = daemon_factory()
    config = dump_config(dl.config)
    config["remoteTiers"] = {
        "hosts": {
            "far": {
                "ssh": "root@127.0.0.1:9",
                "rdmaIp": "127.0.0.1",
                "ramdiskSize": "64M",
                "transport": "tcp",
                "path": str(dl.lab.pool_path("far")),
            }
        }
    }
    dl.lab.config_path.write_text(json.dumps(config))
    dl.start()
    return dl


def remote_edits(dl) -> dict[str, str]:
    """SetConfig arguments, each one remote-tier change a member must not make."""

    def edited(change) -> str:
        data = json.loads(dl.state()["config"])
        change(data, data["remoteTiers"]["hosts"]["far"])
        return json.dumps(data)

    new_host = {"ssh": "root@10.9.9.9", "rdmaIp": "10.9.9.9", "ramdiskSize": "1P"}
    return {
        "add a host": edited(lambda d, far: d["remoteTiers"]["hosts"].update(evil=new_host)),
        "rdmaIp": edited(lambda d, far: far.update(rdmaIp="10.9.9.9")),
        "ramdiskSize": edited(lambda d, far: far.update(ramdiskSize="1P")),
        "ssh": edited(lambda d, far: far.update(ssh="root@10.9.9.9")),
        "sshKeyPath": edited(lambda d, far: d.update(sshKeyPath="/home/mallory/.ssh/id")),
        "path": edited(lambda d, far: far.update(path="/etc/far")),
        "remove a host": edited(lambda d, far: d["remoteTiers"]["hosts"].clear()),
    }


def test_member_cannot_change_remote_tiers(remote_daemon):
    edits = remote_edits(remote_daemon)
    steps = [call("SetConfig", "s", text) for text in edits.values()]
    results = refused_and_unchanged(remote_daemon, MEMBER, steps, "NotAuthorized")
    for what, r in zip(edits, results, strict=True):
        key = "sshKeyPath" if what == "sshKeyPath" else "remoteTiers"
        assert "administer" in r["message"] and f"changing {key} " in r["message"], (what, r)


def test_member_cannot_resize_remote_ram(remote_daemon):
    """Refused by polkit before anything else: the pool is not even connected, which would
    otherwise be the error."""
    step = call("Resize", "s", "1P", path=FAR, iface=POOL)
    [r] = refused_and_unchanged(remote_daemon, MEMBER, [step], "NotAuthorized")
    assert "administer" in r["message"]
    [as_root] = remote_daemon.run_as(None, [step])
    assert as_root.get("error") != "NotAuthorized", as_root


def test_member_keeps_strategy_pins_and_speeds(remote_daemon):
    """The split is not "deny all": what only steers placement stays the member's."""
    dl = remote_daemon
    data = json.loads(dl.state()["config"])
    data["modelPlacement"] = {"defaultStrategy": "round-robin", "pinned": {"tiny:1b": "far"}}
    data["pools"][0]["speed"] = 150
    data["remoteTiers"]["hosts"]["far"]["speed"] = 70
    [r] = dl.run_as(MEMBER, [call("SetConfig", "s", json.dumps(data))])
    assert r == {"ok": None}, r
    saved = json.loads(dl.lab.config_path.read_text())
    assert saved["modelPlacement"]["defaultStrategy"] == "round-robin"
    assert saved["modelPlacement"]["pinned"] == {"tiny:1b": "far"}
    assert saved["pools"][0]["speed"] == 150
    assert saved["remoteTiers"]["hosts"]["far"]["speed"] == 70
    still_serving(dl)


# --- finding 10a: who may cancel a job -------------------------------------------------------


def started_by(dl, job: str) -> int:
    async def read():
        async with await dl.client() as c:
            return (await c.get_all(job, JOB))["StartedByUID"]

    return run(read())


def cancel(job: str) -> dict:
    return {"path": job, "iface": JOB, "member": "Cancel", "sig": "", "args": []}


def past_polkit(result: dict) -> bool:
    """Cancelled, or the copy won the race and had already finished: either way the caller
    was allowed. (Which one happens depends on timing; the right to try does not.)"""
    return "ok" in result or "already finished" in result.get("message", "")


def test_member_cannot_cancel_roots_job(daemon_factory):
    dl = daemon_factory(big=512 * MiB)
    dl.start()

    async def scenario():
        async with await dl.client() as c:
            await c.subscribe()
            job = await c.promote(dl.big)
            # The member's attempt runs while root follows the job to its end.
            [attempt] = await asyncio.to_thread(dl.run_as, MEMBER, [cancel(job)])
            return job, attempt, await c.follow_job(job, timeout=120)

    job, attempt, result = run(scenario())
    assert attempt.get("error") == "NotAuthorized", attempt
    assert "administer" in attempt["message"] and "uid 0 started it" in attempt["message"]
    assert result.success, result.message  # the copy went on to the end
    assert started_by(dl, job) == 0
    model = dl.state()["objects"][f"{ROOT}/models/big_3a70b"][MODEL]
    assert (model["Tier"], model["State"]) == ("local", "hot"), model


def test_root_cancels_the_members_job_and_the_member_its_own(daemon_factory):
    dl = daemon_factory(big=512 * MiB)
    dl.start()
    promote = call("Promote", "ss", dl.big, "")
    [own] = dl.run_as(MEMBER, [promote])
    job = own["ok"]
    assert started_by(dl, job) == member_uid()
    [own_cancel] = dl.run_as(MEMBER, [cancel(job)])
    assert past_polkit(own_cancel), own_cancel
    wait_until_cold(dl, job)
    [theirs] = dl.run_as(MEMBER, [promote])
    assert started_by(dl, theirs["ok"]) == member_uid()
    [root_cancel] = dl.run_as(None, [cancel(theirs["ok"])])
    assert past_polkit(root_cancel), root_cancel


def wait_until_cold(dl, job: str) -> None:
    """Wait for ``job`` to end, then demote what it left hot, so the next promote is new."""

    async def scenario():
        async with await dl.client() as c:
            await c.subscribe()
            await c.follow_job(job, timeout=120)
            demoted = await c.demote(dl.big)
            await c.follow_job(demoted, timeout=120)

    run(scenario())


# --- the SetConfig split itself, as a rule on two configs ----------------------------------


def _base() -> dict:
    return {
        "modelsDir": "/srv/models",
        "storage": {"path": "/srv/cold", "type": "local"},
        "backend": {"type": "ollama"},
        "pools": [
            {"name": "a", "path": "/run/speedloader/pools/a", "size": "1 GiB", "speed": 100},
            {"name": "b", "path": "/run/speedloader/pools/b", "size": "1 GiB"},
        ],
        "remoteTiers": {"hosts": {"far": {"ssh": "root@h", "ramdiskSize": "1 GiB"}}},
        "modelPlacement": {"defaultStrategy": "fastest-fit", "pinned": {}},
    }


def _edit(change) -> dict:
    data = _base()
    change(data)
    return data


MEMBER_EDITS = {
    "strategy": lambda d: d["modelPlacement"].update(defaultStrategy="round-robin"),
    "a pin": lambda d: d["modelPlacement"].update(pinned={"m:1": "b"}),
    "no placement key at all": lambda d: d.pop("modelPlacement"),
    "a pool's speed": lambda d: d["pools"][1].update(speed=300),
    "a remote tier's speed": lambda d: d["remoteTiers"]["hosts"]["far"].update(speed=5),
}
ADMIN_EDITS = {
    "modelsDir": lambda d: d.update(modelsDir="/home/m/models"),
    "stateDir": lambda d: d.update(stateDir="/home/m/state"),
    "poolsRoot": lambda d: d.update(poolsRoot="/home/m"),
    "storage": lambda d: d["storage"].update(path="/etc"),
    "backend": lambda d: d["backend"].update(apiUrl="http://10.0.0.1:1"),
    "ramdisk": lambda d: d.update(ramdisk={"path": "/mnt/x", "size": "1G"}),
    "pools": lambda d: d["pools"][0].update(path="/etc/x"),
    "pools size": lambda d: d["pools"][0].update(size="2 GiB"),
    "pools reordered": lambda d: d["pools"].reverse(),
    "pools removed": lambda d: d["pools"].pop(),
    "remoteTiers": lambda d: d["remoteTiers"]["hosts"]["far"].update(rdmaIp="10.0.0.9"),
    "sshKeyPath": lambda d: d.update(sshKeyPath="/home/m/key"),
    "an extension key": lambda d: d.update(_comment="root writes what a member chose"),
    "placement extension": lambda d: d["modelPlacement"].update({"x-note": "hi"}),
}


@pytest.mark.parametrize("edit", MEMBER_EDITS.values(), ids=MEMBER_EDITS)
def test_placement_only_changes_are_a_members(edit):
    from speedloaderd.privilege import admin_changes

    assert admin_changes(_base(), _edit(edit)) == []


@pytest.mark.parametrize("edit", ADMIN_EDITS.values(), ids=ADMIN_EDITS)
def test_every_other_change_is_an_admins(edit):
    from speedloaderd.privilege import admin_changes

    changed = admin_changes(_base(), _edit(edit))
    assert len(changed) == 1, changed
    assert admin_changes(_base(), _base()) == []


def test_with_no_running_config_any_config_is_an_admins():
    from speedloaderd.privilege import admin_changes

    # Every key that names a path, host or key is new; only placement would be a member's.
    assert admin_changes({}, _base()) == sorted(set(_base()) - {"modelPlacement"})


def test_clients_say_who_can_make_an_admin_change():
    """An admin refusal must not advise joining the group (that would not help)."""
    from speedloader_cli.errors import Exit
    from speedloader_cli.errors import explain as cli_explain
    from speedloader_client.client import ClientError
    from speedloader_tui.errors import explain as tui_explain

    refusal = ClientError(
        "NotAuthorized",
        "not authorized for org.speedloader.administer: adding a pool needs an administrator "
        "(it names a path)",
    )
    cli = cli_explain(refusal)
    assert cli.code == Exit.NOT_AUTHORIZED and "run slctl as root" in str(cli)
    assert "group" not in str(cli)
    tui = tui_explain(refusal)
    assert "administrator must make this change" in tui.sentence and "group" not in tui.sentence
    member_refusal = ClientError("NotAuthorized", "not authorized for org.speedloader.promote")
    assert "'speedloader' group" in tui_explain(member_refusal).sentence
