"""The copy engine: one file from cold storage into a pool, fast, gentle and all-or-nothing.

Blocking code: the caller runs :func:`copy_file` in a worker thread (measured: a blocking
sendfile on the event loop thread stalled asyncio for 2.5 s; in a worker thread the loop's
lag stayed at 0.2-0.5 ms p99).

What a copy does, in order:

1. Open the source read-only through :mod:`.roots` (relative to the cold root, never
   leaving it, ``O_NOATIME``, ``O_NONBLOCK``) and check it is the regular file the scan saw
   (device and inode): a cold-storage writer who swaps it for a link to a root-only file
   after the scan gets a refusal, not a copy. Nothing is ever created or written next to
   it: cold storage is the master copy.
2. Create ``.sl-partial-<random>`` beside the destination (relative to the pool's
   root, no symlink followed), owned like the source with at most its permission bits
   (a copy never widens access), and ``posix_fallocate``
   the full size, so a full pool fails at once rather than after minutes of copying. On a
   ``huge=within_size`` tmpfs this also matters for speed: sendfile into a file that grows
   as it is written gets no huge pages at all on kernel 6.18, into a preallocated file it
   gets them all (about 3x faster promotes, 10x faster mmap loads).
3. Copy in large chunks with ``copy_file_range``, else ``sendfile`` (cross-filesystem
   ``copy_file_range`` fails with EXDEV; remembered per process for that pair of
   filesystems), else ``preadv``/``pwrite``. After each chunk the source's pages are
   dropped from the page cache, so a promoted model is not held in RAM twice.
4. With a digest, a second thread hashes the destination as it is written (trailing the
   copy chunk by chunk), so verification costs little wall time; unless ``known_good``
   says that digest was verified from this very file as it is now (verified.py: device,
   inode, size, mtime and ctime of the open source), when the copy then only checks that
   none of those changed while it read. A hash that matched is reported to ``on_verified``
   with the source's stamp.
5. ``fsync`` the file, ``rename`` it onto the destination, ``fsync`` the directory.

Any failure or cancel unlinks the partial file and closes every descriptor before the
domain error (:class:`NoSpace`, :class:`Cancelled`, :class:`VerificationFailed`,
:class:`Failed`) reaches the caller.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import Cancelled, Failed, InvalidArgument, NoSpace, VerificationFailed
from .roots import ChangedFile, Identity, Root, own_like
from .sizes import format_size

DEFAULT_CHUNK = 64 << 20
"""64 MiB: large enough for in-kernel copies to run at full speed, small enough that a
cancel is honoured within a fraction of a second even from a slow disk."""

_RW_BUFFER = 8 << 20
"""Read/write fallback and verification read in pieces of this size into one buffer."""

Method = Literal["copy_file_range", "sendfile", "readwrite"]

_CFR_FALLBACK = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})
_SENDFILE_FALLBACK = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})

_TMPFS_MAGIC = 0x01021994
_RAMFS_MAGIC = 0x858458F6

# (source st_dev, destination st_dev) pairs for which copy_file_range answered EXDEV.
# Per process, as asked: the kernel's answer for a pair of filesystems does not change.
_cross_fs_refused: set[tuple[int, int]] = set()


@dataclass(frozen=True, slots=True)
class CopyResult:
    bytes: int
    seconds: float
    method: Method
    """The copy method that moved the data (the last one used, after any fallback)."""
    verified: bool
    """True when a digest was given and the destination's content matched it."""
    trusted: bool = False
    """True when the digest was not hashed again: ``known_good`` knew the source as it is."""


def forget_refused_pairs() -> None:
    """Forget which filesystem pairs refused copy_file_range (for tests)."""
    _cross_fs_refused.clear()


def copy_file(src: Path, dst: Path, **kw: Any) -> CopyResult:
    """:func:`copy_into` for two plain paths (tests, benchmarks): the source's directory and
    the destination's deepest existing directory serve as the roots."""
    src, dst = Path(src), Path(dst)
    top = dst.parent
    while not top.is_dir() and top.parent != top:
        top = top.parent
    return copy_into(
        Root(src.parent, "source", links=True),
        src.name,
        Root(top, "destination"),
        str(dst.relative_to(top)),
        **kw,
    )


