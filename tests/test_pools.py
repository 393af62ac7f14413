"""TmpfsPool against real tmpfs mounts under a temporary directory (needs root)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from speedloaderd.errors import Busy, Failed, InvalidArgument, NoSpace
from speedloaderd.pools import (
    PAGE_SIZE,
    PoolState,
    PoolUsage,
    TmpfsPool,
    mount_at,
    mounts,
    mounts_below,
    parse_mountinfo,
)

from .conftest import unmount_below

MiB = 1 << 20


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


@pytest.fixture
def base(workdir: Path) -> Path:
    return workdir


@pytest.fixture
def pool(base: Path) -> Iterator[TmpfsPool]:
    p = TmpfsPool("test-pool", base / "pool", 8 * MiB)
    try:
        p.mount()
        yield p
    finally:
        p.unmount()


def _write(path: Path, size: int) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _at(path: Path) -> list:
    real = os.path.realpath(path)
    return [m for m in mounts() if m.mount_point == real]


# --------------------------------------------------------------------------- mount


def test_mount_shows_size_and_huge_in_mountinfo(pool: TmpfsPool) -> None:
    info = mount_at(pool.path)
    assert info is not None
    assert info.fstype == "tmpfs"
    assert info.source == "speedloader-test-pool"
    assert info.super_options["huge"] == "within_size"
    assert info.super_options["size"] == "8192k"
    assert info.size == 8 * MiB
    assert info.super_options["mode"] == "755"
    assert "nosuid" in info.mount_options and "nodev" in info.mount_options
    assert pool.state() is PoolState.MOUNTED
    assert oct(pool.path.stat().st_mode & 0o7777) == "0o755"


def test_mount_creates_missing_parents(base: Path) -> None:
    p = TmpfsPool("deep", base / "a" / "b" / "c", MiB)
    assert p.state() is PoolState.UNMOUNTED
    p.mount()
    try:
        assert p.state() is PoolState.MOUNTED
    finally:
        p.unmount()
    assert p.state() is PoolState.UNMOUNTED


def test_size_is_rounded_up_to_pages(base: Path) -> None:
    p = TmpfsPool("odd", base / "odd", PAGE_SIZE * 3 + 1)
    assert p.size == PAGE_SIZE * 4
    p.mount()
    try:
        assert mount_at(p.path).size == PAGE_SIZE * 4
        assert p.usage().size == PAGE_SIZE * 4
    finally:
        p.unmount()


def test_mount_is_idempotent(pool: TmpfsPool) -> None:
    digest = _write(pool.path / "model.bin", MiB)
    pool.mount()
    pool.mount()
    assert len(_at(pool.path)) == 1, "a second mount() must not stack a new tmpfs"
    assert _sha(pool.path / "model.bin") == digest


def test_adopt_existing_mount_and_remount_to_configured_size(pool: TmpfsPool) -> None:
    digest = _write(pool.path / "model.bin", 2 * MiB)
    # The daemon restarts with a new config: a fresh object for the same pool, bigger.
    again = TmpfsPool("test-pool", pool.path, 16 * MiB)
    again.mount()
    assert len(_at(pool.path)) == 1
    assert mount_at(pool.path).size == 16 * MiB
    assert again.usage().size == 16 * MiB
    assert _sha(pool.path / "model.bin") == digest


def test_adopt_adds_huge_pages_to_a_plain_mount(base: Path) -> None:
    path = base / "plain"
    path.mkdir()
    _sh("mount", "-t", "tmpfs", "-o", f"size={4 * MiB}", "speedloader-plain", str(path))
    p = TmpfsPool("plain", path, 4 * MiB)
    p.mount()
    try:
        info = mount_at(path)
        assert info.super_options.get("huge") == "within_size"
        assert info.size == 4 * MiB
        assert len(_at(path)) == 1
    finally:
        p.unmount()


def test_adopt_refuses_configured_size_below_used(pool: TmpfsPool) -> None:
    _write(pool.path / "model.bin", 5 * MiB)
    small = TmpfsPool("test-pool", pool.path, MiB)
    with pytest.raises(NoSpace, match=r"pool 'test-pool' uses 5M; cannot shrink it to 1M"):
        small.mount()
    assert mount_at(pool.path).size == 8 * MiB
    assert small.state() is PoolState.MOUNTED


# --------------------------------------------------------------------------- usage / resize


def test_usage_after_writing_a_file(pool: TmpfsPool) -> None:
    before = pool.usage()
    assert before == PoolUsage(size=8 * MiB, used=0, free=8 * MiB)
    _write(pool.path / "model.bin", 3 * MiB)
    after = pool.usage()
    assert after.size == 8 * MiB
    assert after.used == 3 * MiB
    assert after.free == 5 * MiB


def test_usage_of_unmounted_pool_is_an_error(base: Path) -> None:
    p = TmpfsPool("nothing", base / "nothing", MiB)
    with pytest.raises(Failed, match="not mounted"):
        p.usage()


def test_grow_and_shrink_live_keep_files(pool: TmpfsPool) -> None:
    digest = _write(pool.path / "model.bin", 3 * MiB)
    pool.resize(32 * MiB)
    assert mount_at(pool.path).size == 32 * MiB
    assert pool.usage().size == 32 * MiB and pool.size == 32 * MiB
    assert _sha(pool.path / "model.bin") == digest
    pool.resize(4 * MiB)
    assert mount_at(pool.path).size == 4 * MiB
    assert pool.usage() == PoolUsage(size=4 * MiB, used=3 * MiB, free=MiB)
    assert _sha(pool.path / "model.bin") == digest
    assert mount_at(pool.path).super_options["huge"] == "within_size"


def test_shrink_to_exactly_used_is_allowed(pool: TmpfsPool) -> None:
    _write(pool.path / "model.bin", 3 * MiB)
    pool.resize(3 * MiB)
    assert pool.usage() == PoolUsage(size=3 * MiB, used=3 * MiB, free=0)


def test_shrink_below_used_is_refused_and_pool_unchanged(pool: TmpfsPool) -> None:
    digest = _write(pool.path / "model.bin", 5 * MiB)
    with pytest.raises(NoSpace) as caught:
        pool.resize(MiB)
    assert str(caught.value).startswith("pool 'test-pool' uses 5M; cannot shrink it to 1M")
    assert mount_at(pool.path).size == 8 * MiB
    assert pool.size == 8 * MiB
    assert _sha(pool.path / "model.bin") == digest


def test_mount_own_refusal_to_shrink_is_reported_cleanly(
    pool: TmpfsPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files written between our check and mount's call: mount refuses, we say why."""
    digest = _write(pool.path / "model.bin", 5 * MiB)
    # Make the pre-check see an empty pool, as if the file landed just after it looked.
    monkeypatch.setattr(pool, "usage", lambda: PoolUsage(size=8 * MiB, used=0, free=8 * MiB))
    with pytest.raises(NoSpace, match=r"pool 'test-pool' uses 5M; cannot shrink it to 1M"):
        pool.resize(MiB)
    assert mount_at(pool.path).size == 8 * MiB
    assert pool.size == 8 * MiB
    assert _sha(pool.path / "model.bin") == digest


