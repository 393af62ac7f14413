"""The one place that opens, creates, renames and unlinks files under the daemon's roots.

The daemon is root, and the trees it works in are partly in other hands: cold storage is
often written by other users (an NFS share, the ``ollama`` user's store), and a path in the
config may lead through directories someone else can change. So nothing under a root is
reached by a plain path. Every call here:

- opens the root's directory, then the parent directory of the entry with ``openat2``
  ``RESOLVE_BENEATH`` (never leaving the root) and, for the daemon's own roots (models dir,
  pools, state dir), ``RESOLVE_NO_SYMLINKS`` too: there, a symlink in a directory position
  is an attack, not a layout;
- acts on the last component relative to that directory fd without following it
  (``O_NOFOLLOW``, ``AT_SYMLINK_NOFOLLOW``), creating with ``O_EXCL``;
- reads sources with ``O_NONBLOCK`` (a FIFO must not wedge a worker) and ``O_NOATIME``, then
  checks with ``fstat`` that it opened a regular file, and the very file the scan saw (same
  device and inode) when the caller says which.

A root the daemon writes into must be trusted: owned by root and writable by nobody else,
along every component of its path (as sshd's StrictModes checks a user's ``~/.ssh``), so that
only root can swap a component for a link. :func:`check_trusted_dir` is that check.

Nothing else in ``speedloaderd`` opens, creates, renames or unlinks under these roots;
``tests/security/test_roots.py`` fails if new code does.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import socket
import stat
import struct
from collections.abc import Container, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import Failed, InvalidArgument

PARTIAL_MARKER = ".sl-partial-"
"""Infix of every partial copy's name; recovery removes files carrying it."""


def is_partial(name: str) -> bool:
    """True if ``name`` (a file name, not a path) is one of our partial copies."""
    return name.startswith(".") and PARTIAL_MARKER in name


def partial_name(final_name: str) -> str:
    """A fresh temporary name for a copy that will become ``final_name``."""
    # Only the marker and random hex: ``.<final_name>...`` would pass NAME_MAX (255 bytes)
    # for a final name of 240 or more, and one long name on cold storage must not make
    # every promote of its model fail. ``final_name`` stays in the signature for callers.
    del final_name
    return f"{PARTIAL_MARKER}{secrets.token_hex(8)}"


# linux/openat2.h
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_SYS_OPENAT2 = 437  # the same number on x86_64 and aarch64 (the generic syscall table)
_O_NOATIME = getattr(os, "O_NOATIME", 0)
_O_PATH = getattr(os, "O_PATH", 0o10000000)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str, flags: int, mode: int = 0, resolve: int = 0) -> int:
    """openat2(2): open ``path`` relative to ``dirfd`` under the ``resolve`` restrictions.

    Raises OSError like os.open; EXDEV means the path would leave the root, ELOOP that it
    met a symlink where ``RESOLVE_NO_SYMLINKS`` (or ``O_NOFOLLOW``) forbids one.
    """
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    while True:
        fd = _libc.syscall(
            _SYS_OPENAT2, dirfd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how)
        )
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err), path)


class UnsafePath(InvalidArgument):
    """A configured directory that someone other than root could change under the daemon."""


# --- trust --------------------------------------------------------------------------------


def _refuse(what: str, path: Path, component: str, why: str) -> UnsafePath:
    return UnsafePath(
        f"{what} {path} is not safe for the root daemon: {component} {why}; it must be "
        "owned by root and writable by nobody else, along every component of its path"
    )


def check_trusted_dir(path: Path | str, what: str, *, allow_missing: bool = False) -> Path | None:
    """Refuse (UnsafePath) unless only root can change ``path`` or any directory above it.

    Every component, as written and through any symlink, must be a directory owned by root
    and not writable by group or others; a root-owned sticky directory (``/tmp``) may be
    passed through, since nobody else can replace root's entries in it, but not ended at.
    A symlink on the way must be root's and sit in such a directory; its target is checked
    the same way. With ``allow_missing``, a path whose tail does not exist yet passes if
    its deepest existing directory does; returns the first missing component, else None.
    """
    path = Path(os.path.abspath(path))
    missing = _check_chain(path, what, path, allow_missing, depth=0)
    return missing


