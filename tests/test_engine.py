"""The engine end to end on real tmpfs pools, real model files and real readers.

Every test runs in the ``lab`` fixture, which asserts at teardown that cold storage did not
change by a byte or a timestamp.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path

import gguf
import pytest
from safetensors import safe_open

from speedloader_lab.modelgen import (
    make_gguf,
    make_hf_hub_repo,
    make_ollama_model,
    make_safetensors_dir,
    make_split_gguf,
)
from speedloaderd.errors import (
    Busy,
    Cancelled,
    Failed,
    InvalidArgument,
    NoSpace,
    NoSuchModel,
    NoSuchPool,
    VerificationFailed,
)
from speedloaderd.jobs import JobState
from speedloaderd.journal import Entry
from speedloaderd.modelsdir import MARKER

from .lab import MiB, run


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_links(lab, rels, where: str) -> None:
    """Every rel is a symlink to ``<where>/<rel>`` (where = "cold" or a pool name)."""
    root = lab.cold if where == "cold" else lab.pool_path(where)
    for rel in rels:
        assert lab.link(rel) == str(root / rel), rel
        assert sha(lab.models / rel) == sha(lab.cold / rel)


# --- ollama: promote, shared blobs, demote ----------------------------------------------


def test_ollama_promote_and_demote_with_a_shared_blob(lab):
    a = make_ollama_model(lab.cold, "llama3:8b", [2 * MiB, 300])
    shared = a.layers[0]
    b = make_ollama_model(lab.cold, "team/llama3-chat:8b", [shared, 500])
    lab.seal()

    async def scenario():
        engine = await lab.engine()
        rels_a = [x.rel for x in a.blobs]
        rels_b = [x.rel for x in b.blobs]
        # Manifests are regular files, blobs symlinks to cold.
        for m in (a, b):
            manifest = lab.models / m.manifest_rel
            assert manifest.is_file() and not manifest.is_symlink()
            assert manifest.read_bytes() == (lab.cold / m.manifest_rel).read_bytes()
        assert_links(lab, rels_a + rels_b, "cold")
        assert engine.model_status("llama3:8b").state == "cold"

        msg = await engine.promote("llama3:8b").wait()
        assert "promoted llama3:8b to pool local" in msg
        assert_links(lab, rels_a, "local")
        st = engine.model_status("llama3:8b")
        assert (st.state, st.tier, st.size) == ("hot", "local", a.size)
        assert engine.model_status("team/llama3-chat:8b").state == "cold"  # partly shared only

        job = engine.promote("team/llama3-chat:8b")
        await job.wait()
        # The shared blob was already in the pool: only b's own blobs were copied.
        assert job.bytes_total == b.size - shared.size
        assert sorted(lab.pool_files("local")) == sorted(set(rels_a + rels_b))

        msg = await engine.demote("llama3:8b").wait()
        assert "shared blobs stay in RAM for team/llama3-chat:8b" in msg
        assert lab.link(shared.rel) == str(lab.pool_path("local") / shared.rel)
        only_a = sorted(set(rels_a) - set(rels_b))
        assert_links(lab, only_a, "cold")
        assert sorted(lab.pool_files("local")) == sorted(rels_b)
        assert engine.model_status("team/llama3-chat:8b").state == "hot"

        await engine.demote("team/llama3-chat:8b").wait()
        assert_links(lab, rels_a + rels_b, "cold")
        assert lab.pool_files("local") == []
        assert engine.model_status("llama3:8b").state == "cold"

    run(scenario())


def test_promote_of_hot_model_is_a_noop_and_concurrent_requests_merge(lab):
    make_ollama_model(lab.cold, "m:1", [8 * MiB])
    lab.seal()

    async def scenario():
        engine = await lab.engine()
        first = engine.promote("m:1")
        second = engine.promote("m:1")
        assert second is first  # merged: one job, one copy
        await first.wait()
        before = {p: os.stat(lab.pool_path("local") / p).st_ino for p in lab.pool_files("local")}
        msg = await engine.promote("m:1").wait()
        assert msg == "m:1 is already hot in pool local"
        after = {p: os.stat(lab.pool_path("local") / p).st_ino for p in lab.pool_files("local")}
        assert before == after  # nothing was copied again

    run(scenario())


def test_demote_of_cold_model_is_a_noop(lab):
    make_ollama_model(lab.cold, "m:1", [4096])
    lab.seal()

    async def scenario():
        engine = await lab.engine()
        assert await engine.demote("m:1").wait() == "m:1 is already cold; nothing freed"

    run(scenario())


# --- real readers through the models dir ---------------------------------------------------


def test_gguf_models_read_through_models_dir_cold_hot_and_cold_again(lab):
    single = make_gguf(lab.cold / "qwen" / "qwen2-0.5b-q4.gguf", n_tensors=3, tensor_bytes=MiB)
    parts = make_split_gguf(lab.cold, "big-model", parts=3, tensor_bytes=256 * 1024)
    lab.seal()

    def read_all(engine):
        for rel in ["qwen/qwen2-0.5b-q4.gguf", *[p.path.name for p in parts]]:
            reader = gguf.GGUFReader(lab.models / rel)
            assert len(reader.tensors) >= 1
        names = [t.name for t in gguf.GGUFReader(lab.models / "qwen/qwen2-0.5b-q4.gguf").tensors]
        assert tuple(names) == single.tensor_names

    async def scenario():
        engine = await lab.engine(lab.config(backend="llamacpp"))
        assert set(engine.catalog.models) == {"qwen/qwen2-0.5b-q4", "big-model"}
        read_all(engine)
        await engine.promote("qwen/qwen2-0.5b-q4").wait()
        await engine.promote("big-model").wait()
        assert_links(lab, [p.path.name for p in parts], "local")
        assert os.path.realpath(lab.models / "qwen/qwen2-0.5b-q4.gguf").startswith(
            str(lab.pool_path("local"))
        )
        read_all(engine)
        await engine.demote("big-model").wait()
        await engine.demote("qwen/qwen2-0.5b-q4").wait()
        read_all(engine)
        assert lab.pool_files("local") == []

    run(scenario())


def test_safetensors_dir_and_hub_cache_read_through_models_dir(lab):
    d = make_safetensors_dir(lab.cold, "org/plain", shards=2, shard_bytes=MiB)
    hub = make_hf_hub_repo(lab.cold / "hub", "org/hubbed", shards=2, shard_bytes=MiB)
    lab.seal()

    def read_all():
        for shard in d.shards:
            with safe_open(str(lab.models / shard), framework="numpy") as f:
                assert list(f.keys())
        snap = lab.models / "hub" / "models--org--hubbed" / "snapshots" / hub.revision
        shards = sorted(p for p in os.listdir(snap) if p.endswith(".safetensors"))
        assert shards
        for shard in shards:
            with safe_open(str(snap / shard), framework="numpy") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    assert f.get_tensor(key).size > 0
        index = json.loads((lab.models / "org/plain/model.safetensors.index.json").read_text())
        assert {f"org/plain/{v}" for v in index["weight_map"].values()} == set(d.shards)

    async def scenario():
        engine = await lab.engine(lab.config(backend="huggingface"))
        assert set(engine.catalog.models) == {"org/plain", "org/hubbed"}
        read_all()
        # The hub snapshot entries are the same relative links HF makes.
        snap = lab.models / "hub" / "models--org--hubbed" / "snapshots" / hub.revision
        for entry in os.listdir(snap):
            assert os.readlink(snap / entry).startswith("../../blobs/")
        for name in ("org/plain", "org/hubbed"):
            await engine.promote(name).wait()
            assert engine.model_status(name).state == "hot"
        read_all()
        for name in ("org/plain", "org/hubbed"):
            await engine.demote(name).wait()
        read_all()
        assert lab.pool_files("local") == []

    run(scenario())


# --- placement, pins, errors ---------------------------------------------------------------


def test_fastest_fit_fails_over_and_pins_are_hard(lab):
    big = make_ollama_model(lab.cold, "big:1", [12 * MiB])
    make_ollama_model(lab.cold, "small:1", [MiB])
    lab.seal()
    pools = (("fast", 8 * MiB, 200), ("slow", 64 * MiB, 50))

    async def scenario():
        engine = await lab.engine(lab.config(pools=pools))
        await engine.promote("small:1").wait()
        assert engine.model_status("small:1").tier == "fast"
        await engine.promote("big:1").wait()  # does not fit the fast pool
        assert engine.model_status("big:1").tier == "slow"
        await engine.demote("big:1").wait()

        # Pinned to the small fast pool: fails with the reason, never lands elsewhere.
        await engine.pin("big:1", "fast")
        assert engine.model_status("big:1").pinned_pool == "fast"
        with pytest.raises(NoSpace, match="fast"):
            await engine.promote("big:1").wait()
        assert_links(lab, [x.rel for x in big.blobs], "cold")
        assert "big" not in " ".join(lab.pool_files("slow") + lab.pool_files("fast"))
        with pytest.raises(InvalidArgument, match="pinned to 'fast'"):
            await engine.promote("big:1", "slow").wait()
        await engine.unpin("big:1")
        await engine.promote("big:1", "slow").wait()
        assert engine.model_status("big:1").tier == "slow"

        # Pinning a hot model elsewhere moves it.
        job = await engine.pin("small:1", "slow")
        assert job is not None
        await job.wait()
        st = engine.model_status("small:1")
        assert (st.tier, st.pinned_pool) == ("slow", "slow")
        assert lab.pool_files("fast") == []

    run(scenario())


def test_bad_input_gets_a_clear_error_and_changes_nothing(lab):
    m = make_ollama_model(lab.cold, "m:1", [MiB])
    lab.seal()

    async def scenario():
        engine = await lab.engine()
        for call, exc, needle in [
            (lambda: engine.promote("nope:1"), NoSuchModel, "no model named 'nope:1'"),
            (lambda: engine.promote("../../etc/passwd"), InvalidArgument, "not a valid model"),
            (lambda: engine.promote("m:1", "nowhere"), NoSuchPool, "no pool named 'nowhere'"),
            (lambda: engine.promote("m:1", "../x"), InvalidArgument, "not a valid pool name"),
            (lambda: engine.demote("a/../../b"), InvalidArgument, "'..'"),
            (lambda: engine.resize_pool("local", -5), InvalidArgument, "positive"),
        ]:
            with pytest.raises(exc, match=needle):
                call()
        for coro, exc in [
            (engine.pin("m:1", "nowhere"), NoSuchPool),
            (engine.unpin("m:1"), InvalidArgument),
        ]:
            with pytest.raises(exc):
                await coro
        assert engine.jobs == {}
        assert_links(lab, [x.rel for x in m.blobs], "cold")
        assert lab.pool_files("local") == []

    run(scenario())


def test_a_failed_job_keeps_its_error_name(lab):
    """An asynchronous NoSpace says NoSpace on the job, not only "failed"; a job that
    succeeds has no error name."""
    make_ollama_model(lab.cold, "big:1", [12 * MiB])
    make_ollama_model(lab.cold, "small:1", [MiB])
    lab.seal()

    async def scenario():
        engine = await lab.engine(lab.config(pools=(("local", 8 * MiB, 100),)))
        job = engine.promote("big:1")  # accepted at once: the room is only known later
        assert job.error_name == ""
        with pytest.raises(NoSpace):
            await job.wait()
        assert job.state is JobState.FAILED
        assert job.error_name == "org.speedloader.Speedloader1.Error.NoSpace"
        ok = engine.promote("small:1")
        await ok.wait()
        assert (ok.state, ok.error_name) == (JobState.SUCCEEDED, "")

    run(scenario())


def test_a_job_that_fails_on_a_bug_is_named_failed():
    from speedloaderd.jobs import Job, run_job

    async def scenario():
        async def body(job):
            raise RuntimeError("a bug")

        job = Job("promote", model="m:1")
        run_job(job, body)
        with pytest.raises(Exception, match="internal error during promote: a bug"):
            await job.wait()
        assert job.error_name == "org.speedloader.Speedloader1.Error.Failed"

    run(scenario())


def test_demote_while_promoting_is_busy(lab):
    make_ollama_model(lab.cold, "m:1", [32 * MiB])
    lab.seal()

    async def scenario():
        engine = await lab.engine()
        job = engine.promote("m:1")
        with pytest.raises(Busy, match="cancel that job first"):
            engine.demote("m:1")
        await job.wait()

    run(scenario())


# --- failures roll back cleanly ---------------------------------------------------------


def test_cancel_leaves_no_trace(lab):
    m = make_ollama_model(lab.cold, "m:1", [200 * MiB])
    lab.seal()

    async def scenario():
        engine = await lab.engine(lab.config(pools=(("local", 256 * MiB, 100),)))
        job = engine.promote("m:1")
        job.listeners.append(lambda j: j.bytes_done > 0 and j.cancel())
        with pytest.raises(Cancelled):
            await job.wait()
        assert job.state is JobState.CANCELLED
        assert job.error_name == "org.speedloader.Speedloader1.Error.Cancelled"
        assert lab.pool_files("local") == []
        assert_links(lab, [x.rel for x in m.blobs], "cold")
        assert os.listdir(lab.state / "journal") == []

    run(scenario())


def test_pool_filling_up_mid_copy_rolls_back(lab):
    m = make_ollama_model(lab.cold, "m:1", [8 * MiB, 24 * MiB])
    lab.seal()

    async def scenario():
        from speedloaderd.config import dump_config, parse_config

        data = dump_config(lab.config(pools=(("local", 40 * MiB, 100),)))
        # One stream: the second blob is preallocated only after the first is copied, so
        # the pool can fill in between (with parallel streams both take their room at once).
        data["storage"]["copyStreams"] = 1
        engine = await lab.engine(parse_config(data))
        job = engine.promote("m:1")
        filler = lab.pool_path("local") / "filler"

        def eat_space(j):
            # Someone else fills the pool once the copy is under way: a real ENOSPC.
            if j.bytes_done > 0 and not filler.exists():
                with open(filler, "wb") as f:
                    f.write(b"\0" * (30 * MiB))

        job.listeners.append(eat_space)
        with pytest.raises(NoSpace, match="full"):
            await job.wait()
        filler.unlink()
        assert lab.pool_files("local") == []
        assert_links(lab, [x.rel for x in m.blobs], "cold")

    run(scenario())


def test_concurrent_promotes_do_not_overbook_a_pool(lab):
    make_ollama_model(lab.cold, "a:1", [20 * MiB])
    make_ollama_model(lab.cold, "b:1", [20 * MiB])
    lab.seal()

    async def scenario():
        engine = await lab.engine(lab.config(pools=(("local", 32 * MiB, 100),)))
        ja, jb = engine.promote("a:1"), engine.promote("b:1")
        results = await asyncio.gather(ja.wait(), jb.wait(), return_exceptions=True)
        failed = [r for r in results if isinstance(r, Exception)]
        assert len(failed) == 1 and isinstance(failed[0], NoSpace), results
        # Refused by placement before copying a byte, not by ENOSPC halfway through.
        assert "no connected pool has room" in str(failed[0])
        assert [j.bytes_done for j in (ja, jb) if j.error] == [0]
        states = sorted(engine.model_status(n).state for n in ("a:1", "b:1"))
        assert states == ["cold", "hot"]
        assert len(lab.pool_files("local")) == 2  # one model's blob + config, nothing else

    run(scenario())


def test_corrupt_copy_is_refused_before_the_link_moves(lab):
    m = make_ollama_model(lab.cold, "m:1", [MiB])
    # Damage the blob on cold storage before sealing: its name no longer matches its content.
    blob = lab.cold / m.layers[0].rel
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF
    blob.write_bytes(bytes(data))
    lab.seal()

    async def scenario():
        engine = await lab.engine()
        with pytest.raises(VerificationFailed, match="sha256"):
            await engine.promote("m:1").wait()
        assert lab.link(m.layers[0].rel) == str(blob)
        assert lab.pool_files("local") == []

    run(scenario())


def test_model_with_problems_is_not_promoted(lab):
    m = make_ollama_model(lab.cold, "m:1", [MiB])
    os.unlink(lab.cold / m.layers[0].rel)
    lab.seal()

    async def scenario():
        engine = await lab.engine()
        st = engine.model_status("m:1")
        assert st.state == "degraded" and st.problems
        with pytest.raises(Failed, match="cannot be promoted"):
            engine.promote("m:1")

    run(scenario())


# --- pools ---------------------------------------------------------------------------------


def test_disconnect_demotes_then_unmounts_and_connect_restores(lab):
    m = make_ollama_model(lab.cold, "m:1", [4 * MiB])
    lab.seal()

    async def scenario():
        engine = await lab.engine()
        await engine.promote("m:1").wait()
        msg = await engine.disconnect_pool("local").wait()
        assert "1 model(s) now served from cold storage" in msg
        assert engine.pool_status("local").state == "unmounted"
        assert_links(lab, [x.rel for x in m.blobs], "cold")
        with pytest.raises(Failed, match="no pool is connected"):
            await engine.promote("m:1").wait()
        await engine.connect_pool("local").wait()
        assert engine.pool_status("local").state == "mounted"
        await engine.promote("m:1").wait()
        assert engine.model_status("m:1").state == "hot"

    run(scenario())


def test_resize_grows_live_and_refuses_to_shrink_below_use(lab):
    m = make_ollama_model(lab.cold, "m:1", [12 * MiB])
    lab.seal()

    async def scenario():
        engine = await lab.engine(lab.config(pools=(("local", 16 * MiB, 100),)))
        await engine.promote("m:1").wait()
        with pytest.raises(NoSpace, match="cannot shrink"):
            await engine.resize_pool("local", 4 * MiB).wait()
        assert engine.pool_status("local").size == 16 * MiB
        await engine.resize_pool("local", 32 * MiB).wait()
        assert engine.pool_status("local").size == 32 * MiB
        assert engine.config.pools[0].size == 32 * MiB
        assert_links(lab, [x.rel for x in m.blobs], "local")

    run(scenario())


def test_add_and_remove_pool(lab):
    make_ollama_model(lab.cold, "m:1", [MiB])
    lab.seal()
    from speedloaderd.config import PoolConfig

    async def scenario():
        engine = await lab.engine()
        await engine.add_pool(PoolConfig(name="extra", path=lab.pool_path("extra"), size=8 * MiB))
        with pytest.raises(InvalidArgument, match="already exists"):
            await engine.add_pool(PoolConfig(name="extra", path=lab.pool_path("x2"), size=MiB))
        # A new pool goes to <poolsRoot>/<name> and nowhere else, not even for root.
        elsewhere = lab.root / "elsewhere"
        with pytest.raises(InvalidArgument, match="poolsRoot"):
            await engine.add_pool(PoolConfig(name="y", path=elsewhere, size=MiB))
        assert "y" not in engine.pools and not elsewhere.exists()
        await engine.connect_pool("extra").wait()
        await engine.promote("m:1", "extra").wait()
        with pytest.raises(Busy, match="disconnect it first"):
            await engine.remove_pool("extra")
        await engine.disconnect_pool("extra").wait()
        await engine.remove_pool("extra")
        assert "extra" not in engine.pools
        assert engine.model_status("m:1").state == "cold"

    run(scenario())


# --- models dir ----------------------------------------------------------------------------


def test_models_dir_refuses_someone_elses_directory(lab):
    make_ollama_model(lab.cold, "m:1", [MiB])
    lab.seal()
    lab.models.mkdir()
    (lab.models / "precious.txt").write_text("not ours")

    async def scenario():
        with pytest.raises(Failed, match="not empty and was not made by speedloader"):
            await lab.engine()
        assert (lab.models / "precious.txt").read_text() == "not ours"

    run(scenario())


def test_rescan_adds_new_models_and_removes_gone_ones(lab):
    a = make_ollama_model(lab.cold, "a:1", [MiB])

    async def scenario():
        engine = await lab.engine()
        (lab.models / "blobs" / "unrelated-ollama-pull").write_bytes(b"x")  # not ours: kept
        b = make_ollama_model(lab.cold, "b:1", [MiB])
        assert await engine.rescan() == 2
        assert_links(lab, [x.rel for x in b.blobs], "cold")
        await engine.promote("a:1").wait()
        for p in [a.manifest_rel, *(x.rel for x in a.blobs)]:
            os.unlink(lab.cold / p)
        assert await engine.rescan() == 1
        assert not (lab.models / a.manifest_rel).exists()
        assert not any(os.path.lexists(lab.models / x.rel) for x in a.blobs)
        assert (lab.models / "blobs" / "unrelated-ollama-pull").exists()
        assert (lab.models / MARKER).exists()
        # The pool copies of a model that is gone are garbage, collected by health repair.
        report = await engine.health(repair=True)
        assert report.ok
        assert lab.pool_files("local") == []

    run(scenario())


# --- recovery ------------------------------------------------------------------------------


def test_restart_cleans_leftovers_and_keeps_hot_models(lab):
    hot = make_ollama_model(lab.cold, "hot:1", [2 * MiB])
    half = make_ollama_model(lab.cold, "half:1", [MiB, MiB])
    lab.seal()

    async def first():
        engine = await lab.engine()
        await engine.promote("hot:1").wait()

    run(first())
    pool = lab.pool_path("local")
    # Leftovers of a crash: a partial copy, a complete copy no link uses, a half-written link,
    # and the journal entry of a promote whose copies did not all finish.
    (pool / "blobs").mkdir(exist_ok=True)
    (pool / "blobs" / ".sha256-abc.sl-partial-1234").write_bytes(b"partial")
    (pool / half.layers[0].rel).write_bytes((lab.cold / half.layers[0].rel).read_bytes())
    os.symlink("/nowhere", lab.models / "blobs" / ".sha256-x.sl-link-1a2b")
    from speedloaderd.journal import Journal

    j = Journal(lab.state / "journal")
    j.write(Entry("promote-9-abc", "promote", "half:1", "local", tuple(x.rel for x in half.blobs)))

    async def second():
        engine = await lab.engine()
        assert_links(lab, [x.rel for x in hot.blobs], "local")
        assert_links(lab, [x.rel for x in half.blobs], "cold")
        assert lab.pool_files("local") == sorted(x.rel for x in hot.blobs)
        assert os.listdir(lab.state / "journal") == []
        assert not any(".sl-link-" in n for n in os.listdir(lab.models / "blobs"))
        assert engine.model_status("hot:1").state == "hot"
        assert (await engine.health()).ok

    run(second())


def test_interrupted_promote_with_all_copies_done_is_finished(lab):
    m = make_ollama_model(lab.cold, "m:1", [MiB, 2048])
    lab.seal()

    async def first():
        await lab.engine()

    run(first())
    pool = lab.pool_path("local")
    for b in m.blobs:  # every copy reached its final name; the links never moved
        (pool / b.rel).parent.mkdir(parents=True, exist_ok=True)
        (pool / b.rel).write_bytes((lab.cold / b.rel).read_bytes())
    from speedloaderd.journal import Journal

    Journal(lab.state / "journal").write(
        Entry("promote-1-x", "promote", "m:1", "local", tuple(b.rel for b in m.blobs))
    )

    async def second():
        engine = await lab.engine()
        assert engine.model_status("m:1").state == "hot"
        assert_links(lab, [b.rel for b in m.blobs], "local")

    run(second())


def test_pool_lost_across_reboot_repoints_to_cold(lab):
    m = make_ollama_model(lab.cold, "m:1", [MiB])
    lab.seal()

    async def first():
        engine = await lab.engine()
        await engine.promote("m:1").wait()
        await asyncio.to_thread(engine.pools["local"].unmount)

    run(first())  # the pool's RAM is gone, as after a reboot

    async def second():
        engine = await lab.engine()
        assert engine.pool_status("local").state == "mounted"
        assert_links(lab, [b.rel for b in m.blobs], "cold")
        assert engine.model_status("m:1").state == "cold"

    run(second())


# --- health --------------------------------------------------------------------------------


def test_health_finds_and_repairs_damage(lab):
    m = make_ollama_model(lab.cold, "m:1", [MiB, 4096])
    other = make_ollama_model(lab.cold, "o:1", [2048])
    lab.seal()

    async def scenario():
        engine = await lab.engine()
        await engine.promote("m:1").wait()
        assert (await engine.health(verify_digests=True)).ok
        pool = lab.pool_path("local")
        # A corrupted pool copy, a link pointing out of every root, an orphan.
        copy = pool / m.layers[0].rel
        data = bytearray(copy.read_bytes())
        data[0] ^= 1
        copy.write_bytes(bytes(data))
        os.unlink(lab.models / other.layers[0].rel)
        os.symlink("/etc/passwd", lab.models / other.layers[0].rel)
        (pool / "orphan.bin").write_bytes(b"o")

        report = await engine.health(verify_digests=True)
        assert not report.ok
        checks = {(f.check, f.subject) for f in report.errors()}
        assert ("digests", f"local:{m.layers[0].rel}") in checks
        assert ("links", other.layers[0].rel) in checks
        assert any(f.check == "orphans" and "orphan.bin" in f.subject for f in report.findings)
        # Nothing repaired without asking.
        assert lab.link(other.layers[0].rel) == "/etc/passwd"

        report = await engine.health(repair=True, verify_digests=True)
        assert report.ok and all(f.repaired for f in report.findings if f.status != "ok")
        assert lab.link(m.layers[0].rel) == str(lab.cold / m.layers[0].rel)
        assert_links(lab, [other.layers[0].rel], "cold")
        assert "orphan.bin" not in lab.pool_files("local")
        assert (await engine.health(verify_digests=True)).ok

    run(scenario())


def test_a_file_in_a_links_place_is_logged_and_reported_never_repaired_over(lab, caplog):
    """A sync leaves a file it did not make where a link belongs (SyncReport.conflicts): the
    daemon's log names its path once, Health reports it as a warning, and no repair replaces
    the file with a link. Once it is moved away, a rescan makes the link and the warning goes."""
    m = make_ollama_model(lab.cold, "m:1", [4096])
    lab.seal()
    rel = m.layers[0].rel

    async def scenario():
        engine = await lab.engine()
        os.unlink(lab.models / rel)
        (lab.models / rel).write_bytes(b"someone else's file")
        with caplog.at_level("WARNING", logger="speedloaderd.modelsdir"):
            await engine.rescan()
            await engine.rescan()  # still there: not logged again
        logged = [r.getMessage() for r in caplog.records if r.name == "speedloaderd.modelsdir"]
        assert len(logged) == 1 and str(lab.models / rel) in logged[0], logged
        assert "move it away, then rescan" in logged[0]

        for repair in (False, True):
            report = await engine.health(repair=repair)
            (finding,) = [f for f in report.findings if f.subject == rel]
            assert (finding.check, finding.status, finding.repaired) == (
                "models-dir",
                "warning",
                False,
            )
            assert str(lab.models / rel) in finding.message
            assert (lab.models / rel).read_bytes() == b"someone else's file"

        os.unlink(lab.models / rel)
        await engine.rescan()
        assert_links(lab, [rel], "cold")
        report = await engine.health()
        assert report.ok and not [f for f in report.findings if f.subject == rel], report

    run(scenario())


def test_a_running_copy_is_not_counted_twice_against_the_pool(lab):
    """A copy preallocates its file, so statvfs already counts it: placement must not also
    subtract it as 'in flight' (that refused a 900 MiB model with 2 GiB of room)."""
    from .buslab import write_zero_blob

    make_ollama_model(lab.cold, "a:1", [write_zero_blob(lab.cold, 900 * MiB)])
    make_ollama_model(lab.cold, "b:1", [write_zero_blob(lab.cold, 900 * MiB + 4096)])
    lab.seal()

    async def scenario():
        engine = await lab.engine(lab.config(pools=(("local", 2048 * MiB, 100),)))
        ja = engine.promote("a:1")
        started = asyncio.Event()
        ja.listeners.append(lambda j: j.bytes_done > 0 and started.set())
        await asyncio.wait_for(started.wait(), 60)
        # a is under way: its big file about to be, being or already preallocated; b must fit
        # whichever side of that preallocation its placement falls on.
        assert 0 < ja.bytes_done < ja.bytes_total
        jb = engine.promote("b:1")
        await asyncio.gather(ja.wait(), jb.wait())
        assert [engine.model_status(n).state for n in ("a:1", "b:1")] == ["hot", "hot"]

    run(scenario())


# --- verify once (issue 15) ---------------------------------------------------------------


def test_a_verified_blob_is_not_hashed_again_until_its_cold_file_changes(lab):
    m = make_ollama_model(lab.cold, "m:1", [MiB, 300])
    lab.seal()
    blob = lab.cold / m.layers[0].rel

    async def scenario():
        engine = await lab.engine()
        first = await engine.promote("m:1").wait()
        assert "not hashed again" not in first  # hashed, and recorded
        await engine.demote("m:1").wait()
        again = await engine.promote("m:1").wait()
        # Both layers and the config blob (each named by its digest): trusted as they are.
        assert again.endswith("; 3 blobs verified before and unchanged, not hashed again"), again
        await engine.demote("m:1").wait()
        engine.close()
        # A restart keeps the records (stateDir/verified.json).
        engine = await lab.engine()
        assert "3 blobs verified before" in await engine.promote("m:1").wait()
        await engine.demote("m:1").wait()
        # A cold-storage writer changes the blob (same size; its ctime moves, as any write
        # moves it) and the catalog is rescanned: the record no longer fits, it is hashed,
        # and the change is caught.
        lab.sealed = None  # this test changes cold storage on purpose
        data = bytearray(blob.read_bytes())
        data[7] ^= 0xFF
        blob.write_bytes(bytes(data))
        await engine.rescan()
        with pytest.raises(VerificationFailed, match="sha256"):
            await engine.promote("m:1").wait()
        assert lab.link(m.layers[0].rel) == str(blob)
        assert m.layers[0].rel not in lab.pool_files("local")
        engine.close()

    run(scenario())


def test_health_verify_drops_every_record(lab):
    make_ollama_model(lab.cold, "m:1", [MiB])
    lab.seal()

    async def scenario():
        engine = await lab.engine()
        await engine.promote("m:1").wait()
        assert len(engine.verified) == 2
        await engine.health(verify_digests=True)
        assert len(engine.verified) == 0
        await engine.demote("m:1").wait()
        assert "not hashed again" not in await engine.promote("m:1").wait()
        engine.close()

    run(scenario())


@pytest.mark.parametrize(
    "content",
    [b"{not json", b'{"version": 2, "blobs": {}}', b'{"version": 1, "blobs": {"sha256:zz": {}}}'],
)
def test_a_bad_verified_file_trusts_nothing_and_is_replaced(lab, content, caplog):
    make_ollama_model(lab.cold, "m:1", [MiB])
    lab.seal()
    lab.state.mkdir(parents=True, exist_ok=True)
    (lab.state / "verified.json").write_bytes(content)

    async def scenario():
        engine = await lab.engine()
        assert len(engine.verified) == 0
        assert "not hashed again" not in await engine.promote("m:1").wait()
        engine.close()

    run(scenario())
    assert "no blob is taken as verified" in caplog.text
    assert json.loads((lab.state / "verified.json").read_text())["version"] == 1


def test_a_symlinked_verified_file_is_not_followed(lab, tmp_path):
    make_ollama_model(lab.cold, "m:1", [MiB])
    lab.seal()
    target = tmp_path / "elsewhere.json"
    target.write_text("untouched")
    lab.state.mkdir(parents=True, exist_ok=True)
    (lab.state / "verified.json").symlink_to(target)

    async def scenario():
        engine = await lab.engine()
        assert len(engine.verified) == 0
        await engine.promote("m:1").wait()
        engine.close()

    run(scenario())
    assert target.read_text() == "untouched"
    assert not (lab.state / "verified.json").is_symlink()


# --- parallel copies (issue 15) -----------------------------------------------------------
# Cold storage is hangfs (tests/robustness/hangfs.py): a real FUSE mount over the lab's cold
# dir whose reads of the chosen blobs wait in the kernel until the test says "release". A
# copy is "in flight" when its read is parked there; hangfs reports each change of the count.


def _on_hangfs(lab, fs, streams: int, pool_mib: int = 64):
    from speedloaderd.config import dump_config, parse_config

    data = dump_config(lab.config(pools=(("local", pool_mib * MiB, 100),)))
    data["storage"]["path"] = str(fs.mountpoint)
    data["storage"]["copyStreams"] = streams
    return parse_config(data)


def _blob_names(*models) -> list[str]:
    return [layer.rel.rpartition("/")[2] for m in models for layer in m.layers]


async def _until(what: str, cond, timeout: float = 60) -> None:
    """Wait on the event loop until ``cond()`` holds (a failure after ``timeout``)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, f"never saw {what}"
        await asyncio.sleep(0.02)