def test_resize_unmounted_pool_only_changes_configuration(base: Path) -> None:
    p = TmpfsPool("later", base / "later", MiB)
    p.resize(2 * MiB + 1)
    assert p.size == 2 * MiB + PAGE_SIZE
    assert p.state() is PoolState.UNMOUNTED
    p.mount()
    try:
        assert mount_at(p.path).size == 2 * MiB + PAGE_SIZE
    finally:
        p.unmount()


@pytest.mark.parametrize("bad", [0, -1, True, "1G", 1.5, None, 1 << 61])
def test_bad_sizes_are_refused(pool: TmpfsPool, bad: object) -> None:
    with pytest.raises(InvalidArgument):
        pool.resize(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        TmpfsPool("x", Path("/nonexistent/x"), bad)  # type: ignore[arg-type]
    assert mount_at(pool.path).size == 8 * MiB


@pytest.mark.parametrize("name", ["", "../x", "a/b", "-x", "a b", "x" * 64])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgument):
        TmpfsPool(name, Path("/nonexistent/x"), MiB)


def test_relative_path_and_bad_speed_are_refused() -> None:
    with pytest.raises(InvalidArgument):
        TmpfsPool("x", Path("relative/x"), MiB)
    for speed in (-1, True, 1.5):
        with pytest.raises(InvalidArgument):
            TmpfsPool("x", Path("/nonexistent/x"), MiB, speed)  # type: ignore[arg-type]
    assert TmpfsPool("x", Path("/nonexistent/x"), MiB).speed == 100


# --------------------------------------------------------------------------- unmount


def test_unmount(base: Path) -> None:
    p = TmpfsPool("gone", base / "gone", MiB)
    p.mount()
    _write(p.path / "f", 1000)
    p.unmount()
    assert p.state() is PoolState.UNMOUNTED
    assert _at(p.path) == []
    assert list(p.path.iterdir()) == [], "the tmpfs contents went away with it"
    p.unmount()  # not mounted: no-op


def test_busy_unmount_is_refused_and_pool_stays(pool: TmpfsPool) -> None:
    digest = _write(pool.path / "model.bin", MiB)
    with open(pool.path / "model.bin", "rb"), pytest.raises(Busy) as caught:
        pool.unmount()
    assert "pool 'test-pool'" in str(caught.value) and "busy" in str(caught.value)
    assert "\n" not in str(caught.value)
    assert pool.state() is PoolState.MOUNTED
    assert _sha(pool.path / "model.bin") == digest


# --------------------------------------------------------------------------- refusals


