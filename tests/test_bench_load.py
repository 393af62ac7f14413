"""bench/load.py at a tiny size (make_llama_gguf's 400 KiB default model, one round): the real
llama-server loads it from the pool, the disk cold and warm, and a plain tmpfs, with mmap and
without, and the bench's output has every figure, each a positive number. Nothing is timed
against a threshold: the figures themselves are the bench's, read in the README."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.load import SOURCES, TITLES, bench_load, print_load
from speedloader_lab import llama

pytestmark = pytest.mark.llama


@pytest.fixture
def llama_binary() -> Path:
    try:
        return llama.build()  # cached under /var/cache/speedloader-llama after the first
    except llama.CannotBuild as err:
        banner = f"llama-server load bench test not run: {err}"
        if os.environ.get("SPEEDLOADER_LLAMA_REQUIRED") == "1":
            pytest.fail(banner + " (SPEEDLOADER_LLAMA_REQUIRED=1)")
        pytest.skip(banner)


def test_the_load_bench_measures_every_source_with_and_without_mmap(llama_binary, capsys):
    d = bench_load(rounds=1, shape={}, log=lambda m: None)

    assert d["rounds"] == 1 and d["size_bytes"] > 0
    assert d["shape"]["n_layer"] == 2  # make_llama_gguf's default: the tiny model
    assert d["llama_server"] == str(llama_binary)
    assert "huge=within_size" in d["mounts"]["pool"]
    assert "huge" not in d["mounts"]["plain"]
    assert sorted((r["mmap"], r["source"]) for r in d["runs"]) == sorted(
        (m, s) for m in (True, False) for s in SOURCES
    )
    for mode in ("mmap", "no_mmap"):
        assert set(d[mode]) == set(SOURCES)
        for source, e in d[mode].items():
            for key in ("load_s", "first_token_s"):
                assert e[key] > 0, (mode, source, key)
                assert e["first_token_s"] >= e["load_s"]  # the same clock, started once
                for ref in ("cold", "warm", "plain"):
                    assert e[f"{key}_vs_{ref}"] > 0, (mode, source, key, ref)
            assert e["pmd_mapped_pct"] >= 0  # a 400 KiB model fills no 2 MiB page
            assert e["disk_read_pct"] >= 0  # the whole disk's reads: 0 when all came from RAM
            if source in ("pool", "plain"):
                assert e["resident_before_pct"] is None  # a tmpfs file is its pages
            else:
                assert 0 <= e["resident_before_pct"] <= 100
        # the page cache was dropped before the cold load and filled before the warm one
        assert d[mode]["warm"]["resident_before_pct"] > d[mode]["cold"]["resident_before_pct"]

    capsys.readouterr()
    print_load(d)
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if any(TITLES[s] in line for s in SOURCES)]
    assert len(rows) == 2 * len(SOURCES)
    assert [r.split()[0] for r in rows] == ["mmap"] * 4 + ["no-mmap"] * 4
    assert any(line.startswith("  pool vs warm page cache: mmap load ") for line in out)
