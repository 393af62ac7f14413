"""Crash safety: SIGKILL a real engine process at random instants of start-up, promote and
demote, many times over, then check that a restart leaves everything consistent.

The kill timer is the point of the test, not a wait for a condition: instants are drawn
uniformly over each phase's measured duration so kills land before, during and after the
journal write, the copies, the link swaps and the garbage collection.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from speedloader_lab.modelgen import make_ollama_model
from speedloaderd.config import dump_config
from speedloaderd.modelsdir import LINK_TMP_MARKER, META_TMP_MARKER
from speedloaderd.roots import is_partial
from speedloaderd.tiering import Access, Policy, Settings

from .lab import MiB, run

REPO = Path(__file__).resolve().parent.parent
ITERATIONS = int(os.environ.get("SPEEDLOADER_CRASH_ITERATIONS", "40"))


def spawn(lab, op: str, model: str, config: Path | None = None) -> subprocess.Popen:
    config = config or lab.config_path
    return subprocess.Popen(
        [sys.executable, "-m", "tests.crash_worker", str(config), op, model],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def read_line(proc: subprocess.Popen, timeout: float = 60.0) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "worker said nothing"
    return proc.stdout.readline().strip()


def timed_run(lab, op: str, model: str, config: Path | None = None) -> tuple[float, float]:
    """Run one op to completion; return (start-up seconds, op seconds: for ``auto`` from
    its job's start, see tests/crash_worker.py)."""
    t0 = time.monotonic()
    proc = spawn(lab, op, model, config)
    assert read_line(proc) == "READY"
    t1 = t_op = time.monotonic()
    if op == "auto":
        assert read_line(proc) == "STARTED"
        t_op = time.monotonic()
    assert read_line(proc) == "DONE"
    t2 = time.monotonic()
    assert proc.wait() == 0
    return t1 - t0, t2 - t_op


def kill_at_random(
    proc: subprocess.Popen,
    rng: random.Random,
    in_startup: bool,
    start_s: float,
    op_s: float,
    outcomes: dict[str, int],
    op_starts: tuple[str, ...] = ("READY",),
) -> None:
    """SIGKILL the worker at a random instant of its start-up (``in_startup``) or of its
    operation (up to 1.3 times its measured length: some kills land after it; timed from
    the last of ``op_starts``), and count whether the operation finished first."""
    if in_startup:
        time.sleep(rng.uniform(0, start_s))
        outcomes["startup"] += 1
    else:
        for line in op_starts:
            said = read_line(proc)
            assert said == line, (said, line)
        time.sleep(rng.uniform(0, 1.3 * op_s))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rest = proc.stdout.read()
    outcomes["finished" if "DONE" in rest else "interrupted"] += 1


def journal_entries(lab) -> list[str]:
    """Complete entries only: one killed while being written never described a started op."""
    return [n for n in os.listdir(lab.state / "journal") if n.endswith(".json")]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_invariants(lab, engine, model_blobs: list[str]) -> str:
    """Everything a reader or a later operation relies on; returns the model's state."""
    pool = lab.pool_path("local")
    assert os.listdir(lab.state / "journal") == []
    referenced = set()
    for model in engine.catalog.models.values():
        for f in model.data_files:
            link = lab.models / f.rel
            target = os.readlink(link)
            assert target in (str(lab.cold / f.rel), str(pool / f.rel)), (f.rel, target)
            # Never a partial or wrong file behind a link.
            assert sha(link) == sha(lab.cold / f.rel), f.rel
            if target.startswith(str(pool)):
                referenced.add(f.rel)
    for dirpath, _, files in os.walk(pool):
        for fn in files:
            rel = str(Path(dirpath, fn).relative_to(pool))
            assert not is_partial(fn), f"partial copy left: {rel}"
            assert rel in referenced, f"orphan left in pool: {rel}"
    for _dirpath, _, files in os.walk(lab.models):
        assert not [f for f in files if LINK_TMP_MARKER in f or META_TMP_MARKER in f]
    # The model under test is wholly in one place, never half promoted.
    places = {os.readlink(lab.models / rel).startswith(str(pool)) for rel in model_blobs}
    assert len(places) == 1, "model left half promoted"
    state = engine.model_status("big:1").state
    assert state in ("hot", "cold")
    # The other model, hot before every kill, stays hot: its shared blob was never pulled.
    assert engine.model_status("other:1").state == "hot"
    return state


def test_sigkill_at_random_points_of_promote_demote_and_startup(lab):
    other = make_ollama_model(lab.cold, "other:1", [4 * MiB])
    big = make_ollama_model(lab.cold, "big:1", [other.layers[0], 96 * MiB, 32 * MiB, 2048])
    lab.seal()
    config = lab.config(pools=(("local", 256 * MiB, 100),))
    lab.config_path.write_text(json.dumps(dump_config(config)))
    # Big's own blobs: the shared one rightly stays in RAM for other:1 when big is demoted.
    blobs = [b.rel for b in big.blobs if b != other.layers[0]]

    timed_run(lab, "promote", "other:1")
    start_s, promote_s = timed_run(lab, "promote", "big:1")
    _, demote_s = timed_run(lab, "demote", "big:1")

    rng = random.Random(int(os.environ.get("SPEEDLOADER_CRASH_SEED", "20261125")))
    state = "cold"
    outcomes = {"interrupted": 0, "replayed": 0, "finished": 0, "startup": 0}
    # At least ITERATIONS kills; more (up to three times as many) while too few of them have
    # cut an operation short: where a kill lands depends on the machine's load, and the
    # test proves nothing unless enough operations were really interrupted.
    for i in range(3 * ITERATIONS):
        if i >= ITERATIONS and enough(outcomes):
            break
        op = "promote" if state == "cold" else "demote"
        proc = spawn(lab, op, "big:1")
        # every fifth kill lands in start-up, i.e. inside recovery itself
        op_s = promote_s if op == "promote" else demote_s
        kill_at_random(proc, rng, i % 5 == 4, start_s, op_s, outcomes)
        pending = journal_entries(lab)

        async def restart():
            engine = await lab.engine(config)
            return engine, check_invariants(lab, engine, blobs)

        engine, state = run(restart())
        if pending:
            outcomes["replayed"] += 1
            assert any("interrupted" in a for a in engine.recovery_actions), engine.recovery_actions

    print(f"crash outcomes over {i + 1} kills: {outcomes}")
    # The test must have really cut operations short, with the journal replayed, else it
    # proved nothing.
    assert enough(outcomes), outcomes


def enough(outcomes: dict[str, int]) -> bool:
    return outcomes["interrupted"] >= ITERATIONS // 3 and outcomes["replayed"] >= 3


# --- the same for automatic tiering's own promotes and evictions ------------------------------

AUTO_ITERATIONS = int(os.environ.get("SPEEDLOADER_CRASH_AUTO_ITERATIONS", "12"))


def seed_uses(lab, model: str) -> None:
    """A tiering history in which ``model`` was used three times in the last seconds: the
    daemon's first plan promotes it (tiering.json, as autotiering.py reads it)."""
    policy = Policy(Settings(coalesce=0))
    now = time.time()
    for ago in (3, 2, 1):
        policy.record(Access(model, 0, now - ago))
    lab.state.mkdir(mode=0o755, exist_ok=True)
    (lab.state / "tiering.json").write_text(policy.to_json())


def test_sigkill_during_automatic_promotes_and_evictions(lab):
    """The daemon (not only the engine) with tiering on, killed while its plan promotes a
    model it saw used (config A) or evicts it from a pool above its high watermark (config
    B, whose watermarks a 128 MiB model in a 256 MiB pool passes); restarts stay consistent
    by the same invariants as above. other:1 is pinned: a pin is never evicted."""
    other = make_ollama_model(lab.cold, "other:1", [4 * MiB])
    big = make_ollama_model(lab.cold, "big:1", [other.layers[0], 96 * MiB, 32 * MiB, 2048])
    lab.seal()
    config = lab.config(pools=(("local", 256 * MiB, 100),), pinned={"other:1": "local"})
    tiering = {"enabled": True, "minResidency": 0, "coalesce": 0, "interval": 1}
    paths = {}
    for op, marks in (("promote", {}), ("evict", {"highWatermark": 0.3, "lowWatermark": 0.2})):
        data = dump_config(config) | {"autoTiering": tiering | marks}
        paths[op] = lab.root / f"config-{op}.json"
        paths[op].write_text(json.dumps(data))
    blobs = [b.rel for b in big.blobs if b != other.layers[0]]

    seed_uses(lab, "big:1")
    start_s, promote_s = timed_run(lab, "auto", "big:1", paths["promote"])
    _, evict_s = timed_run(lab, "auto", "big:1", paths["evict"])
    assert run(_state_after_restart(lab, config, blobs)) == "cold"

    rng = random.Random(int(os.environ.get("SPEEDLOADER_CRASH_SEED", "20261202")))
    state = "cold"
    outcomes = {"interrupted": 0, "replayed": 0, "finished": 0, "startup": 0}
    for i in range(3 * AUTO_ITERATIONS):
        if i >= AUTO_ITERATIONS and enough_auto(outcomes):
            break
        op = "promote" if state == "cold" else "evict"
        if op == "promote":
            seed_uses(lab, "big:1")
        proc = spawn(lab, "auto", "big:1", paths[op])
        # every fourth kill lands in start-up (recovery, the first plan)
        op_s = promote_s if op == "promote" else evict_s
        kill_at_random(proc, rng, i % 4 == 3, start_s, op_s, outcomes, ("READY", "STARTED"))
        pending = journal_entries(lab)
        state = run(_state_after_restart(lab, config, blobs))
        if pending:
            outcomes["replayed"] += 1

    print(f"automatic tiering crash outcomes over {i + 1} kills: {outcomes}")
    assert enough_auto(outcomes), outcomes


async def _state_after_restart(lab, config, blobs: list[str]) -> str:
    engine = await lab.engine(config)
    try:
        return check_invariants(lab, engine, blobs)
    finally:
        engine.close()


def enough_auto(outcomes: dict[str, int]) -> bool:
    return outcomes["interrupted"] >= AUTO_ITERATIONS // 3 and outcomes["replayed"] >= 2
