"""speedloaderd on the bus: jobs followed by signals, crash and restart, introspection that
matches dbus/*.xml, named errors for every bad input, and a config that can be fixed live."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from dbus_fast import Message

from speedloader_client.client import (
    ERROR_PREFIX,
    JOB,
    MANAGER,
    MODEL,
    POOL,
    ROOT,
    Client,
    ClientError,
)
from speedloader_lab.sandbox import REPO

from .buslab import MiB, run

BIG = 1024 * MiB


def model_obj(name: str) -> str:
    from speedloaderd.bus.names import model_path

    return model_path(name)


async def props(c: Client, path: str, iface: str) -> dict:
    return await c.get_all(path, iface)


def assert_consistent(dl) -> None:
    """Every link in the models dir resolves to cold storage or to a whole pool copy."""
    lab = dl.lab
    for link in lab.models.rglob("*"):
        if not link.is_symlink():
            continue
        target = Path(os.readlink(link))
        assert target.exists(), f"{link} -> {target} dangles"
        rel = link.relative_to(lab.models)
        if target.is_relative_to(lab.pool_path("local")):
            assert target.stat().st_size == (lab.cold / rel).stat().st_size, f"{target} partial"
        else:
            assert target == lab.cold / rel, f"{link} -> {target}: neither cold nor a pool"
    leftovers = [f for f in lab.pool_files("local") if "/." in f or f.startswith(".")]
    assert not leftovers, f"temporary files left in the pool: {leftovers}"


async def promote_until_copying(c: Client, model: str) -> tuple[str, asyncio.Future]:
    """Start promoting ``model`` and return once bytes are moving: (job path, the task
    following the job to its end)."""
    await c.subscribe()
    job = await c.promote(model)
    copying = asyncio.get_running_loop().create_future()

    def on_update(p: dict) -> None:
        if 0 < p.get("BytesDone", 0) < p.get("BytesTotal", 0) and not copying.done():
            copying.set_result(None)

    follow = asyncio.ensure_future(c.follow_job(job, on_update=on_update, timeout=120))
    await asyncio.wait_for(copying, 60)
    return job, follow


# --- jobs by signals -------------------------------------------------------------------------


def test_promote_is_followed_by_signals_alone(daemon_factory):
    dl = daemon_factory(big=BIG)
    dl.start()

    async def scenario():
        async with await dl.client() as c:
            seen: list[Message] = []
            c.add_listener(seen.append)
            await c.subscribe()
            job = await c.promote(dl.big)
            progress: list[dict] = []
            result = await c.follow_job(job, on_update=progress.append, timeout=120)
            model = await props(c, model_obj(dl.big), MODEL)
            return job, seen, progress, result, model

    job, seen, progress, result, model = run(scenario())
    assert result.success, result.message
    added = [m for m in seen if m.member == "InterfacesAdded" and m.body[0] == job]
    assert added and JOB in added[0].body[1], "the job's object was not announced"
    assert added[0].path == ROOT, "InterfacesAdded must come from the ObjectManager's path"
    done = [p["BytesDone"] for p in progress]
    assert done == sorted(done), f"BytesDone went backwards: {done}"
    total = result.properties["BytesTotal"]
    assert total >= BIG and done[-1] == total
    midway = sorted({d for d in done if 0 < d < total})
    assert len(midway) >= 2, f"expected progress on the way, saw only {done}"
    assert result.properties["State"] == "succeeded" and result.properties["Progress"] == 1.0
    assert result.properties["ErrorName"] == ""
    completed = [m for m in seen if m.member == "Completed" and m.path == job]
    assert len(completed) == 1 and completed[0].body == [True, result.message]
    assert model["State"] == "hot" and model["Tier"] == "local"
    # Model state changes reached the client as signals too: promoting, then hot.
    states = [
        m.body[1]["State"].value
        for m in seen
        if m.member == "PropertiesChanged" and m.path == model_obj(dl.big) and "State" in m.body[1]
    ]
    assert states[-1] == "hot" and "promoting" in states
    assert_consistent(dl)


def test_cancelled_promote_leaves_no_trace(daemon_factory):
    dl = daemon_factory(big=BIG)
    dl.start()
    before = dl.state()

    async def scenario():
        async with await dl.client() as c:
            job, follow = await promote_until_copying(c, dl.big)
            await c.cancel(job)
            return await follow

    result = run(scenario())
    assert not result.success and "cancel" in result.message.lower()
    assert result.properties["State"] == "cancelled"
    assert result.properties["ErrorName"] == ERROR_PREFIX + "Cancelled", "not only 'failed'"
    after = dl.state()
    assert after["links"] == before["links"] and after["pool_files"] == []
    assert_consistent(dl)


def test_sigkill_mid_promote_then_restart(daemon_factory):
    dl = daemon_factory(big=BIG)
    dl.start()

    async def start_and_wait_for_copying():
        async with await dl.client() as c:
            _, follow = await promote_until_copying(c, dl.big)
            dl.proc.send_signal(signal.SIGKILL)  # while the copy is running, mid-file
            follow.cancel()

    run(start_and_wait_for_copying())
    assert dl.stop(signal.SIGKILL) == -signal.SIGKILL
    dl.start()  # recovery runs before the daemon takes its name

    async def inspect():
        async with await dl.client() as c:
            model = await props(c, model_obj(dl.big), MODEL)
            ok, findings = await c.manager("Health", "bb", False, False)
            objects = await c.managed_objects()
            await c.subscribe()
            again = await c.follow_job(await c.promote(dl.big), timeout=120)
            return model, ok, findings, objects, again

    model, ok, findings, objects, again = run(inspect())
    assert model["State"] in ("cold", "hot"), model
    assert ok, findings
    assert not [p for p in objects if "/jobs/" in p], "jobs of the dead daemon reappeared"
    assert again.success, again.message
    assert_consistent(dl)


def test_sigterm_mid_promote_cancels_and_leaves_nothing_to_repair(daemon_factory):
    dl = daemon_factory(big=BIG)
    dl.start()
    before = dl.state()

    async def stop_while_copying():
        async with await dl.client() as c:
            _, follow = await promote_until_copying(c, dl.big)
            dl.proc.send_signal(signal.SIGTERM)
            return await asyncio.wait_for(follow, 60)  # Completed still reaches us

    result = run(stop_while_copying())
    assert not result.success and result.properties["State"] == "cancelled"
    assert dl.stop() == 0
    assert "stopping: waiting for 1 job(s) to end" in dl.log()
    assert list((dl.lab.state / "journal").iterdir()) == [], "a stop left work for recovery"
    assert dl.lab.pool_files("local") == []
    assert_consistent(dl)
    dl.start()
    assert dl.state()["links"] == before["links"]


def test_sigterm_leaves_the_bus_cleanly(daemon):
    assert daemon.stop(signal.SIGTERM) == 0
    assert "stopping on signal" in daemon.log()

    async def call():
        async with await daemon.client() as c:
            await c.manager("GetVersion")

    with pytest.raises(ClientError) as err:
        run(call())
    assert err.value.unreachable, err.value.name


# --- the published API ---------------------------------------------------------------------


def _signature(iface: ET.Element) -> list:
    """An interface's members, order-free, for comparison."""
    out = []
    for child in iface:
        args = tuple((a.get("name"), a.get("type"), a.get("direction")) for a in child.iter("arg"))
        out.append((child.tag, child.get("name"), child.get("type"), child.get("access"), args))
    return sorted(out, key=str)


