"""The copy engine against real tmpfs pools, with sources on the ordinary disk.

Runs as root: every pool is a real ``mount -t tmpfs``. Sources live on the disk (ext4
here), so the ext4 -> tmpfs path, where copy_file_range fails with EXDEV and sendfile
takes over, is the real one, not a simulation.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.copyspeed import page_cache_resident
from speedloaderd.errors import Cancelled, Failed, InvalidArgument, NoSpace, VerificationFailed
from speedloaderd.roots import PARTIAL_MARKER, is_partial, partial_name
from speedloaderd.transfer import (
    CopyResult,
    Progress,
    ProgressMeter,
    copy_file,
    forget_refused_pairs,
)

MiB = 1 << 20

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="LOUD SKIP: needs root to mount tmpfs pools (CI runs as root)"
)


# --- fixtures and helpers -----------------------------------------------------------


def _fstype(path: Path) -> str:
    return subprocess.run(
        ["stat", "-f", "-c", "%T", str(path)], check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.fixture
def make_pool() -> Iterator[Callable[..., Path]]:
    """Mount tmpfs pools on fresh directories; always unmounted and removed afterwards."""
    mounted: list[Path] = []
    made: list[Path] = []

    def make(size: str = "64M", *, huge: bool = True) -> Path:
        d = Path(tempfile.mkdtemp(prefix="sl-test-pool-"))
        made.append(d)
        opts = f"size={size}" + (",huge=within_size" if huge else "")
        subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "sl-test-pool", str(d)], check=True)
        mounted.append(d)
        return d

    try:
        yield make
    finally:
        busy = []
        for d in reversed(mounted):
            if subprocess.run(["umount", str(d)]).returncode != 0:
                busy.append(d)  # something still holds it open: a leak, reported below
                subprocess.run(["umount", "-l", str(d)])
        for d in made:
            os.rmdir(d)
        assert not busy, f"pools still busy at teardown (open files leaked?): {busy}"


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    """A directory on the ordinary disk, never tmpfs, so copies into pools cross filesystems."""
    if _fstype(tmp_path) in ("tmpfs", "ramfs"):
        d = Path(tempfile.mkdtemp(prefix="sl-test-disk-", dir="/var/tmp"))
        assert _fstype(d) not in ("tmpfs", "ramfs"), "no disk-backed directory found"
        yield d
        shutil.rmtree(d)
    else:
        yield tmp_path


@pytest.fixture
def read_only_view(disk: Path) -> Iterator[Callable[[Path], Path]]:
    """``view(dir)`` bind-mounts ``dir`` read-only: any write through it fails with EROFS."""
    mounted: list[Path] = []

    def view(directory: Path) -> Path:
        d = Path(tempfile.mkdtemp(prefix="sl-test-ro-", dir=disk))
        subprocess.run(["mount", "--bind", str(directory), str(d)], check=True)
        mounted.append(d)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(d)], check=True)
        return d

    try:
        yield view
    finally:
        for d in reversed(mounted):
            subprocess.run(["umount", str(d)], check=True)
            os.rmdir(d)


@pytest.fixture(autouse=True)
def fresh_engine() -> Iterator[None]:
    """Each test starts without remembered copy_file_range refusals; no fd may leak."""
    forget_refused_pairs()
    before = set(os.listdir("/proc/self/fd"))
    yield
    forget_refused_pairs()
    leaked = set(os.listdir("/proc/self/fd")) - before
    assert not leaked, f"file descriptors left open: {sorted(leaked)}"


def make_file(path: Path, size: int, seed: int = 0) -> str:
    """Write ``size`` pseudo-random bytes, fsync'd (clean pages); return ``sha256:<hex>``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    block = hashlib.sha256(f"seed{seed}".encode()).digest() * (MiB // 32)
    with open(path, "wb") as f:
        i = 0
        while i * MiB < size:
            piece = bytes(b ^ (i & 0xFF) for b in block[:64]) + block[64:]
            piece = piece[: size - i * MiB]
            f.write(piece)
            h.update(piece)
            i += 1
        f.flush()
        os.fsync(f.fileno())
    return "sha256:" + h.hexdigest()


def sha(path: Path) -> str:
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def all_files(root: Path) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, name), root)
        for d, _dirs, files in os.walk(root)
        for name in files
    )


# --- copies -------------------------------------------------------------------------