def copy_into(
    src_root: Root,
    src_rel: str,
    dst_root: Root,
    dst_rel: str,
    *,
    expect: Identity | None = None,
    like: Root | None = None,
    digest: str | None = None,
    expected_size: int | None = None,
    on_bytes: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    on_allocated: Callable[[], None] | None = None,
    allocation_lock: threading.Lock | None = None,
    known_good: Callable[[os.stat_result], bool] | None = None,
    on_verified: Callable[[os.stat_result], None] | None = None,
) -> CopyResult:
    """Copy ``src_rel`` under ``src_root`` (cold storage) to ``dst_rel`` under ``dst_root``
    (a pool), atomically; see the module docstring.

    ``expect`` is the source's identity as the scan saw it; any other file is refused.
    Directories made in the pool give at most the access of their counterparts under
    ``like`` (cold storage). ``digest`` is ``"<algorithm>:<hex>"`` (in practice
    ``sha256:``); the destination's content is hashed and must match. ``on_bytes(n)`` is
    called after each chunk with the bytes just copied. Setting ``cancel`` stops the copy at
    the next chunk boundary. ``on_allocated()`` is called once the destination holds its
    whole size (preallocated): from then on the pool's free space already counts it. Both
    happen under ``allocation_lock``, so whoever reads free space under it never sees a
    half-done preallocation.
    """
    if chunk_size <= 0:
        raise InvalidArgument(f"chunk size must be positive, got {chunk_size}")
    if expected_size is not None and expected_size < 0:
        raise InvalidArgument(f"expected size must be 0 or more bytes, got {expected_size}")
    want = _parse_digest(digest) if digest is not None else None
    job = _CopyJob(
        src_root, src_rel, dst_root, dst_rel, want, expected_size, on_bytes, cancel, chunk_size
    )
    job.expect, job.like = expect, like
    job.on_allocated, job.allocation_lock = on_allocated, allocation_lock
    job.known_good, job.on_verified = known_good, on_verified
    try:
        return job.run()
    except ChangedFile as e:
        raise Failed(
            f"{job.src} {e.strerror}; it was not copied (cold storage changed since the scan: "
            "run a rescan)"
        ) from e
    except OSError as e:
        # job.run() has already removed the partial file, so free space is measured as
        # the pool stands without it.
        raise job.translate(e) from e


def _parse_digest(digest: str) -> tuple[str, str]:
    algo, sep, hexpart = digest.partition(":")
    algo = algo.lower()
    hexpart = hexpart.lower()
    if not sep or algo not in hashlib.algorithms_guaranteed or algo.startswith("shake"):
        raise InvalidArgument(f"{digest!r} is not a digest; expected 'sha256:<hex>'")
    size = hashlib.new(algo).digest_size
    if len(hexpart) != 2 * size or any(c not in "0123456789abcdef" for c in hexpart):
        raise InvalidArgument(
            f"{digest!r} is not a {algo} digest; expected {2 * size} hexadecimal digits"
        )
    return algo, hexpart


