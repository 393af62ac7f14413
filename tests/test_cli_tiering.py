"""slctl tiering, the real program against the real daemon on the test bus: on/off through the
configuration (as root; refused to a member, nothing changed), the status JSON contract, and
the dry-run plan after real uses (this process opens a model's files through the models dir;
the daemon sees the opens by fanotify) while tiering is off, so nothing moves."""

from __future__ import annotations

import json
import subprocess

from speedloader_client.client import MANAGER
from speedloaderd.bus.names import ROOT

from .buslab import ADMIN, run
from .test_autotiering import in_pool, jobs, model, tiering_lab, tiers, until, use
from .test_cli import SLCTL, bash_complete, one_error_line, slctl

SETTINGS = {
    "enabled", "policy", "highWatermark", "lowWatermark", "minResidency", "halfLife",
    "admitAccesses", "coalesce", "interval",
}  # fmt: skip


def manager(dl) -> dict:
    async def read() -> dict:
        async with await dl.client() as c:
            return await c.get_all(ROOT, MANAGER)

    return run(read())


def test_on_off_round_trip_changes_the_file_and_the_manager(daemon):
    assert "autoTiering" not in json.loads(daemon.lab.config_path.read_text())
    before = json.loads(daemon.lab.config_path.read_text())
    r = slctl(daemon, "tiering", "on")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[:2] == [
        "autoTiering.enabled: false -> true",
        "automatic tiering: on",
    ], r.stdout
    after = json.loads(daemon.lab.config_path.read_text())
    assert after["autoTiering"] == {"enabled": True}  # made, with that key only
    assert {k: v for k, v in after.items() if k != "autoTiering"} == before  # the rest kept
    assert manager(daemon)["Tiering"] == "on"
    r = slctl(daemon, "tiering", "on")
    assert (r.returncode, r.stdout.strip()) == (
        0,
        "automatic tiering is already on; nothing changed",
    )
    # Another autoTiering key set meanwhile is kept by off.
    r = slctl(daemon, "config", "set", "autoTiering.lowWatermark", "0.5")
    assert r.returncode == 0, r.stderr
    r = slctl(daemon, "tiering", "off")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["autoTiering.enabled: true -> false", "automatic tiering: off"]
    after = json.loads(daemon.lab.config_path.read_text())
    assert after["autoTiering"] == {"enabled": False, "lowWatermark": 0.5}
    assert manager(daemon)["Tiering"] == "off"
    status = json.loads(slctl(daemon, "tiering", "status", "--json").stdout)
    assert status["enabled"] is False and status["settings"]["lowWatermark"] == 0.5


def test_a_member_is_refused_on_and_off_with_one_line_and_nothing_changes(daemon):
    before, file_before = daemon.state(), daemon.lab.config_path.read_bytes()
    r = slctl(daemon, "tiering", "on", user=ADMIN)
    assert r.returncode == 4, (r.returncode, r.stderr)
    line = one_error_line(r)
    assert "org.speedloader.administer" in line and "run slctl as root" in line, line
    assert r.stdout == ""
    assert daemon.state() == before
    assert daemon.lab.config_path.read_bytes() == file_before
    assert manager(daemon)["Tiering"] == "off"
    # Turned on by root, off is refused to the member the same way.
    assert slctl(daemon, "tiering", "on").returncode == 0
    file_before = daemon.lab.config_path.read_bytes()
    r = slctl(daemon, "tiering", "off", user=ADMIN)
    assert r.returncode == 4 and "org.speedloader.administer" in one_error_line(r)
    assert daemon.lab.config_path.read_bytes() == file_before
    assert manager(daemon)["Tiering"] == "on"


