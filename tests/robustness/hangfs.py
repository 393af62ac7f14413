"""hangfs: a read-only FUSE passthrough of a directory whose reads of chosen files hang.

A real kernel mount (FUSE, spoken over /dev/fuse directly: no libfuse, no fusermount),
standing for cold storage on an NFS or FUSE server that stops answering: the reader
blocks in the kernel, in read/sendfile, exactly as there. Hanging reads are answered only
when told to ("release" on stdin) or when the kernel interrupts them because the reader
is being killed (as a FUSE server that supports interrupts, and NFS's killable waits, do):
then the reader gets EINTR.

    python -m tests.robustness.hangfs SOURCE MOUNTPOINT NAME...

Prints ``ready`` once mounted and ``parked N`` whenever the number of hanging reads
changes. Reads stdin: ``release`` answers the hanging reads and stops hanging; ``hold``
hangs again; end of file unmounts and exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import stat
import struct
import sys

IN_HDR = struct.Struct("<IIQQIIIHH")
OUT_HDR = struct.Struct("<IiQ")
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
ENTRY_OUT = struct.Struct("<QQQQII")
ATTR_OUT = struct.Struct("<QII")
OPEN_OUT = struct.Struct("<QII")
READ_IN = struct.Struct("<QQII")
INIT_IN = struct.Struct("<IIII")
INIT_OUT = struct.Struct("<IIIIHHIIHHII")
KSTATFS = struct.Struct("<QQQQQIIII")
DIRENT = struct.Struct("<QQII")

# Opcodes (linux/fuse.h); any other gets ENOSYS.
LOOKUP, FORGET, GETATTR, READLINK = 1, 2, 3, 5
OPEN, READ, STATFS, RELEASE, FLUSH, INIT = 14, 15, 17, 18, 25, 26
OPENDIR, READDIR, RELEASEDIR, ACCESS = 27, 28, 29, 34
INTERRUPT, DESTROY, BATCH_FORGET = 36, 38, 42
NO_REPLY = {FORGET, BATCH_FORGET, INTERRUPT}
FOPEN_DIRECT_IO = 1  # every read reaches us: nothing is served from the page cache
MS_NOSUID, MS_NODEV, MNT_DETACH = 2, 4, 2

_libc = ctypes.CDLL("libc.so.6", use_errno=True)


class HangFS:
    def __init__(self, source: str, mountpoint: str, stuck: set[str]):
        self.source = source
        self.mountpoint = mountpoint
        self.stuck = stuck
        self.released = False
        self.nodes: dict[int, str] = {1: ""}  # node id -> path relative to source
        self.ids: dict[str, int] = {"": 1}
        self.parked: dict[int, tuple[int, int, int]] = {}  # unique -> (fh, offset, size)
        self.fd = os.open("/dev/fuse", os.O_RDWR)
        opts = f"fd={self.fd},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions"
        if (
            _libc.mount(
                b"hangfs", mountpoint.encode(), b"fuse", MS_NOSUID | MS_NODEV, opts.encode()
            )
            != 0
        ):
            raise OSError(ctypes.get_errno(), "mount fuse", mountpoint)

    # --- replies ---------------------------------------------------------------------

    def reply(self, unique: int, data: bytes = b"", error: int = 0) -> None:
        # ENOENT: the request was interrupted meanwhile; ENODEV: the connection is gone.
        with contextlib.suppress(OSError):
            os.write(self.fd, OUT_HDR.pack(OUT_HDR.size + len(data), -error, unique) + data)

    def real(self, rel: str) -> str:
        return os.path.join(self.source, rel) if rel else self.source

    def attr(self, st: os.stat_result) -> bytes:
        return ATTR.pack(
            st.st_ino,
            st.st_size,
            st.st_blocks,
            int(st.st_atime),
            int(st.st_mtime),
            int(st.st_ctime),
            st.st_atime_ns % 10**9,
            st.st_mtime_ns % 10**9,
            st.st_ctime_ns % 10**9,
            st.st_mode,
            st.st_nlink,
            st.st_uid,
            st.st_gid,
            st.st_rdev,
            4096,
            0,
        )

    def report(self) -> None:
        print(f"parked {len(self.parked)}", flush=True)

    # --- requests --------------------------------------------------------------------

    def handle(self, buf: bytes) -> bool:
        _, op, unique, node, *_ = IN_HDR.unpack_from(buf)
        arg = buf[IN_HDR.size :]
        try:
            return self.dispatch(op, unique, node, arg)
        except OSError as e:
            if op not in NO_REPLY:
                self.reply(unique, error=e.errno or errno.EIO)
            return True

    def dispatch(self, op: int, unique: int, node: int, arg: bytes) -> bool:
        if op == INIT:
            major, minor, readahead, _flags = INIT_IN.unpack_from(arg)
            out = INIT_OUT.pack(7, 31, readahead, 0, 16, 12, 1 << 17, 1, 32, 0, 0, 0)
            self.reply(unique, out + bytes(24))
        elif op == LOOKUP:
            name = arg.split(b"\0", 1)[0].decode()
            rel = os.path.join(self.nodes[node], name) if self.nodes[node] else name
            st = os.lstat(self.real(rel))
            nid = self.ids.setdefault(rel, len(self.ids) + 1)
            self.nodes[nid] = rel
            self.reply(unique, ENTRY_OUT.pack(nid, 0, 1, 1, 0, 0) + self.attr(st))
        elif op == GETATTR:
            st = os.lstat(self.real(self.nodes[node]))
            self.reply(unique, ATTR_OUT.pack(1, 0, 0) + self.attr(st))
        elif op == READLINK:
            self.reply(unique, os.readlink(self.real(self.nodes[node])).encode())
        elif op == OPEN:
            fh = os.open(self.real(self.nodes[node]), os.O_RDONLY | os.O_NOFOLLOW)
            self.reply(unique, OPEN_OUT.pack(fh, FOPEN_DIRECT_IO, 0))
        elif op == READ:
            fh, offset, size, _ = READ_IN.unpack_from(arg)
            if not self.released and os.path.basename(self.nodes[node]) in self.stuck:
                self.parked[unique] = (fh, offset, size)
                self.report()
            else:
                self.reply(unique, os.pread(fh, size, offset))
        elif op == RELEASE:
            os.close(struct.unpack_from("<Q", arg)[0])
            self.reply(unique)
        elif op in (OPENDIR, RELEASEDIR):
            self.reply(unique, OPEN_OUT.pack(0, 0, 0) if op == OPENDIR else b"")
        elif op == READDIR:
            _, offset, size, _ = READ_IN.unpack_from(arg)
            self.reply(unique, self.readdir(self.nodes[node], offset, size))
        elif op == STATFS:
            v = os.statvfs(self.source)
            out = KSTATFS.pack(
                v.f_blocks,
                v.f_bfree,
                v.f_bavail,
                v.f_files,
                v.f_ffree,
                v.f_bsize,
                v.f_namemax,
                v.f_frsize,
                0,
            )
            self.reply(unique, out + bytes(24))
        elif op in (FLUSH, ACCESS):
            self.reply(unique)
        elif op == INTERRUPT:  # the reader is being killed: let it go
            target = struct.unpack_from("<Q", arg)[0]
            if self.parked.pop(target, None) is not None:
                self.reply(target, error=errno.EINTR)
                self.report()
        elif op == DESTROY:
            self.reply(unique)
            return False
        elif op not in NO_REPLY:
            self.reply(unique, error=errno.ENOSYS)
        return True

    def readdir(self, rel: str, offset: int, size: int) -> bytes:
        path = self.real(rel)
        names = [".", "..", *sorted(os.listdir(path))]
        out = b""
        for i in range(offset, len(names)):
            name = names[i].encode()
            st = os.lstat(os.path.join(path, names[i]))
            rec = DIRENT.pack(st.st_ino, i + 1, len(name), stat.S_IFMT(st.st_mode) >> 12) + name
            rec += bytes(-len(rec) % 8)
            if len(out) + len(rec) > size:
                break
            out += rec
        return out

    def release_parked(self) -> None:
        for unique, (fh, offset, size) in list(self.parked.items()):
            self.reply(unique, os.pread(fh, size, offset))
        self.parked.clear()
        self.report()

    # --- loop ------------------------------------------------------------------------

    def serve(self) -> None:
        print("ready", flush=True)
        running = True
        while running:
            ready, _, _ = select.select([self.fd, sys.stdin], [], [])
            if sys.stdin in ready:
                line = sys.stdin.readline()
                if not line:
                    break
                if line.strip() == "release":
                    self.released = True
                    self.release_parked()
                elif line.strip() == "hold":
                    self.released = False
            if self.fd in ready:
                try:
                    buf = os.read(self.fd, (1 << 20) + 4096)
                except OSError as e:
                    if e.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                        continue
                    break  # ENODEV: unmounted
                running = self.handle(buf)
        _libc.umount2(self.mountpoint.encode(), MNT_DETACH)
        os.close(self.fd)  # aborts whatever is still waiting for an answer


if __name__ == "__main__":
    HangFS(sys.argv[1], sys.argv[2], set(sys.argv[3:])).serve()