def _check_chain(
    path: Path, what: str, shown: Path, allow_missing: bool, depth: int
) -> Path | None:
    if depth > 40:
        raise _refuse(what, shown, str(path), "leads through too many symlinks")
    cur = Path("/")
    _check_dir(cur, os.lstat(cur), what, shown, last=len(path.parts) == 1)
    for i, name in enumerate(path.parts[1:], start=2):
        nxt = cur / name
        last = i == len(path.parts)
        try:
            st = os.lstat(nxt)
        except FileNotFoundError:
            if allow_missing:
                return nxt
            raise _refuse(what, shown, str(nxt), "does not exist") from None
        except OSError as err:
            raise _refuse(what, shown, str(nxt), f"cannot be examined ({err.strerror})") from None
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid != 0:
                raise _refuse(what, shown, str(nxt), f"is a symlink owned by uid {st.st_uid}")
            target = Path(os.path.normpath(cur / os.readlink(nxt)))
            missing = _check_chain(target, what, shown, allow_missing, depth + 1)
            if missing is not None:
                return missing
            cur = Path(os.path.realpath(nxt))
            if last:
                _check_dir(cur, os.lstat(cur), what, shown, last=True)
            continue
        _check_dir(nxt, st, what, shown, last=last)
        cur = nxt
    return None


def _check_dir(p: Path, st: os.stat_result, what: str, shown: Path, *, last: bool) -> None:
    if not stat.S_ISDIR(st.st_mode):
        raise Failed(f"{what} {shown}: {p} is not a directory")
    if st.st_uid != 0:
        raise _refuse(what, shown, str(p), f"is owned by uid {st.st_uid}")
    if st.st_mode & 0o022:
        if not last and st.st_mode & stat.S_ISVTX:
            return  # sticky: others may add entries, never replace root's
        who = (
            "group and others"
            if st.st_mode & 0o022 == 0o022
            else ("its group" if st.st_mode & 0o020 else "others")
        )
        raise _refuse(what, shown, str(p), f"is writable by {who} (mode {st.st_mode & 0o7777:o})")


def ensure_trusted_dir(path: Path | str, what: str, mode: int = 0o755) -> None:
    """Create ``path`` (and missing parents, root's, ``mode``) below a trusted directory,
    then check it: the same rule as :func:`check_trusted_dir`, for a path that may be new."""
    path = Path(os.path.abspath(path))
    missing = check_trusted_dir(path, what, allow_missing=True)
    if missing is not None:
        parent = Path(os.path.realpath(missing.parent))
        rest = path.relative_to(missing.parent).parts
        fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            for name in rest:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, mode, dir_fd=fd)
                sub = openat2(
                    fd,
                    name,
                    os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                    0,
                    RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS,
                )
                os.fchmod(sub, mode)  # whatever the umask
                os.fsync(fd)
                os.close(fd)
                fd = sub
        finally:
            os.close(fd)
    check_trusted_dir(path, what)


# --- a root -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Identity:
    """Which file the scan saw: a copy opens it again and checks it is the same one.

    Device and inode name the file; the inode change time tells a new file that got the
    number of a deleted one (ext4 hands a freed inode to the next file at once: a file
    replaced by ``rm`` + write had the same number in tests) and any write, chmod or link
    since the scan."""

    dev: int
    ino: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        return cls(st.st_dev, st.st_ino, st.st_ctime_ns)


@dataclass(frozen=True, slots=True)
class Entry:
    """One non-directory entry of a walk, not followed."""

    rel: str
    is_link: bool
    is_file: bool


class ChangedFile(OSError):
    """The file at a path is not the one the scan saw (swapped, replaced, not regular)."""