def _dev(engine, name: str) -> int:
    (dev,) = {f.ident.dev for f in engine.catalog.models[name].data_files}
    return dev


@pytest.fixture
def hangfs(lab, workdir):
    from .robustness.test_lifecycle import HangFS

    made = []

    def make(stuck: list[str]) -> HangFS:
        fs = HangFS(lab.cold, workdir / "coldfs", stuck)
        made.append(fs)
        return fs

    yield make
    for fs in made:
        fs.close()


def _assert_nothing_left(lab, engine, m, journal: bool = True) -> None:
    assert lab.pool_files("local") == []  # no copy, no partial file
    for rel in (x.rel for x in m.blobs):
        assert lab.link(rel) == str(engine.config.storage.path / rel), rel
    if journal:
        assert os.listdir(lab.state / "journal") == []


async def _parked_promote(lab, fs, name: str, streams: int):
    """An engine on the hanging cold storage with ``streams`` copy streams, promoting
    ``name`` until as many of its reads as there are streams wait in the kernel."""
    engine = await lab.engine(_on_hangfs(lab, fs, streams=streams))
    dev = _dev(engine, name)
    job = engine.promote(name)
    await asyncio.to_thread(fs.wait_parked, streams)
    return engine, dev, job


def test_a_models_files_copy_side_by_side_up_to_copy_streams(lab, hangfs):
    m = make_ollama_model(lab.cold, "m:1", [2 * MiB] * 4)
    lab.seal()
    fs = hangfs(_blob_names(m))

    async def scenario():
        engine, dev, job = await _parked_promote(lab, fs, "m:1", streams=3)
        # Three reads wait in the kernel at once: three files of one model in flight; the
        # fourth layer waits for a stream, and none can free while the reads hang.
        await _until("the fourth layer queued", lambda: engine.copies.streams.waiting(dev))
        fs.drain()
        seen = (fs.parked, engine.copies.streams.running(dev))
        fs.command("release")
        msg = await job.wait()
        assert job.bytes_done == job.bytes_total == m.size  # one meter across the files
        engine.close()
        return seen, msg

    (parked, running), msg = run(scenario())
    assert (parked, running) == (3, 3)
    assert msg.startswith("promoted m:1 to pool local")
    for rel in (x.rel for x in m.blobs):
        assert sha(lab.pool_path("local") / rel) == sha(lab.cold / rel)