def test_disk_to_tmpfs_copy_is_identical_and_uses_sendfile(disk, make_pool, read_only_view):
    digest = make_file(disk / "src" / "model.gguf", 10 * MiB + 4321)
    src = read_only_view(disk / "src") / "model.gguf"  # writes next to it would fail
    pool = make_pool()
    dst = pool / "org" / "model" / "model.gguf"

    res = copy_file(src, dst, chunk_size=3 * MiB)

    assert res == CopyResult(bytes=10 * MiB + 4321, seconds=res.seconds, method="sendfile",
                             verified=False)  # fmt: skip
    assert sha(dst) == digest
    assert all_files(pool) == ["org/model/model.gguf"]
    assert (dst.stat().st_mode & 0o777) == 0o444  # the source is 0644: no write bits in a pool
    assert (dst.parent.stat().st_mode & 0o777) == 0o755
    assert (dst.parent.parent.stat().st_mode & 0o777) == 0o755


def test_daemon_umask_does_not_change_modes(disk, make_pool):
    make_file(disk / "a.bin", MiB)
    pool = make_pool()
    old = os.umask(0o077)
    try:
        copy_file(disk / "a.bin", pool / "d" / "a.bin")
    finally:
        os.umask(old)
    assert ((pool / "d").stat().st_mode & 0o777) == 0o755
    assert ((pool / "d" / "a.bin").stat().st_mode & 0o777) == 0o444


def test_cross_filesystem_refusal_is_remembered(disk, make_pool, monkeypatch):
    make_file(disk / "a.bin", 2 * MiB, seed=1)
    make_file(disk / "b.bin", 2 * MiB, seed=2)
    pool = make_pool()
    assert copy_file(disk / "a.bin", pool / "a.bin").method == "sendfile"

    calls = []
    real = os.copy_file_range

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(os, "copy_file_range", counting)
    res = copy_file(disk / "b.bin", pool / "b.bin")
    assert res.method == "sendfile"
    assert calls == [], "copy_file_range was retried for a pair of filesystems that refused it"
    assert sha(pool / "b.bin") == sha(disk / "b.bin")


def test_within_one_tmpfs_copy_file_range_is_used(disk, make_pool):
    digest = make_file(disk / "m.bin", 9 * MiB + 7)
    pool = make_pool()
    copy_file(disk / "m.bin", pool / "a" / "m.bin")

    res = copy_file(pool / "a" / "m.bin", pool / "b" / "m.bin", digest=digest, chunk_size=2 * MiB)

    assert (res.method, res.verified) == ("copy_file_range", True)
    assert sha(pool / "b" / "m.bin") == sha(pool / "a" / "m.bin") == digest


def test_pool_to_pool_falls_back_to_sendfile(disk, make_pool):
    # Measured on 6.18: copy_file_range between two tmpfs mounts is EXDEV as well; it
    # only works within one filesystem.
    digest = make_file(disk / "m.bin", 9 * MiB + 7)
    hot, other = make_pool(), make_pool(huge=False)
    copy_file(disk / "m.bin", hot / "m.bin")

    res = copy_file(hot / "m.bin", other / "m.bin", digest=digest, chunk_size=2 * MiB)

    assert (res.method, res.verified) == ("sendfile", True)
    assert sha(other / "m.bin") == sha(hot / "m.bin") == digest
    assert page_cache_resident(hot / "m.bin") == 9 * MiB + 7, "a tmpfs source stays whole"


def test_existing_destination_is_replaced(disk, make_pool):
    digest = make_file(disk / "m.bin", 3 * MiB, seed=5)
    pool = make_pool()
    (pool / "m.bin").write_bytes(b"old content")
    copy_file(disk / "m.bin", pool / "m.bin")
    assert sha(pool / "m.bin") == digest
    assert all_files(pool) == ["m.bin"]


def test_empty_file(disk, make_pool):
    digest = make_file(disk / "empty", 0)
    pool = make_pool()
    res = copy_file(disk / "empty", pool / "empty", digest=digest, expected_size=0)
    assert (res.bytes, res.verified) == (0, True)
    assert (pool / "empty").read_bytes() == b""


def test_on_bytes_sums_to_size(disk, make_pool):
    size = 7 * MiB + 999
    make_file(disk / "m.bin", size)
    pool = make_pool()
    seen: list[int] = []
    copy_file(disk / "m.bin", pool / "m.bin", on_bytes=seen.append, chunk_size=2 * MiB)
    assert sum(seen) == size
    assert seen == [2 * MiB] * 3 + [MiB + 999]