def _split(rel: str) -> tuple[str, str]:
    parent, _, name = rel.rpartition("/")
    if not name or name in (".", "..") or "\0" in rel or rel.startswith("/"):
        raise InvalidArgument(f"{rel!r} is not a path relative to a root")
    return parent, name


class Root:
    """A directory tree the daemon works in, reached only through directory fds.

    ``links=True`` (cold storage) lets paths resolve through symlinks that stay inside the
    root; otherwise (the daemon's own trees) any symlink in a directory position is refused.
    The root directory itself is opened afresh by each call: a pool's tmpfs is mounted over
    its directory after the Root object exists, and a held fd would see what lies beneath.
    """

    __slots__ = ("path", "what", "resolve")

    def __init__(self, path: Path | str, what: str, *, links: bool = False):
        self.path = Path(path)
        self.what = what
        self.resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS
        if not links:
            self.resolve |= RESOLVE_NO_SYMLINKS

    def __repr__(self) -> str:
        return f"Root({str(self.path)!r}, {self.what!r})"

    def abs(self, rel: str) -> Path:
        """The path a client (or an inference server) uses for ``rel``; never opened here."""
        return self.path / rel if rel else self.path

    # --- directories

    def _root_fd(self) -> int:
        return os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    @contextlib.contextmanager
    def directory(
        self, rel_dir: str = "", *, create: bool = False, like: Root | None = None
    ) -> Iterator[int]:
        """An fd of the directory ``rel_dir`` (``""``: the root), for ``*at`` calls.

        With ``create``, missing directories are made; with ``like`` (cold storage), each new
        one is given at most the access its counterpart there gives (:func:`_mirror_dir`)."""
        fd = self._root_fd()
        try:
            if not rel_dir:
                yield fd
                return
            if not create:
                sub = openat2(fd, rel_dir, os.O_RDONLY | os.O_DIRECTORY, 0, self.resolve)
                os.close(fd)
                fd = sub
                yield fd
                return
            done = []
            for name in rel_dir.split("/"):
                done.append(name)
                try:
                    os.mkdir(name, 0o700, dir_fd=fd)
                    made = True
                except FileExistsError:
                    made = False
                sub = openat2(
                    fd, name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, 0, self.resolve
                )
                if made:
                    _mirror_dir(sub, like, "/".join(done))
                    os.fsync(fd)
                os.close(fd)
                fd = sub
            yield fd
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def parent(
        self, rel: str, *, create: bool = False, like: Root | None = None
    ) -> Iterator[tuple[int, str]]:
        """(fd of the directory holding ``rel``, the last component's name)."""
        parent, name = _split(rel)
        with self.directory(parent, create=create, like=like) as fd:
            yield fd, name

    def exists(self) -> bool:
        try:
            os.close(self._root_fd())
        except OSError:
            return False
        return True

    # --- reading

    def open_source(self, rel: str, expect: Identity | None = None, *, follow: bool = False) -> int:
        """Open the regular file ``rel`` for reading: no atime update, no blocking on a FIFO,
        the same file as ``expect`` (the scan's). Raises ChangedFile if it is not. With
        ``follow``, a link in the last component is followed too (within the root only)."""
        flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
        try:
            with self.directory() as rfd:
                try:
                    fd = openat2(rfd, rel, flags | _O_NOATIME, 0, self.resolve)
                except PermissionError as err:
                    if err.errno != errno.EPERM or not _O_NOATIME:  # EPERM: O_NOATIME
                        raise
                    fd = openat2(rfd, rel, flags, 0, self.resolve)
        except OSError as err:
            if err.errno == errno.EXDEV:
                raise ChangedFile(err.errno, f"leads outside {self.what}", rel) from None
            if err.errno == errno.ELOOP:
                raise ChangedFile(err.errno, "is reached through a symlink", rel) from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ChangedFile(errno.EINVAL, "is not a regular file", rel)
            if expect is not None and Identity.of(st) != expect:
                raise ChangedFile(errno.ESTALE, "is not the file the scan saw", rel)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def read_small(self, rel: str, limit: int, expect: Identity | None = None) -> bytes:
        """The content of a small regular file (a manifest, a ref), at most ``limit`` bytes."""
        return self.read_small_stat(rel, limit, expect)[0]

    def read_small_stat(
        self, rel: str, limit: int, expect: Identity | None = None, *, follow: bool = False
    ) -> tuple[bytes, os.stat_result]:
        """:meth:`read_small`, with the fstat of the very fd that was read (so a caller that
        records mode, owner or identity records those of the bytes it got)."""
        fd = self.open_source(rel, expect, follow=follow)
        try:
            st = os.fstat(fd)
            if st.st_size > limit:
                raise ChangedFile(errno.EFBIG, f"is {st.st_size} bytes, more than {limit}", rel)
            chunks: list[bytes] = []
            left = limit + 1  # one byte more than allowed tells a file that grew meanwhile
            while left > 0 and (chunk := os.read(fd, left)):
                chunks.append(chunk)
                left -= len(chunk)
        finally:
            os.close(fd)
        data = b"".join(chunks)
        if len(data) > limit:
            raise ChangedFile(errno.EFBIG, f"is more than {limit} bytes", rel)
        return data, st

    def lstat(self, rel: str) -> os.stat_result | None:
        """The entry ``rel`` itself (a link is not followed); None if it is not there."""
        try:
            with self.parent(rel) as (fd, name):
                return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.EXDEV):
                return None  # not reachable without a link: as good as absent
            raise

    def stat(self, rel: str, *, links: bool = True) -> os.stat_result:
        """The entry ``rel`` whatever its type, without opening it (O_PATH: a FIFO or a device
        is never opened), links followed only within the root, or none at all if not
        ``links``. Raises OSError: EXDEV if the path leads out of the root, ELOOP if it
        meets a link where none may be."""
        resolve = self.resolve if links else self.resolve | RESOLVE_NO_SYMLINKS
        with self.directory() as rfd:
            fd = openat2(rfd, rel, _O_PATH, 0, resolve)
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def stat_file(self, rel: str) -> os.stat_result | None:
        """The regular file ``rel`` (links followed only within the root), or None."""
        try:
            with self.directory() as rfd:
                fd = openat2(rfd, rel, _O_PATH, 0, self.resolve)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        return st if stat.S_ISREG(st.st_mode) else None

    def stat_dir(self, rel_dir: str) -> os.stat_result | None:
        try:
            with self.directory(rel_dir) as fd:
                return os.fstat(fd)
        except OSError:
            return None

    def is_file(self, rel: str) -> bool:
        """True if ``rel`` is a regular file, not a link (the daemon's own trees)."""
        st = self.lstat(rel)
        return st is not None and stat.S_ISREG(st.st_mode)

    def readlink(self, rel: str) -> str | None:
        try:
            with self.parent(rel) as (fd, name):
                return os.readlink(name, dir_fd=fd)
        except OSError:
            return None

    def walk(self) -> list[Entry]:
        """Every non-directory entry below the root, never following a link, with its rel;
        directories that cannot be read are skipped."""
        out: list[Entry] = []
        stack: list[tuple[int, str]] = []
        try:
            stack.append((self._root_fd(), ""))
        except OSError:
            return out
        while stack:
            fd, prefix = stack.pop()
            try:
                with os.scandir(fd) as it:
                    entries = list(it)
                for e in entries:
                    rel = f"{prefix}{e.name}"
                    if e.is_dir(follow_symlinks=False):
                        with contextlib.suppress(OSError):
                            stack.append(
                                (
                                    openat2(
                                        fd,
                                        e.name,
                                        os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                                        0,
                                        self.resolve,
                                    ),
                                    rel + "/",
                                )
                            )
                    else:
                        out.append(Entry(rel, e.is_symlink(), e.is_file(follow_symlinks=False)))
            except OSError:
                pass
            finally:
                os.close(fd)
        return out

    def directories(self) -> list[str]:
        """Every directory below the root (not the root), deepest first."""
        dirs: list[str] = []
        stack = [""]
        while stack:
            rel = stack.pop()
            try:
                with self.directory(rel) as fd, os.scandir(fd) as it:
                    subs = [
                        f"{rel}/{e.name}" if rel else e.name
                        for e in it
                        if e.is_dir(follow_symlinks=False)
                    ]
            except OSError:
                continue
            dirs.extend(subs)
            stack.extend(subs)
        return sorted(dirs, key=lambda d: d.count("/"), reverse=True)

    # --- writing

    def create_temp(self, rel: str, *, like: Root | None = None) -> tuple[int, str]:
        """Create a new, empty file beside ``rel`` under a fresh temporary name, mode 0600,
        opened read-write. Returns (fd, temporary name's rel)."""
        with self.parent(rel, create=True, like=like) as (dfd, name):
            tmp = partial_name(name)
            fd = os.open(
                tmp,
                os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=dfd,
            )
        parent = rel.rpartition("/")[0]
        return fd, f"{parent}/{tmp}" if parent else tmp

    def rename(self, src_rel: str, dst_rel: str, *, durable: bool = True) -> None:
        """Rename within one directory (temp name onto the final one), atomically."""
        sp, sname = _split(src_rel)
        dp, dname = _split(dst_rel)
        if sp != dp:
            raise InvalidArgument(f"{src_rel!r} and {dst_rel!r} are not in the same directory")
        with self.directory(sp) as fd:
            os.rename(sname, dname, src_dir_fd=fd, dst_dir_fd=fd)
            if durable:
                os.fsync(fd)

    def unlink(self, rel: str, *, durable: bool = False) -> bool:
        """Remove the entry ``rel`` (a link is removed, not followed); False if absent."""
        try:
            with self.parent(rel) as (fd, name):
                os.unlink(name, dir_fd=fd)
                if durable:
                    os.fsync(fd)
        except FileNotFoundError:
            return False
        return True

    def rmdir(self, rel: str) -> bool:
        """Remove the directory ``rel`` if it is empty."""
        try:
            with self.parent(rel) as (fd, name):
                os.rmdir(name, dir_fd=fd)
        except OSError:
            return False
        return True

    def prune(self, rel_dir: str) -> None:
        """Remove ``rel_dir`` and its parents, as long as they are empty (never the root)."""
        while rel_dir and self.rmdir(rel_dir):
            rel_dir = rel_dir.rpartition("/")[0]

    def prune_empty(self, keep: Container[str] = ()) -> None:
        """Remove every empty directory below the root, deepest first, but those under a
        top-level name in ``keep`` (a pool's ``lost+found``)."""
        for d in self.directories():
            if d.split("/", 1)[0] not in keep:
                self.rmdir(d)

    def symlink(
        self,
        rel: str,
        target: str,
        tmp_name: str,
        *,
        durable: bool = True,
        like: Root | None = None,
    ) -> None:
        """Make ``rel`` a symlink to ``target`` atomically: a new link under ``tmp_name``
        (in the same directory), renamed over whatever ``rel`` was."""
        with self.parent(rel, create=True, like=like) as (fd, name):
            os.symlink(target, tmp_name, dir_fd=fd)
            _replace(fd, tmp_name, name, durable)

    def write_file(
        self,
        rel: str,
        content: bytes,
        tmp_name: str,
        *,
        mode: int = 0o644,
        owner: tuple[int, int] = (0, 0),
        durable: bool = True,
        like: Root | None = None,
    ) -> None:
        """Replace ``rel`` atomically with a regular file holding ``content``."""
        with self.parent(rel, create=True, like=like) as (dfd, name):
            write_atomically(dfd, name, content, tmp_name, mode=mode, owner=owner, durable=durable)

    def read_own(self, rel: str, limit: int) -> bytes | None:
        """A small regular file of the daemon's own (state, descriptors); None if absent."""
        try:
            with self.parent(rel) as (dfd, name):
                fd = os.open(
                    name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd
                )
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            data = os.read(fd, limit + 1)
        finally:
            os.close(fd)
        return data if len(data) <= limit else None

    def read_state(self, rel: str, limit: int) -> tuple[bytes | None, str]:
        """A state file of the daemon's own that is not trusted to be usable (usage.json,
        verified.json): (its bytes, "") when read, (None, "") when absent, else (None, why
        not) — a symlink is not followed, nor anything but a regular file read, nor more
        than ``limit`` bytes."""
        try:
            st = self.lstat(rel)
            if st is None:
                return None, ""
            if stat.S_ISLNK(st.st_mode):
                return None, "is a symlink (not followed)"
            if not stat.S_ISREG(st.st_mode):
                return None, "is not a regular file"
            if st.st_size > limit:
                return None, f"is {st.st_size} bytes, more than {limit}"
            return self.read_own(rel, limit), ""  # None: gone or grown since the lstat
        except OSError as err:
            return None, f"cannot be read ({err.strerror or err})"

    def replace_state(self, rel: str, content: bytes, tmp_name: str) -> None:
        """Replace a state file of the daemon's own (mode 0600), first removing a temp name
        a crash left behind (the write makes it O_EXCL)."""
        self.unlink(tmp_name)
        self.write_file(rel, content, tmp_name, mode=0o600)

    def fsync(self, rel_dir: str = "") -> None:
        with self.directory(rel_dir) as fd:
            os.fsync(fd)

    def syncfs(self) -> None:
        """Flush the whole filesystem of the root in one call (syncfs(2))."""
        with self.directory() as fd:
            if _libc.syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err), str(self.path))