def test_status_json_contract(daemon):
    r = slctl(daemon, "tiering", "status", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert set(data) == {"enabled", "paused", "watch", "settings", "nextEviction", "models"}
    assert data["enabled"] is False and data["paused"] is None
    assert set(data["watch"]) == {"state", "reason"}
    assert data["watch"]["state"] in ("watching", "unavailable", "off"), data["watch"]
    # No autoTiering in the file: the daemon's defaults (speedloaderd/config.py).
    assert data["settings"] == {
        "enabled": False, "policy": "gdsf", "highWatermark": 0.95, "lowWatermark": 0.85,
        "minResidency": 600.0, "halfLife": 43200.0, "admitAccesses": 2, "coalesce": 60.0,
        "interval": 30.0,
    }  # fmt: skip
    assert data["nextEviction"] is None and data["models"] == []  # nothing used, nothing hot
    # A promoted model is known to tiering (it is in RAM), with every key of the contract.
    assert slctl(daemon, "promote", "tiny:1b").returncode == 0
    data = json.loads(slctl(daemon, "tiering", "status", "--json").stdout)
    [m] = data["models"]
    assert set(m) == {
        "name", "tier", "state", "pinnedPool", "sizeBytes", "useCount", "value", "lastUsed",
        "why",
    }  # fmt: skip
    assert (m["name"], m["tier"], m["state"], m["pinnedPool"]) == ("tiny:1b", "local", "hot", None)
    assert m["useCount"] == 0 and m["value"] == 0 and m["lastUsed"] is None
    assert m["why"] == "not used since tiering began"


def test_plan_after_uses_lists_a_promote_and_nothing_moves_while_off(daemon_factory):
    dl, models = tiering_lab(daemon_factory, enabled=False)
    dl.start()
    r = slctl(dl, "tiering", "plan")
    assert (r.returncode, r.stdout) == (0, "nothing to do\n(tiering is off: nothing will move)\n")

    async def used_twice() -> None:
        async with await dl.client() as c:

            async def twice() -> bool:
                return (await model(c, "a:1"))["UseCount"] >= 2

            await until(c, "a:1's two uses", twice)

    use(dl, models["a:1"], 2)  # two opens, use()'s SPACING apart: two uses
    run(used_twice())
    r = slctl(dl, "tiering", "plan")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "promote a:1 to local: auto: used 2x in 1 h",
        "(tiering is off: nothing will move)",
    ], r.stdout
    data = json.loads(slctl(dl, "tiering", "plan", "--json").stdout)
    assert data == {
        "enabled": False,
        "actions": [
            {"action": "promote", "model": "a:1", "pool": "local", "reason": "auto: used 2x in 1 h"}
        ],
    }
    status = json.loads(slctl(dl, "tiering", "status", "--json").stdout)
    [a] = status["models"]
    assert (a["name"], a["tier"], a["useCount"], a["why"]) == ("a:1", "cold", 2, "used 2x in 1 h")
    assert a["value"] > 0 and a["useCount"] >= 2  # lastUsed is the backend's word: none here
    text = slctl(dl, "tiering", "status").stdout
    assert text.startswith("automatic tiering: off\n"), text
    assert "next eviction: none" in text
    [row] = [line for line in text.splitlines() if line.startswith("a:1 ")]
    assert row.split()[:3] == ["a:1", "cold", "2"] and row.endswith("used 2x in 1 h"), row

    async def nothing_moved() -> tuple[dict, list]:
        async with await dl.client() as c:
            return await tiers(c), await jobs(c)

    assert run(nothing_moved()) == ({"a:1": "cold", "b:1": "cold", "c:1": "cold"}, [])
    assert in_pool(dl) == set()


def test_automatic_jobs_show_their_reason_in_slctl_jobs(daemon_factory):
    dl, models = tiering_lab(daemon_factory)
    dl.start()
    use(dl, models["a:1"], 2)

    async def promoted() -> None:
        async with await dl.client() as c:

            async def hot() -> bool:
                return (await tiers(c))["a:1"] == "local" and all(
                    j["State"] != "running" for j in await jobs(c)
                )

            await until(c, "a:1 promoted by tiering", hot)

            async def next_eviction() -> bool:  # set by the pass after the promote
                return bool((await c.get_all(ROOT, MANAGER))["TieringNextEviction"])

            await until(c, "the next eviction", next_eviction)

    run(promoted())
    r = slctl(dl, "jobs")
    assert r.returncode == 0, r.stderr
    [line] = [x for x in r.stdout.splitlines() if x.startswith("job ")]
    assert line.endswith(": promote a:1 → local (auto: used 2x in 1 h)"), r.stdout
    [job] = json.loads(slctl(dl, "jobs", "--json").stdout)
    assert job["reason"] == "auto: used 2x in 1 h" and job["operation"] == "promote"
    status = json.loads(slctl(dl, "tiering", "status", "--json").stdout)
    assert status["enabled"] is True
    assert status["nextEviction"] == "a:1 from local (used 2x in 1 h)", status
    [a] = status["models"]
    assert (a["tier"], a["why"]) == ("local", "auto: used 2x in 1 h")


def test_help_and_completion_of_the_tiering_commands(daemon):
    for args in (("tiering",), ("tiering", "status"), ("tiering", "plan"), ("tiering", "on")):
        r = subprocess.run([SLCTL, *args, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "Usage: slctl tiering" in r.stdout, r.stderr
        assert "Examples:" in r.stdout
    lines = bash_complete(daemon, "slctl tiering ", 2)
    offered = {line.split(",", 1)[1] for line in lines}
    assert offered == {"status", "plan", "on", "off"}, lines
    lines = bash_complete(daemon, "slctl ti", 1)
    assert "plain,tiering" in lines, lines
