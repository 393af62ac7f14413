"""Issue 10, items 1 and 2, on the real daemon: no single entry on cold storage stops a start
or a Rescan, and cold storage that is unmounted, late or emptied is a state, never a wipe."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from speedloader_client.client import MANAGER, MODEL, ROOT, Client, ClientError
from speedloader_lab.modelgen import make_ollama_model
from speedloaderd.bus.names import model_path
from speedloaderd.config import save_config

from ..buslab import MiB, run
from ..test_cli import slctl

LONG_GGUF = "m" * 245 + ".gguf"  # 250 characters: the old temp names passed NAME_MAX


async def promote(c: Client, model: str) -> None:
    await c.subscribe()
    result = await c.follow_job(await c.promote(model), timeout=120)
    assert result.success, result.message


async def demote(c: Client, model: str) -> None:
    await c.subscribe()
    result = await c.follow_job(await c.demote(model), timeout=120)
    assert result.success, result.message


async def wait_for_manager(c: Client, key: str, value: object, timeout: float = 60) -> dict:
    """Wait (on the condition, bounded) until a Manager property has ``value``."""
    deadline = time.monotonic() + timeout
    while True:
        props = await c.get_all(ROOT, MANAGER)
        if props.get(key) == value:
            return props
        assert time.monotonic() < deadline, f"{key} stayed {props.get(key)!r}: {props}"
        await asyncio.sleep(0.1)


async def on_manager(dl, key: str, value: object) -> dict:
    async with await dl.client() as c:
        return await wait_for_manager(c, key, value)


def models_on_bus(dl) -> dict[str, tuple[str, str]]:
    async def read() -> dict[str, tuple[str, str]]:
        async with await dl.client() as c:
            objects = await c.managed_objects()
        return {
            i[MODEL]["Name"]: (i[MODEL]["Tier"], i[MODEL]["State"])
            for i in objects.values()
            if MODEL in i
        }

    return run(read())


def manager(dl) -> dict:
    async def read() -> dict:
        async with await dl.client() as c:
            return await c.get_all(ROOT, MANAGER)

    return run(read())


def rescan_error(dl) -> ClientError:
    async def call() -> ClientError:
        async with await dl.client() as c:
            try:
                await c.manager("Rescan")
            except ClientError as err:
                return err
        raise AssertionError("Rescan succeeded")

    return run(call())


# --- item 1: one bad entry ------------------------------------------------------------------


@pytest.fixture
def deep_fingerprints():
    """The lab's cold-storage fingerprint recurses per directory: 1,200 levels need room.
    Requested before daemon_factory, so it ends after that fixture's final check."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)
    yield
    sys.setrecursionlimit(old)


def test_long_name_and_deep_tree_do_not_stop_start_rescan_or_promote(
    deep_fingerprints, daemon_factory
):
    dl = daemon_factory()
    cold = dl.lab.cold
    (cold / LONG_GGUF).write_bytes(os.urandom(64 * 1024))
    deep = cold / "deep" / "/".join(["d"] * 1200)  # 1,200 nested directories
    deep.mkdir(parents=True)
    (deep / "lost.gguf").write_bytes(b"GGUF")
    (cold / "fine.gguf").write_bytes(os.urandom(4096))
    dl.lab.seal()
    dl.config = dl.lab.config(backend="llamacpp", pools=(("local", 64 * MiB, 100),))
    save_config(dl.config, dl.lab.config_path)
    dl.start()  # today: ENAMETOOLONG in the models dir sync, and the daemon exits
    long_name = LONG_GGUF.removesuffix(".gguf")
    assert models_on_bus(dl) == {long_name: ("cold", "cold"), "fine": ("cold", "cold")}
    problems = manager(dl)["ScanProblems"]
    assert any("more than 64 directories deep" in p for p in problems), problems

    async def scenario() -> None:
        async with await dl.client() as c:
            assert await c.manager("Rescan") == 2
            await promote(c, long_name)
            assert (await c.get_all(model_path(long_name), MODEL))["State"] == "hot"
            await demote(c, long_name)

    run(scenario())
    assert dl.lab.link(LONG_GGUF) == str(cold / LONG_GGUF)
    assert (dl.lab.models / LONG_GGUF).read_bytes() == (cold / LONG_GGUF).read_bytes()
    r = slctl(dl, "status")
    assert r.returncode == 0 and "more than 64 directories deep" in r.stdout, r.stdout
    r = slctl(dl, "health", "--json")
    findings = json.loads(r.stdout)["findings"]
    assert any("more than 64 directories deep" in f["message"] for f in findings), findings


