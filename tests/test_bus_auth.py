"""Who may do what: every mutating method, called by root, by a member of the
``speedloader`` group, by a user outside it and by one polkit asks to authenticate.

The callers are real processes of those uids on a private system bus; polkitd is real and
reads the project's own .policy and .rules. Denied calls must change nothing at all.
"""

from __future__ import annotations

import json

import pytest

from speedloader_client.client import JOB, MANAGER, POOL, ROOT
from speedloaderd.config import dump_config

from .buslab import ADMIN, ASKER, GUEST, MiB, run

LOCAL = f"{ROOT}/pools/local"
EXTRA = f"{ROOT}/pools/extra"


def manager(member: str, sig: str = "", *args, follow: bool = False) -> dict:
    return {
        "path": ROOT,
        "iface": MANAGER,
        "member": member,
        "sig": sig,
        "args": list(args),
        "follow": follow,
    }


def pool(path: str, member: str, sig: str = "", *args, follow: bool = True) -> dict:
    return {
        "path": path,
        "iface": POOL,
        "member": member,
        "sig": sig,
        "args": list(args),
        "follow": follow,
    }


FAR = f"{ROOT}/pools/far"
REFUSALS = ("NotAuthorized", "AuthenticationRequired")


def edited_config(dl, edit) -> str:
    data = json.loads(dl.state()["config"])
    edit(data)
    return json.dumps(data)


def changed_config(dl) -> str:
    """A member's change: only the strategy."""
    return edited_config(dl, lambda d: d["modelPlacement"].update(defaultStrategy="fill-first"))


FAR_TIER = {"ssh": "root@127.0.0.1:9", "rdmaIp": "127.0.0.1", "ramdiskSize": "64M",
            "transport": "tcp"}  # fmt: skip


def with_far(d: dict) -> None:
    d["remoteTiers"] = {"hosts": {"far": {**FAR_TIER, "path": d["poolsRoot"] + "/far"}}}


def member_sequence(dl) -> list[tuple[str, dict]]:
    """Each member-level method once, in an order where each call is valid."""
    return [
        ("SetConfig(strategy)", manager("SetConfig", "s", changed_config(dl))),
        ("Promote", manager("Promote", "ss", "tiny:1b", "", follow=True)),
        ("Demote", manager("Demote", "s", "tiny:1b", follow=True)),
        ("Pin", manager("Pin", "ss", "small:3b", "local", follow=True)),
        ("Unpin", manager("Unpin", "s", "small:3b")),
        ("Pool.Resize(local)", pool(LOCAL, "Resize", "s", "320M")),
        ("Pool.Disconnect", pool(LOCAL, "Disconnect")),
        ("Pool.Connect", pool(LOCAL, "Connect")),
        ("Rescan", manager("Rescan")),
        ("Health(repair)", manager("Health", "bb", True, False)),
    ]


def admin_sequence(dl) -> list[tuple[str, dict]]:
    """Each admin-only method once, valid in this order (after member_sequence)."""
    extra = str(dl.lab.root / "pools" / "extra")
    return [
        ("AddPool", manager("AddPool", "sssu", "extra", extra, "64M", 50)),
        ("Pool.Disconnect", pool(EXTRA, "Disconnect")),  # a connected pool is not removed
        ("RemovePool", manager("RemovePool", "s", "extra")),
        ("SetConfig(remoteTiers)", manager("SetConfig", "s", edited_config(dl, with_far))),
    ]


@pytest.mark.parametrize("user", [None, ADMIN], ids=["root", "group-member"])
def test_allowed_callers_can_do_their_part(daemon, user):
    # Each sequence's SetConfig is made from the config as it is when the sequence starts.
    for sequence in [member_sequence] + ([admin_sequence] if user is None else []):
        steps = sequence(daemon)
        results = daemon.run_as(user, [s for _, s in steps])
        for (what, _), result in zip(steps, results, strict=True):
            assert "error" not in result, f"{what} as {user or 'root'}: {result}"
            if "job" in result:
                assert result["job"]["success"], f"{what}: {result['job']}"
    state = daemon.state()
    config = json.loads(state["config"])
    assert config["modelPlacement"]["defaultStrategy"] == "fill-first"
    assert f"{ROOT}/pools/extra" not in state["objects"]
    assert (FAR in state["objects"]) == (user is None)
    models = {
        p: o["org.speedloader.Speedloader1.Model"]
        for p, o in state["objects"].items()
        if "/models/" in p
    }
    assert models[f"{ROOT}/models/tiny_3a1b"]["Tier"] == "cold"  # promoted, then demoted
    assert models[f"{ROOT}/models/small_3a3b"]["PinnedPool"] == ""  # pinned, then unpinned
    if user is None:  # remote RAM is resized by an admin only; polkit lets root through
        [resize] = daemon.run_as(None, [pool(FAR, "Resize", "s", "128M", follow=True)])
        assert resize.get("error") not in REFUSALS, resize


