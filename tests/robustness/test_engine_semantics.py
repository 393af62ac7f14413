"""Issue 10, items 5 and 7: demote frees what the user asked to free, and the smaller engine
and bus bugs (reservations, the models dir marker, journal replay, argument checks, Health
and the engine lock, pool usage after a mapping ends).

On the real engine (or daemon), real tmpfs pools and real files; each test fails on the code
before the fix.
"""

from __future__ import annotations

import asyncio
import json
import logging
import mmap
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from speedloaderd import health
from speedloaderd.errors import Failed
from speedloaderd.journal import Entry, Journal
from speedloaderd.modelsdir import MARKER

from ..lab import MiB, run
from ..modelgen import make_ollama_model

WAIT = 60.0  # seconds a condition may take before the test gives up (never a threshold)


def _twins(lab, size: int = 2 * MiB):
    """Two Ollama tags with identical blobs, config included (``ollama cp`` makes these)."""
    a = make_ollama_model(lab.cold, "x:latest", [size, 300])
    b = make_ollama_model(lab.cold, "x:8b", list(a.layers), config=a.config)
    assert {x.rel for x in a.blobs} == {x.rel for x in b.blobs}
    return a, b


# --- item 5: demote frees what the user asked to free -------------------------------------


def test_demote_of_the_promoted_twin_frees_the_blobs_and_says_the_other_is_cold(lab):
    a, _ = _twins(lab)
    lab.seal()

    async def scenario():
        engine = await lab.engine()
        await engine.promote("x:latest").wait()
        # x:8b is hot too (its links point at the same copies), but nobody promoted it.
        assert engine.model_status("x:8b").state == "hot"
        msg = await engine.demote("x:latest").wait()
        assert msg.startswith("demoted x:latest: "), msg
        assert "x:8b shared those blobs and is now cold too" in msg, msg
        assert lab.pool_files("local") == []
        for name in ("x:latest", "x:8b"):
            assert engine.model_status(name).state == "cold"
        for b in a.blobs:
            assert lab.link(b.rel) == str(lab.cold / b.rel)

    run(scenario())


def test_demote_of_one_of_two_promoted_twins_keeps_the_blobs_and_says_so(lab):
    a, _ = _twins(lab)
    lab.seal()

    async def scenario():
        engine = await lab.engine()
        await engine.promote("x:latest").wait()
        await engine.promote("x:8b").wait()  # already hot: from now on it holds the blobs
        before = lab.pool_files("local")
        msg = await engine.demote("x:latest").wait()
        assert "nothing freed; shared blobs stay in RAM for x:8b" in msg, msg
        assert lab.pool_files("local") == before
        # Then the other one frees them: neither keeps the other hot for ever.
        msg = await engine.demote("x:8b").wait()
        assert msg.startswith("demoted x:8b: "), msg
        assert lab.pool_files("local") == []
        assert engine.model_status("x:latest").state == "cold"

    run(scenario())


def test_who_promoted_what_survives_a_restart(lab):
    _twins(lab)
    lab.seal()

    async def first():
        engine = await lab.engine()
        await engine.promote("x:latest").wait()

    async def second():
        engine = await lab.engine()
        assert engine.model_status("x:8b").state == "hot"
        msg = await engine.demote("x:latest").wait()
        assert "x:8b shared those blobs and is now cold too" in msg, msg
        assert lab.pool_files("local") == []

    run(first())
    run(second())


def test_demote_of_a_cold_model_says_it_is_cold_even_when_it_shares_a_hot_blob(lab):
    a = make_ollama_model(lab.cold, "a:1", [MiB, 300])
    make_ollama_model(lab.cold, "b:1", [a.layers[0], 500])  # shares one blob with a:1
    lab.seal()

    async def scenario():
        engine = await lab.engine()
        await engine.promote("a:1").wait()
        assert engine.model_status("b:1").state == "cold"
        before = lab.pool_files("local")
        assert await engine.demote("b:1").wait() == "b:1 is already cold; nothing freed"
        assert lab.pool_files("local") == before
        assert engine.model_status("a:1").state == "hot"

    run(scenario())


# --- item 7: reservations -----------------------------------------------------------------


def _fill(directory: Path) -> None:
    """Fill the filesystem holding ``directory`` until a write fails with ENOSPC."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * (16 << 10))
    except OSError:
        pass
    finally:
        os.close(fd)


def test_a_journal_write_failure_does_not_leak_the_promotes_reservation(lab):
    make_ollama_model(lab.cold, "big:1", [6 * MiB])
    lab.seal()
    lab.state.mkdir(mode=0o755)
    # A tiny tmpfs as the state dir: full, the journal cannot be written.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", lab.state])

    async def scenario():
        engine = await lab.engine(lab.config(pools=(("local", 8 * MiB, 100),)))
        _fill(lab.state)
        with pytest.raises(Failed, match="cannot write the journal"):
            await engine.promote("big:1").wait()
        assert engine._reserved == {} and engine._unstarted == {}
        assert engine.model_status("big:1").state == "cold"
        assert lab.pool_files("local") == []
        # With room in the state dir again, placement sees the whole pool: 6 MiB of 8 fits.
        (lab.state / "filler").unlink()
        await engine.promote("big:1").wait()
        assert engine.model_status("big:1").state == "hot"

    run(scenario())


def test_health_repair_clears_stale_reservations(lab):
    m = make_ollama_model(lab.cold, "big:1", [6 * MiB])
    lab.seal()

    async def scenario():
        engine = await lab.engine(lab.config(pools=(("local", 8 * MiB, 100),)))
        # What a leak leaves: a reservation of a job that is no longer running.
        engine._reserved[("local", m.layers[0].rel)] += 1
        engine._unstarted[999] = ("local", 6 * MiB)
        report = await engine.health()  # a look changes nothing
        assert engine._unstarted and engine._reserved
        report = await engine.health(repair=True)
        assert engine._reserved == {} and engine._unstarted == {}
        assert any(f.check == "reservations" and f.repaired for f in report.findings), report
        await engine.promote("big:1").wait()
        assert engine.model_status("big:1").state == "hot"

    run(scenario())
