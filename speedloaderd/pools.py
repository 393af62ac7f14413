"""Local RAM pools: tmpfs mounts that hold hot copies of model files.

Blocking code: the daemon calls it from worker threads. No D-Bus, no asyncio.

A pool is "ours" when a tmpfs whose source is ``speedloader-<name>`` is mounted at the
pool's path with root ``/``. Anything else mounted there is left alone: the pool is
DEGRADED and ``mount()`` refuses rather than stacking over it.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import re
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .errors import Busy, Failed, InvalidArgument, NoSpace
from .paths import check_pool_name
from .roots import Root, ensure_trusted_dir
from .sizes import format_size

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TMPFS_SPEED",
    "MountInfo",
    "Pool",
    "PoolState",
    "PoolUsage",
    "TmpfsPool",
    "mount_at",
    "mounts",
    "page_round",
    "parse_mountinfo",
]

MOUNTINFO = Path("/proc/self/mountinfo")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
DEFAULT_TMPFS_SPEED = 100
# Anything larger is certainly a typo; tmpfs itself would take it and overcommit RAM.
MAX_POOL_SIZE = 1 << 60
SOURCE_PREFIX = "speedloader-"
# nosuid,nodev: a pool holds model data, never setuid programs or device nodes.
# huge=within_size: measured on 4 GiB, promotes from a warm source 6.1 GB/s against 2.3 and
# mmap loads touching every page 18.7 GB/s against 1.7 on a plain tmpfs.
_TMPFS_OPTIONS = ("mode=0755", "nosuid", "nodev", "huge=within_size")
_HUGE = "within_size"


# --------------------------------------------------------------------------- mountinfo


_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")


def _unescape(field_: bytes) -> str:
    """Undo the kernel's octal escapes (``\\040`` space, ``\\011`` tab, ``\\012``, ``\\134``)."""
    raw = _OCTAL_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field_)
    return os.fsdecode(raw)


def _parse_options(text: str) -> dict[str, str | None]:
    opts: dict[str, str | None] = {}
    for item in text.split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        opts[key] = value if sep else None
    return opts


_SIZE_OPTION = re.compile(r"^(\d+)([kKmMgGtTpPeE%]?)$")
_SIZE_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE_SUFFIX["e"] = 1 << 60


@dataclass(frozen=True)
class MountInfo:
    """One line of /proc/self/mountinfo (see proc(5)), with escapes decoded."""

    mount_id: int
    parent_id: int
    device: str
    """``major:minor`` of the filesystem."""
    root: str
    """Path inside the filesystem that is mounted here (``/`` unless a bind mount of a subdir)."""
    mount_point: str
    mount_options: dict[str, str | None]
    optional_fields: tuple[str, ...]
    fstype: str
    source: str
    super_options: dict[str, str | None] = field(default_factory=dict)

    @property
    def size(self) -> int | None:
        """The ``size=`` super option in bytes (tmpfs prints it in KiB), or None if absent."""
        value = self.super_options.get("size")
        if value is None:
            return None
        m = _SIZE_OPTION.match(value)
        if not m or m.group(2) == "%":
            return None
        return int(m.group(1)) * _SIZE_SUFFIX[m.group(2).lower()]


def parse_mountinfo(data: bytes | str) -> list[MountInfo]:
    """Parse the text of a mountinfo file. Malformed lines are skipped with a log warning."""
    if isinstance(data, str):
        data = os.fsencode(data)
    result: list[MountInfo] = []
    for line in data.splitlines():
        if not line.strip():
            continue
        fields = line.split(b" ")
        try:
            sep = fields.index(b"-", 6)
            mount_id, parent_id, device, root, mount_point, mount_opts = fields[:6]
            fstype, source, super_opts = fields[sep + 1 : sep + 4]
        except ValueError:
            log.warning("cannot parse mountinfo line %r", line)
            continue
        try:
            ids = int(mount_id), int(parent_id)
        except ValueError:
            log.warning("cannot parse mountinfo line %r", line)
            continue
        result.append(
            MountInfo(
                mount_id=ids[0],
                parent_id=ids[1],
                device=device.decode("ascii", "replace"),
                root=_unescape(root),
                mount_point=_unescape(mount_point),
                mount_options=_parse_options(_unescape(mount_opts)),
                optional_fields=tuple(_unescape(f) for f in fields[6:sep] if f),
                fstype=_unescape(fstype),
                source=_unescape(source),
                super_options=_parse_options(_unescape(super_opts)),
            )
        )
    return result