@pytest.mark.parametrize("user", [None, ADMIN], ids=["root", "group-member"])
def test_allowed_callers_can_cancel_their_own_job(daemon_factory, user):
    dl = daemon_factory(big=256 * MiB)
    dl.start()
    promote = dl.run_as(user, [manager("Promote", "ss", dl.big, "")])[0]
    job = promote["ok"]
    [cancel] = dl.run_as(user, [{"path": job, "iface": JOB, "member": "Cancel"}])
    # Past polkit either way: cancelled, or the copy won the race and finished first.
    assert "ok" in cancel or cancel["error"] == "InvalidArgument", cancel


# What the group may do, refused to everyone outside it.
DENIED = [
    ("Promote", manager("Promote", "ss", "small:3b", "")),
    ("Demote", manager("Demote", "s", "tiny:1b")),
    ("Pin", manager("Pin", "ss", "small:3b", "local")),
    ("Unpin", manager("Unpin", "s", "tiny:1b")),
    ("Rescan", manager("Rescan")),
    ("Health(repair)", manager("Health", "bb", True, False)),
    ("Health(verify)", manager("Health", "bb", False, True)),
    ("SetConfig", manager("SetConfig", "s", "{}")),
    ("Pool.Resize", pool(LOCAL, "Resize", "s", "128M", follow=False)),
    ("Pool.Disconnect", pool(LOCAL, "Disconnect", follow=False)),
    ("Pool.Connect", pool(LOCAL, "Connect", follow=False)),
]


def admin_only(dl, finished_job: str) -> list[tuple[str, dict]]:
    """Every admin-only call, each valid if an admin made it; the daemon must have ``far``."""
    extra = str(dl.lab.root / "pools" / "extra")
    elsewhere = str(dl.lab.root / "elsewhere")
    return [
        ("AddPool", manager("AddPool", "sssu", "extra", extra, "64M", 50)),
        ("RemovePool", manager("RemovePool", "s", "far")),
        ("Pool.Resize(remote)", pool(FAR, "Resize", "s", "128M", follow=False)),
        ("Job.Cancel(root's)", {"path": finished_job, "iface": JOB, "member": "Cancel"}),
        *(
            (f"SetConfig({key})", manager("SetConfig", "s", edited_config(dl, edit)))
            for key, edit in {
                "modelsDir": lambda d: d.update(modelsDir=elsewhere),
                "stateDir": lambda d: d.update(stateDir=elsewhere),
                "poolsRoot": lambda d: d.update(poolsRoot=elsewhere),
                "storage": lambda d: d["storage"].update(type="nfs"),
                "backend.apiUrl": lambda d: d["backend"].update(apiUrl="http://10.9.9.9:1"),
                "pools[].path": lambda d: d["pools"][0].update(path=elsewhere),
                "pools[].size": lambda d: d["pools"][0].update(size="1G"),
                "pools+": lambda d: d["pools"].append(
                    {"name": "more", "path": extra, "size": "64M"}
                ),
                "remoteTiers.rdmaIp": lambda d: d["remoteTiers"]["hosts"]["far"].update(
                    rdmaIp="10.9.9.9"
                ),
                "sshKeyPath": lambda d: d.update(sshKeyPath="/tmp/key"),
                "_comment": lambda d: d.update(_comment="not a member's file to write"),
            }.items()
        ),
    ]


@pytest.fixture
def far_daemon(daemon_factory):
    """The small lab plus a configured, never connected remote tier ``far``, with
    something hot, a pin and a finished job of root's, all real."""
    dl = daemon_factory()
    config = json.loads(json.dumps(dump_config(dl.config)))
    with_far(config)
    dl.lab.config_path.write_text(json.dumps(config))
    dl.start()
    [promote, pin] = dl.run_as(
        None,
        [
            manager("Promote", "ss", "tiny:1b", "", follow=True),
            manager("Pin", "ss", "tiny:1b", "local", follow=True),
        ],
    )
    assert promote["job"]["success"] and "error" not in pin, (promote, pin)
    dl.finished_job = promote["ok"]
    return dl


