"""Automatic tiering end to end (speedloaderd/autotiering.py): the real daemon on the private
bus, a real tmpfs pool, real fanotify. This test process opens model files through the
models dir as an inference server would; the daemon sees the opens, promotes what is used
again and again, evicts the least valuable when the pool is full, and never touches what is
pinned, loaded or held, nor anything while tiering is off or for a one-off scan.

Each model here is one 4 MiB layer and a small config: a 12 MiB pool holds two (its high
watermark, 95 %, is 11.4 MiB; three would be 12 MiB and more)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import stat
import subprocess
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from speedloader_client.client import JOB, MANAGER, MODEL, Client, ClientError
from speedloader_lab.fake_backend import FakeProcess
from speedloader_lab.modelgen import OllamaModel, make_ollama_model
from speedloaderd.bus.names import ROOT, model_path
from speedloaderd.config import dump_config, parse_config, save_config

from .buslab import DaemonLab, run
from .lab import MiB
from .test_demote_policy import fakes, snapshot
from .test_holders import Holder, holders
from .test_metrics import free_port, samples, scrape, tool, value, wait_for, with_metrics

__all__ = ["fakes", "holders"]  # the fixtures

WAIT = 60.0
NAMES = ("a:1", "b:1", "c:1")
POOL = 12 * MiB


def tiering_lab(
    daemon_factory, enabled: bool = True, extra: int = 0, **tiering: Any
) -> tuple[DaemonLab, dict[str, OllamaModel]]:
    """A DaemonLab with three 4 MiB models more (and ``extra`` 1 MiB ones) and automatic
    tiering as given (no minimum residency, every window of opens a use, a plan every
    second unless told otherwise)."""
    dl = daemon_factory()
    models = {n: make_ollama_model(dl.lab.cold, n, (4 * MiB,)) for n in NAMES}
    for i in range(extra):
        models[f"scan{i}:1"] = make_ollama_model(dl.lab.cold, f"scan{i}:1", (1 * MiB,))
    dl.lab.seal()
    data = dump_config(dl.lab.config(pools=(("local", POOL, 100),)))
    data["autoTiering"] = {
        "enabled": enabled,
        "minResidency": 0,
        "coalesce": 0,
        "interval": 1,
        **tiering,
    }
    dl.config = parse_config(data)
    save_config(dl.config, dl.lab.config_path)
    return dl, models


def use(dl: DaemonLab, model: OllamaModel, times: int = 1) -> None:
    """Open the model's weights through the models dir, as a loader does: ``times`` uses,
    each seen before the next is made. The marks are placed in a thread after the daemon is
    on the bus (an open before them is not seen: a CI run on shared cores once lost the first
    of two that way), so the first waits for the daemon's "watching" line; the watch stamps
    an open when it reads it, and each open here waits for the model's UseCount to rise (the
    window it fell in was delivered), so two are never read as one window however late the
    watch's thread reads."""
    watched(dl)
    link = dl.lab.models / model.layers[0].rel
    path = model_path(model.name)
    with ThreadPoolExecutor(1) as pool:  # callers may be inside an event loop themselves

        def count() -> int:
            async def read() -> int:
                async with await dl.client() as c:
                    return int((await c.get_all(path, MODEL))["UseCount"])

            return pool.submit(asyncio.run, read()).result()

        for i in range(times):
            before = count()
            with open(link, "rb") as f:
                f.read(4096)
            deadline = time.monotonic() + WAIT
            while count() == before:
                if time.monotonic() > deadline:
                    raise AssertionError(f"use {i + 1} of {model.name} not seen in {WAIT:.0f} s")
                time.sleep(0.1)


def watched(dl: DaemonLab) -> None:
    """Until the daemon started last says it watches the model files' opens
    (autotiering._say_watched)."""
    deadline = time.monotonic() + WAIT
    while "watching the opens of model files:" not in dl.log_of_this_run():
        if time.monotonic() > deadline:
            raise AssertionError(f"the open watch not in place within {WAIT:.0f} s:\n{dl.log()}")
        time.sleep(0.1)


