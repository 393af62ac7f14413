"""Usage telemetry (speedloaderd/usage.py): what one look of the backend counts, the file
that keeps it across restarts and what a bad one does, then the real daemon on the private
bus with the fake Ollama: LoadCount and LastUsed on the Model objects, kept by a restart,
and a corrupt or symlinked usage.json that neither stops the daemon nor is followed."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from speedloader_client import fmt
from speedloader_client.client import MODEL, Client
from speedloader_lab.fake_backend import FakeProcess
from speedloaderd import usage as usage_mod
from speedloaderd.backends.ollama import OllamaBackend
from speedloaderd.bus.names import model_path
from speedloaderd.config import save_config
from speedloaderd.usage import FILE, MAX_U32, Seen, Usage, micros

from .buslab import GUEST, as_user, run

SLCTL = str(Path(sys.executable).with_name("slctl"))

S = 1_000_000  # µs
T0 = 1_764_648_000 * S


def state_dir(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    return d


# --- one look at a time ---------------------------------------------------------------------


def test_a_load_counts_once_and_an_idle_ollama_model_is_not_a_use(tmp_path):
    u = Usage(state_dir(tmp_path))
    exp = T0 + 300 * S  # keep_alive 5m after the load
    assert u.observe({"a": Seen(True, exp)}, T0) == {"a"}
    assert u.of("a") == (T0, 1) and u.of("never") == (0, 0)
    # Still loaded, expires_at where it was: idle, nothing changes, nothing to publish.
    assert u.observe({"a": Seen(True, exp)}, T0 + 15 * S) == set()
    assert u.of("a") == (T0, 1)
    # A request ended: expires_at later. A use at this look, not a load.
    assert u.observe({"a": Seen(True, exp + 20 * S)}, T0 + 30 * S) == {"a"}
    assert u.of("a") == (T0 + 30 * S, 1)
    # It moves back (an unload's expireRunner sets it to now): not a use.
    assert u.observe({"a": Seen(True, T0 + 44 * S)}, T0 + 45 * S) == set()
    # Gone, then listed again: a second load.
    assert u.observe({}, T0 + 60 * S) == set()
    assert u.observe({"a": Seen(True, T0 + 375 * S)}, T0 + 75 * S) == {"a"}
    assert u.of("a") == (T0 + 75 * S, 2)


def test_llamacpp_loading_then_loaded_is_one_load_and_loaded_is_in_use_at_each_look(tmp_path):
    u = Usage(state_dir(tmp_path))
    assert u.observe({"m": Seen(False)}, T0) == {"m"}  # loading: in use, not yet a load
    assert u.of("m") == (T0, 0)
    assert u.observe({"m": Seen(True)}, T0 + 15 * S) == {"m"}
    assert u.of("m") == (T0 + 15 * S, 1)
    assert u.observe({"m": Seen(True)}, T0 + 30 * S) == {"m"}  # no expiry: listed is use
    assert u.of("m") == (T0 + 30 * S, 1)
    # A load that fails (loading, then gone) is no load; its use stays.
    assert u.observe({"f": Seen(False), "m": Seen(True)}, T0 + 45 * S) == {"f", "m"}
    assert u.observe({"m": Seen(True)}, T0 + 60 * S) == {"m"}
    assert u.of("f") == (T0 + 45 * S, 0)
    # A clock set back never moves LastUsed back.
    u.observe({"m": Seen(True)}, T0)
    assert u.of("m") == (T0 + 60 * S, 1)


def test_a_look_publishes_only_the_models_whose_usage_changed(tmp_path):
    """100,000 models remembered, one loaded and used: one Model change, not 100,000."""
    u = Usage(state_dir(tmp_path))
    names = [f"m{i}" for i in range(100_000)]
    u.observe({n: Seen(True, T0) for n in names}, T0)
    assert u.observe({}, T0 + 15 * S) == set()  # all unloaded: LastUsed and LoadCount stay
    assert u.observe({"m7": Seen(True, T0 + 300 * S)}, T0 + 30 * S) == {"m7"}
    assert u.observe({"m7": Seen(True, T0 + 300 * S)}, T0 + 45 * S) == set()  # idle


def test_counts_are_bounded_and_the_longest_unused_model_goes_first(tmp_path, monkeypatch):
    u = Usage(state_dir(tmp_path))
    u.observe({"x": Seen(True)}, T0)
    u.models["x"].load_count = MAX_U32
    u.observe({}, T0 + S)
    u.observe({"x": Seen(True)}, T0 + 2 * S)
    assert u.of("x")[1] == MAX_U32  # LoadCount is a D-Bus "u"
    monkeypatch.setattr(usage_mod, "MAX_MODELS", 3)
    u.observe({"old": Seen(True)}, T0 - 100 * S)
    u.observe({"mid": Seen(True)}, T0 - 50 * S)
    u.observe({"x": Seen(True)}, T0 + 3 * S)  # "old" and "mid" are no longer listed
    u.observe({"x": Seen(True), "new": Seen(True)}, T0 + 4 * S)
    assert set(u.models) == {"mid", "x", "new"}  # x is loaded: kept whatever its age


def test_usage_reads_as_a_person_says_it():
    now = T0 / S
    assert fmt.last_used(0, 0, now) == "-"
    assert fmt.last_used(T0 - 20 * S, 1, now) == "just now, 1 load"  # looks are 15 s apart
    assert fmt.last_used(T0 - 4 * 60 * S, 2, now) == "4 min ago, 2 loads"
    assert fmt.last_used(T0 - 3 * 3600 * S, 2, now) == "3 h ago, 2 loads"
    assert fmt.last_used(T0 - 9 * 86400 * S, 12, now) == "9 days ago, 12 loads"
    assert fmt.last_used(T0 + 60 * S, 1, now) == "just now, 1 load"  # a clock behind ours
    assert fmt.last_used(T0, 0, now) == "just now, 0 loads"  # used while loading, no load


def test_micros_of_go_and_odd_times():
    assert micros(datetime(2025, 12, 2, 4, 5, 6, 123456, tzinfo=UTC)) == 1_764_648_306_123_456
    assert micros(datetime(1, 1, 1, tzinfo=UTC)) == 0  # Go's zero time
    assert micros(datetime(9999, 12, 31, 23, 59, tzinfo=UTC)) == 253_402_300_740 * S


# --- the file -------------------------------------------------------------------------------


def test_written_and_read_back_with_models_gone_from_the_catalog_dropped(tmp_path):
    d = state_dir(tmp_path)
    u = Usage(d)
    u.observe({"a": Seen(True, T0 + 300 * S), "b": Seen(True)}, T0)
    assert u.due(0.0)  # the first write is not held back
    u.write(u.snapshot({"a"}), 0.0)  # b left the catalog
    assert not u.due(1.0) and (d / FILE).stat().st_mode & 0o777 == 0o600
    u.observe({"a": Seen(True, T0 + 400 * S)}, T0 + 15 * S)
    assert u.dirty and not u.due(1.0) and u.due(usage_mod.WRITE_EVERY)  # throttled
    u.write(u.snapshot(None), usage_mod.WRITE_EVERY)  # cold storage away: nothing dropped
    again = Usage(d)
    again.load()
    assert set(again.models) == {"a"} and again.of("a") == (T0 + 15 * S, 1)
    assert not again.dirty
    # What the last look saw is kept: still loaded at the next start is the same load...
    assert again.observe({"a": Seen(True, T0 + 400 * S)}, T0 + 99 * S) == set()
    # ...and one loaded while the daemon was down counts once.
    again.observe({}, T0 + 100 * S)
    again.write(again.snapshot({"a"}), 0.0)
    third = Usage(d)
    third.load()
    assert third.observe({"a": Seen(True, T0 + 900 * S)}, T0 + 600 * S) == {"a"}
    assert third.of("a") == (T0 + 600 * S, 2)


@pytest.mark.parametrize(
    "content, why",
    [
        (b"{not json", "is not a usage file"),
        (b'{"version": 2, "models": {}}', "is not a usage file (version"),
        (b'{"version": 1, "models": {"a": {"lastUsed": -1, "loadCount": 1}}}', "lastUsed"),
        (b'{"version": 1, "models": []}', "is not a usage file (models"),
        (b"[" * 500 + b"]" * 500, "is not a usage file"),
        (b" " * 2048, "is 2048 bytes, more than 1024"),
    ],
    ids=["corrupt", "version", "negative", "shape", "deep", "huge"],
)
def test_a_bad_file_starts_empty_says_why_once_and_is_replaced(tmp_path, caplog, content, why):
    d = state_dir(tmp_path)
    (d / FILE).write_bytes(content)
    u = Usage(d)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(usage_mod, "LIMIT", 1024)
        with caplog.at_level(logging.WARNING, "speedloaderd.usage"):
            u.load()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and why in lines[0] and "starting with no usage" in lines[0], lines
    assert u.models == {} and u.due(0.0)
    u.write(u.snapshot(None), 0.0)
    assert json.loads((d / FILE).read_bytes()) == {"version": 1, "models": {}}


def test_a_symlinked_file_is_not_followed_and_its_target_is_untouched(tmp_path, caplog):
    d = state_dir(tmp_path)
    target = tmp_path / "victim.json"
    victim = b'{"version": 1, "models": {"a": {"lastUsed": 5, "loadCount": 7}}}'
    target.write_bytes(victim)
    target.chmod(0o644)
    (d / FILE).symlink_to(target)
    (d / ".usage.json.tmp").symlink_to(target)  # a planted temp name is removed, not used
    u = Usage(d)
    with caplog.at_level(logging.WARNING, "speedloaderd.usage"):
        u.load()
    assert u.models == {} and "is a symlink (not followed)" in caplog.text
    u.observe({"b": Seen(True)}, T0)
    u.write(u.snapshot(None), 0.0)
    assert target.read_bytes() == victim and target.stat().st_mode & 0o777 == 0o644
    assert not (d / FILE).is_symlink() and not (d / ".usage.json.tmp").exists()
    assert set(json.loads((d / FILE).read_bytes())["models"]) == {"b"}


def test_a_state_dir_that_cannot_be_written_keeps_the_usage_in_memory(tmp_path, caplog):
    d = state_dir(tmp_path)
    (d / FILE).mkdir()  # rename over a directory fails: as a full or read-only dir would
    u = Usage(d)
    u.observe({"a": Seen(True)}, T0)
    with caplog.at_level(logging.WARNING, "speedloaderd.usage"):
        u.write(u.snapshot(None), 0.0)
    assert "cannot save" in caplog.text and u.dirty and u.of("a") == (T0, 1)


# --- the daemon on the bus ------------------------------------------------------------------

WAIT = 30.0  # a backend look every 15 s, at once when holders change (every 5 s): above both
LAYER = 256 * 1024


async def until(
    c: Client, path: str, ok: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    """The model's properties once ``ok`` holds: read again at each PropertiesChanged of it."""
    changed = asyncio.Event()
    remove = c.add_listener(lambda m: m.path == path and changed.set())
    props: dict[str, Any] = {}
    try:
        async with asyncio.timeout(WAIT):
            while True:
                changed.clear()
                props = await c.get_all(path, MODEL)
                if ok(props):
                    return props
                await changed.wait()
    except TimeoutError:
        raise AssertionError(f"{what} not seen within {WAIT} s: {props}") from None
    finally:
        remove()


