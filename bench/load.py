"""Benchmark: the load side. The real llama-server loading one GGUF from each place it can be.

    python3 -m bench --only load [--load-mib 512] [--rounds 3]

As root (mounts tmpfs, drops the page cache). The real ``llama-server`` (speedloader_lab/llama.py,
built once per machine and cached) in single-model mode (``-m PATH -c 256 -np 1 -t 2``), on a
llama-architecture GGUF of F32 random weights (modelgen.make_llama_gguf, 1024 wide, as many
blocks as make ``--load-mib``), written once per run under /var/tmp and removed after. The
same file, byte for byte, is loaded from:

- **pool**: the engine's promote of it into a pool the engine mounts (tmpfs
  ``huge=within_size``, as the daemon does); the server is given the models dir link, as a
  backend would be;
- **cold**: the file on disk right after ``sync`` + ``3 > /proc/sys/vm/drop_caches`` (its
  residency after the drop is measured with mincore and printed); the server binary is read
  back into the cache after the drop, so only the model comes from disk;
- **warm**: the file on disk with all of it in the page cache (read once before; residency
  printed);
- **plain tmpfs**: a copy on a tmpfs mounted without huge pages.

Each with mmap (llama.cpp's default) and without: this llama.cpp has no ``--no-mmap`` any more,
``--load-mode none`` is its replacement (common/arg.cpp: "auto: mmap, unless a device does not
support it"; "none": llama.cpp reads the file into its own buffers, how a copying loader
behaves), so the two runs pass ``--load-mode mmap`` and ``--load-mode none``.

Per round, in this process, every (mode, source) pair in a rotating order: the server is
started; **load** is the time from its start to ``/health`` answering 200 (polled every 5 ms;
llama-server answers 503 until the model is loaded and its warm-up run has touched the
weights); then one completion of one token; **first token** is the time from the start to that
answer (load + prompt + one token); and what the disk read meanwhile (/proc/diskstats, the
whole machine, as a share of the model). The run checks that the server maps the file it was
given with mmap and does not without it, and how much of the model the server maps with 2 MiB
entries (ShmemPmdMapped + FilePmdMapped in /proc/PID/smaps_rollup: huge pages of tmpfs, large
folios of the page cache). Ratios are per round (the cold, warm or plain load's
time / this one's: higher is faster), then the
median over rounds, as are the times.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from speedloader_lab import llama
from speedloader_lab.llama import LlamaServer, mappings_of
from speedloader_lab.modelgen import make_llama_gguf
from speedloaderd.config import parse_config
from speedloaderd.engine import Engine
from speedloaderd.pools import mounts_below

from .copyspeed import device_bytes_read, drop_caches, page_cache_resident, tmpfs

MiB = 1 << 20
GIB = 1 << 30
NAME = "bench-load"
# 1024 wide, 16 heads (4 KV heads), 2816 FFN: 11.3 M F32 weights (43 MiB) a block; 12 blocks
# make 516 MiB, loaded in well under a second from RAM and in a few from this virtual disk.
WIDE: dict[str, int] = {"n_embd": 1024, "n_head": 16, "n_head_kv": 4, "n_ff": 2816}
SERVER_ARGS = ["-c", "256", "-np", "1", "-t", "2"]
COMPLETION = {"prompt": "hello world", "n_predict": 1, "temperature": 0, "ignore_eos": True}
SOURCES = ("pool", "cold", "warm", "plain")
TITLES = {
    "pool": "pool (promote, huge pages)",
    "cold": "disk, page cache dropped",
    "warm": "disk, warm page cache",
    "plain": "plain tmpfs (no huge pages)",
}
LOAD_TIMEOUT = 300.0  # s: a cold load on a shared 2-core VM whose disk gives 0.3-1.7 GB/s
HEALTH_POLL = 0.005  # s between two /health looks: the loads from RAM take ~0.1-0.5 s


def block_bytes(shape: dict[str, int]) -> int:
    """F32 bytes of one block (make_llama_gguf's formula)."""
    e, f = shape["n_embd"], shape["n_ff"]
    kv = e * shape["n_head_kv"] // shape["n_head"]
    return 4 * (2 * e * e + 2 * e * kv + 3 * e * f + 2 * e)


def shape_for(size_mib: int) -> dict[str, int]:
    return {**WIDE, "n_layer": max(1, round(size_mib * MiB / block_bytes(WIDE)))}


def mount_options(path: Path) -> str:
    """The options ``path``'s mount was made with (/proc/self/mounts)."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == str(path):
            return fields[3]
    raise RuntimeError(f"{path} is not a mount point")


def pmd_mapped(pid: int) -> int:
    """Bytes ``pid`` maps with 2 MiB page-table entries, shmem (tmpfs) and file (page cache)
    together (/proc/PID/smaps_rollup): whether its mapping of the model got huge pages."""
    total = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(("ShmemPmdMapped:", "FilePmdMapped:")):
            total += int(line.split()[1]) * 1024
    return total


def read_all(path: Path) -> None:
    """Read ``path`` through the page cache, keeping nothing here (it stays cached)."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 * MiB)
        while f.readinto(buf):
            pass


def _engine(root: Path, cold: Path, pool: Path, pool_size: int) -> Engine:
    config = parse_config(
        {
            "modelsDir": str(root / "models"),
            "storage": {"path": str(cold), "type": "local"},
            "backend": {"type": "llamacpp"},
            "stateDir": str(root / "state"),
            "pools": [{"name": "bench", "path": str(pool), "size": pool_size}],
        }
    )
    return Engine(config)


async def _promote(engine: Engine) -> None:
    await engine.start()  # mounts the pool (huge=within_size), as the daemon does
    try:
        await engine.promote(NAME).wait()
        if engine.model_status(NAME).state != "hot":
            raise RuntimeError(f"{NAME} is not hot after its promote")
    finally:
        engine.close()  # its watches end with this loop; the copy stays in the pool


class Loads:
    """Starts the server on one source and times it; keeps each run's row."""

    def __init__(self, root: Path, paths: dict[str, Path], cold: Path, size: int) -> None:
        self.root, self.paths, self.cold, self.size = root, paths, cold, size

    def prepare(self, source: str) -> float | None:
        """Put the cold file's page cache where ``source`` wants it; its residency (0-1)."""
        if source == "cold":
            drop_caches()
            resident = page_cache_resident(self.cold) / self.size
            # The binary and its libraries back into the cache: only the model from disk.
            read_all(llama.server_binary())
            subprocess.run([str(llama.server_binary()), "--version"], capture_output=True)
            return resident
        if source == "warm":
            read_all(self.cold)
            return page_cache_resident(self.cold) / self.size
        return None

    def one(self, source: str, mmap: bool, r: int) -> dict[str, Any]:
        path = self.paths[source]
        args = ["-m", str(path), *SERVER_ARGS, "--load-mode", "mmap" if mmap else "none"]
        log = self.root / f"llama-{source}-{'mmap' if mmap else 'no-mmap'}.log"
        row: dict[str, Any] = {"round": r, "source": source, "mmap": mmap}
        row["resident_before"] = self.prepare(source)
        server = LlamaServer(args, log)
        disk0 = device_bytes_read(self.cold)
        t0 = time.perf_counter()
        server.start(ready_timeout=LOAD_TIMEOUT, poll=HEALTH_POLL)
        try:
            row["load_s"] = time.perf_counter() - t0
            answer = server.post("/completion", COMPLETION, timeout=LOAD_TIMEOUT)
            row["first_token_s"] = time.perf_counter() - t0
            row["disk_read"] = (device_bytes_read(self.cold) - disk0) / self.size
            if answer.get("tokens_predicted") != 1:
                raise RuntimeError(f"the completion did not run: {answer}")
            row["prompt_ms"] = answer["timings"]["prompt_ms"]
            row["pmd_mapped"] = pmd_mapped(server.pid) / self.size
            mapped = bool(mappings_of(server.pid, path))
            if mapped != mmap:
                raise RuntimeError(
                    f"llama-server {'does not map' if mmap else 'maps'} {path} "
                    f"with --load-mode {'mmap' if mmap else 'none'}"
                )
        finally:
            server.stop()
        return row


def bench_load(
    rounds: int = 3,
    size_mib: int = 512,
    log: Callable[[str], None] = print,
    *,
    shape: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Run the load bench; ``shape`` (make_llama_gguf's dims) overrides ``size_mib``, and
    ``{}`` is its tiny default model (for tests)."""
    binary = llama.build(say=log)  # cached under /var/cache/speedloader-llama after the first
    dims = shape_for(size_mib) if shape is None else shape
    root = Path(tempfile.mkdtemp(prefix="sl-bench-load-", dir="/var/tmp"))
    root.chmod(0o755)
    pool = root / "pool"
    try:
        cold_dir = root / "cold"
        cold = cold_dir / f"{NAME}.gguf"
        log(f"writing a llama GGUF (F32, {dims}) to {cold} ...")
        size = make_llama_gguf(cold, **dims).size
        os.sync()  # written back: the cold loads read it from the disk, not dirty pages
        with tmpfs(root, size + 64 * MiB, huge=False) as plain:
            shutil.copyfile(cold, plain / cold.name)
            engine = _engine(root, cold_dir, pool, size + 256 * MiB)
            asyncio.run(_promote(engine))
            link = root / "models" / cold.name
            if not Path(os.path.realpath(link)).is_relative_to(pool):
                raise RuntimeError(f"{link} does not lead into the pool {pool}")
            paths = {"pool": link, "cold": cold, "warm": cold, "plain": plain / cold.name}
            mounts = {"pool": mount_options(pool), "plain": mount_options(plain)}
            loads = Loads(root, paths, cold, size)
            runs: list[dict[str, Any]] = []
            pairs = [(m, s) for m in (True, False) for s in SOURCES]
            for r in range(rounds):
                k = r % len(pairs)
                for mmap, source in pairs[k:] + pairs[:k]:  # each pair first in some round
                    row = loads.one(source, mmap, r + 1)
                    runs.append(row)
                    log(
                        f"round {r + 1} {'mmap   ' if mmap else 'no-mmap'} {source:5} "
                        f"load {row['load_s'] * 1000:7.0f} ms, first token "
                        f"{row['first_token_s'] * 1000:7.0f} ms"
                    )
            engine.pools["bench"].unmount()
    finally:
        for info in mounts_below(root):  # left mounted by a failure: lazily, then removed
            subprocess.run(["umount", "-l", info.mount_point], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
    return _summary(runs, size, rounds, dims, mounts, binary)


def _summary(
    runs: list[dict[str, Any]],
    size: int,
    rounds: int,
    dims: dict[str, int],
    mounts: dict[str, str],
    binary: Path,
) -> dict[str, Any]:
    def pick(mmap: bool, source: str) -> dict[int, dict[str, Any]]:
        return {r["round"]: r for r in runs if r["mmap"] == mmap and r["source"] == source}

    results: dict[str, Any] = {}
    for mmap in (True, False):
        mode = "mmap" if mmap else "no_mmap"
        per_source: dict[str, Any] = {}
        refs = {ref: pick(mmap, ref) for ref in ("cold", "warm", "plain")}
        for source in SOURCES:
            mine = pick(mmap, source)
            entry: dict[str, Any] = {}
            for key in ("load_s", "first_token_s"):
                entry[key] = round(statistics.median(r[key] for r in mine.values()), 4)
                for ref, by_round in refs.items():
                    entry[f"{key}_vs_{ref}"] = round(
                        statistics.median(by_round[i][key] / r[key] for i, r in mine.items()), 2
                    )
            resident = [r["resident_before"] for r in mine.values()]
            entry["resident_before_pct"] = (
                None if resident[0] is None else round(100 * statistics.median(resident), 1)
            )
            for key in ("disk_read", "pmd_mapped"):
                entry[f"{key}_pct"] = round(
                    100 * statistics.median(r[key] for r in mine.values()), 1
                )
            per_source[source] = entry
        results[mode] = per_source
    defaults = {
        k: p.default
        for k, p in inspect.signature(make_llama_gguf).parameters.items()
        if p.default is not inspect.Parameter.empty and k != "name"
    }
    return {
        "size_bytes": size,
        "rounds": rounds,
        "shape": {**defaults, **dims},
        "server_args": SERVER_ARGS,
        "llama_server": str(binary),
        "llama_cpp_commit": (llama.read_stamp() or {}).get("llama_cpp_commit", "?"),
        "mounts": mounts,
        **results,
        "runs": runs,
    }


def print_load(d: dict[str, Any]) -> None:
    shape, commit = d["shape"], str(d["llama_cpp_commit"])[:8]
    print(
        f"llama-server load of a {d['size_bytes'] / MiB:.0f} MiB GGUF (F32, "
        f"{shape['n_layer']} blocks {shape['n_embd']} wide), llama.cpp {commit}, "
        f"{' '.join(d['server_args'])}, median of {d['rounds']} rounds:"
    )
    print(f"  pool mount: {d['mounts']['pool']}; plain tmpfs: {d['mounts']['plain']}")
    print(
        "  load = start to /health 200 (warm-up included); first token = start to the answer"
        " of a 1-token completion;"
    )
    print("  mmap = --load-mode mmap, no-mmap = --load-mode none (reads the file into buffers)")
    head = (
        f"  {'':8}{'source':29}{'load ms':>9}{'vs cold':>9}{'vs warm':>9}"
        f"{'1st token ms':>14}{'vs cold':>9}{'vs warm':>9}"
        "   page cache before   read from disk   huge-mapped"
    )
    print(head)
    for mode, title in (("mmap", "mmap"), ("no_mmap", "no-mmap")):  # --load-mode mmap, none
        for source in SOURCES:
            e = d[mode][source]
            resident = (
                "-" if e["resident_before_pct"] is None else f"{e['resident_before_pct']:.1f} %"
            )
            print(
                f"  {title:8}{TITLES[source]:29}{e['load_s'] * 1000:9.0f}"
                f"{e['load_s_vs_cold']:8.2f}x{e['load_s_vs_warm']:8.2f}x"
                f"{e['first_token_s'] * 1000:14.0f}{e['first_token_s_vs_cold']:8.2f}x"
                f"{e['first_token_s_vs_warm']:8.2f}x   {resident:>17}   {e['disk_read_pct']:9.1f} %"
                f"{e['pmd_mapped_pct']:12.1f} %"
            )
    m, n = d["mmap"], d["no_mmap"]
    print(
        f"  pool vs warm page cache: mmap load {m['pool']['load_s_vs_warm']:.2f}x, "
        f"no-mmap load {n['pool']['load_s_vs_warm']:.2f}x; pool vs plain tmpfs (mmap): "
        f"{m['pool']['load_s_vs_plain']:.2f}x"
    )
