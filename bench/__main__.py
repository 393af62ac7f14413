"""Run every benchmark: ``scripts/bench [--size-gib 4] [--rounds 3] [--only bus]``.

As root (mounts tmpfs, drops the page cache). Prints a summary and writes all figures to
bench/out/results.json. Each figure is a ratio against a reference run in the same process
(promote vs cp of the same file and vs an O_DIRECT read of it; a load from the pool vs from
the disk, cold and warm), because this machine kind is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from speedloader_lab.llama import CannotBuild

from .bus import bench_bus, print_bus
from .demote_loaded import bench_demote_loaded, print_demote_loaded
from .load import bench_load, print_load
from .parallel import bench_parallel, print_parallel
from .promote import bench_promote, print_promote
from .scan import bench_scan
from .tiering import bench_tiering, print_tiering


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--size-gib", type=float, default=4.0, help="model size (default 4)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--models", type=int, default=10000, help="models for the scan (10000)")
    ap.add_argument("--clients", type=int, default=50, help="bus clients in the soak (50)")
    ap.add_argument("--seconds", type=float, default=60, help="length of the soak (60)")
    ap.add_argument(
        "--big", type=int, default=100_000, help="models for the paged bus part (0: skip)"
    )
    ap.add_argument(
        "--seed", type=int, default=13, help="the tiering replay's catalog and traces (13)"
    )
    ap.add_argument(
        "--only",
        choices=["promote", "parallel", "scan", "bus", "demote-loaded", "load", "tiering"],
        help="run one part (default: all)",
    )
    ap.add_argument(
        "--load-mib", type=int, default=512, help="GGUF size for the load part (512 MiB)"
    )
    args = ap.parse_args(argv)
    if os.geteuid() != 0 and args.only != "tiering":  # tiering replays traces, no I/O
        print(
            "error: run as root: the benchmark mounts tmpfs and drops the page cache",
            file=sys.stderr,
        )
        return 2
    log = lambda m: print(m, flush=True)  # noqa: E731
    results: dict = {"machine": {"kernel": platform.release(), "cpus": os.cpu_count()}}
    if args.only in (None, "promote"):
        results["promote"] = bench_promote(args.size_gib, args.rounds, log=log)
    if args.only in (None, "parallel"):
        results["parallel"] = bench_parallel(args.size_gib, args.rounds, log=log)
    if args.only in (None, "scan"):
        results["scan"] = bench_scan(args.models)
    if args.only in (None, "bus"):
        results["bus"] = bench_bus(args.clients, args.seconds, args.models, args.big, log=log)
    not_run = []
    if args.only in (None, "demote-loaded"):
        try:
            results["demote_loaded"] = bench_demote_loaded(args.rounds, log=log)
        except CannotBuild as err:  # no compiler here: the other parts still count
            not_run.append(f"demote-loaded not run: cannot build llama-server: {err}")
    if args.only in (None, "load"):
        try:
            results["load"] = bench_load(args.rounds, args.load_mib, log=log)
        except CannotBuild as err:
            not_run.append(f"load not run: cannot build llama-server: {err}")
    if args.only in (None, "tiering"):
        results["tiering"] = bench_tiering(args.seed, log=log)
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print()
    if "promote" in results:
        print_promote(results["promote"])
    if "parallel" in results:
        print_parallel(results["parallel"])
    if "scan" in results:
        scan = results["scan"]
        print(
            f"catalog scan of {scan['n']} models: ollama {scan['ollama_scan_s'] * 1000:.0f} ms, "
            f"gguf {scan['gguf_scan_s'] * 1000:.0f} ms"
        )
    if "bus" in results:
        print_bus(results["bus"])
    if "demote_loaded" in results:
        print_demote_loaded(results["demote_loaded"])
    if "load" in results:
        print_load(results["load"])
    if "tiering" in results:
        print_tiering(results["tiering"])
    print(f"all figures: {out / 'results.json'}")
    for line in not_run:
        print(f"error: {line}", file=sys.stderr)
    return 1 if not_run else 0


if __name__ == "__main__":
    sys.exit(main())
