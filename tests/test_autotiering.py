"""Automatic tiering end to end (speedloaderd/autotiering.py): the real daemon on the private
bus, a real tmpfs pool, real fanotify. This test process opens model files through the
models dir as an inference server would; the daemon sees the opens, promotes what is used
again and again, evicts the least valuable when the pool is full, and never touches what is
pinned, loaded or held, nor anything while tiering is off or for a one-off scan.

Each model here is one 4 MiB layer and a small config: a 12 MiB pool holds two (its high
watermark, 95 %, is 11.4 MiB; three would be 12 MiB and more)."""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable
from typing import Any

from speedloader_client.client import MANAGER, MODEL, Client
from speedloader_lab.modelgen import OllamaModel, make_ollama_model
from speedloaderd.bus.names import ROOT, model_path
from speedloaderd.config import dump_config, parse_config, save_config

from .buslab import DaemonLab, run
from .lab import MiB

WAIT = 60.0
NAMES = ("a:1", "b:1", "c:1")
POOL = 12 * MiB


def tiering_lab(daemon_factory, enabled: bool = True, **tiering: Any) -> tuple[DaemonLab, dict]:
    """A DaemonLab with three 4 MiB models more and automatic tiering as given (no minimum
    residency, every window of opens a use, a plan every second unless told otherwise)."""
    dl = daemon_factory()
    models = {n: make_ollama_model(dl.lab.cold, n, (4 * MiB,)) for n in NAMES}
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
    each in its own window of the open watch (opens.WINDOW, 1 s) so none is merged."""
    link = dl.lab.models / model.layers[0].rel
    for i in range(times):
        if i:
            time.sleep(1.2)
        with open(link, "rb") as f:
            f.read(4096)


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
