"""When the pools' shmem makes Ollama load a model with mmap off: the rule and Health's warning.

The rule is Ollama's (server/sched.go disableMmapForHostPressure; speedloaderd/hostmem.py
cites it). The engine test gives Health the meminfo numbers instead of filling the machine's
RAM, which others share.
"""

from __future__ import annotations

from speedloader_lab.modelgen import make_ollama_model
from speedloaderd.engine import Engine
from speedloaderd.hostmem import MemInfo, ollama_headroom, ollama_mmap_warning, parse_meminfo

from .lab import MiB, run

GiB = 1 << 30

MEMINFO = """\
MemTotal:       24683520 kB
MemFree:        21119916 kB
MemAvailable:   20998356 kB
Buffers:           13312 kB
Cached:          2193408 kB
SwapCached:            0 kB
Shmem:           2108416 kB
HugePages_Total:       0
"""


def test_meminfo_is_read_in_bytes():
    assert parse_meminfo(MEMINFO) == MemInfo(
        total=24683520 * 1024, available=20998356 * 1024, shmem=2108416 * 1024
    )


def test_headroom_is_ollamas_max_of_8_gb_and_a_tenth():
    assert ollama_headroom(24 * GiB) == 8 * 10**9  # a tenth is 2.6 GB: the 8 GB floor
    assert ollama_headroom(256 * GiB) == 256 * GiB // 10
    assert ollama_headroom(0) == 8 * 10**9


def test_the_warning_gives_the_numbers_when_memavailable_is_under_the_threshold():
    mem = MemInfo(total=24 * GiB, available=10 * GiB, shmem=12 * GiB)
    message = ollama_mmap_warning(mem, 12 * GiB, "llama3:8b", 4 * GiB)
    # threshold = 4 GiB + 8 GB = 12294967296 bytes = 11.5G
    assert message.startswith(
        "pools hold 12G of RAM as shmem, which MemAvailable does not count; "
        "Ollama sees MemAvailable 10G; on a Linux host with discrete GPUs it loads "
        "llama3:8b (4G) with mmap off when MemAvailable < model + loaded mmapped models "
        "+ max(8 GB, MemTotal/10) = 11.5G or more: "
    ), message
    assert "RAM twice" in message and "use_mmap true" in message


def test_no_warning_at_or_above_the_threshold_nor_without_pools_or_model():
    threshold = 4 * GiB + 8 * 10**9
    at = MemInfo(total=24 * GiB, available=threshold, shmem=GiB)
    below = MemInfo(total=24 * GiB, available=threshold - 1, shmem=GiB)
    assert ollama_mmap_warning(at, GiB, "m", 4 * GiB) == ""
    assert ollama_mmap_warning(below, GiB, "m", 4 * GiB) != ""  # Ollama's test is strict <
    assert ollama_mmap_warning(below, 0, "m", 4 * GiB) == ""  # the pools are not the cause
    assert ollama_mmap_warning(below, GiB, "m", 0) == ""


def test_health_warns_for_the_largest_hot_ollama_model_when_meminfo_says_so(lab):
    make_ollama_model(lab.cold, "small:1", [2 * MiB])
    make_ollama_model(lab.cold, "big:1", [8 * MiB, 3 * MiB])
    lab.seal()

    async def scenario():
        engine = Engine(lab.config(), None)
        await engine.start()
        short = MemInfo(total=24 * GiB, available=3 * GiB, shmem=10 * MiB)
        engine.meminfo = lambda: short
        assert not _findings(await engine.health())  # nothing hot: nothing to say
        await engine.promote("small:1").wait()
        await engine.promote("big:1").wait()
        report = await engine.health()
        [finding] = _findings(report)
        assert finding.status.value == "warning" and report.ok
        assert finding.subject == "big:1"
        used = engine.pool_status("local").used
        assert used >= 13 * MiB
        assert finding.message == ollama_mmap_warning(short, used, "big:1", 8 * MiB)
        assert "Ollama sees MemAvailable 3G" in finding.message
        assert "loads big:1 (8M) with mmap off" in finding.message

        engine.meminfo = lambda: MemInfo(total=24 * GiB, available=20 * GiB, shmem=10 * MiB)
        assert not _findings(await engine.health())  # room enough: no warning

        engine.meminfo = lambda: short
        engine.config = lab.config(backend="llamacpp")  # not Ollama's rule: no warning
        assert not _findings(await engine.health())
        engine.config = lab.config()

        await engine.demote("big:1").wait()
        await engine.demote("small:1").wait()
        assert not _findings(await engine.health())  # nothing hot again
        engine.stop_watching()

    run(scenario())


def _findings(report):
    return [f for f in report.findings if f.check == "ollama-memory"]