# --- verification -------------------------------------------------------------------


def test_digest_is_verified(disk, make_pool):
    size = 12 * MiB + 1
    digest = make_file(disk / "blob", size, seed=3)
    pool = make_pool()
    res = copy_file(disk / "blob", pool / "blob", digest=digest, expected_size=size, chunk_size=MiB)
    assert res.verified
    assert sha(pool / "blob") == digest


def test_digest_mismatch_raises_and_leaves_no_trace(disk, make_pool):
    make_file(disk / "blob", 5 * MiB, seed=3)
    wrong = "sha256:" + "ab" * 32
    pool = make_pool()
    with pytest.raises(VerificationFailed) as ei:
        copy_file(disk / "blob", pool / "sub" / "blob", digest=wrong, chunk_size=MiB)
    msg = str(ei.value)
    assert str(disk / "blob") in msg
    assert wrong in msg
    assert sha(disk / "blob") in msg
    assert all_files(pool) == []


def test_expected_size_mismatch_is_refused(disk, make_pool):
    make_file(disk / "blob", 2 * MiB)
    pool = make_pool()
    with pytest.raises(VerificationFailed, match="expects 12345"):
        copy_file(disk / "blob", pool / "blob", expected_size=12345)
    assert all_files(pool) == []


def test_malformed_digest_is_refused_before_anything_happens(disk, make_pool):
    make_file(disk / "blob", MiB)
    pool = make_pool()
    for bad in ("sha256-" + "ab" * 32, "sha256:xyz", "md4:00", "sha256:" + "ab" * 31):
        with pytest.raises(InvalidArgument):
            copy_file(disk / "blob", pool / "d" / "blob", digest=bad)
    assert os.listdir(pool) == []


# --- full pools ---------------------------------------------------------------------


def test_full_pool_fails_at_once_and_keeps_earlier_files(disk, make_pool):
    small = make_file(disk / "small.bin", MiB, seed=7)
    make_file(disk / "big.bin", 16 * MiB, seed=8)
    pool = make_pool("4M")
    copy_file(disk / "small.bin", pool / "small.bin")
    seen: list[int] = []

    with pytest.raises(NoSpace) as ei:
        copy_file(disk / "big.bin", pool / "big.bin", on_bytes=seen.append, chunk_size=MiB)

    assert seen == [], "preallocation should refuse before any byte is copied"
    assert str(pool) in str(ei.value) and "big.bin" in str(ei.value)
    assert "more bytes" in str(ei.value)
    assert all_files(pool) == ["small.bin"]
    assert sha(pool / "small.bin") == small


def test_pool_filling_mid_copy_leaves_no_trace(disk, make_pool, monkeypatch):
    # Forced: preallocation is skipped so the pool runs out while sendfile is writing,
    # exercising the ENOSPC path of the copy loop itself (another writer could fill a
    # pool between our fallocate and now on a filesystem without fallocate).
    small = make_file(disk / "small.bin", MiB, seed=7)
    make_file(disk / "big.bin", 16 * MiB, seed=8)
    pool = make_pool("4M")
    copy_file(disk / "small.bin", pool / "small.bin")
    monkeypatch.setattr(os, "posix_fallocate", lambda fd, off, n: None)
    seen: list[int] = []

    with pytest.raises(NoSpace) as ei:
        copy_file(disk / "big.bin", pool / "big.bin", on_bytes=seen.append, chunk_size=MiB)

    assert seen, "the copy was expected to get under way before the pool filled"
    assert str(pool) in str(ei.value)
    assert all_files(pool) == ["small.bin"]
    assert sha(pool / "small.bin") == small


# --- cancel -------------------------------------------------------------------------


@pytest.mark.parametrize("verify", [False, True])
def test_cancel_mid_copy_leaves_no_trace(disk, make_pool, verify):
    digest = make_file(disk / "m.bin", 8 * MiB)
    pool = make_pool()
    cancel = threading.Event()
    seen: list[int] = []

    def on_bytes(n: int) -> None:
        seen.append(n)
        cancel.set()

    with pytest.raises(Cancelled):
        copy_file(
            disk / "m.bin",
            pool / "d" / "m.bin",
            digest=digest if verify else None,
            on_bytes=on_bytes,
            cancel=cancel,
            chunk_size=MiB,
        )
    assert seen == [MiB], "the copy must stop at the first chunk boundary after cancel"
    assert all_files(pool) == []