def test_deeply_nested_manifest_is_a_problem_on_its_model(daemon_factory):
    dl = daemon_factory()
    manifest = dl.lab.cold / "manifests/registry.ollama.ai/library/deep/latest"
    manifest.parent.mkdir(parents=True)
    manifest.write_bytes(b"[" * 200_000)  # RecursionError in json.loads
    dl.lab.seal()
    dl.start()  # today: the RecursionError ends the start
    models = models_on_bus(dl)
    assert models["deep:latest"] == ("cold", "degraded")
    assert models["tiny:1b"] == ("cold", "cold")

    async def scenario() -> tuple[int, list[str]]:
        async with await dl.client() as c:
            count = await c.manager("Rescan")
            return count, (await c.get_all(model_path("deep:latest"), MODEL))["Problems"]

    count, problems = run(scenario())
    assert count == 4
    assert any("more than the 32 a manifest may have" in p for p in problems), problems
    r = slctl(dl, "status")
    assert "model deep:latest:" in r.stdout and "levels deep" in r.stdout, r.stdout
    health = json.loads(slctl(dl, "health", "--json").stdout)["findings"]
    assert any(f["subject"] == "deep:latest" for f in health), health


def test_a_failed_rescan_leaves_engine_and_bus_agreeing(daemon_factory):
    """The models dir is a tmpfs out of inodes: the Rescan fails with a named error, and the
    model it found is neither shown nor promotable (the engine kept the old catalog)."""
    dl = daemon_factory()
    models = dl.lab.models
    models.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(models)], check=True)
    dl.start()
    before = models_on_bus(dl)
    st = os.statvfs(models)
    used = st.f_files - st.f_ffree
    subprocess.run(["mount", "-o", f"remount,nr_inodes={used + 1}", str(models)], check=True)
    make_ollama_model(dl.lab.cold, "late:1b", (128 * 1024,))
    dl.lab.seal()
    err = rescan_error(dl)
    assert err.name == "Failed" and "could not update the models dir" in err.message
    assert models_on_bus(dl) == before

    async def try_promote() -> ClientError:
        async with await dl.client() as c:
            try:
                await c.promote("late:1b")
            except ClientError as e:
                return e
        raise AssertionError("the engine knows a model the bus does not show")

    assert run(try_promote()).name == "NoSuchModel"


# --- item 2: cold storage unavailable ------------------------------------------------------


def cold_on_tmpfs(dl, workdir: Path) -> Path:
    """Move cold storage onto a tmpfs of its own and bind it at the lab's cold path, so it
    can be unmounted and mounted again with the very same files."""
    store = workdir / "coldfs"
    store.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(store)], check=True)
    subprocess.run(["cp", "-a", f"{dl.lab.cold}/.", str(store)], check=True)
    for child in dl.lab.cold.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    mount_cold(dl, store)
    dl.lab.seal()
    return store


def mount_cold(dl, store: Path) -> None:
    subprocess.run(["mount", "--bind", str(store), str(dl.lab.cold)], check=True)


def umount_cold(dl) -> None:
    subprocess.run(["umount", str(dl.lab.cold)], check=True)


def on_disk(dl) -> dict:
    lab = dl.lab
    return {
        "links": {
            str(p.relative_to(lab.models)): os.readlink(p)
            for p in sorted(lab.models.rglob("*"))
            if p.is_symlink()
        },
        "pool": lab.pool_files("local"),
    }