def test_the_stream_bound_holds_across_two_promotes_and_grows_live(lab, hangfs):
    from speedloaderd.config import with_changes

    a = make_ollama_model(lab.cold, "a:1", [2 * MiB] * 2)
    b = make_ollama_model(lab.cold, "b:1", [2 * MiB] * 2)
    lab.seal()
    fs = hangfs(_blob_names(a, b))

    async def scenario():
        engine = await lab.engine(_on_hangfs(lab, fs, streams=2))
        dev = _dev(engine, "a:1")
        assert dev == _dev(engine, "b:1")  # one cold filesystem
        ja, jb = engine.promote("a:1"), engine.promote("b:1")
        await asyncio.to_thread(fs.wait_parked, 2)
        # Four stuck layers, two streams for both promotes: two read, two wait.
        await _until("two layers queued", lambda: engine.copies.streams.waiting(dev) >= 2)
        fs.drain()
        bounded = (fs.parked, engine.copies.streams.running(dev))
        # storage.copyStreams is live: raised, the waiting layers start at once.
        storage = engine.config.storage.model_copy(update={"copy_streams": 4})
        storage.model_fields_set.add("copy_streams")
        await engine.set_config(with_changes(engine.config, storage=storage))
        await asyncio.to_thread(fs.wait_parked, 4)
        raised = fs.parked
        fs.command("release")
        await asyncio.gather(ja.wait(), jb.wait())
        states = [engine.model_status(n).state for n in ("a:1", "b:1")]
        left = engine.copies.streams.running(dev)
        engine.close()
        return bounded, raised, states, left

    bounded, raised, states, left = run(scenario())
    assert bounded == (2, 2)
    assert raised == 4
    assert states == ["hot", "hot"]
    assert left == 0  # every stream given back