def test_exported_interfaces_match_the_published_xml(daemon):
    async def introspect():
        async with await daemon.client() as c:
            await c.subscribe()
            job = await c.promote("tiny:1b")
            await c.follow_job(job, timeout=60)
            paths = [ROOT, f"{ROOT}/pools/local", model_obj("tiny:1b"), job]
            return [
                await c.call(p, "org.freedesktop.DBus.Introspectable", "Introspect") for p in paths
            ]

    exported = {}
    for xml in run(introspect()):
        for iface in ET.fromstring(xml).iter("interface"):
            if iface.get("name").startswith("org.speedloader."):
                exported[iface.get("name")] = _signature(iface)
    published = {}
    for path in sorted((REPO / "dbus").glob("org.speedloader.Speedloader1.*.xml")):
        for iface in ET.parse(path).getroot().iter("interface"):
            published[iface.get("name")] = _signature(iface)
    assert set(exported) == {MANAGER, POOL, MODEL, JOB}
    assert exported == published, "regenerate with: python3 -m speedloaderd.bus.introspect dbus/"


# --- errors --------------------------------------------------------------------------------


BAD_CALLS = [
    ("Promote", "ss", ["no-such:model", ""], "NoSuchModel", "no-such:model"),
    ("Promote", "ss", ["tiny:1b", "nowhere"], "NoSuchPool", "nowhere"),
    ("Promote", "ss", ["../../etc/passwd", ""], "InvalidArgument", "../../etc/passwd"),
    ("Promote", "ss", ["tiny:1b", "../x"], "InvalidArgument", "../x"),
    ("Promote", "ss", ["tiny:1b\n", ""], "InvalidArgument", "not a valid model name"),
    ("Promote", "ss", ["tiny:1b", "local\n"], "InvalidArgument", "not a valid pool name"),
    ("Demote", "s", ["no-such:model"], "NoSuchModel", "no-such:model"),
    ("Pin", "ss", ["tiny:1b", "nowhere"], "NoSuchPool", "nowhere"),
    ("Pin", "ss", ["tiny:1b/..", "local"], "InvalidArgument", "tiny:1b/.."),
    ("Unpin", "s", ["tiny:1b"], "InvalidArgument", "not pinned"),
    ("AddPool", "sssu", ["x", "/tmp/sl-x", "12Q", 1], "InvalidArgument", "12Q"),
    ("AddPool", "sssu", ["x", "/tmp/sl-x", "-1G", 1], "InvalidArgument", "-1G"),
    ("AddPool", "sssu", ["../x", "/tmp/sl-x", "1G", 1], "InvalidArgument", "../x"),
    ("AddPool", "sssu", ["x", "relative/path", "1G", 1], "InvalidArgument", "relative/path"),
    ("AddPool", "sssu", ["local", "/tmp/sl-x", "1G", 1], "InvalidArgument", "local"),
    ("RemovePool", "s", ["nowhere"], "NoSuchPool", "nowhere"),
    ("RemovePool", "s", ["local"], "Busy", "disconnect"),
    ("SetConfig", "s", ["{not json"], "InvalidArgument", "JSON"),
    ("SetConfig", "s", ['{"modelsDir": "/x"}'], "InvalidArgument", "storage"),
]