def test_unmounted_cold_storage_wipes_nothing_and_comes_back(daemon_factory, workdir):
    dl = daemon_factory()
    store = cold_on_tmpfs(dl, workdir)
    dl.start()

    async def hot() -> None:
        async with await dl.client() as c:
            await promote(c, "tiny:1b")

    run(hot())
    before_disk, before_bus = on_disk(dl), models_on_bus(dl)
    assert before_bus["tiny:1b"] == ("local", "hot") and before_disk["pool"]
    blob = next(r for r, t in before_disk["links"].items() if "/pools/local/" in t)
    content = (dl.lab.models / blob).read_bytes()

    umount_cold(dl)
    err = rescan_error(dl)  # today: the empty mount point wipes every link and copy
    assert err.name == "Failed" and "the catalog, the links and the RAM copies are kept" in (
        err.message
    )
    # The bus publishes changes at its next flush (a tenth of a second): wait for it.
    m = run(on_manager(dl, "ColdStorageState", "unavailable"))
    assert "filesystem" in m["ColdStorageProblem"], m
    assert on_disk(dl) == before_disk
    assert set(models_on_bus(dl)) == set(before_bus)
    assert models_on_bus(dl)["tiny:1b"] == ("local", "hot")
    assert (dl.lab.models / blob).read_bytes() == content  # served from RAM meanwhile
    r = slctl(dl, "status")
    assert "cold storage unavailable:" in r.stdout, r.stdout
    assert json.loads(slctl(dl, "status", "--json").stdout)["coldStorage"]["state"] == (
        "unavailable"
    )
    r = slctl(dl, "health", "--repair")
    assert r.returncode != 0 and "nothing is repaired until it is back" in r.stdout
    assert on_disk(dl) == before_disk
    r = slctl(dl, "pool", "disconnect", "local")  # would leave links to nothing
    assert r.returncode == 1 and "keep serving from RAM until cold storage is back" in r.stderr
    assert on_disk(dl) == before_disk
    assert models_on_bus(dl)["tiny:1b"] == ("local", "hot")

    mount_cold(dl, store)  # the retry notices by itself: no Rescan asked for

    run(on_manager(dl, "ColdStorageState", "available"))
    assert manager(dl)["ColdStorageProblem"] == ""
    assert on_disk(dl) == before_disk and models_on_bus(dl) == before_bus

    # A daemon started while the mount is missing: unavailable, links and copies kept.
    dl.stop()
    umount_cold(dl)
    dl.start()
    m = manager(dl)
    assert m["ColdStorageState"] == "unavailable", m
    assert on_disk(dl) == before_disk
    mount_cold(dl, store)
    run(on_manager(dl, "ColdStorageState", "available"))
    assert models_on_bus(dl) == before_bus and on_disk(dl) == before_disk


def test_emptied_cold_storage_is_suspicious_until_a_person_leaves_an_entry(daemon_factory, workdir):
    dl = daemon_factory()
    store = cold_on_tmpfs(dl, workdir)
    dl.start()
    before_disk = on_disk(dl)
    assert before_disk["links"]
    for child in store.iterdir():  # every model deleted, same filesystem, nothing left
        shutil.rmtree(child)
    dl.lab.seal()
    err = rescan_error(dl)
    assert err.name == "Failed" and "is empty, but 3 model(s) were there" in err.message
    run(on_manager(dl, "ColdStorageState", "unavailable"))
    assert on_disk(dl) == before_disk and len(models_on_bus(dl)) == 3
    (store / "manifests").mkdir()  # what `ollama rm` of every model leaves
    dl.lab.seal()

    async def rescan() -> int:
        async with await dl.client() as c:
            return await c.manager("Rescan")

    assert run(rescan()) == 0
    deadline = time.monotonic() + 30  # the bus publishes the new catalog at its next flush
    while models_on_bus(dl):
        assert time.monotonic() < deadline, models_on_bus(dl)
        time.sleep(0.1)
    assert on_disk(dl)["links"] == {}
    assert manager(dl)["ColdStorageState"] == "available"