def blob_link(lab: Any) -> Path:
    """tiny:1b's 256 KiB layer through the models dir, as Ollama's runner maps it."""
    for blob in sorted((lab.cold / "blobs").iterdir()):
        if blob.stat().st_size == LAYER:
            return lab.models / "blobs" / blob.name
    raise AssertionError("no 256 KiB blob")


def with_fake_ollama(dl: Any) -> FakeProcess:
    fake = FakeProcess("fake_ollama", "--model", f"tiny:1b={blob_link(dl.lab)}")
    dl.config.backend.api_url = fake.url
    save_config(dl.config, dl.lab.config_path)
    return fake


def test_loads_and_requests_on_the_bus_are_counted_and_kept_by_a_restart(daemon_factory):
    dl = daemon_factory()
    fake = with_fake_ollama(dl)
    path = model_path("tiny:1b")
    backend = OllamaBackend(fake.url)
    try:
        dl.start()

        async def first_run() -> int:
            async with await dl.client() as c:
                await c.subscribe()
                props = await c.get_all(path, MODEL)
                assert (props["LoadCount"], props["LastUsed"]) == (0, 0)
                before = time_us()
                assert (await backend.preload("tiny:1b")).ok
                props = await until(c, path, lambda p: p["LoadCount"] == 1, "LoadCount 1")
                loaded_at = props["LastUsed"]
                assert before <= loaded_at <= time_us()
                # A request moves expires_at: LastUsed moves at the next look (no load).
                reply = await backend.http.post_json(
                    "/api/generate", {"model": "tiny:1b", "prompt": "hi", "stream": False}
                )
                assert reply.status == 200
                props = await until(c, path, lambda p: p["LastUsed"] > loaded_at, "the use")
                assert props["LoadCount"] == 1
                # Unloaded, then loaded again: the second load.
                assert (await backend.unload("tiny:1b")).ok
                await until(c, path, lambda p: not p["Loaded"], "the unload")
                assert (await backend.preload("tiny:1b")).ok
                props = await until(c, path, lambda p: p["LoadCount"] == 2, "LoadCount 2")
                other = await c.get_all(model_path("small:3b"), MODEL)
                assert (other["LoadCount"], other["LastUsed"]) == (0, 0)  # never loaded
                return props["LastUsed"]

        last = run(first_run())
        assert dl.stop() == 0
        saved = json.loads((dl.lab.state / FILE).read_bytes())
        assert saved["models"]["tiny:1b"]["loadCount"] == 2  # written at shutdown
        # Still loaded across the restart: the same load, not a third. The daemon takes its
        # bus name only after its first look is counted, so this is what that look made.
        dl.start()

        async def second_run() -> dict[str, Any]:
            async with await dl.client() as c:
                return await c.get_all(path, MODEL)

        props = run(second_run())
        assert props["LoadCount"] == 2 and props["LastUsed"] >= last
        # slctl status, as anyone: the model's row says it; a model never used says "-".
        r = subprocess.run(
            as_user(GUEST, [SLCTL, "status"], dl.address),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        (header,) = [line for line in r.stdout.splitlines() if line.startswith("MODEL")]
        assert header.split()[-2:] == ["LAST", "USED"]
        (tiny,) = [line for line in r.stdout.splitlines() if line.startswith("tiny:1b ")]
        (small,) = [line for line in r.stdout.splitlines() if line.startswith("small:3b ")]
        assert tiny.endswith(", 2 loads") and small.endswith("  -")
    finally:
        fake.stop()


def time_us() -> int:
    return int(datetime.now(UTC).timestamp() * S)


@pytest.mark.parametrize("bad", ["corrupt", "symlink"])
def test_a_bad_usage_file_neither_stops_the_daemon_nor_is_followed(daemon_factory, bad):
    dl = daemon_factory()
    lab = dl.lab
    lab.state.mkdir(parents=True, exist_ok=True)
    victim = lab.root / "victim.json"
    content = b'{"version": 1, "models": {"tiny:1b": {"lastUsed": 5, "loadCount": 7}}}'
    victim.write_bytes(content)
    if bad == "symlink":
        (lab.state / FILE).symlink_to(victim)
    else:
        (lab.state / FILE).write_bytes(b"\x00garbage{")
    logged = len(dl.log())  # the sandbox's log is the whole session's
    dl.start()

    async def read() -> dict[str, Any]:
        async with await dl.client() as c:
            return await c.get_all(model_path("tiny:1b"), MODEL)

    props = run(read())
    assert (props["LoadCount"], props["LastUsed"]) == (0, 0)
    assert dl.stop() == 0
    why = "is a symlink (not followed)" if bad == "symlink" else "is not a usage file"
    lines = [line for line in dl.log()[logged:].splitlines() if FILE in line]
    assert len(lines) == 1 and why in lines[0], lines
    assert victim.read_bytes() == content
    assert not (lab.state / FILE).is_symlink()
    assert json.loads((lab.state / FILE).read_bytes()) == {"version": 1, "models": {}}
    assert os.stat(lab.state / FILE).st_uid == 0
