"""Run every benchmark: ``scripts/bench [--size-gib 4] [--rounds 3] [--only bus]``.

As root (mounts tmpfs, drops the page cache). Prints a summary and writes all figures to
bench/out/results.json. Each figure is a ratio against a reference run in the same process
(promote vs cp of the same file), because this machine kind is shared and noisy.
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
from .promote import bench_promote
from .scan import bench_scan
from .tiering import bench_tiering, print_tiering


def print_promote(p: dict) -> None:
    print(
        f"promote of a {p['size_bytes'] / (1 << 30):g} GiB model, median of {p['rounds']} "
        "interleaved rounds, source read from disk:"
    )
    print(
        f"  cp                       {p['cp_GBps']:6.2f} GB/s   1.00x   "
        f"source left in page cache {p['cp_residue_pct']:5.1f} %"
    )
    print(
        f"  promote                  {p['promote_GBps']:6.2f} GB/s  {p['promote_vs_cp']:5.2f}x"
        f"   source left in page cache {p['promote_residue_pct']:5.1f} %"
    )
    print(
        f"  promote + sha256 verify  {p['promote_verified_GBps']:6.2f} GB/s  "
        f"{p['promote_verified_vs_cp']:5.2f}x   source left in page cache "
        f"{p['promote_verified_residue_pct']:5.1f} %"
    )
    print(
        f"  promote, verified before {p['promote_verified_again_GBps']:6.2f} GB/s  "
        f"{p['promote_verified_again_vs_cp']:5.2f}x   source left in page cache "
        f"{p['promote_verified_again_residue_pct']:5.1f} %   "
        f"({p['promote_verified_again_vs_promote']:.2f}x the unverified promote)"
    )
    print(f"  demote                   {p['demote_ms']:.1f} ms")


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
        choices=["promote", "scan", "bus", "demote-loaded", "tiering"],
        help="run one part (default: all)",
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
    if args.only in (None, "tiering"):
        results["tiering"] = bench_tiering(args.seed, log=log)
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print()
    if "promote" in results:
        print_promote(results["promote"])
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
    if "tiering" in results:
        print_tiering(results["tiering"])
    print(f"all figures: {out / 'results.json'}")
    for line in not_run:
        print(f"error: {line}", file=sys.stderr)
    return 1 if not_run else 0


if __name__ == "__main__":
    sys.exit(main())
