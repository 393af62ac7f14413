"""Read-only access to cold storage for the catalog: never write, never follow a link out.

Everything here reads; nothing creates, renames or touches a file. Files are opened with
``O_NOATIME`` (dropped on EPERM, e.g. on a file we do not own over NFS) so a scan does not
even move access times. Only regular files are ever opened: a FIFO or a device node on cold
storage is reported, not opened (opening a tape device can rewind it, a FIFO can block).

A path is addressed by its ``rel`` (relative to the cold root, '/'-separated). The layout
scanners reach every path by walking directories with ``os.scandir`` without following
directory symlinks, so the only symlinks they meet are leaf entries; :meth:`ColdRoot.stat_file`
resolves those and refuses any that lead outside the cold root.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

_O_NOATIME = getattr(os, "O_NOATIME", 0)
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC


class ColdFileError(Exception):
    """A file on cold storage cannot be used; the message says why, without the path."""


def open_readonly(path: str) -> int:
    """Open ``path`` read-only without updating its atime where the kernel lets us.

    Does not follow a symlink in the last component (``O_NOFOLLOW``) and does not block on
    a FIFO (``O_NONBLOCK``); callers check the type with ``os.fstat``.
    """
    try:
        return os.open(path, _OPEN_FLAGS | _O_NOATIME)
    except PermissionError as exc:
        # O_NOATIME needs ownership or CAP_FOWNER; without them the kernel says EPERM.
        if exc.errno != errno.EPERM or not _O_NOATIME:
            raise
        return os.open(path, _OPEN_FLAGS)


def kind_of(mode: int) -> str:
    """A word for a file type, for messages: 'directory', 'FIFO', 'socket'..."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device node"
    if stat.S_ISLNK(mode):
        return "a symlink"
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


class ColdRoot:
    """The cold storage root. ``path`` is how we were told to find it, ``real`` its realpath."""

    __slots__ = ("path", "real", "_real_prefix")

    def __init__(self, root: Path | str) -> None:
        self.path = os.path.abspath(os.fspath(root))
        self.real = os.path.realpath(self.path)
        self._real_prefix = self.real.rstrip("/") + "/"

    def abs(self, rel: str) -> str:
        return f"{self.path}/{rel}" if rel else self.path

    def contains_real(self, real: str) -> bool:
        """True if the (already resolved) path is the cold root or below it."""
        return real == self.real or real.startswith(self._real_prefix)

    def resolve(self, rel: str) -> str | None:
        """Realpath of ``rel``, or None if it leads outside the cold root."""
        real = os.path.realpath(self.abs(rel))
        return real if self.contains_real(real) else None

    def scandir(self, rel: str) -> list[os.DirEntry[str]]:
        """Entries of directory ``rel``, hidden names left out, sorted by name.

        Raises ColdFileError if it cannot be listed. ``rel`` must have been reached without
        following a symlink, or been checked with :meth:`resolve`.
        """
        try:
            with os.scandir(self.abs(rel)) as it:
                entries = [e for e in it if not e.name.startswith(".")]
        except FileNotFoundError as exc:
            raise ColdFileError("is missing") from exc
        except NotADirectoryError as exc:
            raise ColdFileError("is not a directory") from exc
        except OSError as exc:
            raise ColdFileError(f"cannot be listed ({exc.strerror})") from exc
        entries.sort(key=_entry_name)
        return entries

    def link_escape(self, rel: str) -> str:
        """Message for ``rel`` whose realpath lies outside the cold root."""
        try:
            target = os.readlink(self.abs(rel))
        except OSError:
            return "leads outside cold storage through a symlinked directory; not followed"
        return f"symlink to {target!r} leads outside cold storage; not followed"

    def stat_file(
        self, rel: str, entry: os.DirEntry[str] | None = None, *, parent_checked: bool = False
    ) -> int:
        """Size of the regular file at ``rel``, following symlinks only within the cold root.

        Pass the ``entry`` from a scandir of the parent (it saves the lstat), or
        ``parent_checked=True`` when the parent directory is known to lie inside the cold
        root; otherwise the whole path is resolved first. Raises ColdFileError when the
        file is missing, dangling, escaping, or not a regular file.
        """
        if entry is None and not parent_checked:
            return self._stat_resolved(rel)
        try:
            st = entry.stat(follow_symlinks=False) if entry else os.lstat(self.abs(rel))
        except FileNotFoundError as exc:
            raise ColdFileError("is missing") from exc
        except OSError as exc:
            raise ColdFileError(f"cannot be examined ({exc.strerror})") from exc
        if stat.S_ISLNK(st.st_mode):
            return self._stat_resolved(rel)
        if not stat.S_ISREG(st.st_mode):
            raise ColdFileError(f"is {kind_of(st.st_mode)}, expected a regular file")
        return st.st_size

    def _stat_resolved(self, rel: str) -> int:
        path = self.abs(rel)
        real = os.path.realpath(path)
        if not self.contains_real(real):
            raise ColdFileError(self.link_escape(rel))
        try:
            st = os.stat(real)
        except FileNotFoundError as exc:
            if os.path.islink(path):
                raise ColdFileError(f"is a dangling symlink (to {os.readlink(path)!r})") from exc
            raise ColdFileError("is missing") from exc
        except OSError as exc:
            raise ColdFileError(f"cannot be examined ({exc.strerror})") from exc
        if not stat.S_ISREG(st.st_mode):
            via = "a symlink to " if os.path.islink(path) else ""
            raise ColdFileError(f"is {via}{kind_of(st.st_mode)}, expected a regular file")
        return st.st_size

    def read_small(self, rel: str, limit: int, entry: os.DirEntry[str] | None = None) -> bytes:
        """Content of the small regular file at ``rel`` (a manifest, a ref).

        Symlinks are followed only within the cold root. Raises ColdFileError if the file
        is not a regular file, is larger than ``limit`` bytes, or cannot be read.
        """
        path = self.abs(rel)
        if entry is None or not entry.is_file(follow_symlinks=False):
            # Check the type before opening: never open a FIFO or a device, nor a link out.
            self.stat_file(rel, entry)
            path = os.path.realpath(path)
        try:
            fd = open_readonly(path)
        except FileNotFoundError as exc:
            raise ColdFileError("is missing") from exc
        except OSError as exc:
            raise ColdFileError(f"cannot be opened ({exc.strerror})") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ColdFileError(f"is {kind_of(st.st_mode)}, expected a regular file")
            if st.st_size > limit:
                raise ColdFileError(f"is {st.st_size} bytes, more than the {limit} expected")
            chunks = []
            left = limit + 1
            while left > 0:
                chunk = os.read(fd, left)
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
        except OSError as exc:
            raise ColdFileError(f"cannot be read ({exc.strerror})") from exc
        finally:
            os.close(fd)
        data = b"".join(chunks)
        if len(data) > limit:
            raise ColdFileError(f"is more than the {limit} bytes expected")
        return data


def _entry_name(entry: os.DirEntry[str]) -> str:
    return entry.name
