"""Promotes of a multi-shard model from NFS with 1, 2 and 4 copy streams, in the "local" guest.

``python -m tests.vm.parallel_probe COLD WORK ROUNDS`` (COLD a directory on the NFS mount
holding one split GGUF model; WORK a root-owned scratch directory) starts an Engine (the
daemon's own, no bus) with a tmpfs pool under /run/speedloader/pools and, per round, the
settings of ``storage.copyStreams`` in a rotated order (changed live, as SetConfig does),
each promote preceded by a drop of this guest's page cache and followed by a demote. For
each promote it prints one JSON line (so the ssh channel never idles for long):
``{"round", "streams", "seconds", "cpu_busy"}``, ``cpu_busy`` being the fraction of this
guest's CPU time not idle during the promote (/proc/stat). After each round's promotes,
the reference without the engine: ``cat`` of the shards one after the other, then four
``cat`` processes at once (``{"round", "cat": 1 or 4, "seconds", "cpu_busy"}``), page cache
dropped before each: what parallel reads gain on this mount whoever reads. The last line is
``{"size": bytes, "done": true}``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

from speedloaderd.config import parse_config, with_changes
from speedloaderd.engine import Engine

STREAMS = (1, 2, 4)
POOL = Path("/run/speedloader/pools/par")


def cpu_times() -> tuple[int, int]:
    """(idle + iowait, total) jiffies of the first line of /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return fields[3] + fields[4], sum(fields)


def drop_caches() -> None:
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


async def main(cold: Path, work: Path, rounds: int) -> None:
    config = parse_config(
        {
            "modelsDir": str(work / "models"),
            "storage": {"path": str(cold), "type": "nfs"},
            "backend": {"type": "llamacpp"},
            "stateDir": str(work / "state"),
            "pools": [{"name": "par", "path": str(POOL), "size": "112M"}],
        }
    )
    engine = Engine(config)
    await engine.start()
    (name,) = engine.catalog.models
    size = engine.model(name).size
    try:
        for r in range(rounds):
            for streams in STREAMS[r % len(STREAMS) :] + STREAMS[: r % len(STREAMS)]:
                storage = engine.config.storage.model_copy(update={"copy_streams": streams})
                storage.model_fields_set.add("copy_streams")
                await engine.set_config(with_changes(engine.config, storage=storage))
                drop_caches()
                idle0, total0 = cpu_times()
                t0 = time.perf_counter()
                await engine.promote(name).wait()
                seconds = time.perf_counter() - t0
                idle1, total1 = cpu_times()
                assert engine.model_status(name).state == "hot"
                await engine.demote(name).wait()
                busy = 1 - (idle1 - idle0) / max(total1 - total0, 1)
                row = {"round": r + 1, "streams": streams, "seconds": seconds, "cpu_busy": busy}
                print(json.dumps(row), flush=True)
            shards = sorted(str(p) for p in cold.iterdir())
            for procs in (1, 4):
                drop_caches()
                idle0, total0 = cpu_times()
                t0 = time.perf_counter()
                groups = [shards] if procs == 1 else [[p] for p in shards]
                readers = [subprocess.Popen(["cat", *g], stdout=subprocess.DEVNULL) for g in groups]
                assert all(p.wait() == 0 for p in readers)
                seconds = time.perf_counter() - t0
                idle1, total1 = cpu_times()
                busy = 1 - (idle1 - idle0) / max(total1 - total0, 1)
                row = {"round": r + 1, "cat": procs, "seconds": seconds, "cpu_busy": busy}
                print(json.dumps(row), flush=True)
    finally:
        await asyncio.to_thread(engine.pools["par"].unmount)
        engine.close()
    print(json.dumps({"size": size, "done": True}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])))
