"""Benchmark: the demote of a model the real llama-server has loaded from the pool.

    python3 -m bench --only demote-loaded [--rounds 3]

As root: a private system bus, a real polkitd and speedloaderd (speedloader_lab/sandbox.py),
cold storage on disk (under /var/tmp), one tmpfs pool the daemon mounts, and the real
``llama-server`` (speedloader_lab/llama.py, built once per machine and cached) in router mode
on the models dir (``--models-dir``, ``--no-models-autoload``, ``-c 256 -np 1 -t 2``). The
model is a llama-architecture GGUF of F32 random weights (modelgen.make_llama_gguf with
bigger dims, about 2.2 GiB), written once per run into the temp dir and removed after.

Each round, all in this process:

1. loaded: promote; ``POST /models/load`` and wait until the router lists it ``loaded`` and
   its child maps the pool copy; one short completion (4 tokens; llama-server's warm-up run
   has already touched every weight page); then the demote, timed end to end (the Demote
   call, polkit check included, to the job's Completed): the daemon asks the router to
   unload, sees the child let go of the copy in /proc, deletes it. That time is split at
   when the daemon asked (its log line) and when the child let go of the copy (its
   /proc/PID/maps, looked at every 5 ms from a thread here).
2. references: promote and load again the same way; the router's own unload timed alone
   (``POST /models/unload`` until ``GET /models``, polled every 20 ms, says ``unloaded``:
   the child has exited); then the demote of the same promoted model that nobody has loaded
   (a pure delete), timed the same way.

After each demote: the pool's ``UsedBytes`` and ``HeldBytes`` read from the bus at once,
against df's used bytes (statvfs ``f_blocks - f_bfree``) of the pool's mount, and how long
they took to agree if they did not at once; MemAvailable (/proc/meminfo) before the load and
after the demote (tmpfs pages are shmem, which MemAvailable does not count as available: the
RAM a demote really frees shows up there). Figures are medians over the rounds; the ratios
are per round (loaded demote / router unload, loaded demote / pure delete), then the median.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from dbus_fast import Message

from speedloader_client.client import POOL, Client
from speedloader_lab import llama
from speedloader_lab.llama import LlamaServer, child_pids, mappings_of
from speedloader_lab.modelgen import make_llama_gguf
from speedloader_lab.sandbox import Sandbox
from speedloaderd.bus.names import pool_path
from speedloaderd.config import save_config
from speedloaderd.pools import mounts_below
from tests.lab import Lab

GIB = 1 << 30
MiB = 1 << 20
NAME = "bench-llama"
POOL_NAME = "local"
# 2048 wide, 16 heads (4 KV heads), 5632 FFN, 13 blocks: 45.1 M F32 weights a block, 2.19 GiB
# in all; llama.cpp loads it (its `meta.size` is the file's tensor bytes) and generates.
N_EMBD, N_HEAD, N_HEAD_KV, N_FF, N_LAYER = 2048, 16, 4, 5632, 13
LOAD_TIMEOUT = 300.0  # s for the child to load and warm up 2.2 GiB on a shared 2-core VM
AGREE_TIMEOUT = 30.0  # s for UsedBytes and df to agree after a demote, if not at once
POLL = 0.02  # s between two looks at the router's /models while timing its unload


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def df_used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def resident_in(pid: int, path: Path) -> int:
    """Bytes of ``path`` resident in ``pid``'s mappings of it (Rss in /proc/PID/smaps)."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    total, ours = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and "-" in parts[0] and not parts[0].endswith(":"):
            ours = parts[3] == dev and parts[4] == str(st.st_ino)
        elif ours and parts and parts[0] == "Rss:":
            total += int(parts[1]) * 1024
    return total


def status_of(router: LlamaServer) -> str:
    for entry in router.get("/models")["data"]:
        if entry["id"] == NAME:
            return str(entry["status"]["value"])
    raise RuntimeError(f"the router does not list {NAME}")