def mounts(mountinfo: Path = MOUNTINFO) -> list[MountInfo]:
    """Every mount visible to this process, in mount order (later entries stack on top)."""
    return parse_mountinfo(mountinfo.read_bytes())


def _canonical(path: str | os.PathLike[str]) -> str:
    return os.path.realpath(os.fspath(path))


def mount_at(
    path: str | os.PathLike[str], table: Sequence[MountInfo] | None = None
) -> MountInfo | None:
    """The mount visible at exactly ``path`` (the topmost if several stack), or None."""
    target = _canonical(path)
    if table is None:
        table = mounts()
    found = None
    for info in table:
        if info.mount_point == target:
            found = info
    return found


def mounts_below(
    path: str | os.PathLike[str], table: Sequence[MountInfo] | None = None
) -> list[MountInfo]:
    """Mounts at or below ``path``, deepest first (the order to unmount them in)."""
    base = _canonical(path).rstrip("/") + "/"
    if table is None:
        table = mounts()
    below = [m for m in table if (m.mount_point + "/").startswith(base)]
    return sorted(below, key=lambda m: (m.mount_point.count("/"), m.mount_id), reverse=True)


# --------------------------------------------------------------------------- helpers


def page_round(size: int) -> int:
    """Round up to whole pages, as tmpfs does with ``size=``."""
    return -(-size // PAGE_SIZE) * PAGE_SIZE


def _check_size(size: object, what: str = "size") -> int:
    if isinstance(size, bool) or not isinstance(size, int):
        raise InvalidArgument(f"pool {what} must be a whole number of bytes, not {size!r}")
    if size <= 0:
        raise InvalidArgument(f"pool {what} must be more than 0 bytes, not {size}")
    if size > MAX_POOL_SIZE:
        raise InvalidArgument(f"pool {what} {size} is larger than {format_size(MAX_POOL_SIZE)}")
    return page_round(size)


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "(no message)"


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LC_ALL": "C"}
    try:
        return subprocess.run(argv, check=False, capture_output=True, text=True, env=env)
    except OSError as e:
        raise Failed(f"cannot run {argv[0]}: {e.strerror or e}") from e


def statvfs_usage(path: str | os.PathLike[str]) -> PoolUsage:
    st = os.statvfs(path)
    size = st.f_blocks * st.f_frsize
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    return PoolUsage(size=size, used=used, free=st.f_bavail * st.f_frsize)


def _describe(info: MountInfo) -> str:
    what = f"a {info.fstype} filesystem ({info.source})"
    if info.root != "/":
        what += f" bind-mounted from {info.root}"
    return what


# --------------------------------------------------------------------------- pools


class PoolState(enum.StrEnum):
    MOUNTED = "mounted"
    UNMOUNTED = "unmounted"
    DEGRADED = "degraded"


@dataclass(frozen=True)
class PoolUsage:
    size: int
    used: int
    free: int


StepReport = Callable[[int, int, str], None]
"""``(steps done, steps in all, name of the step starting now)``: a Job's progress."""


class Pool(Protocol):
    """What the engine uses of a pool: TmpfsPool here, RemotePool in remote/pool.py.

    Every method blocks (the engine calls them in worker threads) except that ``state()``
    must be cheap and never wait on the pool's storage."""

    name: str
    path: Path
    size: int
    speed: int
    kind: str

    def state(self) -> PoolState: ...

    @property
    def problem(self) -> str:
        """Why the pool is degraded, in one sentence ("" when nothing is known against it).
        A pool with a problem is not read from: I/O to it may hang."""
        ...

    def takes_links(self) -> bool:
        """May a promote's links go to the pool now? Cheap, and no I/O to the pool."""
        ...

    def describe(self) -> str:
        """Where the pool is, for a person: "mounted at /run/... (64.0M)"."""
        ...

    def usage(self) -> PoolUsage: ...

    def startup(self) -> None:
        """At daemon start: make the pool usable if that needs nobody's say-so."""
        ...

    def mount(self, on_step: StepReport | None = None) -> None: ...

    def unmount(self) -> None: ...

    def resize(self, new_size: int) -> None: ...


class TmpfsPool:
    """A local RAM pool: one tmpfs mounted at ``path`` with a fixed ``size`` in bytes.

    ``size`` is rounded up to whole pages like the kernel does. All methods block; calls on
    one pool object are serialized by a lock so two worker threads cannot interleave a
    resize and an unmount.
    """

    kind = "tmpfs"

    def __init__(self, name: str, path: Path, size: int, speed: int = DEFAULT_TMPFS_SPEED):
        self.name = check_pool_name(name)
        path = Path(path)
        if not path.is_absolute():
            raise InvalidArgument(f"pool path {str(path)!r} must be absolute")
        self.path = path
        self.size = _check_size(size)
        if isinstance(speed, bool) or not isinstance(speed, int) or speed < 0:
            raise InvalidArgument(f"pool speed must be a whole number 0 or more, not {speed!r}")
        self.speed = speed
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"TmpfsPool({self.name!r}, {str(self.path)!r}, size={self.size}, speed={self.speed})"

    @property
    def source(self) -> str:
        """The mount source that marks this tmpfs as ours in mountinfo."""
        return SOURCE_PREFIX + self.name

    # ---- inspection

    def mount_info(self) -> MountInfo | None:
        """What is mounted at the pool's path right now, ours or not."""
        return mount_at(self.path)

    def _is_ours(self, info: MountInfo | None) -> bool:
        return (
            info is not None
            and info.fstype == "tmpfs"
            and info.source == self.source
            and info.root == "/"
        )

    def _readable(self) -> bool:
        try:
            os.statvfs(self.path)
            with os.scandir(self.path) as it:
                next(it, None)
        except OSError:
            return False
        return True

    def state(self) -> PoolState:
        info = self.mount_info()
        if info is None:
            return PoolState.UNMOUNTED
        if not self._is_ours(info) or not self._readable():
            return PoolState.DEGRADED
        return PoolState.MOUNTED

    @property
    def problem(self) -> str:
        return ""  # a tmpfs that is not ours or not readable says so in its state

    def takes_links(self) -> bool:
        return self.state() is PoolState.MOUNTED

    def describe(self) -> str:
        return f"mounted at {self.path} ({format_size(self.size)})"

    def usage(self) -> PoolUsage:
        """Size, used and free bytes of the mounted pool (statvfs)."""
        with self._lock:
            self._require_mounted("report usage of")
            return statvfs_usage(self.path)

    def _require_mounted(self, verb: str) -> MountInfo:
        info = self.mount_info()
        if info is None:
            raise Failed(f"cannot {verb} pool {self.name!r}: it is not mounted at {self.path}")
        if not self._is_ours(info):
            raise Failed(
                f"cannot {verb} pool {self.name!r}: {_describe(info)} is mounted at "
                f"{self.path} instead of the pool's tmpfs"
            )
        return info

    # ---- lifecycle

    def startup(self) -> None:
        """At daemon start a local pool is mounted (or adopted): it costs only this RAM."""
        self.mount()

    def mount(self, on_step: StepReport | None = None) -> None:
        """Mount the pool, or adopt our tmpfs if it is already mounted (daemon restart).

        An adopted mount is remounted to the configured size and to ``huge=within_size``
        if either differs. Never mounts over something else or over a non-empty directory.
        """
        if on_step is not None:
            on_step(0, 1, "mount tmpfs")
        with self._lock:
            info = self.mount_info()
            if info is not None:
                if not self._is_ours(info):
                    raise Busy(
                        f"cannot mount pool {self.name!r}: {_describe(info)} is already "
                        f"mounted at {self.path}; unmount it or give the pool another path"
                    )
                self._adopt(info)
                return
            self._prepare_dir()
            opts = ",".join((f"size={self.size}", *_TMPFS_OPTIONS))
            result = _run(["mount", "-t", "tmpfs", "-o", opts, self.source, str(self.path)])
            if result.returncode != 0:
                raise Failed(
                    f"cannot mount pool {self.name!r} at {self.path}: mount said: "
                    f"{_one_line(result.stderr)}"
                )
            self._require_mounted("mount")
            log.info("mounted pool %s at %s (%s)", self.name, self.path, format_size(self.size))

    def _prepare_dir(self) -> None:
        """The mount point: a directory only root can change along its whole path (else a
        member could have it mounted over a directory of their choosing), made if missing,
        and empty (a tmpfs must not hide files)."""
        try:
            ensure_trusted_dir(self.path, f"pool {self.name!r} path")
        except OSError as e:
            raise Failed(
                f"cannot mount pool {self.name!r}: cannot create {self.path}: {e.strerror}"
            ) from e
        tree = Root(self.path, f"pool {self.name}")
        if tree.walk() or tree.directories():
            raise Busy(
                f"cannot mount pool {self.name!r}: {self.path} is not empty and not a mount; "
                "refusing to hide its files under a tmpfs (move them away or choose another path)"
            )

    def _adopt(self, info: MountInfo) -> None:
        size_differs = info.size != self.size
        huge_differs = info.super_options.get("huge") != _HUGE
        if size_differs or huge_differs:
            log.info(
                "adopting mounted pool %s at %s: remounting from %s to %s",
                self.name,
                self.path,
                format_size(info.size) if info.size else "unlimited",
                format_size(self.size),
            )
            self._remount(self.size)
        else:
            log.info("adopted mounted pool %s at %s", self.name, self.path)

    def unmount(self) -> None:
        """Unmount the pool; no-op if it is not mounted. Open files make it Busy."""
        with self._lock:
            info = self.mount_info()
            if info is None:
                return
            if not self._is_ours(info):
                raise Failed(
                    f"will not unmount {self.path}: {_describe(info)} is mounted there, "
                    f"not pool {self.name!r}'s tmpfs"
                )
            result = _run(["umount", str(self.path)])
            if result.returncode == 0:
                log.info("unmounted pool %s from %s", self.name, self.path)
                return
            message = _one_line(result.stderr)
            if "busy" in message.lower():
                raise Busy(
                    f"pool {self.name!r} at {self.path} is busy: a process has files open on it "
                    f"or works inside it; stop it and try again (umount said: {message})"
                )
            raise Failed(
                f"cannot unmount pool {self.name!r} at {self.path}: umount said: {message}"
            )

    def resize(self, new_size: int) -> None:
        """Resize the pool live. If it is not mounted, only the configured size changes."""
        with self._lock:
            new_size = _check_size(new_size, "size")
            info = self.mount_info()
            if info is None:
                self.size = new_size
                return
            self._require_mounted("resize")
            used = self.usage().used
            if new_size < used:
                raise NoSpace(self._shrink_refusal(used, new_size))
            self._remount(new_size)
            self.size = new_size
            log.info("resized pool %s to %s", self.name, format_size(new_size))

    def _shrink_refusal(self, used: int, new_size: int) -> str:
        return (
            f"pool {self.name!r} uses {format_size(used)}; cannot shrink it to "
            f"{format_size(new_size)} (demote models first or choose a larger size)"
        )

    def _remount(self, size: int) -> None:
        opts = f"remount,size={size},huge={_HUGE}"
        result = _run(["mount", "-o", opts, str(self.path)])
        if result.returncode == 0:
            return
        # tmpfs refuses a size below what is in use (mount exits 32 with a vague message;
        # the real reason goes to the kernel log). Files may have been written since we
        # looked, so check again and say so plainly.
        with contextlib.suppress(OSError):
            used = statvfs_usage(self.path).used
            if size < used:
                raise NoSpace(self._shrink_refusal(used, size))
        raise Failed(
            f"cannot resize pool {self.name!r} to {format_size(size)}: mount said: "
            f"{_one_line(result.stderr)}"
        )