@pytest.mark.parametrize(
    ("member", "sig", "args", "error", "mentions"),
    BAD_CALLS,
    ids=[f"{c[0]}-{c[3]}-{i}" for i, c in enumerate(BAD_CALLS)],
)
def test_bad_input_gets_a_named_error_and_changes_nothing(
    daemon, member, sig, args, error, mentions
):
    before = daemon.state()
    [result] = daemon.run_as(
        None, [{"path": ROOT, "iface": MANAGER, "member": member, "sig": sig, "args": args}]
    )
    assert result.get("error") == error, result
    assert mentions in result["message"], result["message"]
    assert "Traceback" not in result["message"] and "\n" not in result["message"]
    assert daemon.state() == before
    assert daemon.proc.poll() is None


def test_bad_pool_sizes_are_refused(daemon):
    local = f"{ROOT}/pools/local"
    [promote] = daemon.run_as(
        None,
        [
            {
                "path": ROOT,
                "iface": MANAGER,
                "member": "Promote",
                "sig": "ss",
                "args": ["small:3b", ""],
                "follow": True,
            }
        ],
    )
    assert promote["job"]["success"], promote
    before = daemon.state()
    steps = [
        {"path": local, "iface": POOL, "member": "Resize", "sig": "s", "args": [s]}
        for s in ("12Q", "-1G", "0", "", "1.5.5G")
    ]
    # Below what the hot model uses: the job fails and says so; the pool is unchanged.
    steps.append(
        {
            "path": local,
            "iface": POOL,
            "member": "Resize",
            "sig": "s",
            "args": ["64K"],
            "follow": True,
        }
    )
    results = daemon.run_as(None, steps)
    for r in results[:-1]:
        assert r.get("error") == "InvalidArgument", r
    shrink = results[-1]["job"]
    assert shrink["success"] is False and "cannot shrink" in shrink["message"], shrink
    after = daemon.state()
    assert after["objects"][local] == before["objects"][local]
    assert after["links"] == before["links"] and after["pool_files"] == before["pool_files"]