def test_one_shard_changed_mid_copy_fails_the_promote_and_leaves_nothing(lab, hangfs):
    m = make_ollama_model(lab.cold, "m:1", [256 * 1024, 4 * MiB, 4 * MiB, 4 * MiB])
    lab.seal()
    fs = hangfs(_blob_names(m))
    first = lab.cold / m.layers[0].rel

    async def scenario():
        engine = await lab.engine(_on_hangfs(lab, fs, streams=4))
        job = engine.promote("m:1")
        await asyncio.to_thread(fs.wait_parked, 4)  # all four shards mid-copy
        # A cold-storage writer changes one shard under the running copies (same size).
        lab.sealed = None  # this test changes cold storage on purpose
        data = bytearray(first.read_bytes())
        data[11] ^= 0xFF
        first.write_bytes(bytes(data))
        fs.command("release")
        with pytest.raises(Failed) as failed:  # VerificationFailed is a Failed
            await job.wait()
        await _until("the copy threads returned", lambda: not engine.copies.abandoned)
        dev = _dev(engine, "m:1")
        await _until("every stream given back", lambda: not engine.copies.streams.running(dev))
        _assert_nothing_left(lab, engine, m)
        engine.close()
        return failed.value, job

    err, job = run(scenario())
    assert m.layers[0].rel.rpartition("/")[2] in str(err), err  # the shard that changed
    assert job.error_name in (
        "org.speedloader.Speedloader1.Error.Failed",
        "org.speedloader.Speedloader1.Error.VerificationFailed",
    ), job.error_name