@pytest.mark.parametrize(
    ("user", "error", "member_steps"),
    [
        (GUEST, "NotAuthorized", True),
        (ASKER, "AuthenticationRequired", True),
        (ADMIN, "NotAuthorized", False),
    ],
    ids=["outsider", "needs-authentication", "group-member-admin-only"],
)
def test_refused_callers_change_nothing(far_daemon, user, error, member_steps):
    dl = far_daemon
    steps = [*(DENIED if member_steps else []), *admin_only(dl, dl.finished_job)]
    before, file_before = dl.state(), dl.lab.config_path.read_bytes()
    results = dl.run_as(user, [s for _, s in steps])
    for (what, _), result in zip(steps, results, strict=True):
        assert result.get("error") == error, f"{what} as {user}: {result}"
        assert result["message"] and "Traceback" not in result["message"]
        if user == ADMIN:  # the group does not help here, and the refusal says so
            assert "org.speedloader.administer" in result["message"], (what, result)
    after = dl.state()
    assert after == before, diff(before, after)
    assert dl.lab.config_path.read_bytes() == file_before


def test_everyone_may_read_state(daemon):
    reads = [
        {
            "path": ROOT,
            "iface": "org.freedesktop.DBus.ObjectManager",
            "member": "GetManagedObjects",
        },
        manager("GetConfig"),
        manager("GetVersion"),
        manager("Health", "bb", False, False),
        {
            "path": LOCAL,
            "iface": "org.freedesktop.DBus.Properties",
            "member": "GetAll",
            "sig": "s",
            "args": [POOL],
        },
        {"path": ROOT, "iface": "org.freedesktop.DBus.Introspectable", "member": "Introspect"},
    ]
    for user in (None, ADMIN, GUEST, ASKER):
        results = daemon.run_as(user, reads)
        assert all("ok" in r for r in results), (user, results)
        objects = results[0]["ok"]
        assert f"{ROOT}/models/tiny_3a1b" in objects and LOCAL in objects
        assert json.loads(results[1]["ok"])["storage"]["path"] == str(daemon.lab.cold)
        ok, findings = results[3]["ok"]
        assert ok is True and findings is not None


def test_only_root_may_own_the_name(daemon):
    [result] = daemon.run_as(ADMIN, [{"own": "org.speedloader.Speedloader1"}])
    assert result["error"] == "org.freedesktop.DBus.Error.AccessDenied", result


def test_polkitd_absent_means_denied(workdir):
    """With no polkitd on the bus even root is refused: the daemon never fails open."""
    from speedloader_lab.sandbox import Sandbox

    from .buslab import DaemonLab

    with Sandbox(polkit=False) as bare:
        (workdir / "nopolkit").mkdir()
        dl = DaemonLab(bare, workdir / "nopolkit")
        dl.start()
        try:
            before = dl.state()
            [result] = dl.run_as(None, [manager("Promote", "ss", "tiny:1b", "")])
            assert result["error"] == "NotAuthorized", result
            assert "polkit" in result["message"]
            assert dl.state() == before
        finally:
            dl.stop()
        dl.lab.check_cold_unchanged()


def test_a_denied_call_reaches_no_engine_code(daemon):
    """Arguments are validated after authorization: an outsider probing with bad input learns
    nothing beyond 'not authorized'."""
    results = daemon.run_as(GUEST, [manager("Promote", "ss", "../../etc", "nope")])
    assert results[0]["error"] == "NotAuthorized"
    results = daemon.run_as(None, [manager("Promote", "ss", "../../etc", "")])
    assert results[0]["error"] == "InvalidArgument"
    assert run_client_ping(daemon)


def run_client_ping(dl) -> bool:
    async def ping():
        async with await dl.client() as c:
            return await c.manager("GetVersion")

    return bool(run(ping()))


def diff(a, b, where=""):
    """The first places two nested values differ, for a readable failure."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k) != b.get(k):
                out += diff(a.get(k), b.get(k), f"{where}/{k}")
        return out
    return [f"{where}: {a!r} -> {b!r}"]