def test_cancel_after_the_last_chunk_still_leaves_no_trace(disk, make_pool):
    digest = make_file(disk / "m.bin", 3 * MiB)
    pool = make_pool()
    cancel = threading.Event()
    done: list[int] = []

    def on_bytes(n: int) -> None:
        done.append(n)
        if sum(done) == 3 * MiB:
            cancel.set()

    with pytest.raises(Cancelled):
        copy_file(
            disk / "m.bin",
            pool / "m.bin",
            digest=digest,
            on_bytes=on_bytes,
            cancel=cancel,
            chunk_size=MiB,
        )
    assert all_files(pool) == []


def test_cancel_before_start_creates_nothing(disk, make_pool):
    make_file(disk / "m.bin", MiB)
    pool = make_pool()
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        copy_file(disk / "m.bin", pool / "d" / "m.bin", cancel=cancel)
    assert os.listdir(pool) == []


# --- fallbacks and failures ---------------------------------------------------------


def test_read_write_fallback(disk, make_pool, monkeypatch):
    # Forced syscall failure: on this kernel both in-kernel paths work (sendfile for
    # ext4 -> tmpfs), so to reach the last resort, copy_file_range and sendfile are
    # replaced by stubs failing with ENOSYS, as they would on a kernel or filesystem
    # without them.
    digest = make_file(disk / "m.bin", 20 * MiB + 3)
    pool = make_pool()

    def enosys(*_args):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(os, "copy_file_range", enosys)
    monkeypatch.setattr(os, "sendfile", enosys)
    seen: list[int] = []
    res = copy_file(
        disk / "m.bin", pool / "m.bin", digest=digest, on_bytes=seen.append, chunk_size=16 * MiB
    )
    assert (res.method, res.verified) == ("readwrite", True)
    assert sha(pool / "m.bin") == digest
    assert seen == [16 * MiB, 4 * MiB + 3]


def test_o_noatime_refused_falls_back(disk, make_pool, monkeypatch):
    # Forced: root may always use O_NOATIME; an unprivileged daemon reading someone
    # else's file gets EPERM and must still be able to copy.
    digest = make_file(disk / "m.bin", MiB)
    pool = make_pool()
    real_open = os.open

    def picky_open(path, flags, *args, **kw):
        if flags & os.O_NOATIME:
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(path))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", picky_open)
    copy_file(disk / "m.bin", pool / "m.bin")
    assert sha(pool / "m.bin") == digest


def test_missing_source_fails_with_path_and_reason(disk, make_pool):
    pool = make_pool()
    with pytest.raises(Failed) as ei:
        copy_file(disk / "nope.bin", pool / "nope.bin")
    assert str(disk / "nope.bin") in str(ei.value)
    assert os.strerror(errno.ENOENT) in str(ei.value)
    assert all_files(pool) == []


def test_destination_parent_is_a_file(disk, make_pool):
    make_file(disk / "m.bin", MiB)
    pool = make_pool()
    (pool / "d").write_bytes(b"not a directory")
    with pytest.raises(Failed, match=os.strerror(errno.ENOTDIR)):
        copy_file(disk / "m.bin", pool / "d" / "m.bin")
    assert all_files(pool) == ["d"]


def test_source_growing_mid_copy_fails(disk, make_pool):
    make_file(disk / "m.bin", 4 * MiB)
    pool = make_pool()

    def grow(_n: int) -> None:
        with open(disk / "m.bin", "ab") as f:
            f.write(b"x" * 100)

    with pytest.raises(Failed, match="changed while being copied"):
        copy_file(disk / "m.bin", pool / "m.bin", on_bytes=grow, chunk_size=MiB)
    assert all_files(pool) == []


def test_source_shrinking_mid_copy_fails(disk, make_pool):
    make_file(disk / "m.bin", 4 * MiB)
    pool = make_pool()

    def shrink(_n: int) -> None:
        os.truncate(disk / "m.bin", MiB + 10)

    with pytest.raises(Failed, match="shrank"):
        copy_file(disk / "m.bin", pool / "m.bin", on_bytes=shrink, chunk_size=MiB)
    assert all_files(pool) == []


# --- the source stays untouched -------------------------------------------------------