def test_cancel_mid_parallel_copy_leaves_nothing(lab, hangfs):
    m = make_ollama_model(lab.cold, "m:1", [2 * MiB] * 4)
    lab.seal()
    fs = hangfs(_blob_names(m))

    async def scenario():
        engine, dev, job = await _parked_promote(lab, fs, "m:1", streams=2)
        await _until("two layers queued", lambda: engine.copies.streams.waiting(dev) >= 2)
        job.cancel()  # two copies in the kernel's read, two waiting for a stream
        fs.command("release")  # the reads return; the copies stop at their chunk's end
        with pytest.raises(Cancelled):
            await job.wait()
        await _until("the copy threads returned", lambda: not engine.copies.abandoned)
        await _until("every stream given back", lambda: not engine.copies.streams.running(dev))
        waiting = engine.copies.streams.waiting(dev)
        _assert_nothing_left(lab, engine, m)
        engine.close()
        return job, waiting

    job, waiting = run(scenario())
    assert job.state is JobState.CANCELLED
    assert waiting == 0


def test_moving_a_mapped_model_names_who_holds_the_old_copy_and_refuse_copies_nothing(lab):
    """A pin to another pool moves a hot model: the old pool's copy is deleted once the
    links point at the new one, and tmpfs keeps its pages while a process maps it (a server
    that loaded it from there). The move says so; under demotePolicy refuse it is refused
    before anything is copied, as a demote of a mapped copy is."""
    from speedloaderd.config import DemotePolicy, with_changes

    from .test_holders import Holder

    m = make_ollama_model(lab.cold, "m:1", [2 * MiB])
    lab.seal()
    layer = m.layers[0].rel
    pools = (("fast", 8 * MiB, 200), ("slow", 8 * MiB, 50))

    async def scenario():
        engine = await lab.engine(lab.config(pools=pools))
        await engine.promote("m:1", "fast").wait()
        server = Holder("map", lab.pool_path("fast") / layer, "llama-server")
        try:
            job = await engine.pin("m:1", "slow")  # demotePolicy wait (the default)
            assert job is not None
            moved = await job.wait()
        finally:
            server.stop()
        assert engine.model_status("m:1").tier == "slow"
        assert lab.link(layer) == str(lab.pool_path("slow") / layer)
        assert lab.pool_files("fast") == []  # deleted; its pages were held until the stop

        backend = engine.config.backend.model_copy(update={"demote_policy": DemotePolicy.REFUSE})
        backend.model_fields_set.add("demote_policy")
        await engine.set_config(with_changes(engine.config, backend=backend))
        server = Holder("map", lab.pool_path("slow") / layer, "llama-server")
        try:
            with pytest.raises(Busy) as refused:
                await (await engine.pin("m:1", "fast")).wait()
            after = (engine.model_status("m:1").tier, lab.link(layer), lab.pool_files("fast"))
        finally:
            server.stop()
        engine.close()
        return moved, server.pid, str(refused.value), after

    moved, pid, refused, (tier, link, fast_files) = run(scenario())
    assert moved.startswith("promoted m:1 to pool slow: 2.0M copied"), moved
    assert "; 2M stays in use in pool fast while llama-server (pid " in moved, moved
    assert f"llama-server (pid {pid}) maps m:1's RAM copy in pool slow (2M)" in refused
    assert "nothing was copied" in refused
    # Refused: still in the slow pool, its link unchanged, nothing copied into fast.
    assert (tier, link, fast_files) == ("slow", str(lab.pool_path("slow") / layer), [])


