"""Benchmark: a whole promote through the engine against ``cp`` of the same file, same run.

A multi-GiB model file is written once to disk and appears in two cold layouts through
hard links: a llama.cpp ``.gguf`` (no digest to verify) and an Ollama blob named by its
sha256 (verified on every promote). Per round, interleaved, with the page cache dropped
before each copy so the source is read from disk:

- ``cp`` of the file into the pool's mount (same tmpfs, same ``huge=within_size``);
- ``promote`` of the GGUF model, then ``demote`` (timed);
- ``promote`` of the Ollama model (copy + sha256 verification; the verified-blob records
  cleared first, so it is hashed), then ``demote``;
- the same again, records kept: the blob was verified and its cold file is unchanged, so it
  is copied without hashing (verify once, speedloaderd/verified.py), then ``demote``.

Reported: GB/s (10^9 bytes/s), the median over rounds of each round's speed ratio to cp,
the source's page-cache residue after each method, demote time. The content is random
bytes: the catalog does not parse model content, and the tests check real readers.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from speedloaderd.config import parse_config
from speedloaderd.engine import Engine

from .copyspeed import drop_caches, make_source, page_cache_resident

GIB = 1 << 30


def _engine(root: Path, cold: Path, backend: str, pool: Path, pool_size: int) -> Engine:
    config = parse_config(
        {
            "modelsDir": str(root / f"models-{backend}"),
            "storage": {"path": str(cold), "type": "local"},
            "backend": {"type": backend},
            "stateDir": str(root / f"state-{backend}"),
            "pools": [{"name": "bench", "path": str(pool), "size": pool_size}],
        }
    )
    return Engine(config)


def bench_promote(
    size_gib: float = 4.0, rounds: int = 3, log: Callable[[str], None] = print
) -> dict:
    size = int(size_gib * GIB)
    root = Path(tempfile.mkdtemp(prefix="sl-bench-promote-", dir="/var/tmp"))
    pool = root / "pool"
    try:
        gguf_cold, ollama_cold = root / "cold-gguf", root / "cold-ollama"
        (gguf_cold).mkdir()
        (ollama_cold / "blobs").mkdir(parents=True)
        src = gguf_cold / "bench-model.gguf"
        log(f"writing a {size_gib:g} GiB model to {root} ...")
        digest = make_source(src, size)
        blob_rel = "blobs/sha256-" + digest.removeprefix("sha256:")
        os.link(src, ollama_cold / blob_rel)
        manifest = ollama_cold / "manifests/registry.ollama.ai/library/bench/latest"
        manifest.parent.mkdir(parents=True)
        manifest.write_text(
            json.dumps(
                {
                    "schemaVersion": 2,
                    "config": {
                        "mediaType": "application/vnd.docker.container.image.v1+json",
                        "digest": digest,
                        "size": size,
                    },
                    "layers": [],
                }
            )
        )
        return asyncio.run(_rounds(root, pool, src, size, gguf_cold, ollama_cold, rounds, log))
    finally:
        subprocess.run(["umount", str(pool)], capture_output=True)
        subprocess.run(["rm", "-rf", str(root)], check=True)


async def _rounds(root, pool, src, size, gguf_cold, ollama_cold, rounds, log) -> dict:
    pool_size = size + GIB
    gguf_engine = _engine(root, gguf_cold, "llamacpp", pool, pool_size)
    ollama_engine = _engine(root, ollama_cold, "ollama", pool, pool_size)
    await gguf_engine.start()  # mounts the pool (huge=within_size), as the daemon does
    await ollama_engine.start()
    runs: list[dict] = []
    for r in range(rounds):
        row: dict = {"round": r + 1}
        drop_caches()
        t0 = time.perf_counter()
        subprocess.run(["cp", str(src), str(pool / "cp-copy")], check=True)
        row["cp_s"] = time.perf_counter() - t0
        row["cp_residue"] = page_cache_resident(src) / size
        os.unlink(pool / "cp-copy")
        for label, engine, name in (
            ("promote", gguf_engine, "bench-model"),
            ("promote_verified", ollama_engine, "bench:latest"),
            ("promote_verified_again", ollama_engine, "bench:latest"),
        ):
            if label == "promote_verified":
                await asyncio.to_thread(engine.verified.clear)  # hashed, as the first time
            drop_caches()
            t0 = time.perf_counter()
            await engine.promote(name).wait()
            row[f"{label}_s"] = time.perf_counter() - t0
            row[f"{label}_residue"] = page_cache_resident(src) / size
            assert engine.model_status(name).state == "hot"
            t0 = time.perf_counter()
            await engine.demote(name).wait()
            row[f"{label}_demote_s"] = time.perf_counter() - t0
        runs.append(row)
        log(
            f"round {r + 1}: cp {size / row['cp_s'] / 1e9:.2f} GB/s, "
            f"promote {size / row['promote_s'] / 1e9:.2f} GB/s, "
            f"promote+sha256 {size / row['promote_verified_s'] / 1e9:.2f} GB/s, "
            f"again (verified before) {size / row['promote_verified_again_s'] / 1e9:.2f} GB/s"
        )
    await asyncio.to_thread(gguf_engine.pools["bench"].unmount)

    def med(key: str) -> float:
        return statistics.median(row[key] for row in runs)

    return {
        "size_bytes": size,
        "rounds": rounds,
        "cp_GBps": round(size / med("cp_s") / 1e9, 2),
        "promote_GBps": round(size / med("promote_s") / 1e9, 2),
        "promote_verified_GBps": round(size / med("promote_verified_s") / 1e9, 2),
        "promote_vs_cp": round(statistics.median(r["cp_s"] / r["promote_s"] for r in runs), 2),
        "promote_verified_vs_cp": round(
            statistics.median(r["cp_s"] / r["promote_verified_s"] for r in runs), 2
        ),
        "promote_verified_again_GBps": round(size / med("promote_verified_again_s") / 1e9, 2),
        "promote_verified_again_vs_cp": round(
            statistics.median(r["cp_s"] / r["promote_verified_again_s"] for r in runs), 2
        ),
        "promote_verified_again_vs_promote": round(
            statistics.median(r["promote_s"] / r["promote_verified_again_s"] for r in runs), 2
        ),
        "promote_verified_again_residue_pct": round(100 * med("promote_verified_again_residue"), 1),
        "cp_residue_pct": round(100 * med("cp_residue"), 1),
        "promote_residue_pct": round(100 * med("promote_residue"), 1),
        "promote_verified_residue_pct": round(100 * med("promote_verified_residue"), 1),
        "demote_ms": round(1000 * med("promote_demote_s"), 1),
        "runs": runs,
    }