class MappingWatch:
    """When ``pid`` stops mapping ``path`` (its /proc/PID/maps, looked at every 5 ms in a
    thread), in s from ``start()``: splits a loaded model's demote into the unload the
    daemon asked for and what follows (the job's own Step signals are coalesced every 0.1 s
    by the bus, too coarse for this)."""

    def __init__(self, pid: int, path: Path) -> None:
        st = os.stat(path)
        self.maps = Path(f"/proc/{pid}/maps")
        self.inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x} {st.st_ino} "
        self.at: float | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _mapped(self) -> bool:
        try:
            return self.inode in self.maps.read_text()
        except (FileNotFoundError, ProcessLookupError):
            return False  # the process has gone, and its mappings with it

    def _watch(self) -> None:
        t0 = time.perf_counter()
        while not self.stopping.is_set():
            if not self._mapped():
                self.at = time.perf_counter() - t0
                return
            self.stopping.wait(0.005)

    def start(self) -> MappingWatch:
        self.thread.start()
        return self

    def stop(self) -> float | None:
        self.stopping.set()
        self.thread.join()
        return self.at


class Run:
    """The lab of one bench run: the daemon's bus, its pool, the router."""

    def __init__(self, sb: Sandbox, root: Path, router: LlamaServer, log: Callable[[str], None]):
        self.sb, self.root, self.router, self.log = sb, root, router, log
        self.pool = root / "pools" / POOL_NAME
        self.wall_t0 = 0.0

    def pool_copy(self) -> Path:
        copy = Path(os.path.realpath(self.root / "models" / f"{NAME}.gguf"))
        if not copy.is_relative_to(self.pool):
            raise RuntimeError(f"{NAME} is not served from the pool: its link goes to {copy}")
        return copy

    async def promote(self, c: Client) -> Path:
        done = await c.follow_job(await c.promote(NAME), timeout=600)
        if not done.success:
            raise RuntimeError(f"promote of {NAME} failed: {done.message}")
        return self.pool_copy()

    async def load(self, copy: Path) -> dict[str, Any]:
        """Load through the router, wait until its child maps ``copy``, run one completion."""
        router = self.router
        t0 = time.perf_counter()
        router.post("/models/load", {"model": NAME})

        def mapped() -> int:
            if status_of(router) != "loaded":
                return 0
            kids = [p for p in child_pids(router.pid) if mappings_of(p, copy)]
            return kids[0] if kids else 0

        child = await asyncio.to_thread(
            llama.wait_for, mapped, LOAD_TIMEOUT, f"{NAME} loaded from {copy}", 0.1
        )
        load_s = time.perf_counter() - t0
        answer = await asyncio.to_thread(
            router.post,
            "/completion",
            {"model": NAME, "prompt": "hello world", "n_predict": 4, "temperature": 0,
             "ignore_eos": True},
            timeout=LOAD_TIMEOUT,
        )  # fmt: skip
        if answer.get("tokens_predicted") != 4:
            raise RuntimeError(f"the completion did not run: {answer}")
        return {"load_s": load_s, "child": child, "resident": resident_in(child, copy)}

    async def demote(self, c: Client) -> tuple[float, str]:
        """The demote timed from the call (polkit check included) to its job's Completed."""
        self.wall_t0, t0 = time.time(), time.perf_counter()
        done = await c.follow_job(await c.demote(NAME), timeout=600)
        seconds = time.perf_counter() - t0
        if not done.success:
            raise RuntimeError(f"demote of {NAME} failed: {done.message}")
        return seconds, done.message

    def asked_at(self) -> float | None:
        """When the daemon asked the router to unload (its INFO line, stamped to the ms in
        local time), in s from the last Demote call; None if it did not log one."""
        stamps = [
            line[:23]
            for line in self.sb.daemon_log().splitlines()
            if f"demote of {NAME}: asking llama.cpp" in line
        ]
        if not stamps:
            return None
        asked = datetime.strptime(stamps[-1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        return asked - self.wall_t0

    async def usage(self, c: Client) -> dict[str, Any]:
        """The pool on the bus against df, at once and (if they differ) once they agree."""
        path = pool_path(POOL_NAME)
        props = await c.get_all(path, POOL)
        out = {
            "used_bytes": props["UsedBytes"],
            "held_bytes": props["HeldBytes"],
            "df_used_bytes": df_used(self.pool),
            "agree_after_s": 0.0,
        }
        if out["used_bytes"] == out["df_used_bytes"] and out["held_bytes"] == 0:
            return out
        t0 = time.perf_counter()
        changed = asyncio.Event()

        def on_signal(msg: Message) -> None:
            if msg.path == path:
                changed.set()

        remove = c.add_listener(on_signal)
        try:
            async with asyncio.timeout(AGREE_TIMEOUT):
                while True:
                    changed.clear()
                    props = await c.get_all(path, POOL)
                    if props["UsedBytes"] == df_used(self.pool) and props["HeldBytes"] == 0:
                        out["agree_after_s"] = time.perf_counter() - t0
                        return out
                    await changed.wait()
        except TimeoutError:
            out["agree_after_s"] = None  # never within AGREE_TIMEOUT: printed as such
            return out
        finally:
            remove()

    async def round(self, c: Client, r: int) -> dict[str, Any]:
        row: dict[str, Any] = {"round": r}
        # 1. the demote of the loaded model: unload + free
        copy = await self.promote(c)
        row["mem_before_load"] = mem_available()
        loaded = await self.load(copy)
        row["load_s"], row["resident_bytes"] = loaded["load_s"], loaded["resident"]
        watch = MappingWatch(loaded["child"], copy).start()
        row["demote_loaded_s"], message = await self.demote(c)
        row["let_go_s"], row["asked_s"] = watch.stop(), self.asked_at()
        row["mem_after_demote"] = mem_available()
        row["after_loaded"] = await self.usage(c)
        if "(llama.cpp unloaded it first)" not in message or row["let_go_s"] is None:
            raise RuntimeError(f"the demote did not unload through the router: {message}")
        if row["asked_s"] is None:
            raise RuntimeError("the daemon's log has no 'asking llama.cpp ... to unload' line")
        row["demote_message"] = message
        # 2. references: the router's unload alone, then the demote of the idle model
        copy = await self.promote(c)
        loaded = await self.load(copy)
        t0 = time.perf_counter()
        self.router.post("/models/unload", {"model": NAME})
        await asyncio.to_thread(
            llama.wait_for, lambda: status_of(self.router) == "unloaded", 120, "unload", POLL
        )
        row["router_unload_s"] = time.perf_counter() - t0
        if mappings_of(loaded["child"], copy):
            raise RuntimeError("the router says unloaded but its child still maps the copy")
        row["demote_idle_s"], _ = await self.demote(c)
        row["after_idle"] = await self.usage(c)
        self.log(
            f"round {r}: demote of the loaded model {row['demote_loaded_s'] * 1000:.0f} ms, "
            f"router unload alone {row['router_unload_s'] * 1000:.0f} ms, "
            f"demote of the idle model {row['demote_idle_s'] * 1000:.1f} ms"
        )
        return row


def bench_demote_loaded(rounds: int = 3, log: Callable[[str], None] = print) -> dict[str, Any]:
    binary = llama.build(say=log)  # cached under /var/cache/speedloader-llama after the first
    root = Path(tempfile.mkdtemp(prefix="sl-bench-demote-", dir="/var/tmp"))
    root.chmod(0o755)
    try:
        lab = Lab(root)
        log(f"writing a {N_LAYER}-block llama GGUF (F32, {N_EMBD} wide) to {lab.cold} ...")
        made = make_llama_gguf(
            lab.cold / f"{NAME}.gguf",
            n_embd=N_EMBD, n_head=N_HEAD, n_head_kv=N_HEAD_KV, n_ff=N_FF, n_layer=N_LAYER,
        )  # fmt: skip
        size = made.size
        config = lab.config(backend="llamacpp", pools=((POOL_NAME, size + 512 * MiB, 100),))
        router = LlamaServer(
            ["--models-dir", str(lab.models), "--no-models-autoload", "-c", "256", "-np", "1",
             "-t", "2"],
            root / "llama-server.log",
        )  # fmt: skip
        config.backend.api_url = router.url
        save_config(config, lab.config_path)
        with Sandbox() as sb:
            proc = sb.start_daemon(lab.config_path)
            try:
                router.start()
                try:
                    runs = asyncio.run(_rounds(Run(sb, root, router, log), rounds))
                finally:
                    router.stop()
            finally:
                sb.stop_daemon(proc)
    finally:
        for info in mounts_below(root):
            subprocess.run(["umount", "-l", info.mount_point], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
    return _summary(runs, size, rounds, binary)


async def _rounds(run: Run, rounds: int) -> list[dict[str, Any]]:
    async with await Client.connect(run.sb.address) as c:
        await c.subscribe()
        return [await run.round(c, r + 1) for r in range(rounds)]


def _summary(runs: list[dict[str, Any]], size: int, rounds: int, binary: Path) -> dict[str, Any]:
    def med(get: Callable[[dict[str, Any]], float]) -> float:
        return statistics.median(get(r) for r in runs)

    after = [r["after_loaded"] for r in runs]
    lags = [a["agree_after_s"] for a in after]
    return {
        "size_bytes": size,
        "rounds": rounds,
        "llama_server": str(binary),
        "llama_cpp_commit": (llama.read_stamp() or {}).get("llama_cpp_commit", "?"),
        "load_s": round(med(lambda r: r["load_s"]), 2),
        "resident_pct": round(100 * med(lambda r: r["resident_bytes"]) / size, 1),
        "demote_loaded_ms": round(1000 * med(lambda r: r["demote_loaded_s"]), 1),
        "router_unload_ms": round(1000 * med(lambda r: r["router_unload_s"]), 1),
        "demote_idle_ms": round(1000 * med(lambda r: r["demote_idle_s"]), 1),
        "asked_ms": round(1000 * med(lambda r: r["asked_s"]), 1),
        "let_go_ms": round(1000 * med(lambda r: r["let_go_s"]), 1),
        "after_let_go_ms": round(1000 * med(lambda r: r["demote_loaded_s"] - r["let_go_s"]), 1),
        "loaded_vs_unload": round(med(lambda r: r["demote_loaded_s"] / r["router_unload_s"]), 2),
        "loaded_vs_idle": round(med(lambda r: r["demote_loaded_s"] / r["demote_idle_s"]), 1),
        "used_bytes": [a["used_bytes"] for a in after],
        "df_used_bytes": [a["df_used_bytes"] for a in after],
        "held_bytes": [a["held_bytes"] for a in after],
        "agree_after_s": lags,
        "mem_freed_bytes": int(med(lambda r: r["mem_after_demote"] - r["mem_before_load"])),
        "demote_message": runs[-1]["demote_message"],
        "runs": runs,
    }


def print_demote_loaded(d: dict[str, Any]) -> None:
    size = d["size_bytes"] / GIB
    print(
        f"demote of a {size:.2f} GiB GGUF loaded in llama-server (router mode, from the pool), "
        f"median of {d['rounds']} rounds:"
    )
    print(
        f"  load until the child maps the copy  {d['load_s'] * 1000:8.0f} ms   "
        f"({d['resident_pct']:.0f} % of it resident in the child)"
    )
    print(
        f"  demote, loaded (unload + free)      {d['demote_loaded_ms']:8.0f} ms   "
        f"{d['loaded_vs_unload']:.2f}x the router's unload, {d['loaded_vs_idle']:.0f}x a "
        "pure delete"
    )
    print(
        f"    daemon asks the router at {d['asked_ms']:.0f} ms, child lets go of the copy at "
        f"{d['let_go_ms']:.0f} ms,"
    )
    print(f"    job Completed {d['after_let_go_ms']:.0f} ms after that")
    print(f"  the router's unload alone           {d['router_unload_ms']:8.0f} ms")
    print(f"  demote, nothing loaded (delete)     {d['demote_idle_ms']:8.1f} ms")
    for i, (used, df, held, lag) in enumerate(
        zip(d["used_bytes"], d["df_used_bytes"], d["held_bytes"], d["agree_after_s"], strict=True)
    ):
        when = (
            "at once"
            if lag == 0
            else ("never within 30 s" if lag is None else f"after {lag * 1000:.0f} ms")
        )
        print(
            f"  round {i + 1} after the demote: UsedBytes {used / MiB:.1f} MiB, df used "
            f"{df / MiB:.1f} MiB, HeldBytes {held}; agree {when}"
        )
    print(
        f"  MemAvailable after the demote - before the load: "
        f"{d['mem_freed_bytes'] / GIB:+.2f} GiB (the copy was {size:.2f} GiB)"
    )
