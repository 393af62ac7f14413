"""Benchmark: a 4-shard model promoted with 1, 2 and 4 copy streams, same run, local disk.

A split GGUF model (``bench-0000N-of-00004.gguf``, random bytes: the catalog does not parse
model content) is written once to /var/tmp (the machine's own disk) and promoted through
the engine into a ``huge=within_size`` tmpfs pool with ``storage.copyStreams`` 1, 2 and 4,
changed live between promotes (as SetConfig would). Per round, the three settings in a
rotated order (so that drift on this shared machine does not favour one), the page cache
dropped before each promote so the shards are read from disk, then a demote.

Reported: GB/s (10^9 bytes/s) of each setting (median over rounds) and the median over
rounds of each round's speed ratio to 1 stream: the figure behind the default of
``storage.copyStreams`` (speedloaderd/config.py), with the NFS figure of the VM tier
(tests/test_vm_nfs.py).
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from speedloaderd.config import parse_config, with_changes
from speedloaderd.engine import Engine

from .copyspeed import drop_caches, make_source

GIB = 1 << 30
SHARDS = 4
STREAMS = (1, 2, 4)
MODEL = "bench"


def bench_parallel(
    size_gib: float = 4.0, rounds: int = 3, log: Callable[[str], None] = print
) -> dict:
    shard = int(size_gib * GIB) // SHARDS
    root = Path(tempfile.mkdtemp(prefix="sl-bench-parallel-", dir="/var/tmp"))
    pool = root / "pool"
    try:
        cold = root / "cold"
        cold.mkdir()
        log(f"writing a {SHARDS}-shard model of {SHARDS * shard / GIB:g} GiB to {root} ...")
        for i in range(SHARDS):
            make_source(cold / f"{MODEL}-{i + 1:05d}-of-{SHARDS:05d}.gguf", shard, seed=i + 1)
        return asyncio.run(_rounds(root, cold, pool, SHARDS * shard, rounds, log))
    finally:
        subprocess.run(["umount", str(pool)], capture_output=True)
        subprocess.run(["rm", "-rf", str(root)], check=True)


async def _rounds(
    root: Path, cold: Path, pool: Path, size: int, rounds: int, log: Callable[[str], None]
) -> dict:
    config = parse_config(
        {
            "modelsDir": str(root / "models"),
            "storage": {"path": str(cold), "type": "local"},
            "backend": {"type": "llamacpp"},
            "stateDir": str(root / "state"),
            "pools": [{"name": "bench", "path": str(pool), "size": size + GIB}],
        }
    )
    engine = Engine(config)
    await engine.start()  # mounts the pool (huge=within_size), as the daemon does
    assert engine.model(MODEL).size == size, "the shards are one model"
    runs: list[dict[int, float]] = []
    try:
        for r in range(rounds):
            row: dict[int, float] = {}
            order = STREAMS[r % len(STREAMS) :] + STREAMS[: r % len(STREAMS)]
            for streams in order:
                await _set_streams(engine, streams)
                drop_caches()
                t0 = time.perf_counter()
                await engine.promote(MODEL).wait()
                row[streams] = time.perf_counter() - t0
                assert engine.model_status(MODEL).state == "hot"
                await engine.demote(MODEL).wait()
            runs.append(row)
            log(
                f"round {r + 1}: "
                + ", ".join(f"{s} stream(s) {size / row[s] / 1e9:.2f} GB/s" for s in STREAMS)
            )
    finally:
        await asyncio.to_thread(engine.pools["bench"].unmount)
        engine.close()
    out: dict = {"size_bytes": size, "shards": SHARDS, "rounds": rounds, "runs": runs}
    for s in STREAMS:
        out[f"streams_{s}_GBps"] = round(size / statistics.median(r[s] for r in runs) / 1e9, 2)
        out[f"streams_{s}_vs_1"] = round(statistics.median(r[1] / r[s] for r in runs), 2)
    return out


async def _set_streams(engine: Engine, streams: int) -> None:
    storage = engine.config.storage.model_copy(update={"copy_streams": streams})
    storage.model_fields_set.add("copy_streams")
    await engine.set_config(with_changes(engine.config, storage=storage))


def print_parallel(p: dict) -> None:
    print(
        f"promote of a {p['shards']}-shard model of {p['size_bytes'] / GIB:g} GiB from local "
        f"disk, page cache dropped before each, median of {p['rounds']} interleaved rounds:"
    )
    for s in STREAMS:
        print(
            f"  copyStreams {s}   {p[f'streams_{s}_GBps']:6.2f} GB/s  "
            f"{p[f'streams_{s}_vs_1']:5.2f}x"
        )
