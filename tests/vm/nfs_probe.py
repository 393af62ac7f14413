"""What the copy engine does with a source on NFS, measured in the "local" guest.

``python -m tests.vm.nfs_probe SRC DSTDIR`` (SRC on the NFS mount, DSTDIR on a tmpfs like a
pool) prints one JSON object:

- ``o_noatime``: what ``open(O_RDONLY | O_NOATIME)`` of SRC gives ("ok" or the errno name);
  roots.Root.open_source falls back to a plain open on EPERM;
- ``method``, ``seconds``: the CopyResult of speedloaderd.transfer.copy_file, the function
  the engine's promote runs (copy_into), from SRC to DSTDIR/promoted;
- ``resident_after_copy`` and ``cached_kib_*``: pages of SRC left in this guest's page cache
  (mincore over an mmap of SRC) and /proc/meminfo Cached, with caches dropped before;
- ``cp_seconds``, ``resident_after_cp``: the same for ``cp SRC DSTDIR/cp`` (coreutils);
- ``same``: both copies have SRC's sha256;
- ``f_fsid``: statvfs's f_fsid of the mount (what catalog/availability.py compares first).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

from speedloaderd.transfer import copy_file

_libc = ctypes.CDLL(None, use_errno=True)


def resident_pages(path: Path) -> tuple[int, int]:
    """(pages of ``path`` in the page cache, pages in all): mincore over a read-only shared
    mapping (mapping reads nothing; only the pages already cached are reported)."""
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    if size == 0:
        return 0, 0
    _libc.mmap.restype = ctypes.c_void_p
    _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                           ctypes.c_int, ctypes.c_long]  # fmt: skip
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap")
        try:
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
            return sum(v & 1 for v in vec), pages
        finally:
            _libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
    finally:
        os.close(fd)


def cached_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Cached:"):
            return int(line.split()[1])
    raise RuntimeError("no Cached line in /proc/meminfo")


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def main(src: Path, dst_dir: Path) -> dict[str, object]:
    out: dict[str, object] = {"size": src.stat().st_size, "f_fsid": os.statvfs(src).f_fsid}
    try:
        os.close(os.open(src, os.O_RDONLY | os.O_NOATIME))
        out["o_noatime"] = "ok"
    except OSError as err:
        out["o_noatime"] = errno.errorcode.get(err.errno or 0, str(err.errno))

    drop_caches()
    out["cached_kib_before"] = cached_kib()
    result = copy_file(src, dst_dir / "promoted")
    out["method"], out["seconds"] = result.method, result.seconds
    out["cached_kib_after_copy"] = cached_kib()
    out["resident_after_copy"], out["pages"] = resident_pages(src)

    want = sha256(src)
    same = sha256(dst_dir / "promoted") == want
    (dst_dir / "promoted").unlink()  # room for cp's copy in the same tmpfs
    drop_caches()
    t0 = time.monotonic()
    subprocess.run(["cp", str(src), str(dst_dir / "cp")], check=True)
    out["cp_seconds"] = time.monotonic() - t0
    out["cached_kib_after_cp"] = cached_kib()
    out["resident_after_cp"], _ = resident_pages(src)

    out["same"] = same and sha256(dst_dir / "cp") == want
    (dst_dir / "cp").unlink()
    return out


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), Path(sys.argv[2]))))
