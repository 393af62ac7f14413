"""Host memory as Ollama sees it, and when the pools make Ollama load a model with mmap off.

A tmpfs pool's pages are shmem: /proc/meminfo counts them in ``Shmem`` and ``Cached`` but not
in ``MemAvailable`` (without swap they cannot be reclaimed). Measured on the dev VM (kernel
6.18, no swap), writing 2048 MiB into a tmpfs: Shmem +2048 MiB, Cached +2047 to +2095 MiB,
MemAvailable - MemFree unchanged (0, 2 and 26 MiB in three runs): the pool's bytes come off
MemAvailable one for one, as a process's anonymous memory would.

Ollama reads exactly that figure. ollama/ollama at fb30760996871fa9460115c753afd2c60d4ab0f7
(2026-08-21; the rule came with v0.30.0, commit 9db4bdbad):

- discover/cpu_linux.go ``getCPUMem``: ``FreeMemory`` = ``MemAvailable`` (MemFree + Buffers
  + Cached only on a kernel without MemAvailable); ``getCPUMemByCgroups`` replaces it with
  memory.max - memory.current when Ollama runs in a cgroup namespace that has them.
- server/sched.go ``applyLlamaServerMmapDefaults`` (lines 1138-1156, called at 572 before
  each llama-server start) asks the two rules below.
- server/sched.go ``disableMmapDefaultReason`` (lines 1158-1177): with no GPU, ``num_gpu``
  0 or only CPU devices, mmap is off for every load ("cpu"), whatever memory is free.
- server/sched.go ``disableMmapForHostPressure`` (lines 1227-1241, headroom 1255-1260): on
  Linux, all GPUs discrete, the model predicted within 80% of free VRAM and ``use_mmap``
  not set by the user, mmap is off when
  ``FreeMemory < model file size + sizes of loaded mmapped models + max(8 GB, MemTotal/10)``
  (GB = 10**9, format/bytes.go).
- llm/llama_server.go ``appendLoadModeArgs`` (line 634): mmap off = ``--load-mode none``.
  llama.cpp (src/llama-model-loader.cpp ``load_all_data``, the llama-cpp-python 0.3.36
  vendored tree, lines 1672-1745) then reads (``read_raw``) each host-resident tensor into
  an anonymous buffer (beside the pool's shmem copy: that part takes RAM twice) and stages
  GPU tensors through a temporary buffer into VRAM. With mmap (llama.cpp's ``auto``
  default) only the tensors it repacks for the CPU (``CPU_REPACK`` buffers) are copies.
  Measured with the real llama-server on the CPU, a 289.6 MiB F32 GGUF in a tmpfs:
  ``--load-mode auto`` RssShmem 289.6 MiB, RssAnon 9.2 MiB; ``--load-mode none`` RssShmem
  0, RssAnon 298.8 MiB (the pool still holds its 289.6 MiB: RAM twice).

So the pools can tip the host-pressure rule: this module computes when they do.
"""

from __future__ import annotations

from dataclasses import dataclass

from .sizes import format_size

OLLAMA_MIN_HEADROOM = 8 * 1000**3
"""server/sched.go mmapHostPressureHeadroom: max(8*format.GigaByte, totalMemory/10)."""


@dataclass(frozen=True, slots=True)
class MemInfo:
    """The /proc/meminfo lines that matter here, in bytes."""

    total: int
    available: int
    shmem: int


def parse_meminfo(text: str) -> MemInfo:
    """The ``MemTotal``, ``MemAvailable`` and ``Shmem`` lines (kB) of /proc/meminfo."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            values[key] = int(fields[0]) * 1024
    return MemInfo(values["MemTotal"], values["MemAvailable"], values["Shmem"])


def read_meminfo() -> MemInfo:
    with open("/proc/meminfo", encoding="ascii") as f:  # not under any root: the kernel's
        return parse_meminfo(f.read())


def ollama_headroom(total: int) -> int:
    return max(OLLAMA_MIN_HEADROOM, total // 10)


def ollama_mmap_warning(mem: MemInfo, pools_used: int, model: str, model_size: int) -> str:
    """The warning when Ollama's host-pressure rule loads ``model`` with mmap off; else "".

    ``pools_used``: bytes the tmpfs pools hold (shmem, not in MemAvailable). Only a warning
    when they hold some: without pools Speedloader is not the cause. Models Ollama already
    has loaded with mmap raise the threshold further; the daemon does not count them, so
    this is the least pressure that turns mmap off."""
    threshold = model_size + ollama_headroom(mem.total)
    if pools_used <= 0 or model_size <= 0 or mem.available >= threshold:
        return ""
    return (
        f"pools hold {format_size(pools_used)} of RAM as shmem, which MemAvailable does not "
        f"count; Ollama sees MemAvailable {format_size(mem.available)}; on a Linux host with "
        f"discrete GPUs it loads {model} ({format_size(model_size)}) with mmap off when "
        f"MemAvailable < model + loaded mmapped models + max(8 GB, MemTotal/10) = "
        f"{format_size(threshold)} or more: the weights are read, not mapped, and what stays "
        f"in host RAM is copied into anonymous memory beside the pool's copy (RAM twice); "
        f"keep MemAvailable above that (smaller pools), or set use_mmap true in the model's options"
    )
