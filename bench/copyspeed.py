"""Benchmark: promote one big file from disk into tmpfs pools, copy_file against ``cp``.

Run as root (it mounts tmpfs and drops the page cache)::

    python3 -m bench.copyspeed --size-gib 4 --rounds 5

Everything is measured in the same run, interleaved round by round (this machine kind is
shared and noisy, so methods are compared by ratio within a round, then the median is
taken). Before every copy the page cache is dropped, so the source is read cold from disk.
After every copy the source's page-cache residue is measured with mincore: ``cp`` leaves
the whole model in the cache (RAM held twice), copy_file should leave almost nothing.

Two pools are compared: tmpfs mounted ``huge=within_size`` (how pools should be mounted)
and a plain tmpfs.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from speedloaderd.transfer import DEFAULT_CHUNK, copy_file

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value

GIB = 1 << 30
_BLOCK = 64 << 20


def page_cache_resident(path: str | os.PathLike[str]) -> int:
    """Bytes of ``path`` currently in the page cache (mincore on a mapping; reads nothing).

    Mapping a file does not fault its pages in, so measuring does not disturb the cache.
    For a tmpfs file this is its whole size: its pages are the file.
    """
    flags = os.O_RDONLY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_NOATIME)
    except PermissionError:
        fd = os.open(path, flags)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        page = os.sysconf("SC_PAGE_SIZE")
        addr = _libc.mmap(None, size, 0x1, 0x01, fd, 0)  # PROT_READ, MAP_SHARED
        if addr in (None, _MAP_FAILED):
            err = ctypes.get_errno()
            raise OSError(err, f"mmap: {os.strerror(err)}", str(path))
        try:
            npages = (size + page - 1) // page
            vec = (ctypes.c_ubyte * npages)()
            if _libc.mincore(addr, size, vec) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mincore: {os.strerror(err)}", str(path))
            flags_per_page = bytes(vec)
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)
    resident_pages = sum(1 for b in flags_per_page if b & 1)
    resident = resident_pages * page
    if flags_per_page[-1] & 1:
        resident -= npages * page - size  # the last page is only partly file
    return resident


def device_bytes_read(path: str | os.PathLike[str]) -> int:
    """Bytes read so far from the block device ``path`` lives on (/proc/diskstats, whole
    machine: other work's reads count too). The difference over a copy says whether its
    source really came from the disk."""
    st = os.stat(path)
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    for line in Path("/proc/diskstats").read_text().splitlines():
        fields = line.split()
        if int(fields[0]) == major and int(fields[1]) == minor:
            return int(fields[5]) * 512  # sectors read, always in 512-byte units
    raise RuntimeError(f"{path}: device {major}:{minor} is not in /proc/diskstats")


def drop_caches() -> None:
    """Write back dirty pages, then drop the whole page cache (root only)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def make_source(path: Path, size: int, seed: int = 1) -> str:
    """Write ``size`` bytes that neither compress nor dedupe; return ``sha256:<hex>``.

    One random 64 MiB block, with every 8-byte word offset by the block's index, so each
    block differs from every other while costing only an addition to generate.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2**63, size=_BLOCK // 8, dtype=np.uint64)
    h = hashlib.sha256()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        written = 0
        i = 0
        while written < size:
            block = memoryview((base + np.uint64(i)).tobytes())[: size - written]
            h.update(block)
            off = 0
            while off < len(block):
                off += os.write(fd, block[off:])
            written += len(block)
            i += 1
        os.fsync(fd)
    finally:
        os.close(fd)
    return "sha256:" + h.hexdigest()


def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


@contextlib.contextmanager
def tmpfs(where: Path, size: int, *, huge: bool) -> Iterator[Path]:
    """A tmpfs mounted on a fresh directory under ``where``; unmounted and removed after."""
    mnt = Path(tempfile.mkdtemp(prefix="pool-huge-" if huge else "pool-plain-", dir=where))
    opts = f"size={size}" + (",huge=within_size" if huge else "")
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "sl-bench", str(mnt)], check=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        os.rmdir(mnt)


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _run_cp(src: Path, dst: Path, digest: str) -> tuple[float, float]:
    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    return time.perf_counter() - t0, _children_cpu() - cpu0


def _run_copy_file(src: Path, dst: Path, digest: str | None) -> tuple[float, float]:
    cpu0 = time.process_time()  # all threads of this process, kernel time included
    t0 = time.perf_counter()
    copy_file(src, dst, digest=digest, chunk_size=DEFAULT_CHUNK)
    return time.perf_counter() - t0, time.process_time() - cpu0


METHODS: dict[str, Callable[[Path, Path, str], tuple[float, float]]] = {
    "cp": _run_cp,
    "copy_file": lambda s, d, digest: _run_copy_file(s, d, None),
    "copy_file+sha256": lambda s, d, digest: _run_copy_file(s, d, digest),
}


def bench_copy(
    size_gib: float = 2.0,
    workdir: str | os.PathLike[str] | None = None,
    *,
    rounds: int = 3,
    log: Callable[[str], None] = print,
) -> dict:
    """Measure cp and copy_file (with and without digest) into a huge and a plain tmpfs.

    ``workdir`` must be on a disk (not tmpfs): the source file is written there and the
    pools are mounted below it. Default: a fresh directory under /var/tmp, removed after.
    Returns every run and, per pool and method, medians of GB/s (10^9 bytes/s), CPU
    seconds per GB, % of the source left in the page cache, and the median per-round
    ratio of each method's speed to cp's.
    """
    if os.geteuid() != 0:
        raise SystemExit("bench_copy needs root: it mounts tmpfs and drops the page cache")
    size = int(size_gib * GIB)
    own_workdir = workdir is None
    root = Path(workdir or tempfile.mkdtemp(prefix="sl-bench-", dir="/var/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    src = root / "model.bin"
    runs: list[dict] = []
    try:
        log(f"writing {size / GIB:.2f} GiB source {src} ...")
        digest = make_source(src, size)
        pool_size = size + (64 << 20)
        with (
            tmpfs(root, pool_size, huge=True) as huge_pool,
            tmpfs(root, pool_size, huge=False) as plain_pool,
        ):
            pools = {"huge": huge_pool, "plain": plain_pool}
            names = list(METHODS)
            for r in range(rounds):
                order = names[r % len(names) :] + names[: r % len(names)]
                pool_order = list(pools) if r % 2 == 0 else list(pools)[::-1]
                for pool_name in pool_order:
                    for method in order:
                        dst = pools[pool_name] / "model.bin"
                        drop_caches()
                        seconds, cpu = METHODS[method](src, dst, digest)
                        resident = page_cache_resident(src)
                        if r == 0 and _file_digest(dst) != digest:
                            raise RuntimeError(f"{method} produced a wrong copy in {dst}")
                        dst.unlink()
                        run = {
                            "round": r,
                            "pool": pool_name,
                            "method": method,
                            "seconds": seconds,
                            "gbps": size / seconds / 1e9,
                            "cpu_s_per_gb": cpu / (size / 1e9),
                            "resident_pct": 100.0 * resident / size,
                        }
                        runs.append(run)
                        log(
                            f"round {r} {pool_name:5} {method:17} {run['gbps']:5.2f} GB/s "
                            f"cpu {run['cpu_s_per_gb']:.2f} s/GB "
                            f"residue {run['resident_pct']:5.1f}%"
                        )
    finally:
        with contextlib.suppress(FileNotFoundError):
            src.unlink()
        if own_workdir:
            shutil.rmtree(root, ignore_errors=True)

    summary: dict[str, dict[str, dict[str, float]]] = {}
    for pool_name in ("huge", "plain"):
        per_method: dict[str, dict[str, float]] = {}
        for method in METHODS:
            mine = [x for x in runs if x["pool"] == pool_name and x["method"] == method]
            cps = {x["round"]: x for x in runs if x["pool"] == pool_name and x["method"] == "cp"}
            per_method[method] = {
                "gbps_median": statistics.median(x["gbps"] for x in mine),
                "cpu_s_per_gb_median": statistics.median(x["cpu_s_per_gb"] for x in mine),
                "resident_pct_median": statistics.median(x["resident_pct"] for x in mine),
                "ratio_vs_cp_median": statistics.median(
                    x["gbps"] / cps[x["round"]]["gbps"] for x in mine
                ),
            }
        summary[pool_name] = per_method
    return {
        "size_bytes": size,
        "rounds": rounds,
        "chunk_size": DEFAULT_CHUNK,
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "runs": runs,
        "summary": summary,
    }


def _print_summary(result: dict) -> None:
    print(
        f"\n{result['size_bytes'] / GIB:.2f} GiB, cold source, {result['rounds']} rounds, "
        f"kernel {result['kernel']}, {result['cpus']} CPUs (medians)"
    )
    print(f"{'pool':6} {'method':17} {'GB/s':>6} {'x cp':>6} {'CPU s/GB':>9} {'residue':>8}")
    for pool_name, per_method in result["summary"].items():
        for method, s in per_method.items():
            print(
                f"{pool_name:6} {method:17} {s['gbps_median']:6.2f} "
                f"{s['ratio_vs_cp_median']:6.2f} {s['cpu_s_per_gb_median']:9.2f} "
                f"{s['resident_pct_median']:7.1f}%"
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-gib", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workdir", help="a directory on disk (default: new one in /var/tmp)")
    p.add_argument("--json", help="also write the full result to this file")
    args = p.parse_args(argv)
    result = bench_copy(args.size_gib, args.workdir, rounds=args.rounds)
    _print_summary(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