async def until(c: Client, what: str, ok: Callable[[], Any], timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = await ok()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not seen within {timeout:.0f} s")
        await asyncio.sleep(0.2)


async def model(c: Client, name: str) -> dict[str, Any]:
    return await c.get_all(model_path(name), MODEL)


async def jobs(c: Client) -> list[dict[str, Any]]:
    return [props for _, props in await c.manager("ListJobs")]


def in_pool(dl: DaemonLab) -> set[str]:
    """The models whose weights are a pool copy now (the links, read on disk)."""
    pool = str(dl.lab.pool_path("local"))
    out = set()
    for p in sorted(dl.lab.models.rglob("*")):
        if p.is_symlink() and os.readlink(p).startswith(pool):
            out.add(str(p.relative_to(dl.lab.models)))
    return out


async def tiers(c: Client) -> dict[str, str]:
    return {n: (await model(c, n))["Tier"] for n in NAMES}


# --- uses make models hot, and the least valuable goes when room is needed -----------------


def test_used_models_are_promoted_and_the_least_valuable_evicted_for_a_hotter_one(
    daemon_factory,
):
    dl, m = tiering_lab(daemon_factory)
    port = free_port()
    with_metrics(dl, listen=f"127.0.0.1:{port}")
    dl.start()

    async def go() -> None:
        async with await dl.client() as c:
            await c.subscribe()
            mgr = await c.get_all(ROOT, MANAGER)
            assert (mgr["Tiering"], mgr["TieringWatch"]) == ("on", "watching"), mgr
            use(dl, m["a:1"], 2)
            await until(c, "a:1 hot", lambda: _tier_is(c, "a:1", "local"))
            use(dl, m["b:1"], 2)
            await until(c, "b:1 hot", lambda: _tier_is(c, "b:1", "local"))
            assert await tiers(c) == {"a:1": "local", "b:1": "local", "c:1": "cold"}
            a = await model(c, "a:1")
            assert a["UseCount"] == 2 and a["Value"] > 0, a
            assert a["Why"] == "auto: used 2x in 1 h", a
            # Both automatic promotes are Jobs with their reason.
            auto = [j for j in await jobs(c) if j["Reason"]]
            assert sorted((j["Operation"], j["Model"]) for j in auto) == [
                ("promote", "a:1"),
                ("promote", "b:1"),
            ]
            assert all(j["Reason"] == "auto: used 2x in 1 h" for j in auto), auto
            assert all(j["State"] == "succeeded" and j["StartedByUID"] == 0 for j in auto)
            # The pool is full; c:1, used four times, is worth more than either: the least
            # valuable (a:1 and b:1 tie; the larger, then the name: a:1) makes room.
            use(dl, m["c:1"], 4)
            await until(c, "c:1 hot", lambda: _tier_is(c, "c:1", "local"))
            assert await tiers(c) == {"a:1": "cold", "b:1": "local", "c:1": "local"}
            evict = [j for j in await jobs(c) if j["Operation"] == "demote"]
            assert [(j["Model"], j["State"]) for j in evict] == [("a:1", "succeeded")]
            # (made as soon as c:1's worth beats a:1's by the margin: after its third or
            # fourth use, as the decay of the first uses has it)
            assert re.fullmatch(
                r"made room for c:1 \(used [34]x in 1 h\); a:1 used 2x in 1 h", evict[0]["Reason"]
            ), evict
            # The engine's own view agrees with the disk: two layers in the pool, no more.
            assert {m["b:1"].layers[0].rel, m["c:1"].layers[0].rel} <= in_pool(dl)
            assert m["a:1"].layers[0].rel not in in_pool(dl)

    run(go())
    log = dl.log()
    assert "automatic tiering plan:" in log
    assert "demote a:1 started: made room for c:1" in log
    # Its metrics: the opens from cold storage (misses: a:1 twice, b:1 twice, c:1 until its
    # promote), the promotes and the eviction, by pool; promtool accepts the exposition.
    use(dl, m["b:1"])  # from RAM now: a hit
    text = wait_for(lambda: _with_hit(port), WAIT, "a hit counted")
    found = samples(text)
    assert value(found, "speedloader_tier_enabled") == 1
    assert value(found, "speedloader_tier_opens_watched") == 1
    assert value(found, "speedloader_tier_promotions_total", pool="local") == 3
    assert value(found, "speedloader_tier_evictions_total", pool="local") == 1
    assert value(found, "speedloader_tier_copied_bytes_total", pool="local") == 3 * m_size(m)
    assert value(found, "speedloader_tier_misses_total") >= 7
    assert value(found, "speedloader_tier_hits_total", pool="local") >= 1
    hits, misses = (
        value(found, "speedloader_tier_hit_bytes_total", pool="local"),
        value(found, "speedloader_tier_miss_bytes_total"),
    )
    assert hits > 0 and misses >= 7 * m_size(m) and hits % m_size(m) == 0
    assert not [k for k in found if k[0] == "speedloader_tier_thrash_total"]  # window 0
    assert value(found, "speedloader_tier_open_events_total") >= 9
    check = subprocess.run(
        [tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr


def m_size(models: dict[str, OllamaModel]) -> int:
    """The size of each of a:1, b:1, c:1 (the same layout: one layer, one config)."""
    sizes = {sum(b.size for b in models[n].blobs) for n in NAMES}
    assert len(sizes) == 1
    return sizes.pop()


def _with_hit(port: int) -> str | None:
    text = scrape(port)
    return text if 'speedloader_tier_hits_total{pool="local"}' in text else None


async def _tier_is(c: Client, name: str, tier: str) -> bool:
    props = await model(c, name)
    return props["Tier"] == tier and props["State"] == ("hot" if tier != "cold" else "cold")


def test_tiering_off_moves_nothing_though_it_sees_the_uses_and_has_a_plan(daemon_factory):
    dl, m = tiering_lab(daemon_factory, enabled=False)
    dl.start()

    async def go() -> None:
        async with await dl.client() as c:
            assert (await c.get_all(ROOT, MANAGER))["Tiering"] == "off"
            use(dl, m["a:1"], 3)
            await until(c, "a:1's uses", lambda: _uses(c, "a:1", 3))
            plan = await c.manager("TieringPlan")
            assert [tuple(p[:3]) for p in plan] == [("promote", "a:1", "local")], plan
            # Several plan intervals (1 s) pass: nothing moved, no job was started.
            await asyncio.sleep(4)
            assert await tiers(c) == {"a:1": "cold", "b:1": "cold", "c:1": "cold"}
            assert await jobs(c) == []
            assert in_pool(dl) == set()

    run(go())


async def _uses(c: Client, name: str, n: int) -> bool:
    return (await model(c, name))["UseCount"] >= n


# --- what must never be evicted ------------------------------------------------------------


def _post(url: str, body: dict[str, Any]) -> None:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200


async def _nothing_moves(c: Client, seconds: float = 4.0) -> None:
    """Several plan intervals (1 s) pass with the plan empty and no job started."""
    before = len(await jobs(c))
    await asyncio.sleep(seconds)
    assert await c.manager("TieringPlan") == []
    assert len(await jobs(c)) == before


def test_pinned_loaded_and_held_models_are_never_evicted_and_go_once_let_go(
    daemon_factory, fakes, holders
):
    dl, m = tiering_lab(daemon_factory)
    b_link = dl.lab.models / m["b:1"].layers[0].rel
    fake = FakeProcess("fake_ollama", "--model", f"b:1={b_link}")
    fakes.append(fake)
    data = dump_config(dl.config)
    data["modelPlacement"]["pinned"] = {"a:1": "local"}
    data["backend"]["apiUrl"] = fake.url
    dl.config = parse_config(data)
    save_config(dl.config, dl.lab.config_path)
    dl.start()

    async def go() -> None:
        async with await dl.client() as c:
            await c.subscribe()
            # A pin is a promote into its pool, by the plan, with no use at all.
            await until(c, "a:1 pinned in", lambda: _tier_is(c, "a:1", "local"))
            assert (await model(c, "a:1"))["Why"] == "pinned to local"
            pinned = [j for j in await jobs(c) if j["Model"] == "a:1"]
            assert [j["Reason"] for j in pinned] == ["pinned to local"], pinned
            use(dl, m["b:1"], 2)
            await until(c, "b:1 hot", lambda: _tier_is(c, "b:1", "local"))
            # The backend loads b:1 (the fake maps the pool copy through the link).
            _post(f"{fake.url}/api/generate", {"model": "b:1"})
            await until(c, "b:1 loaded", lambda: _prop(c, "b:1", "Loaded", True))
            # c:1, used five times, is worth more than either; neither may go.
            use(dl, m["c:1"], 5)
            await until(c, "c:1's uses", lambda: _uses(c, "c:1", 5))
            await _nothing_moves(c)
            assert await tiers(c) == {"a:1": "local", "b:1": "local", "c:1": "cold"}
            assert (await model(c, "b:1"))["Why"] == "in use (loaded)"
            assert (await c.get_all(ROOT, MANAGER))["TieringNextEviction"] == ""
            # Unloaded, but a process maps the copy: held, still not evicted.
            holder = Holder("map", b_link, "hold-b")
            holders.append(holder)
            _post(f"{fake.url}/api/generate", {"model": "b:1", "keep_alive": 0})
            await until(c, "b:1 unloaded", lambda: _prop(c, "b:1", "Loaded", False))
            why = f"in use (held by hold-b (pid {holder.pid}))"
            await until(c, "b:1 held", lambda: _prop(c, "b:1", "Why", why))
            await _nothing_moves(c)
            assert await tiers(c) == {"a:1": "local", "b:1": "local", "c:1": "cold"}
            # Let go: b:1 is the least valuable evictable model, and c:1 takes its place once
            # it is worth 1.5 times b:1 (whose loader and holder opened it too).
            holder.stop()
            await until(c, "b:1 let go", lambda: _prop(c, "b:1", "Holders", []))
            b_uses = (await model(c, "b:1"))["UseCount"]
            use(dl, m["c:1"], max(1, math.ceil(1.5 * b_uses) + 1 - 5))
            await until(c, "c:1 hot", lambda: _tier_is(c, "c:1", "local"))
            assert await tiers(c) == {"a:1": "local", "b:1": "cold", "c:1": "local"}
            demotes = [j["Model"] for j in await jobs(c) if j["Operation"] == "demote"]
            assert demotes == ["b:1"]

    run(go())


async def _prop(c: Client, name: str, key: str, want: Any) -> bool:
    return (await model(c, name))[key] == want


def test_a_one_off_scan_of_every_model_flushes_nothing(daemon_factory):
    dl, m = tiering_lab(daemon_factory, extra=8)
    dl.start()

    async def go() -> None:
        async with await dl.client() as c:
            use(dl, m["a:1"], 2)
            use(dl, m["b:1"], 2)
            await until(c, "a:1 hot", lambda: _tier_is(c, "a:1", "local"))
            await until(c, "b:1 hot", lambda: _tier_is(c, "b:1", "local"))
            started = len(await jobs(c))
            # A backup, a checksum run, an indexer: every other model opened once.
            scanned = [n for n in m if n not in ("a:1", "b:1")]
            for name in scanned:
                use(dl, m[name])
            for name in scanned:
                await until(c, f"{name}'s use", lambda n=name: _uses(c, n, 1))
            await _nothing_moves(c)
            assert len(await jobs(c)) == started
            assert {n: (await model(c, n))["Tier"] for n in m} == {
                n: "local" if n in ("a:1", "b:1") else "cold" for n in m
            }

    run(go())


# --- a manual promote when the pool is full --------------------------------------------------


def test_a_manual_promote_makes_room_only_when_tiering_is_on(daemon_factory):
    dl, m = tiering_lab(daemon_factory, enabled=False)
    dl.start()

    async def go() -> None:
        async with await dl.client() as c:
            await c.subscribe()
            for name in ("a:1", "b:1"):
                assert (await c.follow_job(await c.promote(name), timeout=WAIT)).success
            use(dl, m["b:1"], 3)
            await until(c, "b:1's uses", lambda: _uses(c, "b:1", 3))
            before = snapshot(dl)
            # Off: the promote fails as it always did, and nothing changed.
            path = await c.promote("c:1")
            done = await c.follow_job(path, timeout=WAIT)
            assert not done.success and "pool has room" in done.message, done
            assert (await c.get_all(path, JOB))["ErrorName"].endswith(".NoSpace")
            assert snapshot(dl) == before
            # On (SetConfig, live): the least valuable of the pool (a:1, never used) goes.
            data = json.loads(await c.manager("GetConfig"))
            data["autoTiering"]["enabled"] = True
            await c.manager("SetConfig", "s", json.dumps(data))
            # (the job's step "making room in local: demoting a:1" lasts as long as a 4 MiB
            # demote: too short to be sure to see; the demote's reason names the promote)
            path = await c.promote("c:1")
            done = await c.follow_job(path, timeout=WAIT)
            assert done.success, done
            assert await tiers(c) == {"a:1": "cold", "b:1": "local", "c:1": "local"}
            demote = [j for j in await jobs(c) if j["Operation"] == "demote"]
            assert [j["Reason"] for j in demote] == [
                f"made room in local for c:1 (job {int(path.rsplit('/', 1)[1])})"
            ]

    run(go())


# --- its memory: kept across a restart, and a bad file is not trusted ------------------------


def test_the_history_survives_a_restart_and_a_bad_state_file_starts_it_afresh(daemon_factory):
    dl, m = tiering_lab(daemon_factory, enabled=False)
    dl.start()
    state = dl.lab.state / "tiering.json"

    async def uses_of(name: str) -> int:
        async with await dl.client() as c:
            return (await model(c, name))["UseCount"]

    async def first() -> None:
        async with await dl.client() as c:
            use(dl, m["a:1"], 3)
            await until(c, "a:1's uses", lambda: _uses(c, "a:1", 3))

    run(first())
    assert dl.stop() == 0
    saved = json.loads(state.read_text())
    assert saved["models"]["a:1"][3] == 3, saved  # history.py: [heat, at, last, count, ...]
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    dl.start()
    assert run(uses_of("a:1")) == 3
    assert dl.stop() == 0
    # A file of another shape: the daemon starts, says why once, forgets, and replaces it.
    state.write_text('{"version": 1, "models": {"a:1": "many"}}')
    dl.start()
    assert run(uses_of("a:1")) == 0
    assert "tiering starts without its history" in dl.log()
    assert dl.stop() == 0
    assert json.loads(state.read_text())["models"] == {}
    # A symlink in its place is not followed, and its target is untouched.
    target = dl.lab.root / "secret"
    target.write_text("root's")
    state.unlink()
    state.symlink_to(target)
    dl.start()
    assert run(uses_of("a:1")) == 0
    assert dl.stop() == 0
    assert target.read_text() == "root's"
    assert not state.is_symlink()


def test_residency_survives_a_restart_so_a_fresh_copy_is_not_evicted_at_once(daemon_factory):
    """minResidency 600 s: a copy promoted a moment ago stays, however hot another model is,
    also after a restart (the promote's time is in tiering.json); the same copy with its time
    moved an hour back is what the plan evicts for the hotter model."""
    dl, m = tiering_lab(daemon_factory, enabled=False, minResidency=600)
    state = dl.lab.state / "tiering.json"
    dl.start()
    t0 = time.time()

    async def promote_two() -> None:
        async with await dl.client() as c:
            await c.subscribe()
            for name in ("a:1", "b:1"):
                assert (await c.follow_job(await c.promote(name), timeout=WAIT)).success

    run(promote_two())
    t1 = time.time()
    assert dl.stop() == 0
    resident = json.loads(state.read_text())["resident"]
    assert set(resident) == {"a:1", "b:1"} and all(t0 <= t <= t1 for t in resident.values())

    async def plan_after_c_is_used() -> list:
        async with await dl.client() as c:
            use(dl, m["c:1"], 4)  # worth more than either: it would take the place of one
            return [tuple(p[:3]) for p in await c.manager("TieringPlan")]

    dl.start()
    assert run(plan_after_c_is_used()) == []  # both are fresh: nothing may go yet
    assert dl.stop() == 0
    # The control: the same state with the promotes an hour old.
    data = json.loads(state.read_text())
    assert data["resident"] == resident  # read back and written again as it was
    data["resident"] = {name: t - 3600 for name, t in resident.items()}
    state.write_text(json.dumps(data))
    dl.start()

    async def plan() -> list:
        async with await dl.client() as c:
            return [tuple(p[:3]) for p in await c.manager("TieringPlan")]

    actions = run(plan())
    assert actions[-1] == ("promote", "c:1", "local"), actions
    assert [a[0] for a in actions[:-1]] == ["evict"] and actions[0][1] in ("a:1", "b:1"), actions


# --- bad settings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tiering", "said"),
    [
        ({"lowWatermark": 0.99}, "0 < lowWatermark < highWatermark <= 1"),
        ({"policy": "arc"}, "policy 'arc' is unknown: use one of gdsf, lru"),
        ({"interval": 0}, "autoTiering.interval = 0"),
        ({"admitAccesses": 0}, "admitAccesses must be 1 to 16"),
        ({"halfLife": 5}, "halfLife must be 60 to 2592000 seconds"),
        ({"enabeld": True}, "unknown key 'enabeld'"),
    ],
)
def test_bad_tiering_settings_are_refused_by_name_and_change_nothing(daemon_factory, tiering, said):
    dl, _ = tiering_lab(daemon_factory, enabled=False)
    dl.start()
    saved = dl.lab.config_path.read_bytes()

    async def go() -> None:
        async with await dl.client() as c:
            before = await c.manager("GetConfig")
            data = json.loads(before)
            data["autoTiering"] |= {"enabled": True, **tiering}
            with pytest.raises(ClientError) as exc:
                await c.manager("SetConfig", "s", json.dumps(data))
            assert exc.value.name == "InvalidArgument", exc.value
            assert said in exc.value.message, exc.value.message
            assert await c.manager("GetConfig") == before
            assert (await c.get_all(ROOT, MANAGER))["Tiering"] == "off"

    run(go())
    assert dl.lab.config_path.read_bytes() == saved