def test_source_is_never_modified(disk, make_pool):
    src_dir = disk / "cold"
    digest = make_file(src_dir / "m.bin", 6 * MiB)
    st = os.stat(src_dir / "m.bin")
    # atime older than mtime: under relatime any ordinary read would now update it.
    os.utime(src_dir / "m.bin", ns=(st.st_mtime_ns - 10**12, st.st_mtime_ns))
    before = os.stat(src_dir / "m.bin")
    listing = sorted(os.listdir(src_dir))
    pool = make_pool()

    copy_file(src_dir / "m.bin", pool / "m.bin", digest=digest, chunk_size=MiB)

    after = os.stat(src_dir / "m.bin")
    assert sha(src_dir / "m.bin") == digest
    assert after.st_mtime_ns == before.st_mtime_ns
    assert after.st_atime_ns == before.st_atime_ns, "the source was read without O_NOATIME"
    assert after.st_size == before.st_size
    assert sorted(os.listdir(src_dir)) == listing


def test_source_leaves_no_page_cache_residue(disk, make_pool):
    size = 48 * MiB
    make_file(disk / "m.bin", size)
    with open(disk / "m.bin", "rb") as f:
        while f.read(8 * MiB):
            pass
    warm = page_cache_resident(disk / "m.bin")
    assert warm >= size * 0.9, f"source should be cached before the copy, {warm} of {size}"
    pool = make_pool()

    copy_file(disk / "m.bin", pool / "m.bin", chunk_size=8 * MiB)

    left = page_cache_resident(disk / "m.bin")
    assert left <= size // 100, f"{left} bytes of the source left in the page cache"
    # The pool copy is RAM itself: all of it resident.
    assert page_cache_resident(pool / "m.bin") == size