def test_disconnecting_a_pool_a_process_maps_waits_then_refuses_and_changes_nothing(lab):
    """A disconnect deletes the pool's copies and unmounts it; a process mapping one keeps its
    pages and the tmpfs busy. So the holders are asked first, as a demote asks them
    (demotePolicy wait, here 1 s): still held, the disconnect is refused naming the process,
    with the links, the copy and the mount as they were; once it lets go, it goes through."""
    from speedloaderd.config import with_changes
    from speedloaderd.pools import PoolState

    from .test_holders import Holder

    m = make_ollama_model(lab.cold, "m:1", [2 * MiB])
    lab.seal()
    layer = m.layers[0].rel

    async def scenario():
        engine = await lab.engine()
        backend = engine.config.backend.model_copy(update={"demote_timeout": 1})
        backend.model_fields_set.add("demote_timeout")
        await engine.set_config(with_changes(engine.config, backend=backend))
        await engine.promote("m:1").wait()
        before = lab.pool_files("local")
        server = Holder("map", lab.pool_path("local") / layer, "llama-server")
        try:
            with pytest.raises(Busy) as refused:
                await engine.disconnect_pool("local").wait()
            after = (
                engine.pools["local"].state(),
                lab.link(layer),
                lab.pool_files("local"),
                engine.model_status("m:1").state.value,
            )
        finally:
            server.stop()
        msg = await engine.disconnect_pool("local").wait()
        gone = (engine.pools["local"].state(), lab.link(layer))
        engine.close()
        return str(refused.value), server.pid, before, after, msg, gone

    refused, pid, before, after, msg, gone = run(scenario())
    assert refused.startswith("cannot disconnect pool 'local': llama-server (pid "), refused
    assert f"(pid {pid}) still maps m:1's RAM copy (2M) after 1 s" in refused
    assert "(ollama at http://127.0.0.1:11434: cannot connect" in refused  # asked, down
    assert refused.endswith("; nothing was deleted: stop it, or raise backend.demoteTimeout, "
                            "or set backend.demotePolicy to force"), refused  # fmt: skip
    assert after == (
        PoolState.MOUNTED,
        str(lab.pool_path("local") / layer),
        before,
        "hot",
    )
    assert layer in before
    assert msg == "pool local disconnected; 1 model(s) now served from cold storage"
    assert gone == (PoolState.UNMOUNTED, str(lab.cold / layer))
