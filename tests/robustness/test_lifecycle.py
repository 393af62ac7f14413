"""Issue 10, items 3 and 6 (and two of 7), on the real daemon on the test bus: a SetConfig
is all or nothing; an unusable path at start leaves the daemon on the bus; copies run on a
bounded executor of their own, a copy blocked in the kernel is cancellable, and SIGTERM
ends the daemon even then.

The blocked copies read cold storage from hangfs (tests/robustness/hangfs.py): a real FUSE
mount whose reads of chosen blobs never return, as an NFS or FUSE server that stops
answering. The reader waits in the kernel; only its death (the kernel's INTERRUPT) or a
"release" lets it go.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from speedloader_client.client import JOB, MANAGER, MODEL, ROOT, Client, ClientError
from speedloader_lab.modelgen import make_ollama_model
from speedloader_lab.sandbox import REPO
from speedloaderd.bus.names import model_path
from speedloaderd.config import DEFAULT_COPY_STREAMS, parse_config, save_config
from speedloaderd.pools import mount_at

from ..buslab import MiB, run

STOP_TIMEOUT = 30  # the unit's TimeoutStopSec


def config_data(dl) -> dict:
    return json.loads(dl.lab.config_path.read_text())


async def manager_props(c: Client) -> dict:
    return await c.get_all(ROOT, MANAGER)


# --- an unusable path at start ---------------------------------------------------------------


def test_start_with_models_dir_a_regular_file_stays_on_the_bus(daemon_factory):
    """Today: a traceback and exit. Now: on the bus, engine-less, the reason in ConfigError,
    nothing mounted, GetConfig shows the config to fix, and a SetConfig brings it up."""
    dl = daemon_factory()
    dl.lab.models.write_text("not a directory\n")
    dl.start()  # waits until the daemon owns its name

    async def scenario():
        async with await dl.client() as c:
            before = await manager_props(c)
            shown = await c.get_config()
            with pytest.raises(ClientError) as refused:
                await c.promote("tiny:1b")
            dl.lab.models.unlink()  # the admin fixes it and sends the config back
            await c.manager("SetConfig", "s", json.dumps(shown))
            return before, shown, refused.value, await manager_props(c), await c.managed_objects()

    before, shown, refused, after, objects = run(scenario())
    assert before["ConfigValid"] is False
    assert (
        str(dl.lab.models) in before["ConfigError"] and "not a directory" in before["ConfigError"]
    )
    assert shown["modelsDir"] == str(dl.lab.models)
    assert refused.name == "Failed" and "not a directory" in refused.message
    assert after["ConfigValid"] is True and after["ConfigError"] == ""
    assert model_path("tiny:1b") in objects
    assert dl.lab.models.is_dir() and dl.proc.poll() is None


def test_start_with_an_unsafe_state_dir_stays_on_the_bus_and_mounts_nothing(daemon_factory):
    """UnsafePath (a state dir a member could write) at start: on the bus, reason shown, and
    the pool it would have mounted is not left mounted."""
    dl = daemon_factory()
    dl.lab.state.mkdir()
    dl.lab.state.chmod(0o777)
    dl.start()

    async def scenario():
        async with await dl.client() as c:
            return await manager_props(c)

    manager = run(scenario())
    assert manager["ConfigValid"] is False and "stateDir" in manager["ConfigError"], manager
    assert mount_at(dl.lab.pool_path("local")) is None
    assert dl.proc.poll() is None


# --- SetConfig all or nothing ----------------------------------------------------------------


def _full_fs(at: Path, inodes: int) -> None:
    """A root-only tmpfs with room for only ``inodes`` inodes: a models dir there starts
    (marker written) and then fails while the links are made, after the pools are mounted."""
    at.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size=1M,nr_inodes={inodes},mode=0755", "sl-full", str(at)],
        check=True,
    )


def test_refused_set_config_is_not_saved_and_undoes_its_mounts(daemon_factory, workdir):
    """A new config whose engine fails half-way (pools mounted, models dir full): refused,
    the file byte-identical, the new pool unmounted again, the running engine in charge."""
    dl = daemon_factory()
    dl.start()
    full = workdir / "full"
    _full_fs(full, inodes=4)
    saved = dl.lab.config_path.read_bytes()
    new = config_data(dl)
    new["modelsDir"] = str(full / "models")
    extra = dl.lab.pool_path("extra")
    new["pools"].append({"name": "extra", "path": str(extra), "size": "8M", "speed": 50})

    async def scenario():
        async with await dl.client() as c:
            await c.subscribe()
            config_before = await c.get_config()
            with pytest.raises(ClientError) as refused:
                await c.manager("SetConfig", "s", json.dumps(new))
            config_after = await c.get_config()
            job = await c.promote("tiny:1b")  # the old engine still works
            result = await c.follow_job(job, timeout=60)
            return config_before, refused.value, config_after, result, await manager_props(c)

    before, refused, after, promoted, manager = run(scenario())
    assert refused.name in ("Failed", "NoSpace"), refused
    assert dl.lab.config_path.read_bytes() == saved  # not saved
    assert after == before and manager["ModelsDir"] == str(dl.lab.models)
    assert mount_at(extra) is None, "the refused config's pool stayed mounted"
    assert mount_at(dl.lab.pool_path("local")) is not None
    assert promoted.success, promoted.message
    assert "pools unmounted again: extra" in dl.log()  # it was mounted, then undone
    # and the next start still comes up with the saved config
    assert dl.stop() == 0
    dl.start()

    async def valid():
        async with await dl.client() as c:
            return await manager_props(c)

    assert run(valid())["ConfigValid"] is True


def _degraded_model(dl) -> str:
    """A model whose manifest names a blob cold storage does not have."""
    m = make_ollama_model(dl.lab.cold, "broken:1b", (64 * 1024,))
    (dl.lab.cold / m.layers[0].rel).unlink()
    dl.lab.seal()
    return "broken:1b"


def test_degraded_model_does_not_block_a_structural_change(daemon_factory, workdir):
    """Item 7: a degraded model holds no RAM; a models dir change must not wait for it
    (today: "demote every model", which it cannot be)."""
    dl = daemon_factory()
    broken = _degraded_model(dl)
    dl.start()
    new = config_data(dl)
    new["modelsDir"] = str(workdir / "models2")

    async def scenario():
        async with await dl.client() as c:
            state = (await c.get_all(model_path(broken), MODEL))["State"]
            await c.manager("SetConfig", "s", json.dumps(new))
            return state, await manager_props(c)

    state, manager = run(scenario())
    assert state == "degraded"
    assert manager["ModelsDir"] == str(workdir / "models2")
    assert json.loads(dl.lab.config_path.read_text())["modelsDir"] == str(workdir / "models2")


def test_api_url_changes_live_and_hot_models_still_block_structural_changes(daemon):
    """Item 7: backend.apiUrl is display-only: it changes with a model hot, no rebuild (the
    model stays hot). A structural change with a model hot is Busy and names the model."""
    new = config_data(daemon)
    new["backend"]["apiUrl"] = "http://127.0.0.1:11434"
    moved = config_data(daemon)
    moved["modelsDir"] = str(daemon.lab.root / "models2")

    async def scenario():
        async with await daemon.client() as c:
            await c.subscribe()
            await c.follow_job(await c.promote("tiny:1b"), timeout=60)
            await c.manager("SetConfig", "s", json.dumps(new))
            manager = await manager_props(c)
            tiny = await c.get_all(model_path("tiny:1b"), MODEL)
            with pytest.raises(ClientError) as busy:
                await c.manager("SetConfig", "s", json.dumps(moved))
            return manager, tiny, busy.value

    manager, tiny, busy = run(scenario())
    assert manager["BackendApiUrl"] == "http://127.0.0.1:11434"
    assert tiny["State"] == "hot" and tiny["Tier"] == "local"
    assert busy.name == "Busy" and "tiny:1b" in busy.message, busy
    assert json.loads(daemon.lab.config_path.read_text())["modelsDir"] == str(daemon.lab.models)


# --- copies blocked in the kernel ------------------------------------------------------------


class HangFS:
    """tests/robustness/hangfs.py running over ``source`` at ``mountpoint``."""

    def __init__(self, source: Path, mountpoint: Path, stuck: list[str]):
        mountpoint.mkdir()
        mountpoint.chmod(0o755)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.robustness.hangfs", str(source), str(mountpoint), *stuck],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        self.mountpoint = mountpoint
        self.parked = 0
        self._pending = b""  # what hangfs printed that no _line() returned yet
        assert self._line(30) == "ready"

    def _line(self, timeout: float) -> str | None:
        """The next line hangfs printed, or None if none came within ``timeout``.

        Read with os.read and our own buffer: select() on the pipe plus a buffered
        readline() would take several lines into Python's buffer and return one, and the
        next select() would then wait for output that already came ("only 1 read(s)
        hanging" when four "parked" lines had arrived together)."""
        assert self.proc.stdout is not None
        while b"\n" not in self._pending:
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            if not ready:
                return None
            data = os.read(self.proc.stdout.fileno(), 4096)
            if not data:
                return None  # hangfs exited
            self._pending += data
        raw, _, self._pending = self._pending.partition(b"\n")
        line = raw.decode().strip()
        if line.startswith("parked "):
            self.parked = int(line.split()[1])
        return line

    def wait_parked(self, at_least: int, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while self.parked < at_least:
            left = deadline - time.monotonic()
            assert left > 0 and self._line(left) is not None, (
                f"only {self.parked} read(s) hanging, expected {at_least}"
            )
        return self.parked

    def drain(self) -> None:
        while self._line(0) is not None:
            pass

    def command(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def hanging_lab(daemon_factory, workdir):
    """A DaemonLab whose cold storage is hangfs over the lab's cold dir: six models whose
    blob reads hang, and free:1b that reads normally."""
    dl = daemon_factory()
    stuck_models = []
    stuck_blobs = []
    for i in range(6):
        m = make_ollama_model(dl.lab.cold, f"stuck{i}:1b", (2 * MiB,))
        stuck_models.append(m.name)
        stuck_blobs.append(m.layers[0].rel.rpartition("/")[2])
    make_ollama_model(dl.lab.cold, "free:1b", (1 * MiB,))
    dl.lab.seal()
    fs = HangFS(dl.lab.cold, workdir / "coldfs", stuck_blobs)
    data = config_data(dl)
    data["storage"]["path"] = str(fs.mountpoint)
    save_config(parse_config(data), dl.lab.config_path)
    try:
        yield dl, fs, stuck_models
    finally:
        if dl.proc is not None:
            dl.proc.kill()  # a daemon this test could not stop must not keep the mount busy
            dl.proc.wait()
            dl.proc = None
        fs.close()


def _journal(dl) -> list[str]:
    d = dl.lab.state / "journal"
    return sorted(os.listdir(d)) if d.exists() else []


def test_stuck_copies_stall_nothing_cancel_at_once_and_sigterm_ends(hanging_lab):
    dl, fs, stuck = hanging_lab
    dl.start()

    async def scenario():
        async with await dl.client() as c:
            await c.subscribe()
            done = await c.follow_job(await c.promote("free:1b"), timeout=60)
            assert done.success, done.message
            jobs = [await c.promote(m) for m in stuck]
            # as many copies start as cold storage has streams (storage.copyStreams); each
            # blocks in the kernel reading its blob, the others wait for a stream
            await asyncio.to_thread(fs.wait_parked, DEFAULT_COPY_STREAMS)
            # metadata never queues behind them (today: the default executor's six threads
            # are all blocked, and each of these waits forever)
            await asyncio.wait_for(c.pin("free:1b", "local"), 60)
            await asyncio.wait_for(c.unpin("free:1b"), 60)
            config = await asyncio.wait_for(c.get_config(), 60)
            demoted = await c.follow_job(await c.demote("free:1b"), timeout=60)
            parked = fs.parked
            # Cancel returns at once; every job ends cancelled though the reads still hang
            followers = [asyncio.ensure_future(c.follow_job(j, timeout=60)) for j in jobs]
            for j in jobs:
                await asyncio.wait_for(c.cancel(j), 10)
            results = await asyncio.gather(*followers)
            states = [(await c.get_all(j, JOB))["State"] for j in jobs]
            return config, demoted, parked, results, states

    config, demoted, parked, results, states = run(scenario())
    assert config["storage"]["path"] == str(fs.mountpoint)
    assert demoted.success, demoted.message
    assert parked == DEFAULT_COPY_STREAMS, (
        f"{parked} copies ran at once from one cold filesystem; copyStreams is "
        f"{DEFAULT_COPY_STREAMS}"
    )
    assert all(not r.success for r in results) and states == ["cancelled"] * 6, states
    fs.drain()
    assert fs.parked == DEFAULT_COPY_STREAMS, "the cancelled reads were expected to still hang"

    stop_seconds = _sigterm(dl)
    assert "still blocked" in dl.log()
    print(
        f"SIGTERM with {DEFAULT_COPY_STREAMS} copies blocked in the kernel: exited in "
        f"{stop_seconds:.1f} s"
    )
    _assert_restart_is_clean(dl, fs, stuck)


def _sigterm(dl) -> float:
    """SIGTERM the daemon; fail unless it exits 0 within the unit's stop timeout. Seconds."""
    started = time.monotonic()
    dl.proc.send_signal(signal.SIGTERM)
    try:
        rc = dl.proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"SIGTERM did not end the daemon in {STOP_TIMEOUT} s:\n{dl.log()[-3000:]}")
    seconds = time.monotonic() - started
    dl.proc = None
    assert rc == 0, dl.log()[-3000:]
    return seconds


def test_sigterm_ends_the_daemon_with_a_copy_blocked_in_the_kernel(hanging_lab):
    """No cancel first: SIGTERM alone. Today the process waits forever for the blocked
    worker thread at exit (Engine.shutdown's 20 s, then the interpreter's join)."""
    dl, fs, stuck = hanging_lab
    dl.start()

    async def scenario():
        async with await dl.client() as c:
            await c.subscribe()
            job = await c.promote(stuck[0])
            await asyncio.to_thread(fs.wait_parked, 1)
            return job

    run(scenario())
    partial = [f for f in dl.lab.pool_files("local") if ".sl-partial-" in f]
    assert partial, "the blocked copy has no partial file in the pool"
    stop_seconds = _sigterm(dl)
    print(f"SIGTERM with one copy blocked in the kernel: exited in {stop_seconds:.1f} s")
    _assert_restart_is_clean(dl, fs, stuck[:1])


def _assert_restart_is_clean(dl, fs: HangFS, stuck: list[str]) -> None:
    """Cold storage answers again; the next start removes the partial copies, no journal
    entry is left, every link points at cold storage, and the stuck models promote."""
    fs.command("release")
    dl.start()

    async def scenario():
        async with await dl.client() as c:
            await c.subscribe()
            states = {m: (await c.get_all(model_path(m), MODEL))["State"] for m in stuck}
            journal_then = _journal(dl)
            pool_then = dl.lab.pool_files("local")
            links = {str(p): os.readlink(p) for p in dl.lab.models.rglob("*") if p.is_symlink()}
            result = await c.follow_job(await c.promote(stuck[0]), timeout=60)
            return states, journal_then, pool_then, links, result

    states, journal, pool, links, result = run(scenario())
    assert set(states.values()) == {"cold"}, states
    assert journal == []
    assert not [f for f in pool if ".sl-partial-" in f], pool
    for link, target in links.items():
        assert target.startswith(str(fs.mountpoint)), f"{link} -> {target}"
    assert result.success, result.message


def test_a_copy_publishes_its_pools_usage_when_it_takes_the_room(lab, workdir):
    """A copy preallocates its whole file before it reads a byte: the pool's usage changes
    then, and the engine says so then (a pool event the bus turns into Pool.UsedBytes), not
    only when the job ends or the usage watch next looks (every 5 s: a dashboard's bar
    stayed at 0 through a copy shorter than that). Here the source read hangs, so the job
    cannot end first, and the usage watch is stopped, so it cannot be what tells."""
    from speedloaderd.config import dump_config
    from speedloaderd.events import EventKind

    m = make_ollama_model(lab.cold, "stuck:1b", (2 * MiB,))
    lab.seal()
    fs = HangFS(lab.cold, workdir / "coldfs", [m.layers[0].rel.rpartition("/")[2]])

    async def scenario():
        data = dump_config(lab.config())
        data["storage"]["path"] = str(fs.mountpoint)
        engine = await lab.engine(parse_config(data))
        assert engine._usage_watch is not None
        engine._usage_watch.cancel()
        told = asyncio.Event()

        def on_event(kind: EventKind, name: str) -> None:
            if kind is EventKind.POOL and name == "local":
                told.set()

        engine.listeners.append(on_event)
        job = engine.promote("stuck:1b")
        try:
            await asyncio.to_thread(fs.wait_parked, 1)
            await asyncio.wait_for(told.wait(), 60)
            seen = (job.finished, job.bytes_done, engine.pool_status("local").used)
        finally:
            job.cancel()
            fs.command("release")  # the blocked read returns; the thread cleans up
            with contextlib.suppress(Exception):
                await job.wait()
            await engine.shutdown()
        return seen

    try:
        finished, done, used = run(scenario())
    finally:
        fs.close()
    assert not finished, "the pool event came only with the job's end"
    assert done < 2 * MiB and used >= 2 * MiB, (done, used)  # the room, before the bytes
