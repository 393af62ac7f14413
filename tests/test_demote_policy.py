"""Issue 12 item 4: a demote frees RAM or says why not (speedloaderd/freeing.py), on the real
daemon and real tmpfs, with the fake servers (each maps the model file, as the real ones do)
and a plain mapper process with no API.

The matrix: per backend (Ollama, llama.cpp router and single-model mode, vLLM with and
without sleep), and per server behaviour (as documented, lying: says unloaded and still maps,
stuck: still listed, slow: past the adapter's timeout, down), each demotePolicy (wait, refuse,
force). Every refused or timed-out demote is checked to have changed nothing (links, pool
files, the model's tier), and no demote's message calls RAM freed while a process holds it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from speedloader_client.client import JOB, MODEL, POOL, Client
from speedloader_lab.fake_backend import FakeProcess
from speedloader_lab.modelgen import make_gguf, make_hf_hub_repo
from speedloaderd.backends import backend_for
from speedloaderd.bus.names import model_path, pool_path
from speedloaderd.config import BackendConfig, BackendType, DemotePolicy, save_config

from .buslab import DaemonLab, run
from .test_holders import LAYER, WAIT, Holder, blob_of, holders, until

__all__ = ["holders"]  # the fixture, shared with test_holders

MODEL_NAME = "tiny:1b"  # a 256 KiB layer (shared with small:3b) and a 300 B config


@dataclass
class Demoted:
    success: bool
    message: str
    error_name: str
    steps: list[str] = field(default_factory=list)


def snapshot(dl: DaemonLab) -> dict[str, Any]:
    """What a demote changes: the models dir links, the pool's files, the model's tier."""
    lab = dl.lab
    links = {
        str(p.relative_to(lab.models)): os.readlink(p)
        for p in sorted(lab.models.rglob("*"))
        if p.is_symlink()
    }
    return {"links": links, "pool": lab.pool_files("local")}


async def demote(c: Client, name: str = MODEL_NAME, timeout: float = 90) -> Demoted:
    steps: list[str] = []

    def seen(props: dict[str, Any]) -> None:
        step = props.get("Step", "")
        if step and (not steps or steps[-1] != step):
            steps.append(step)

    path = await c.demote(name)
    result = await c.follow_job(path, on_update=seen, timeout=timeout)
    job = await c.get_all(path, JOB)
    return Demoted(result.success, result.message, job["ErrorName"], steps)


def configure(dl: DaemonLab, kind: BackendType, url: str, policy: DemotePolicy, secs: int) -> None:
    backend = dl.config.backend
    backend.type, backend.api_url = kind, url
    backend.demote_policy, backend.demote_timeout = policy, secs
    save_config(dl.config, dl.lab.config_path)


@pytest.fixture
def fakes() -> Iterator[list[FakeProcess]]:
    started: list[FakeProcess] = []
    yield started
    for f in started:
        f.stop()


async def promoted(c: Client) -> None:
    await c.subscribe()
    assert (await c.follow_job(await c.promote(MODEL_NAME), timeout=60)).success


async def pool_props(c: Client) -> dict[str, Any]:
    return await c.get_all(pool_path("local"), POOL)


def freed(message: str) -> str:
    m = re.search(r"demoted \S+: (\S+) freed", message)
    assert m, message
    return m.group(1)


# --- as documented: the backend unloads, the demote frees ------------------------------

BIG = 256 * 1024  # the weights file each lab's model has (its pool copy is what is mapped)


def backend_lab(dl: DaemonLab, kind: str) -> str:
    """Give the daemon a model of ``kind``'s layout in cold storage; returns its name.
    The catalog is scanned as the backend lays models out (Ollama blobs, GGUF files, the
    hub cache), so llama.cpp and vLLM each get their own model."""
    lab = dl.lab
    if kind == "ollama":
        return MODEL_NAME
    if kind.startswith("llamacpp"):
        make_gguf(lab.cold / "tiny-gguf.gguf", n_tensors=1, tensor_bytes=BIG)
        btype, name = "llamacpp", "tiny-gguf"
    else:
        make_hf_hub_repo(
            lab.cold / "hub", "org/tiny", files={"config.json": b"{}", "model.safetensors": BIG}
        )
        btype, name = "vllm", "org/tiny"
    lab.seal()  # cold storage holds the new model too; it must stay as it is
    dl.config = lab.config(backend=btype, pools=(("local", dl.pool_size, 100),))
    return name


def weights_rel(dl: DaemonLab) -> str:
    """The largest pool copy (the weights), relative to the pool and the models dir."""
    root = dl.lab.pool_path("local")
    return max(dl.lab.pool_files("local"), key=lambda r: (root / r).stat().st_size)


def fake_for(kind: str, name: str, path: Path) -> tuple[FakeProcess, bool]:
    """The fake server of ``kind`` serving ``name`` from ``path`` (the models dir link,
    resolved when the fake maps it: the pool copy once promoted), and whether it must be
    asked to load it (vLLM and llama.cpp's single mode map theirs at start)."""
    spec = f"{name}={path}"
    if kind == "ollama":
        return FakeProcess("fake_ollama", "--model", spec), True
    if kind == "llamacpp-router":
        return FakeProcess("fake_llamacpp", "--router", "--model", spec), True
    if kind == "vllm-sleep":
        return FakeProcess("fake_vllm", "--dev-mode", "--model", spec), False
    raise AssertionError(kind)


async def set_backend(c: Client, **keys: Any) -> None:
    """Change backend keys through SetConfig: live (the model stays hot, nothing rebuilt)."""
    config = await c.get_config()
    config["backend"].update(keys)
    await c.manager("SetConfig", "s", json.dumps(config))


@pytest.mark.parametrize("kind", ["ollama", "llamacpp-router", "vllm-sleep"])
def test_demote_unloads_through_the_backend_then_frees(daemon_factory, fakes, kind):
    dl = daemon_factory()
    name = backend_lab(dl, kind)
    save_config(dl.config, dl.lab.config_path)
    dl.start()

    async def scenario() -> None:
        async with await dl.client() as c:
            await c.subscribe()
            assert (await c.follow_job(await c.promote(name), timeout=60)).success
            rel = weights_rel(dl)
            copy = dl.lab.pool_path("local") / rel
            fake, load = fake_for(kind, name, dl.lab.models / rel)
            fakes.append(fake)
            await set_backend(c, apiUrl=fake.url)
            if load:
                assert (await backend_for(BackendConfig(type=dl.config.backend.type,
                        api_url=fake.url)).preload(name)).ok  # fmt: skip
            assert fake.maps_file(copy)  # the pool copy, mapped, as the real servers do
            props = await until(c, model_path(name), MODEL, lambda p: p["Loaded"], "Loaded")
            assert any(h[0] == fake.pid for h in props["Holders"])
            done = await demote(c, name)
            assert done.success, done.message
            assert "unloaded it first" in done.message, done.message
            assert not fake.maps_file(copy) and not copy.exists()
            assert "stays in use" not in done.message
            assert freed(done.message) != "0B"
            pool = await until(
                c, pool_path("local"), POOL, lambda p: p["UsedBytes"] < BIG, "the RAM back"
            )
            assert pool["HeldBytes"] == 0
            st = os.statvfs(dl.lab.pool_path("local"))
            assert (st.f_blocks - st.f_bfree) * st.f_frsize < BIG  # df agrees

    run(scenario())


def test_a_model_nobody_maps_is_demoted_without_asking_the_backend(daemon_factory, fakes):
    """No holder of the pool copy: nothing to unload (a server that loaded the cold file
    before the promote keeps it, not reloaded for nothing), and a backend that is down
    does not stop the demote."""
    dl = daemon_factory()
    configure(dl, BackendType.OLLAMA, "http://127.0.0.1:9", DemotePolicy.REFUSE, 5)
    dl.start()

    async def scenario() -> None:
        async with await dl.client() as c:
            await promoted(c)
            done = await demote(c)
            assert done.success, done.message
            assert done.steps == []  # no unload step, no wait
            assert freed(done.message) != "0B"

    run(scenario())
    assert "asking ollama at http://127.0.0.1:9 " not in dl.log()


# --- misbehaving servers and plain mappers: wait, refuse, force -----------------------


def ollama_fake(dl: DaemonLab, fakes: list[FakeProcess]) -> FakeProcess:
    """The fake Ollama serving tiny:1b's layer through the models dir link."""
    rel = blob_of(dl.lab, LAYER)
    fake = FakeProcess("fake_ollama", "--model", f"{MODEL_NAME}={dl.lab.models / rel}")
    fakes.append(fake)
    return fake


@pytest.mark.parametrize(
    ("mode", "said"),
    [
        ("lying", "no longer lists"),  # says unloaded, keeps the mapping
        ("stuck", "still lists"),  # keeps listing and mapping it
    ],
)
def test_wait_times_out_on_a_server_that_does_not_let_go_and_deletes_nothing(
    daemon_factory, fakes, mode, said
):
    dl = daemon_factory()
    fake = ollama_fake(dl, fakes)
    configure(dl, BackendType.OLLAMA, fake.url, DemotePolicy.WAIT, 2)
    dl.start()

    async def scenario() -> None:
        async with await dl.client() as c:
            await promoted(c)
            backend = backend_for(dl.config.backend)
            assert (await backend.preload(MODEL_NAME)).ok
            fake.set_mode(mode)
            before = snapshot(dl)
            done = await demote(c)
            assert not done.success
            assert done.error_name.endswith(".Busy")
            assert f"(pid {fake.pid}) still maps {MODEL_NAME}'s RAM copy" in done.message
            assert "after 2 s" in done.message and said in done.message
            assert "nothing was deleted" in done.message
            assert snapshot(dl) == before  # links, pool files: as they were
            model = await c.get_all(model_path(MODEL_NAME), MODEL)
            assert model["Tier"] == "local" and model["State"] == "hot"
            assert (await pool_props(c))["HeldBytes"] == 0  # nothing deleted, nothing "held"

    run(scenario())


def test_refuse_names_the_process_at_once_and_deletes_nothing(daemon_factory, holders):
    dl = daemon_factory()
    configure(dl, BackendType.OLLAMA, "http://127.0.0.1:9", DemotePolicy.REFUSE, 600)
    dl.start()
    rel = blob_of(dl.lab, LAYER)

    async def scenario() -> None:
        async with await dl.client() as c:
            await promoted(c)
            mapper = Holder("map", dl.lab.models / rel, "mapper")
            holders.append(mapper)
            before = snapshot(dl)
            done = await demote(c, timeout=60)  # refuse: never the 600 s wait
            assert not done.success and done.error_name.endswith(".Busy")
            assert done.message.startswith(f"mapper (pid {mapper.pid}) still maps tiny:1b's")
            # The backend is down (nobody at port 9): said, and it changes nothing.
            assert "ollama at http://127.0.0.1:9" in done.message
            assert "nothing was deleted" in done.message
            assert snapshot(dl) == before

    run(scenario())


def test_wait_ends_when_the_holder_goes_and_then_frees(daemon_factory, holders):
    dl = daemon_factory()
    configure(dl, BackendType.OLLAMA, "http://127.0.0.1:9", DemotePolicy.WAIT, 600)
    dl.start()
    rel = blob_of(dl.lab, LAYER)

    async def scenario() -> None:
        async with await dl.client() as c:
            await promoted(c)
            mapper = Holder("map", dl.lab.models / rel, "mapper")
            holders.append(mapper)
            path = await c.demote(MODEL_NAME)
            job = await until(
                c, path, JOB, lambda p: p["Step"].startswith("waiting for mapper"), "waiting"
            )
            assert f"mapper (pid {mapper.pid}) to let go of tiny:1b" in job["Step"]
            assert (dl.lab.pool_path("local") / rel).exists()  # not before it lets go
            mapper.stop()
            result = await c.follow_job(path, timeout=WAIT)
            assert result.success, result.message
            assert "stays in use" not in result.message
            assert not (dl.lab.pool_path("local") / rel).exists()

    run(scenario())


def test_cancel_while_waiting_deletes_nothing(daemon_factory, holders):
    dl = daemon_factory()
    configure(dl, BackendType.OLLAMA, "http://127.0.0.1:9", DemotePolicy.WAIT, 600)
    dl.start()
    rel = blob_of(dl.lab, LAYER)

    async def scenario() -> None:
        async with await dl.client() as c:
            await promoted(c)
            mapper = Holder("map", dl.lab.models / rel, "mapper")
            holders.append(mapper)
            before = snapshot(dl)
            path = await c.demote(MODEL_NAME)
            await until(c, path, JOB, lambda p: p["Step"].startswith("waiting for"), "waiting")
            await c.cancel(path)
            result = await c.follow_job(path, timeout=WAIT)
            job = await c.get_all(path, JOB)
            assert not result.success and job["ErrorName"].endswith(".Cancelled")
            assert "nothing was deleted" in result.message
            assert snapshot(dl) == before
            model = await c.get_all(model_path(MODEL_NAME), MODEL)
            assert model["State"] == "hot"

    run(scenario())


def test_force_deletes_and_the_pool_reports_the_held_ram(daemon_factory, fakes):
    """A lying server and force: the copy is deleted, and neither the job nor the pool
    calls the held RAM freed until the process lets go."""
    dl = daemon_factory()
    fake = ollama_fake(dl, fakes)
    configure(dl, BackendType.OLLAMA, fake.url, DemotePolicy.FORCE, 600)
    dl.start()
    rel = blob_of(dl.lab, LAYER)

    async def scenario() -> None:
        async with await dl.client() as c:
            await promoted(c)
            assert (await backend_for(dl.config.backend).preload(MODEL_NAME)).ok
            fake.set_mode("lying")
            done = await demote(c, timeout=60)
            assert done.success, done.message
            # The 300 B config is freed; the 256 KiB layer is not, and the message says so.
            comm = Path(f"/proc/{fake.pid}/comm").read_text().strip()
            # What is freed is the rest of the model (its config, its manifest), not the
            # layer: the message says who keeps that.
            assert freed(done.message) != "0B"
            assert done.message.endswith(
                f"; 256K stays in use in the pool while {comm} (pid {fake.pid}) maps the "
                "deleted copy"
            ), done.message
            assert not (dl.lab.pool_path("local") / rel).exists()
            pool = await until(
                c, pool_path("local"), POOL, lambda p: p["HeldBytes"] == LAYER, "HeldBytes"
            )
            assert pool["UsedBytes"] >= LAYER
            fake.stop()
            await until(
                c, pool_path("local"), POOL,
                lambda p: p["HeldBytes"] == 0 and p["UsedBytes"] < LAYER, "the RAM released",
            )  # fmt: skip

    run(scenario())


def test_a_slow_server_costs_the_demote_its_timeout_and_is_named(daemon_factory, fakes):
    dl = daemon_factory()
    fake = ollama_fake(dl, fakes)
    configure(dl, BackendType.OLLAMA, fake.url, DemotePolicy.REFUSE, 600)
    dl.start()

    async def scenario() -> None:
        async with await dl.client() as c:
            await promoted(c)
            assert (await backend_for(dl.config.backend).preload(MODEL_NAME)).ok
            before = snapshot(dl)
            fake.set_mode("slow", slow=15)  # past the adapter's 10 s
            done = await demote(c, timeout=60)
            assert not done.success and done.error_name.endswith(".Busy")
            assert f"(pid {fake.pid}) still maps" in done.message
            assert "ollama at" in done.message  # what the server did (did not answer)
            assert snapshot(dl) == before

    run(scenario())


def test_llama_single_model_mode_cannot_unload_so_wait_or_refuse(daemon_factory, fakes):
    dl = daemon_factory()
    name = backend_lab(dl, "llamacpp-single")
    configure(dl, BackendType.LLAMACPP, "http://127.0.0.1:9", DemotePolicy.REFUSE, 1)
    dl.start()

    async def scenario() -> None:
        async with await dl.client() as c:
            await c.subscribe()
            assert (await c.follow_job(await c.promote(name), timeout=60)).success
            rel = weights_rel(dl)
            # Single-model mode (-m) maps its model at start, and cannot unload it.
            fake = FakeProcess("fake_llamacpp", "--model", f"{name}={dl.lab.models / rel}")
            fakes.append(fake)
            assert fake.maps_file(dl.lab.pool_path("local") / rel)
            await set_backend(c, apiUrl=fake.url)
            before = snapshot(dl)
            done = await demote(c, name)
            assert not done.success and done.error_name.endswith(".Busy"), done.message
            assert f"(pid {fake.pid}) still maps {name}'s RAM copy" in done.message
            assert "single-model mode" in done.message
            assert snapshot(dl) == before
            await set_backend(c, demotePolicy="wait")
            done = await demote(c, name)
            assert not done.success and "after 1 s" in done.message, done.message
            assert snapshot(dl) == before
            fake.stop()  # the admin stops the server: now the demote frees
            done = await demote(c, name)
            assert done.success and "stays in use" not in done.message, done.message

    run(scenario())


@pytest.mark.parametrize("kind", ["llamacpp-router", "vllm-sleep"])
@pytest.mark.parametrize("policy", [DemotePolicy.WAIT, DemotePolicy.REFUSE, DemotePolicy.FORCE])
def test_a_lying_server_of_each_kind_meets_each_policy(daemon_factory, fakes, kind, policy):
    """Says it unloaded (llama.cpp: status unloaded; vLLM: asleep) and keeps the mapping:
    wait and refuse delete nothing; force deletes and the RAM is reported held, not freed."""
    dl = daemon_factory()
    name = backend_lab(dl, kind)
    configure(dl, dl.config.backend.type, "http://127.0.0.1:9", policy, 1)
    dl.start()

    async def scenario() -> None:
        async with await dl.client() as c:
            await c.subscribe()
            assert (await c.follow_job(await c.promote(name), timeout=60)).success
            rel = weights_rel(dl)
            copy = dl.lab.pool_path("local") / rel
            fake, load = fake_for(kind, name, dl.lab.models / rel)
            fakes.append(fake)
            await set_backend(c, apiUrl=fake.url)
            if load:
                config = dl.config.backend.model_copy(update={"api_url": fake.url})
                assert (await backend_for(config).preload(name)).ok
            fake.set_mode("lying")
            before = snapshot(dl)
            done = await demote(c, name)
            comm = Path(f"/proc/{fake.pid}/comm").read_text().strip()
            if policy is DemotePolicy.FORCE:
                assert done.success, done.message
                assert f"stays in use in the pool while {comm} (pid {fake.pid})" in done.message
                # The server's word is quoted, not believed: /proc says it still maps it.
                assert "says it unloaded it)" in done.message, done.message
                assert not copy.exists() and fake.maps_file(f"{copy} (deleted)")
                pool = await until(
                    c, pool_path("local"), POOL, lambda p: p["HeldBytes"] >= BIG, "HeldBytes"
                )
                assert pool["UsedBytes"] >= BIG
                return
            assert not done.success and done.error_name.endswith(".Busy"), done.message
            assert f"{comm} (pid {fake.pid}) still maps {name}'s RAM copy" in done.message
            assert "nothing was deleted" in done.message
            assert snapshot(dl) == before and copy.exists()

    run(scenario())
