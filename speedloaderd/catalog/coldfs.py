"""Read-only access to cold storage for the catalog: never write, never follow a link out.

Cold storage is in other hands (an NFS export, the ``ollama`` user's store), so nothing here
reaches a file by a path the kernel resolves freely: every call goes through
:class:`speedloaderd.roots.Root`, relative to a directory fd of the cold root, with openat2
``RESOLVE_BENEATH``. A symlink inside cold storage is followed; one that leads out fails in
the kernel (EXDEV) at the moment of the open, so swapping a directory or a file for a link
between a check and a use gains a cold-storage writer nothing.

Only regular files are ever opened for reading: a leaf is first examined through an
``O_PATH`` fd (which opens no FIFO and no device), and a small read then checks with
``fstat`` that it got a regular file. Reads use ``O_NOATIME`` where allowed, so a scan does
not even move access times.

A path is addressed by its ``rel`` (relative to the cold root, '/'-separated). The layout
scanners walk directories without following directory symlinks (:class:`ColdEntry` says what
each entry is, as listed), and :meth:`ColdRoot.scandir` refuses to go deeper than
:data:`MAX_DEPTH`, so a directory swapped for a link back up the tree during a scan cannot
make the walk loop or recurse without end.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..roots import ChangedFile, Identity, Root

MAX_DEPTH = 64
"""Directories below the cold root a scan descends; no model layout needs a tenth of it."""


class ColdFileError(Exception):
    """A file on cold storage cannot be used; the message says why, without the path."""


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


@dataclass(frozen=True, slots=True)
class ColdEntry:
    """One entry of a directory as it was listed (not followed). A hint for the walk only:
    what is used is examined again, relative to the root, when it is used."""

    name: str
    is_dir: bool
    is_link: bool
    st: os.stat_result | None = None
    """For a regular file (not a link): its stat, taken through the listed directory's fd
    (fstatat, no path walked again: a resolution per file made scans ~2x slower)."""


@dataclass(frozen=True, slots=True)
class MetaRead:
    """A small file read by the scan: its bytes and the fstat of the fd they came from."""

    content: bytes
    st: os.stat_result


class _HeldRoot(Root):
    """A :class:`Root` whose directory is opened once, for one scan, not once per call.

    A scan makes several calls per file; each would look the root's path up again (on NFS,
    a round trip per component). Holding one fd also means the whole scan sees one cold
    storage directory, even if something is mounted over its path meanwhile.
    """

    __slots__ = ("_held",)

    def __init__(self, path: str) -> None:
        super().__init__(path, "cold storage", links=True)
        self._held: int | None = None

    def _root_fd(self) -> int:
        if self._held is None:
            return super()._root_fd()
        return os.dup(self._held)  # callers close what they get

    def hold(self) -> None:
        if self._held is None:
            self._held = super()._root_fd()

    def release(self) -> None:
        if self._held is not None:
            os.close(self._held)
            self._held = None


class ColdRoot:
    """The cold storage root, reached only through :class:`Root` (``links=True``).

    Use it as a context manager for a scan: the root directory is then opened once.
    """

    __slots__ = ("path", "root")

    def __init__(self, root: Path | str) -> None:
        self.path = os.path.abspath(os.fspath(root))
        self.root = _HeldRoot(self.path)

    def __enter__(self) -> ColdRoot:
        with contextlib.suppress(OSError):  # not there: each call then says why on its own
            self.root.hold()
        return self

    def __exit__(self, *exc: object) -> None:
        self.root.release()

    def abs(self, rel: str) -> str:
        """The path a message or an inference server uses; never opened by this module."""
        return f"{self.path}/{rel}" if rel else self.path

    # --- directories

    def scandir(self, rel: str) -> list[ColdEntry]:
        """Entries of directory ``rel``, hidden names left out, sorted by name.

        Raises ColdFileError if it cannot be listed, leads out of cold storage, or lies
        deeper than :data:`MAX_DEPTH`.
        """
        if rel and rel.count("/") >= MAX_DEPTH:
            raise ColdFileError(f"is more than {MAX_DEPTH} directories deep; not listed")
        try:
            with self.root.directory(rel) as fd, os.scandir(fd) as it:
                # Types are taken while the fd is open: a DirEntry of an fd scandir stats
                # through that fd, which must not be used once it is closed.
                entries = [
                    ColdEntry(
                        e.name,
                        e.is_dir(follow_symlinks=False),
                        e.is_symlink(),
                        e.stat(follow_symlinks=False) if e.is_file(follow_symlinks=False) else None,
                    )
                    for e in it
                    if not e.name.startswith(".")
                ]
        except FileNotFoundError as exc:
            raise ColdFileError("is missing") from exc
        except NotADirectoryError as exc:
            raise ColdFileError("is not a directory") from exc
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                raise ColdFileError(self.link_escape(rel)) from exc
            raise ColdFileError(f"cannot be listed ({exc.strerror})") from exc
        entries.sort(key=_entry_name)
        return entries

    def mtime_ns(self, rel: str) -> int:
        """Modification time of the entry ``rel`` itself (a link not followed); -1 if gone."""
        st = self.root.lstat(rel)
        return -1 if st is None else st.st_mtime_ns

    # --- links

    def readlink(self, rel: str) -> str | None:
        """The target of the symlink ``rel``, or None if it is not one (or is gone)."""
        return self.root.readlink(rel)

    def leads_out(self, rel: str) -> bool:
        """True if ``rel`` can only be reached by leaving cold storage (a link out)."""
        try:
            self.root.stat(rel)
        except OSError as exc:
            return exc.errno == errno.EXDEV
        return False

    def link_escape(self, rel: str) -> str:
        """Message for ``rel`` that leads outside cold storage."""
        target = self.readlink(rel) if rel else None
        if target is None:
            return "leads outside cold storage through a symlinked directory; not followed"
        return f"symlink to {target!r} leads outside cold storage; not followed"

    # --- files

    def stat_file(
        self, rel: str, *, links: bool = True, entry: ColdEntry | None = None
    ) -> os.stat_result:
        """The stat of the regular file at ``rel``, links followed only within cold storage
        (none at all unless ``links``). The file is not opened. ``entry``, the listing's
        entry of ``rel``, saves the lookup when it was a regular file.

        Raises ColdFileError when the file is missing, dangling, escaping, a link where
        none may be, or not a regular file.
        """
        if entry is not None and entry.st is not None:
            return entry.st
        try:
            st = self.root.stat(rel, links=links)
        except OSError as exc:
            raise ColdFileError(self._why_not(rel, exc)) from exc
        if not stat.S_ISREG(st.st_mode):
            via = "a symlink to " if self.readlink(rel) is not None else ""
            raise ColdFileError(f"is {via}{kind_of(st.st_mode)}, expected a regular file")
        return st

    def _why_not(self, rel: str, exc: OSError) -> str:
        target = self.readlink(rel)
        if exc.errno == errno.EXDEV:
            return self.link_escape(rel)
        if exc.errno == errno.ENOENT:
            return "is missing" if target is None else f"is a dangling symlink (to {target!r})"
        if exc.errno == errno.ENOTDIR:
            return "is missing (a directory on its path is not a directory)"
        if exc.errno == errno.ELOOP:
            if target is not None and self.leads_out(rel):
                return self.link_escape(rel)
            if target is not None:
                return f"is a symlink (to {target!r}), expected a regular file; not followed"
            return "is reached through a symlinked directory, where no link may be; not followed"
        return f"cannot be examined ({exc.strerror})"

    def read_small(self, rel: str, limit: int, entry: ColdEntry | None = None) -> MetaRead:
        """Content of the small regular file at ``rel`` (a manifest, a ref), with the fstat
        of the fd it was read from. Links are followed only within cold storage.

        Raises ColdFileError if it is not a regular file, is larger than ``limit`` bytes,
        or cannot be read. A FIFO or a device is named without ever being opened.
        """
        seen = self.stat_file(rel, entry=entry)
        if seen.st_size > limit:
            raise ColdFileError(f"is {seen.st_size} bytes, more than the {limit} expected")
        try:
            data, st = self.root.read_small_stat(rel, limit, Identity.of(seen), follow=True)
        except ChangedFile as exc:
            raise ColdFileError(f"changed while it was read ({exc.strerror})") from exc
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                raise ColdFileError(self._why_not(rel, exc)) from exc
            raise ColdFileError(f"cannot be read ({exc.strerror})") from exc
        return MetaRead(data, st)


def _entry_name(entry: ColdEntry) -> str:
    return entry.name