def write_atomically(
    dfd: int,
    name: str,
    content: bytes,
    tmp_name: str,
    *,
    mode: int = 0o644,
    owner: tuple[int, int] | None = (0, 0),
    durable: bool = True,
) -> None:
    """The one atomic write of a small file, relative to the directory ``dfd``: ``content``
    goes to a new ``tmp_name`` (``O_EXCL | O_NOFOLLOW``: nothing there is followed or
    reused), gets ``owner`` (None: the caller's) and ``mode``, is fsync'ed, renamed over
    ``name``, and the directory is fsync'ed, so after a crash ``name`` holds the old content
    or the new, never a part. A failure removes the temp file. ``durable=False`` skips both
    fsyncs, for a caller that syncs the whole filesystem at the end (the models dir's sync)."""
    fd = os.open(
        tmp_name,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=dfd,
    )
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
        if owner is not None:
            _own(fd, owner, mode)
        else:
            os.fchmod(fd, mode)  # whatever the umask
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):  # the first error is the one to report
            os.unlink(tmp_name, dir_fd=dfd)
        raise
    os.close(fd)
    _replace(dfd, tmp_name, name, durable)


def bind_unix_socket(sock: socket.socket, path: Path, *, mode: int, gid: int) -> None:
    """Bind ``sock`` at ``path`` (the metrics socket), owned by root and group ``gid`` with
    ``mode``. The directory is made if missing and must be trusted (only root can change
    it, so nothing can be swapped in between the calls below); a socket left there by an
    earlier run is replaced, anything else there is refused. The bind goes through
    /proc/self/fd of the directory's fd: the path is resolved once, by the open."""
    ensure_trusted_dir(path.parent, "metrics socket directory")
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            st = os.lstat(path.name, dir_fd=dfd)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise InvalidArgument(
                    f"{path} exists and is not a socket; remove it or choose another "
                    "metrics.listen path"
                )
            os.unlink(path.name, dir_fd=dfd)
        # A new socket is 0777 & ~umask (the unit's UMask=0022: 0755), and connect(2) needs
        # write access to it: between bind and chmod only root can connect. Under a umask
        # of 0 (not the unit's) anyone could for that instant: the exposition, no more.
        sock.bind(f"/proc/self/fd/{dfd}/{path.name}")
        os.chown(path.name, 0, gid, dir_fd=dfd, follow_symlinks=False)
        os.chmod(path.name, mode, dir_fd=dfd)  # root's directory: the name is our socket
    finally:
        os.close(dfd)