def test_page_cache_resident_agrees_with_fincore(disk):
    fincore = shutil.which("fincore")
    if fincore is None:
        pytest.skip("LOUD SKIP: util-linux fincore not installed; cannot cross-check mincore")
    make_file(disk / "m.bin", 8 * MiB)  # whole pages: fincore counts pages, not bytes
    fd = os.open(disk / "m.bin", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        # No readahead, so exactly the 3 MiB read are cached and nothing is still in
        # flight while the two tools look.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        os.pread(fd, 3 * MiB, 0)
    finally:
        os.close(fd)
    out = subprocess.run(
        [fincore, "--bytes", "--noheadings", "--output", "RES", str(disk / "m.bin")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    ours = page_cache_resident(disk / "m.bin")
    assert ours == int(out.strip())
    assert ours == 3 * MiB


# --- huge pages ---------------------------------------------------------------------


def _pmd_mapped_kb(path: Path) -> int:
    """Map ``path`` read-only, touch every 2 MiB, return its PMD-mapped kB from smaps."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]  # fmt: skip
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, 0x1, 0x01, fd, 0)  # PROT_READ, MAP_SHARED
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            for off in range(0, size, 2 * MiB):
                ctypes.string_at(addr + off, 1)
            pmd_kb = None
            in_mapping = False
            for line in Path("/proc/self/smaps").read_text().splitlines():
                header = re.match(r"([0-9a-f]+)-[0-9a-f]+ ", line)
                if header:
                    in_mapping = int(header.group(1), 16) == addr
                elif in_mapping and line.startswith(("ShmemPmdMapped:", "FilePmdMapped:")):
                    pmd_kb = (pmd_kb or 0) + int(line.split()[1])
            if pmd_kb is not None:
                return pmd_kb
            raise AssertionError("mapping not found in /proc/self/smaps")
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def test_copy_into_huge_pool_lands_in_huge_pages(disk, make_pool):
    # Why this matters: mmap loads from a plain-page tmpfs ran ~10x slower (1.7 against
    # 18.7 GB/s for 4 GiB, see _TMPFS_OPTIONS in speedloaderd/pools.py). sendfile into a
    # file that grows as it is written gets no huge pages on within_size; the
    # preallocation is what makes the copy land in them.
    if Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled").read_text().find("[deny]") >= 0:
        pytest.skip("LOUD SKIP: shmem huge pages are denied on this kernel (shmem_enabled=deny)")
    make_file(disk / "m.bin", 16 * MiB)
    pool = make_pool()
    copy_file(disk / "m.bin", pool / "m.bin")
    assert _pmd_mapped_kb(pool / "m.bin") >= 8 * 1024


# --- partial names ------------------------------------------------------------------


def test_partial_names():
    name = partial_name("model.gguf")
    assert name.startswith(PARTIAL_MARKER)
    assert is_partial(name)
    # It fits NAME_MAX whatever the final name's length (a cold file may have 255 bytes).
    assert len(partial_name("m" * 255)) < 64
    assert partial_name("x") != partial_name("x")
    assert not is_partial("model.gguf")
    assert not is_partial(".hidden")
    assert not is_partial("sha256-" + "ab" * 32)


# --- progress -----------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_progress_is_rate_limited_and_always_finishes():
    clock = FakeClock()
    reports: list[Progress] = []
    total = 10_000 * 1000
    meter = ProgressMeter(total, reports.append, max_hz=10.0, clock=clock)
    for i in range(1, 10_000):  # one add per millisecond for ~10 s
        clock.now = 1000.0 + i / 1000
        meter.add(1000)
    emitted_in_loop = len(reports)
    # At most 10 per second over 10 s, plus the very first report.
    assert 95 <= emitted_in_loop <= 101
    gaps = [b.done - a.done for a, b in zip(reports, reports[1:], strict=False)]
    assert min(gaps) >= 100 * 1000, "two reports less than 0.1 s (100 adds) apart"

    meter.finish()
    last = reports[-1]
    assert (last.done, last.total, last.fraction, last.eta) == (total, total, 1.0, 0.0)
    assert len(reports) == emitted_in_loop + 1
    meter.finish()
    meter.add(5)
    assert len(reports) == emitted_in_loop + 1, "nothing is reported after finish"


def test_progress_final_report_even_within_rate_limit():
    clock = FakeClock()
    reports: list[Progress] = []
    meter = ProgressMeter(100, reports.append, clock=clock)
    meter.add(40)  # first add reports
    meter.add(60)  # same instant: suppressed by the rate limit
    assert [r.done for r in reports] == [40]
    meter.finish()
    assert [r.done for r in reports] == [40, 100]


def test_progress_rate_is_a_sliding_window_and_eta_follows():
    clock = FakeClock()
    reports: list[Progress] = []
    total = 1000 * MiB
    meter = ProgressMeter(total, reports.append, max_hz=10.0, clock=clock, window=5.0)
    # 10 s at 40 MiB/s, adds every 0.25 s (each one reported: slower than 10 Hz).
    for i in range(1, 41):
        clock.now = 1000.0 + 0.25 * i
        meter.add(10 * MiB)
    r = reports[-1]
    assert r.rate == pytest.approx(40 * MiB)
    assert r.done == 400 * MiB
    assert r.fraction == pytest.approx(0.4)
    assert r.eta == pytest.approx(600 * MiB / (40 * MiB))
    # Slow down to 10 MiB/s: after one window the rate reflects only the new speed.
    t = clock.now
    for i in range(1, 41):
        clock.now = t + 0.25 * i
        meter.add(int(2.5 * MiB))
        if i == 4:  # 1 s in: smoothed, between the old and the new speed
            assert 10 * MiB < reports[-1].rate < 40 * MiB
    r = reports[-1]
    assert r.rate == pytest.approx(10 * MiB)
    assert r.eta == pytest.approx((total - r.done) / (10 * MiB))


def test_progress_without_elapsed_time_has_no_eta():
    clock = FakeClock()
    reports: list[Progress] = []
    meter = ProgressMeter(100, reports.append, clock=clock)
    meter.add(10)
    assert reports[-1].rate == 0.0
    assert reports[-1].eta is None
    assert reports[-1].fraction == pytest.approx(0.1)


def test_progress_empty_job():
    reports: list[Progress] = []
    meter = ProgressMeter(0, reports.append, clock=FakeClock())
    meter.finish()
    assert reports == [Progress(done=0, total=0, rate=0.0, eta=0.0, fraction=1.0)]


def test_progress_from_many_threads_is_ordered_and_complete():
    reports: list[Progress] = []
    counter = iter(range(10**9))
    meter = ProgressMeter(8 * 5000, reports.append, max_hz=1e9, clock=lambda: next(counter))

    def work() -> None:
        for _ in range(5000):
            meter.add(1)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert meter.done == 8 * 5000
    done = [r.done for r in reports]
    assert done == sorted(done), "reports arrived out of order"
    assert done[-1] == 8 * 5000