class _CopyJob:
    """State of one copy, so that every exit path can clean up the same way."""

    def __init__(
        self,
        src_root: Root,
        src_rel: str,
        dst_root: Root,
        dst_rel: str,
        want: tuple[str, str] | None,
        expected_size: int | None,
        on_bytes: Callable[[int], None] | None,
        cancel: threading.Event | None,
        chunk_size: int,
    ) -> None:
        self.on_allocated: Callable[[], None] | None = None
        self.allocation_lock: threading.Lock | None = None
        self.expect: Identity | None = None
        self.like: Root | None = None
        self.src_root, self.src_rel = src_root, src_rel
        self.dst_root, self.dst_rel = dst_root, dst_rel
        self.src = src_root.abs(src_rel)  # for messages
        self.dst = dst_root.abs(dst_rel)
        self.want = want
        self.expected_size = expected_size
        self.on_bytes = on_bytes
        self.cancel = cancel
        self.chunk_size = chunk_size
        self.size = 0
        self.src_fd = -1
        self.dst_fd = -1
        self.verify_fd = -1
        self.tmp: str | None = None  # the partial copy's rel under dst_root
        self.hasher: _TrailingHasher | None = None
        self.known_good: Callable[[os.stat_result], bool] | None = None
        self.on_verified: Callable[[os.stat_result], None] | None = None

    def run(self) -> CopyResult:
        started = time.monotonic()
        renamed = False
        try:
            self.src_fd = self.src_root.open_source(self.src_rel, self.expect, follow=True)
            st = os.fstat(self.src_fd)
            self.size = size = st.st_size
            if self.expected_size is not None and size != self.expected_size:
                raise VerificationFailed(
                    f"{self.src} is {size} bytes but the catalog expects "
                    f"{self.expected_size}; it was not copied"
                )
            self._check_cancel()
            trusted = self.want is not None and self.known_good is not None and self.known_good(st)
            if trusted:
                self.want = None  # verified from this very file before: not hashed again

            self.dst_fd, self.tmp = self.dst_root.create_temp(self.dst_rel, like=self.like)
            own_like(self.dst_fd, st)
            with self.allocation_lock or contextlib.nullcontext():
                if size:
                    os.posix_fallocate(self.dst_fd, 0, size)
                if self.on_allocated is not None:
                    self.on_allocated()
            if self.want is not None:
                # The copy's own descriptor, read back with explicit offsets (preadv moves
                # no file position), so what is verified is what will be renamed into place.
                self.verify_fd = os.dup(self.dst_fd)
                self.hasher = _TrailingHasher(self.verify_fd, self.want[0], size, self.cancel)
                self.hasher.start()

            # The source's own pages are the RAM when it is tmpfs: nothing to drop there.
            drop_cache = not _is_ram_fs(self.src_fd)
            if drop_cache:
                os.posix_fadvise(self.src_fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            dst_dev = os.fstat(self.dst_fd).st_dev
            copier = _Copier(self.src_fd, self.dst_fd, (st.st_dev, dst_dev), self.chunk_size)

            off = 0
            while off < size:
                self._check_cancel()
                n = copier.copy(off, min(self.chunk_size, size - off))
                if n == 0:
                    raise Failed(
                        f"{self.src} shrank while being copied (read {off} of {size} "
                        "bytes); the copy was abandoned"
                    )
                if drop_cache:
                    os.posix_fadvise(self.src_fd, off, n, os.POSIX_FADV_DONTNEED)
                off += n
                if self.hasher is not None:
                    self.hasher.advance(off)
                if self.on_bytes is not None:
                    self.on_bytes(n)

            after = os.fstat(self.src_fd)
            if (
                after.st_size != size
                or after.st_mtime_ns != st.st_mtime_ns
                or (
                    (trusted or self.on_verified is not None)
                    and after.st_ctime_ns != st.st_ctime_ns
                )
            ):
                raise Failed(
                    f"{self.src} changed while being copied (size {size} -> "
                    f"{after.st_size} bytes); the copy was abandoned"
                )
            if drop_cache:  # readahead still in flight when its chunk was dropped
                os.posix_fadvise(self.src_fd, 0, 0, os.POSIX_FADV_DONTNEED)

            verified = False
            if self.hasher is not None and self.want is not None:
                got = self.hasher.result()
                self._check_cancel()
                if got is None:
                    raise Failed(f"verification of {self.dst} stopped before the end")
                algo, want_hex = self.want
                if got != want_hex:
                    raise VerificationFailed(
                        f"{self.src} copied to the pool hashes to {algo}:{got}, but "
                        f"{algo}:{want_hex} was expected; the copy was discarded"
                    )
                verified = True
                if self.on_verified is not None:
                    self.on_verified(st)

            self._check_cancel()
            os.fsync(self.dst_fd)
            self.dst_root.rename(self.tmp, self.dst_rel)  # and fsyncs the directory
            renamed = True
            return CopyResult(
                bytes=off,
                seconds=time.monotonic() - started,
                method=copier.method,
                verified=verified or trusted,
                trusted=trusted,
            )
        finally:
            self._cleanup(remove_partial=not renamed)

    def _check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled(f"copy of {self.src} to {self.dst} was cancelled")

    def _cleanup(self, *, remove_partial: bool) -> None:
        if self.hasher is not None:
            self.hasher.abort()
            self.hasher.join()  # before its descriptor is closed under it
        for fd in (self.verify_fd, self.dst_fd, self.src_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.verify_fd = self.dst_fd = self.src_fd = -1
        if remove_partial and self.tmp is not None:
            # If this fails, recovery finds the file by PARTIAL_MARKER; the original
            # error is the one to report.
            with contextlib.suppress(OSError):
                self.dst_root.unlink(self.tmp)

    def translate(self, e: OSError) -> Exception:
        """The domain error for an OSError out of the copy."""
        if e.errno in _NO_SPACE:
            pool = self.dst_root.path
            try:
                vfs = os.fstatvfs(self.dst_fd) if self.dst_fd >= 0 else os.statvfs(pool)
                free = vfs.f_bavail * vfs.f_frsize
            except OSError:
                free = 0
            needed = max(self.size - free, 0)
            what = "quota is exhausted" if e.errno == errno.EDQUOT else "is full"
            if needed:
                return NoSpace(
                    f"pool at {pool} {what}: needed {needed} more bytes "
                    f"({format_size(needed)}) for {self.dst.name} "
                    f"({format_size(self.size)}); free space there or choose another pool"
                )
            return NoSpace(
                f"pool at {pool} {what}: it ran out of space while {self.dst.name} "
                f"({format_size(self.size)}) was being copied; free space there or "
                "choose another pool"
            )
        where = f" ({e.filename})" if e.filename else ""
        return Failed(f"copying {self.src} to {self.dst} failed: {e.strerror or e}{where}")


class _Copier:
    """Moves byte ranges with the best method the kernel accepts for this pair of files."""

    def __init__(self, src_fd: int, dst_fd: int, devs: tuple[int, int], chunk_size: int):
        self.src_fd = src_fd
        self.dst_fd = dst_fd
        self.devs = devs
        self.chunk_size = chunk_size
        self.method: Method = "sendfile" if devs in _cross_fs_refused else "copy_file_range"
        self._buf: memoryview | None = None

    def copy(self, off: int, count: int) -> int:
        """Copy ``count`` bytes at ``off``; fewer only at the source's end of file."""
        done = 0
        while done < count:
            n = self._once(off + done, count - done)
            if n == 0:
                if self.method == "readwrite":
                    break  # a plain read saw end of file
                # An in-kernel copy that returns 0 early (some filesystems do): read it.
                self.method = "readwrite"
                continue
            done += n
        return done

    def _once(self, off: int, count: int) -> int:
        if self.method == "copy_file_range":
            try:
                return os.copy_file_range(self.src_fd, self.dst_fd, count, off, off)
            except OSError as e:
                if e.errno not in _CFR_FALLBACK:
                    raise
                if e.errno == errno.EXDEV:
                    _cross_fs_refused.add(self.devs)
                self.method = "sendfile"
        if self.method == "sendfile":
            try:
                # sendfile writes at the destination's file position; set it every time
                # so a switch from copy_file_range (explicit offsets) cannot misplace data.
                os.lseek(self.dst_fd, off, os.SEEK_SET)
                return os.sendfile(self.dst_fd, self.src_fd, off, count)
            except OSError as e:
                if e.errno not in _SENDFILE_FALLBACK:
                    raise
                self.method = "readwrite"
        return self._read_write(off, count)

    def _read_write(self, off: int, count: int) -> int:
        if self._buf is None:
            self._buf = memoryview(bytearray(min(self.chunk_size, _RW_BUFFER)))
        buf = self._buf
        done = 0
        while done < count:
            n = os.preadv(self.src_fd, [buf[: min(len(buf), count - done)]], off + done)
            if n == 0:
                break
            written = 0
            while written < n:
                written += os.pwrite(self.dst_fd, buf[written:n], off + done + written)
            done += n
        return done


class _TrailingHasher:
    """Hashes the destination up to what the copy has finished, as the copy goes.

    Reads the pool copy back through its own descriptor, so what is verified is the
    content that will be renamed into place. hashlib and preadv release the GIL on
    large buffers, so on two cores this runs alongside the copy.
    """

    def __init__(self, fd: int, algo: str, size: int, cancel: threading.Event | None):
        self._fd = fd
        self._hash = hashlib.new(algo)
        self._size = size
        self._cancel = cancel
        self._cond = threading.Condition()
        self._ready = 0
        self._halt = False
        self._complete = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sl-verify", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    def advance(self, upto: int) -> None:
        with self._cond:
            self._ready = upto
            self._cond.notify()

    def abort(self) -> None:
        with self._cond:
            self._halt = True
            self._cond.notify()

    def result(self) -> str | None:
        """The hex digest of all ``size`` bytes once hashed; None if cancelled first.

        Call after the last ``advance``.
        """
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._hash.hexdigest() if self._complete else None

    def _stopping(self) -> bool:
        return self._halt or (self._cancel is not None and self._cancel.is_set())

    def _run(self) -> None:
        try:
            buf = memoryview(bytearray(min(max(self._size, 1), _RW_BUFFER)))
            pos = 0
            while pos < self._size:
                with self._cond:
                    while pos >= self._ready and not self._stopping():
                        self._cond.wait(timeout=0.5)  # also notices a cancel
                    limit = self._ready
                while pos < limit:
                    if self._stopping():
                        return
                    n = os.preadv(self._fd, [buf[: min(len(buf), limit - pos)]], pos)
                    if n == 0:
                        raise Failed("the pool copy ended early while being verified")
                    self._hash.update(buf[:n])
                    pos += n
                if self._stopping():
                    return
            self._complete = True
        except BaseException as e:  # handed to the copying thread by result()
            self._error = e


class _StatFs(ctypes.Structure):
    # Only f_type is read; the rest is room for the kernel to write into.
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 256)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _is_ram_fs(fd: int) -> bool:
    """True if ``fd`` lives on tmpfs/ramfs, where DONTNEED would at best do nothing.

    Newer kernels may treat DONTNEED on shmem as "swap this out", which would demote a
    pool-to-pool copy's source to swap; so it is never sent there.
    """
    buf = _StatFs()
    if _libc.fstatfs(fd, ctypes.byref(buf)) != 0:
        return False
    return (buf.f_type & 0xFFFFFFFF) in (_TMPFS_MAGIC, _RAMFS_MAGIC)


# --- progress ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Progress:
    done: int
    total: int
    rate: float
    """Bytes per second over the last few seconds (sliding window)."""
    eta: float | None
    """Seconds to go at ``rate``; None while the rate is unknown or zero."""
    fraction: float


class ProgressMeter:
    """Aggregates bytes from many files of one job into rate-limited Progress reports.

    ``add`` may be called from any thread. The callback runs under the meter's lock (so
    reports arrive in order, ``done`` never going backwards) and must be quick, e.g. hand
    the report to the event loop with ``loop.call_soon_threadsafe``.
    """

    def __init__(
        self,
        total: int,
        callback: Callable[[Progress], None],
        max_hz: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        window: float = 5.0,
    ) -> None:
        if total < 0:
            raise ValueError(f"total must be 0 or more bytes, got {total}")
        if max_hz <= 0:
            raise ValueError(f"max_hz must be positive, got {max_hz}")
        if window <= 0:
            raise ValueError(f"window must be positive, got {window}")
        self.total = total
        self._callback = callback
        self._interval = 1.0 / max_hz
        self._clock = clock
        self._window = window
        self._lock = threading.Lock()
        self._done = 0
        self._last_emit: float | None = None
        self._finished = False
        # (time, done) at each report, oldest first; the rate is measured against the
        # newest one that is at least `window` old.
        self._samples: collections.deque[tuple[float, int]] = collections.deque([(clock(), 0)])

    @property
    def done(self) -> int:
        with self._lock:
            return self._done

    def add(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"cannot add {n} bytes; progress only goes forward")
        with self._lock:
            if self._finished:
                return
            self._done += n
            now = self._clock()
            if self._last_emit is not None and now - self._last_emit < self._interval:
                return
            self._last_emit = now
            rate = self._rate(now)
            remaining = max(self.total - self._done, 0)
            eta = remaining / rate if rate > 0 else (0.0 if remaining == 0 else None)
            fraction = min(self._done / self.total, 1.0) if self.total else 1.0
            self._callback(Progress(self._done, self.total, rate, eta, fraction))

    def finish(self) -> None:
        """Report completion (done == total) once, whatever the rate limit says."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
            rate = self._rate(self._clock())
            self._callback(Progress(self.total, self.total, rate, 0.0, 1.0))

    def _rate(self, now: float) -> float:
        samples = self._samples
        samples.append((now, self._done))
        while len(samples) > 2 and samples[1][0] <= now - self._window:
            samples.popleft()
        t0, d0 = samples[0]
        dt = now - t0
        return (self._done - d0) / dt if dt > 0 else 0.0
