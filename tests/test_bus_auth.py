"""Who may do what: every mutating method, called by root, by a member of the
``speedloader`` group, by a user outside it and by one polkit asks to authenticate.

The callers are real processes of those uids on a private system bus; polkitd is real and
reads the project's own .policy and .rules. Denied calls must change nothing at all.
"""

from __future__ import annotations

import json

import pytest

from speedloader_cli.client import JOB, MANAGER, POOL, ROOT

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


def changed_config(dl) -> str:
    data = json.loads(dl.state()["config"])
    data["modelPlacement"]["defaultStrategy"] = "fill-first"
    return json.dumps(data)


def allowed_sequence(dl) -> list[tuple[str, dict]]:
    """Each mutating method once, in an order where each call is valid."""
    extra = str(dl.lab.root / "pools" / "extra")
    return [
        ("Promote", manager("Promote", "ss", "tiny:1b", "", follow=True)),
        ("Demote", manager("Demote", "s", "tiny:1b", follow=True)),
        ("Pin", manager("Pin", "ss", "small:3b", "local", follow=True)),
        ("Unpin", manager("Unpin", "s", "small:3b")),
        ("AddPool", manager("AddPool", "sssu", "extra", extra, "64M", 50)),
        ("Pool.Resize", pool(EXTRA, "Resize", "s", "96M")),
        ("Pool.Disconnect", pool(EXTRA, "Disconnect")),
        ("Pool.Connect", pool(EXTRA, "Connect")),
        ("Pool.Disconnect", pool(EXTRA, "Disconnect")),  # a connected pool is not removed
        ("RemovePool", manager("RemovePool", "s", "extra")),
        ("Rescan", manager("Rescan")),
        ("Health(repair)", manager("Health", "bb", True, False)),
        ("SetConfig", manager("SetConfig", "s", changed_config(dl))),
    ]


@pytest.mark.parametrize("user", [None, ADMIN], ids=["root", "group-member"])
def test_allowed_callers_can_do_everything(daemon, user):
    steps = allowed_sequence(daemon)
    results = daemon.run_as(user, [s for _, s in steps])
    for (what, _), result in zip(steps, results, strict=True):
        assert "error" not in result, f"{what} as {user or 'root'}: {result}"
        if "job" in result:
            assert result["job"]["success"], f"{what}: {result['job']}"
    state = daemon.state()
    assert json.loads(state["config"])["modelPlacement"]["defaultStrategy"] == "fill-first"
    assert f"{ROOT}/pools/extra" not in state["objects"]
    models = {
        p: o["org.speedloader.Speedloader1.Model"]
        for p, o in state["objects"].items()
        if "/models/" in p
    }
    assert models[f"{ROOT}/models/tiny_3a1b"]["Tier"] == "cold"  # promoted, then demoted
    assert models[f"{ROOT}/models/small_3a3b"]["PinnedPool"] == ""  # pinned, then unpinned


@pytest.mark.parametrize("user", [None, ADMIN], ids=["root", "group-member"])
def test_allowed_callers_can_cancel_a_job(daemon_factory, user):
    dl = daemon_factory(big=256 * MiB)
    dl.start()
    promote = dl.run_as(None, [manager("Promote", "ss", dl.big, "")])[0]
    job = promote["ok"]
    [cancel] = dl.run_as(user, [{"path": job, "iface": JOB, "member": "Cancel"}])
    # Past polkit either way: cancelled, or the copy won the race and finished first.
    assert "ok" in cancel or cancel["error"] == "InvalidArgument", cancel


DENIED = [
    ("Promote", manager("Promote", "ss", "small:3b", "")),
    ("Demote", manager("Demote", "s", "tiny:1b")),
    ("Pin", manager("Pin", "ss", "small:3b", "local")),
    ("Unpin", manager("Unpin", "s", "tiny:1b")),
    ("AddPool", manager("AddPool", "sssu", "extra", "/tmp/sl-denied-extra", "64M", 50)),
    ("RemovePool", manager("RemovePool", "s", "local")),
    ("Rescan", manager("Rescan")),
    ("Health(repair)", manager("Health", "bb", True, False)),
    ("Health(verify)", manager("Health", "bb", False, True)),
    ("SetConfig", manager("SetConfig", "s", "{}")),
    ("Pool.Resize", pool(LOCAL, "Resize", "s", "128M", follow=False)),
    ("Pool.Disconnect", pool(LOCAL, "Disconnect", follow=False)),
    ("Pool.Connect", pool(LOCAL, "Connect", follow=False)),
]


@pytest.mark.parametrize(
    ("user", "error"),
    [(GUEST, "NotAuthorized"), (ASKER, "AuthenticationRequired")],
    ids=["outsider", "needs-authentication"],
)
def test_refused_callers_change_nothing(daemon, user, error):
    # Something hot to demote, a pin to remove and a finished job to cancel: all real.
    [promote, pin] = daemon.run_as(
        None,
        [
            manager("Promote", "ss", "tiny:1b", "", follow=True),
            manager("Pin", "ss", "tiny:1b", "local", follow=True),
        ],
    )
    assert promote["job"]["success"] and "error" not in pin, (promote, pin)
    steps = [*DENIED, ("Job.Cancel", {"path": promote["ok"], "iface": JOB, "member": "Cancel"})]
    before = daemon.state()
    results = daemon.run_as(user, [s for _, s in steps])
    for (what, _), result in zip(steps, results, strict=True):
        assert result.get("error") == error, f"{what} as {user}: {result}"
        assert result["message"] and "Traceback" not in result["message"]
    after = daemon.state()
    assert after == before, diff(before, after)


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
    from speedloaderd.sandbox import Sandbox

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