def test_refuses_to_mount_over_a_non_empty_dir(base: Path) -> None:
    path = base / "full"
    path.mkdir()
    (path / "precious").write_text("keep me")
    p = TmpfsPool("full", path, MiB)
    with pytest.raises(Busy, match="not empty"):
        p.mount()
    assert _at(path) == []
    assert (path / "precious").read_text() == "keep me"
    assert p.state() is PoolState.UNMOUNTED


def test_refuses_when_path_is_a_file(base: Path) -> None:
    (base / "file").write_text("x")
    with pytest.raises(Failed, match="not a directory"):
        TmpfsPool("file", base / "file", MiB).mount()


def test_something_else_mounted_is_degraded_and_left_alone(base: Path) -> None:
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "theirs").write_text("not ours")
    path = base / "pool"
    path.mkdir()
    _sh("mount", "--bind", str(elsewhere), str(path))
    p = TmpfsPool("bound", path, MiB)
    assert p.state() is PoolState.DEGRADED
    with pytest.raises(Busy, match="already mounted"):
        p.mount()
    with pytest.raises(Failed, match="will not unmount"):
        p.unmount()
    with pytest.raises(Failed):
        p.resize(2 * MiB)
    assert len(_at(path)) == 1, "mount() must not stack a tmpfs over someone else's mount"
    assert (path / "theirs").read_text() == "not ours"


def test_foreign_tmpfs_is_not_adopted(base: Path) -> None:
    path = base / "shm"
    path.mkdir()
    _sh("mount", "-t", "tmpfs", "-o", "size=1m", "someone-else", str(path))
    p = TmpfsPool("shm", path, MiB)
    assert p.state() is PoolState.DEGRADED
    with pytest.raises(Busy, match="someone-else"):
        p.mount()
    with pytest.raises(Failed):
        p.unmount()
    assert mount_at(path).source == "someone-else"


# --------------------------------------------------------------------------- mountinfo


def test_real_mount_at_a_path_with_a_space(base: Path) -> None:
    p = TmpfsPool("spaced", base / "with space\tand tab", MiB)
    p.mount()
    try:
        raw = Path("/proc/self/mountinfo").read_bytes()
        assert b"with\\040space\\011and\\040tab" in raw
        info = mount_at(p.path)
        assert info is not None and info.mount_point == str(p.path)
        assert p.state() is PoolState.MOUNTED
    finally:
        p.unmount()
    assert mount_at(p.path) is None


def test_parse_mountinfo_fields_and_escapes() -> None:
    text = (
        "36 35 98:0 /mnt1 /mnt/with\\040space\\134back rw,noatime master:1 shared:7 - "
        "ext3 /dev/root rw,errors=continue\n"
        "42 27 0:39 / /srv/pool rw,relatime - tmpfs speedloader-p rw,size=10240k,mode=755,"
        "huge=within_size\n"
        "garbage line\n"
        "43 27 0:40 / /srv/unlimited rw - tmpfs tmpfs rw\n"
    )
    a, b, c = parse_mountinfo(text)
    assert a.mount_id == 36 and a.parent_id == 35 and a.device == "98:0"
    assert a.root == "/mnt1"
    assert a.mount_point == "/mnt/with space\\back"
    assert a.optional_fields == ("master:1", "shared:7")
    assert a.mount_options == {"rw": None, "noatime": None}
    assert a.fstype == "ext3" and a.source == "/dev/root"
    assert a.super_options == {"rw": None, "errors": "continue"}
    assert a.size is None
    assert b.fstype == "tmpfs" and b.source == "speedloader-p"
    assert b.super_options["huge"] == "within_size"
    assert b.size == 10 * MiB
    assert c.size is None
    assert mount_at("/srv/pool", [a, b, c]) is b


def test_mount_at_picks_the_topmost_of_stacked_mounts() -> None:
    text = (
        "50 27 0:50 / /srv/p rw - tmpfs speedloader-p rw,size=4k\n"
        "51 50 0:51 / /srv/p rw - ext4 /dev/sdb1 rw\n"
    )
    assert mount_at("/srv/p", parse_mountinfo(text)).fstype == "ext4"


def test_safety_sweep_unmounts_leaked_mounts() -> None:
    d = Path(tempfile.mkdtemp(prefix="sl-sweep-"))
    try:
        (d / "p").mkdir()
        _sh("mount", "-t", "tmpfs", "-o", "size=1m", "speedloader-leak", str(d / "p"))
        (d / "p" / "inner").mkdir()
        _sh("mount", "-t", "tmpfs", "-o", "size=1m", "speedloader-inner", str(d / "p" / "inner"))
        _sh("mount", "-t", "tmpfs", "-o", "size=1m", "speedloader-stacked", str(d / "p"))
        with open(d / "p" / "held", "w"):
            assert len(mounts_below(d)) == 3
            assert unmount_below(d) == []
    finally:
        unmount_below(d)
        shutil.rmtree(d, ignore_errors=True)
