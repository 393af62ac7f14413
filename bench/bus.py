"""The daemon on the bus under load: many clients at once, calls while transfers run, and
GetManagedObjects over a large catalog.

    python3 -m bench.bus [--clients 50] [--seconds 60] [--models 10000] [--big 100000]

Runs a private system bus, a real polkitd and speedloaderd (speedloader_lab/sandbox.py), as
root. Every figure is measured in this run; latencies include polkit's CheckAuthorization
for the calls that change something. ``soak`` is also what tests/test_bus_soak.py runs and
checks for lost, duplicated or unfinished jobs. ``big`` serves 100,000 GGUF models (a
catalog whose GetManagedObjects no bus would carry) and times the daemon's start, its RSS
and ``slctl status`` run by an unprivileged user, which reads the models in pages.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbus_fast import Message

from speedloader_client.client import (
    JOB,
    MODEL,
    ROOT,
    Client,
    ClientError,
    model_path,
    unwrap,
)

MiB = 1 << 20


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def ms(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_ms": percentile(values, 50) * 1000,
        "p99_ms": percentile(values, 99) * 1000,
        "max_ms": max(values) * 1000 if values else float("nan"),
    }


# --- the soak ----------------------------------------------------------------------------


@dataclass
class SoakReport:
    clients: int
    seconds: float
    calls: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    change_latency: list[float] = field(default_factory=list)
    read_latency: list[float] = field(default_factory=list)
    returned_jobs: set[str] = field(default_factory=set)
    job_outcomes: Counter = field(default_factory=Counter)
    unfinished: list[str] = field(default_factory=list)
    completions: Counter = field(default_factory=Counter)
    announced: set[str] = field(default_factory=set)
    overlaps: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "seconds": self.seconds,
            "calls": dict(self.calls),
            "errors": dict(self.errors),
            "jobs": len(self.returned_jobs),
            "job_outcomes": dict(self.job_outcomes),
            "change_call": ms(self.change_latency),
            "read_call": ms(self.read_latency),
        }


class JobObserver:
    """Watches every job by signals: a model must never have two jobs running at once, and
    every job announced must complete exactly once."""

    def __init__(self, report: SoakReport):
        self.report = report
        self.running: dict[str, set[str]] = defaultdict(set)
        self.model_of: dict[str, str] = {}

    def __call__(self, msg: Message) -> None:
        if msg.member == "InterfacesAdded" and JOB in msg.body[1]:
            path, job = msg.body[0], unwrap(msg.body[1][JOB])
            self.report.announced.add(path)
            if job.get("State") != "running" or not job.get("Model"):
                return
            model = job["Model"]
            self.model_of[path] = model
            self.running[model].add(path)
            if len(self.running[model]) > 1:
                self.report.overlaps.append(f"{model}: {sorted(self.running[model])}")
        elif msg.member == "Completed" and msg.interface == JOB:
            self.report.completions[msg.path] += 1
            model = self.model_of.get(msg.path)
            if model is not None:
                self.running[model].discard(msg.path)


async def _worker(
    address: str, models: list[str], deadline: float, seed: int, report: SoakReport
) -> None:
    rng = random.Random(seed)
    async with await Client.connect(address) as c:
        await c.subscribe()
        while time.monotonic() < deadline:
            op = rng.choices(["promote", "demote", "read"], weights=[4, 4, 2])[0]
            model = rng.choice(models)
            report.calls[op] += 1
            t0 = time.perf_counter()
            try:
                if op == "promote":
                    job = await c.promote(model)
                elif op == "demote":
                    job = await c.demote(model)
                else:
                    if rng.random() < 0.5:
                        await c.managed_objects()
                    else:
                        await c.get_all(model_path(model), MODEL)
                    report.read_latency.append(time.perf_counter() - t0)
                    continue
            except ClientError as err:
                report.errors[err.name] += 1
                if err.name != "Busy":  # Busy: the model is moving the other way; fine
                    report.unexpected.append(f"{op} {model}: {err.name}: {err.message}")
                continue
            report.change_latency.append(time.perf_counter() - t0)
            report.returned_jobs.add(job)
            try:
                result = await c.follow_job(job, timeout=120)
            except (TimeoutError, ClientError) as err:
                report.unfinished.append(f"{job}: {err}")
                continue
            report.job_outcomes[result.properties.get("State", "?")] += 1


async def soak(address: str, models: list[str], clients: int, seconds: float) -> SoakReport:
    report = SoakReport(clients, seconds)
    observer_client = await Client.connect(address)
    observer_client.add_listener(JobObserver(report))
    await observer_client.subscribe()
    try:
        deadline = time.monotonic() + seconds
        await asyncio.gather(
            *(_worker(address, models, deadline, i, report) for i in range(clients))
        )
        # Every job a client was handed has completed by now (each client followed its
        # own); one round trip flushes the Completed signals to the observer too.
        await observer_client.manager("GetVersion")
    finally:
        observer_client.close()
    return report


# --- latency while transfers run ------------------------------------------------------------


async def _call_latencies(c: Client, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await c.call(
            f"{ROOT}/pools/local",
            "org.freedesktop.DBus.Properties",
            "GetAll",
            "s",
            ["org.speedloader.Speedloader1.Pool"],
        )
        out.append(time.perf_counter() - t0)
    return out


async def latency_under_transfers(address: str, big_models: list[str], calls: int) -> dict:
    """Round trips of a property read, idle and while len(big_models) promotes copy."""
    async with await Client.connect(address) as c:
        await c.subscribe()
        idle = await _call_latencies(c, calls)
        jobs = [await c.promote(m) for m in big_models]
        followers = [asyncio.ensure_future(c.follow_job(j, timeout=600)) for j in jobs]
        t0 = time.perf_counter()
        busy = []
        while not all(f.done() for f in followers):
            busy += await _call_latencies(c, 20)
        elapsed = time.perf_counter() - t0
        results = [await f for f in followers]
        for j in big_models:
            await c.follow_job(await c.demote(j), timeout=120)
    return {
        "transfers": len(big_models),
        "idle": ms(idle) | {"calls_per_s": len(idle) / sum(idle)},
        "during_transfers": ms(busy) | {"calls_per_s": len(busy) / sum(busy) if busy else 0},
        "transfer_seconds": elapsed,
        "transfers_ok": all(r.success for r in results),
    }


async def managed_objects_time(address: str, rounds: int = 3) -> dict:
    async with await Client.connect(address) as c:
        times, n = [], 0
        for _ in range(rounds):
            t0 = time.perf_counter()
            objects = await c.managed_objects()
            times.append(time.perf_counter() - t0)
            n = len(objects)
    return {
        "objects": n,
        "best_ms": min(times) * 1000,
        "median_ms": statistics.median(times) * 1000,
    }


# --- the command ---------------------------------------------------------------------------


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def big_catalog(sb: Any, work: Path, n_models: int, log=print) -> dict:
    """Start the daemon on ``n_models`` GGUF models; time ``slctl status`` as ``nobody``."""
    import subprocess

    from bench.scan import make_gguf_tree
    from speedloaderd.config import save_config
    from tests.buslab import as_user
    from tests.lab import Lab

    (work / "big").mkdir()
    lab = Lab(work / "big")
    log(f"writing {n_models} GGUF models ...")
    made = make_gguf_tree(lab.cold, n_models * 6 // 5)  # one in ten is split in 3 files
    save_config(lab.config(backend="llamacpp"), lab.config_path)
    t0 = time.perf_counter()
    proc = sb.start_daemon(lab.config_path, timeout=900)
    out: dict[str, Any] = {
        "models": made,
        "daemon_start_s": time.perf_counter() - t0,
        "daemon_rss_mib": _rss_mib(proc.pid),
    }
    slctl = str(Path(sys.executable).with_name("slctl"))
    for key, args in (("status_s", ["status"]), ("status_json_s", ["status", "--json"])):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            r = subprocess.run(
                as_user("nobody", [slctl, *args], sb.address), capture_output=True, text=True
            )
            times.append(time.perf_counter() - t0)
            if r.returncode != 0:
                raise RuntimeError(f"slctl {' '.join(args)} failed: {r.stderr.strip()}")
        out[key] = statistics.median(times)
    out["daemon_rss_after_mib"] = _rss_mib(proc.pid)
    out["daemon_alive"] = proc.poll() is None
    sb.stop_daemon(proc)
    return out


def bench_bus(
    clients: int, seconds: float, n_models: int, big_models: int = 100_000, log=print
) -> dict:
    from bench.scan import make_ollama_library
    from speedloader_lab.modelgen import make_ollama_model
    from speedloader_lab.sandbox import Sandbox
    from speedloaderd.config import save_config
    from tests.buslab import write_zero_blob
    from tests.lab import Lab

    results: dict[str, Any] = {}
    with Sandbox() as sb:
        work = Path(tempfile.mkdtemp(prefix="sl-bench-bus-", dir="/tmp"))
        work.chmod(0o755)
        try:
            # 1. 50 clients promoting, demoting and reading; 4 transfers with calls between.
            (work / "small").mkdir()
            lab = Lab(work / "small")
            names = [f"m{i}:q4" for i in range(12)]
            for i, name in enumerate(names):
                make_ollama_model(lab.cold, name, ((1 + i % 4) * MiB, 300))
            big = [f"big{i}:70b" for i in range(4)]
            for name in big:
                make_ollama_model(
                    lab.cold, name, (write_zero_blob(lab.cold, 512 * MiB), 10 + len(name))
                )
            save_config(lab.config(pools=(("local", 3 << 30, 100),)), lab.config_path)
            proc = sb.start_daemon(lab.config_path)
            log(f"soak: {clients} clients for {seconds:.0f} s ...")
            report = asyncio.run(soak(sb.address, names, clients, seconds))
            results["soak"] = report.summary()
            log("latency while 4 promotes of 512 MiB copy ...")
            results["latency"] = asyncio.run(latency_under_transfers(sb.address, big, 200))
            sb.stop_daemon(proc)
            _unmount_below(work)
            # 2. GetManagedObjects with n models.
            (work / "many").mkdir()
            lab = Lab(work / "many")
            log(f"writing {n_models} models ...")
            make_ollama_library(lab.cold, n_models)
            save_config(lab.config(pools=(("local", 64 * MiB, 100),)), lab.config_path)
            t0 = time.perf_counter()
            proc = sb.start_daemon(lab.config_path, timeout=600)
            start_s = time.perf_counter() - t0
            results["many"] = asyncio.run(managed_objects_time(sb.address)) | {
                "daemon_start_s": start_s
            }
            sb.stop_daemon(proc)
            _unmount_below(work)
            # 3. A catalog too big for one message: paged reads.
            if big_models:
                results["big"] = big_catalog(sb, work, big_models, log)
        finally:
            _unmount_below(work)
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    return results


def _unmount_below(root: Path) -> None:
    import subprocess

    from speedloaderd.pools import mounts_below

    for info in mounts_below(root):
        subprocess.run(["umount", "-l", info.mount_point], capture_output=True)


def print_bus(r: dict) -> None:
    s, lat, many = r["soak"], r["latency"], r["many"]
    print(
        f"{s['clients']} clients for {s['seconds']:.0f} s: {sum(s['calls'].values())} calls, "
        f"{s['jobs']} jobs {s['job_outcomes']}, errors {s['errors']}"
    )
    print(
        f"  promote/demote call (with polkit): p50 {s['change_call']['p50_ms']:.1f} ms, "
        f"p99 {s['change_call']['p99_ms']:.1f} ms"
    )
    print(
        f"  read call:                        p50 {s['read_call']['p50_ms']:.1f} ms, "
        f"p99 {s['read_call']['p99_ms']:.1f} ms"
    )
    i, b = lat["idle"], lat["during_transfers"]
    print(
        f"property read, idle: {i['calls_per_s']:.0f} calls/s, p99 {i['p99_ms']:.2f} ms; while "
        f"{lat['transfers']} promotes copy: {b['calls_per_s']:.0f} calls/s "
        f"({b['calls_per_s'] / i['calls_per_s']:.2f}x idle), p99 {b['p99_ms']:.2f} ms"
    )
    print(
        f"GetManagedObjects with {many['objects']} objects: best {many['best_ms']:.0f} ms, "
        f"median {many['median_ms']:.0f} ms; daemon start to on-the-bus "
        f"{many['daemon_start_s']:.1f} s"
    )
    big = r.get("big")
    if big:
        print(
            f"{big['models']} GGUF models: daemon start to on-the-bus "
            f"{big['daemon_start_s']:.1f} s, RSS {big['daemon_rss_mib']:.0f} MiB "
            f"({big['daemon_rss_after_mib']:.0f} after the reads)"
        )
        print(
            f"  `slctl status` as nobody {big['status_s']:.1f} s, `--json` "
            f"{big['status_json_s']:.1f} s (medians of 3); still on the bus: "
            f"{big['daemon_alive']}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.bus", description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--models", type=int, default=10000)
    ap.add_argument("--big", type=int, default=100_000, help="models in the paged part (0: skip)")
    args = ap.parse_args(argv)
    r = bench_bus(args.clients, args.seconds, args.models, args.big)
    print(json.dumps(r, indent=2))
    print_bus(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