def test_bad_config_is_refused_and_the_running_one_kept(daemon):
    good = json.loads(daemon.state()["config"])
    bad = json.loads(json.dumps(good))
    bad["pools"][0]["size"] = "12Q"
    results = daemon.run_as(
        None,
        [
            {
                "path": ROOT,
                "iface": MANAGER,
                "member": "SetConfig",
                "sig": "s",
                "args": [json.dumps(bad)],
            },
            {"path": ROOT, "iface": MANAGER, "member": "GetConfig"},
        ],
    )
    assert results[0]["error"] == "InvalidArgument"
    assert "12Q" in results[0]["message"] and "size" in results[0]["message"]
    assert json.loads(results[1]["ok"]) == good
    assert json.loads(daemon.lab.config_path.read_text())["pools"][0]["size"] != "12Q"


def test_daemon_without_a_valid_config_stays_up_and_is_fixed_live(daemon_factory):
    dl = daemon_factory()
    good = dl.lab.config_path.read_text()
    dl.lab.config_path.write_text(
        '{"modelsDir": "/tmp/x", "ramdisk": {"path": "/tmp/y", "size": "12Q"}}'
    )
    dl.start()

    async def scenario():
        async with await dl.client() as c:
            manager = await props(c, ROOT, MANAGER)
            with pytest.raises(ClientError) as err:
                await c.promote("tiny:1b")
            added: list[str] = []
            c.add_listener(lambda m: m.member == "InterfacesAdded" and added.append(m.body[0]))
            await c.subscribe()
            await c.manager("SetConfig", "s", good)
            objects = await c.managed_objects()
            valid = await props(c, ROOT, MANAGER)
            return manager, err.value, added, objects, valid

    manager, err, added, objects, valid = run(scenario())
    assert manager["ConfigValid"] is False and "12Q" in manager["ConfigError"]
    assert err.name == "Failed" and "configuration" in err.message
    assert valid["ConfigValid"] is True
    assert model_obj("tiny:1b") in objects and model_obj("tiny:1b") in added


def test_manager_properties_change_by_signal(daemon):
    """A SetConfig that changes the strategy reaches every client as PropertiesChanged on
    the Manager, not only the caller."""

    async def scenario():
        async with await daemon.client() as watcher, await daemon.client() as setter:
            seen: list[dict] = []
            watcher.add_listener(
                lambda m: (
                    m.member == "PropertiesChanged"
                    and m.path == ROOT
                    and m.body[0] == MANAGER
                    and seen.append({k: v.value for k, v in m.body[1].items()})
                )
            )
            await watcher.subscribe()
            config = json.loads(await setter.manager("GetConfig"))
            config["modelPlacement"]["defaultStrategy"] = "round-robin"
            await setter.manager("SetConfig", "s", json.dumps(config))
            await watcher.manager("GetVersion")  # the signal was sent before this reply
            return seen

    seen = run(scenario())
    assert {"Strategy": "round-robin"} in seen, seen


def test_disconnect_counts_only_models_that_were_hot(daemon):
    """small:3b shares a blob with tiny:1b: promoting tiny puts that blob in the pool, but
    small stays cold, and the disconnect's sentence must not count it as moved."""
    local = f"{ROOT}/pools/local"
    results = daemon.run_as(None, [
        {"path": ROOT, "iface": MANAGER, "member": "Promote", "sig": "ss",
         "args": ["tiny:1b", ""], "follow": True},
        {"path": local, "iface": POOL, "member": "Disconnect", "follow": True},
    ])  # fmt: skip
    assert results[1]["job"] == {
        "success": True,
        "message": "pool local disconnected; 1 model(s) now served from cold storage",
    }, results
