"""CPU of speedloader-tui, idle and under a stream of updates, with many models.

    python3 -m bench.tui_cpu [--models 500] [--seconds 10] [--big-gib 2] [--parallel 2]

As root: a private bus, a real polkitd and speedloaderd over a lab of ``--models`` small
Ollama models plus one big sparse one; the dashboard runs in a real terminal (tmux,
160x50). Measured from /proc (user+system time of the dashboard's process):

- idle: nothing happens on the bus;
- busy: big models are promoted and demoted over and over, ``--parallel`` at a time, so
  the daemon sends job progress (each job at most 10 Hz) plus model and pool changes,
  with the Models tab shown and then with the Transfers tab (its bars redrawn at up to
  10 Hz) shown. The signal rate every client received is reported with the CPU figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from speedloader_client.client import JOB, Client
from speedloader_lab.sandbox import Sandbox
from speedloaderd.config import save_config

GiB = 1 << 30
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def build_lab(root: Path, models: int, big: int, parallel: int) -> Path:
    from speedloader_lab.modelgen import make_ollama_model
    from tests.buslab import write_zero_blob
    from tests.lab import Lab

    lab = Lab(root)
    for i in range(models):
        make_ollama_model(lab.cold, f"bench/m{i:04d}:1b", (4096 + i,))
    for i in range(parallel):  # sizes differ, so the blobs (named by digest) do too
        size = big + i * (1 << 20)
        make_ollama_model(lab.cold, f"big{i}:70b", (write_zero_blob(lab.cold, size), 100))
    config = lab.config(pools=(("local", 2 * parallel * big + GiB, 100),))  # a limit, not RAM
    save_config(config, lab.config_path)
    return lab.config_path


class Terminal:
    def __init__(self, tmp: Path):
        self.sock = tmp / "tmux.sock"
        self.fifo = tmp / "pane.fifo"
        os.mkfifo(self.fifo)
        self.seen = b""

    def tmux(self, *args: str) -> str:
        return subprocess.run(
            ["tmux", "-f", "/dev/null", "-S", str(self.sock), *args],
            check=True,
            capture_output=True,
            text=True,
        ).stdout

    def start(self, command: str) -> int:
        self.tmux("new-session", "-d", "-s", "b", "-x", "160", "-y", "50", "sh")
        self.tmux("pipe-pane", "-t", "b", "-o", f"cat > {self.fifo}")
        self.reader = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK)
        self.tmux("send-keys", "-t", "b", f"exec {command}", "Enter")
        self.wait_for("COLD")
        self.tmux("pipe-pane", "-t", "b")  # stop copying output: nobody reads it from now
        return int(self.tmux("display", "-p", "-t", "b", "#{pane_pid}").strip())

    def wait_for(self, text: str, timeout: float = 60) -> None:
        while text.encode() not in self.seen:
            ready, _, _ = select.select([self.reader], [], [], timeout)
            if not ready:
                raise TimeoutError(text)
            self.seen += os.read(self.reader, 1 << 16)

    def close(self) -> None:
        subprocess.run(
            ["tmux", "-f", "/dev/null", "-S", str(self.sock), "kill-server"], capture_output=True
        )


async def churn(address: str, seconds: float, parallel: int) -> dict[str, float]:
    """Promote and demote the big models (``parallel`` at once) until ``seconds`` are
    over; count the signals every client receives meanwhile."""
    async with await Client.connect(address) as c:
        signals = {"job_progress": 0, "all": 0}

        def count(msg) -> None:
            signals["all"] += 1
            if msg.member == "PropertiesChanged" and msg.body and msg.body[0] == JOB:
                signals["job_progress"] += 1

        c.add_listener(count)
        await c.subscribe()
        start = time.monotonic()
        end = start + seconds
        cycles = 0

        async def cycle(model: str) -> None:
            nonlocal cycles
            while time.monotonic() < end:
                for start_job in (c.promote, c.demote):
                    result = await c.follow_job(await start_job(model), timeout=300)
                    if not result.success:
                        raise RuntimeError(f"{model}: {result.message}")
                cycles += 1

        await asyncio.gather(*(cycle(f"big{i}:70b") for i in range(parallel)))
        wall = time.monotonic() - start
        return {"cycles": cycles, **{k: v / wall for k, v in signals.items()}}


def measure(pid: int, seconds: float, address: str | None, parallel: int = 1) -> dict[str, float]:
    start_cpu, start = cpu_seconds(pid), time.monotonic()
    extra: dict[str, float] = {}
    if address is None:
        time.sleep(seconds)
    else:
        extra = asyncio.run(churn(address, seconds, parallel))
    wall = time.monotonic() - start
    return {
        "cpu_percent": 100 * (cpu_seconds(pid) - start_cpu) / wall,
        "seconds": wall,
        **{f"{k}_per_s" if k != "cycles" else k: v for k, v in extra.items()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.tui_cpu")
    ap.add_argument("--models", type=int, default=500)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--big-gib", type=float, default=2.0)
    ap.add_argument(
        "--parallel",
        type=int,
        default=2,
        help="big models promoted at once (each job reports at <= 10 Hz)",
    )
    args = ap.parse_args(argv)
    if os.geteuid() != 0 or shutil.which("tmux") is None:
        print("error: run as root, with tmux installed", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="sl-bench-tui-", dir="/tmp"))
    root.chmod(0o755)
    term = Terminal(root)
    results: dict[str, object] = {"models": args.models + args.parallel}
    try:
        config = build_lab(root, args.models, int(args.big_gib * GiB), args.parallel)
        with Sandbox() as sb:
            daemon = sb.start_daemon(config)
            try:
                pid = term.start(
                    f"env DBUS_SYSTEM_BUS_ADDRESS={sb.address} TERM=xterm-256color "
                    f"{sys.executable} -m speedloader_tui"
                )
                time.sleep(2)  # let start-up work finish before measuring
                results["idle"] = measure(pid, args.seconds, None)
                results["busy_models_tab"] = measure(pid, args.seconds, sb.address, args.parallel)
                term.tmux("send-keys", "-t", "b", "3")
                results["busy_transfers_tab"] = measure(
                    pid, args.seconds, sb.address, args.parallel
                )
                term.tmux("send-keys", "-t", "b", "1")
                time.sleep(1)
                results["idle_after"] = measure(pid, args.seconds, None)
            finally:
                sb.stop_daemon(daemon)
    finally:
        term.close()
        subprocess.run(["umount", "-R", str(root / "pools" / "local")], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