def unlink_in_dir(path: Path) -> None:
    """Remove ``path`` (the metrics socket at stop) relative to its directory's fd, without
    following a link; nothing if it is gone."""
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.unlink(path.name, dir_fd=dfd)
        finally:
            os.close(dfd)


def replace_file(path: Path, content: bytes, *, mode: int = 0o644) -> None:
    """:func:`write_atomically` for a file an admin names by path (the config file), not one
    under a root: its directory is made if missing and opened once, the file written in it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        tmp = f".{path.name}.{secrets.token_hex(6)}.tmp"
        write_atomically(dfd, path.name, content, tmp, mode=mode, owner=None)
    finally:
        os.close(dfd)


def _replace(dfd: int, tmp_name: str, name: str, durable: bool) -> None:
    """Rename ``tmp_name`` over ``name`` in the directory ``dfd``; on failure remove it."""
    try:
        os.rename(tmp_name, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name, dir_fd=dfd)
        raise
    if durable:
        os.fsync(dfd)


# --- access of copies ---------------------------------------------------------------------


def own_like(fd: int, src: os.stat_result) -> None:
    """Give a copy at most its source's access: the same owner and group, the source's
    permission bits without setuid/setgid/sticky and without write (a pool copy is not for
    editing: the master stays on cold storage)."""
    _own(fd, (src.st_uid, src.st_gid), stat.S_IMODE(src.st_mode) & 0o555)


def _own(fd: int, owner: tuple[int, int], mode: int) -> None:
    os.fchown(fd, *owner)  # first: chown clears setuid bits a later chmod would set
    os.fchmod(fd, mode)


# ACL xattr layout (linux/posix_acl_xattr.h): a version, then (tag, perm, id) entries.
_ACL_VERSION = 2
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
_ACL_UNDEFINED = 0xFFFFFFFF


def _mirror_dir(fd: int, like: Root | None, rel_dir: str) -> None:
    """A directory the daemon made in a pool or the models dir gives at most the access of
    its counterpart on cold storage: root owns it (nobody else may add or swap entries), its
    group and the group and other bits come from there, without write; the counterpart's
    owner, when not root, keeps its read/search right through an ACL entry."""
    src = like.stat_dir(rel_dir) if like is not None else None
    if src is None:
        os.fchmod(fd, 0o755)
        return
    bits = stat.S_IMODE(src.st_mode)
    group, other = (bits >> 3) & 0o5, bits & 0o5
    os.fchown(fd, 0, src.st_gid)
    os.fchmod(fd, 0o700 | (group << 3) | other)
    if src.st_uid != 0:
        user = (bits >> 6) & 0o5
        acl = struct.pack("<I", _ACL_VERSION) + b"".join(
            struct.pack("<HHI", tag, perm, ident)
            for tag, perm, ident in (
                (_ACL_USER_OBJ, 0o7, _ACL_UNDEFINED),
                (_ACL_USER, user, src.st_uid),
                (_ACL_GROUP_OBJ, group, _ACL_UNDEFINED),
                (_ACL_MASK, user | group, _ACL_UNDEFINED),
                (_ACL_OTHER, other, _ACL_UNDEFINED),
            )
        )
        # Without ACL support the owner merely loses access to the hot copy: narrower,
        # never wider, and its loads fall back to what the links say.
        with contextlib.suppress(OSError):
            os.setxattr(fd, "system.posix_acl_access", acl)
