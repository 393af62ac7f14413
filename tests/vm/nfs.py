"""A real NFSv4 server in the "remote" guest and a read-only mount of it in the "local" one.

The server is the kernel's nfsd with nfs-kernel-server's rpc.nfsd, rpc.mountd and exportfs
(copied into the image by vmlab/build); the client is the kernel's NFS client with
nfs-common's mount.nfs. NFSv4.2 only over TCP on the fabric link (192.168.100.1 -> .2):
v4 needs no rpcbind, statd or lockd, so the guests run two daemons and nothing else.

The export is a directory on a tmpfs in the remote guest (an export of a filesystem with no
UUID needs ``fsid=``), read-only, ``root_squash``: root on the client is "nobody" there, as cold
storage shared by several inference boxes would be set up, so the daemon reads only what
everyone may read. The mount options are what a careful admin of a read-only cold store
uses, see MOUNT_OPTIONS.
"""

from __future__ import annotations

from .guests import FABRIC

EXPORT_FS = "/srv/nfs"
"""A tmpfs on the remote guest holding the export, and room beside it on the same
filesystem: files moved out of the export and back are renames (same inodes, no copy)."""
EXPORT = f"{EXPORT_FS}/cold"
"""The exported directory on the remote guest."""
EXPORT_SIZE = "320m"
EXPORT_LINE = f"{EXPORT} {FABRIC['local']}(ro,sync,no_subtree_check,root_squash,fsid=1)"

# NFSv4 lease and grace: the kernel's default of 90 s grace after every nfsd start would make
# each restart in the tests wait 90 s before the first OPEN; 10 s is the smallest allowed.
LEASE_SECONDS = 10

MOUNT_OPTIONS = ",".join(
    (
        "ro",  # cold storage is never written: the kernel refuses it too
        "nosuid",
        "nodev",
        "noexec",  # model files are data; nothing on the export runs here
        "vers=4.2",
        "proto=tcp",
        # soft: a read from a server that is gone fails with EIO after the retransmissions
        # below instead of hanging forever in D state (hard, the default). For a read-only
        # mount whose every read can be redone from the master, that is the right trade:
        # a promote fails with a sentence, the links stay on cold, a retry works. timeo is
        # in tenths of a second and grows linearly per retry over TCP: one RPC gives up
        # after 5+10+15 = 30 s, long enough for a TCG guest's slowest RPC. A copy meets
        # several such RPCs in turn (readahead, then the page read retried), so the
        # promote failed about 2 minutes after nfsd stopped (measured; tests/vm/README.md).
        "soft",
        "timeo=50",
        "retrans=2",
    )
)
"""What the local guest mounts the export with."""


def _ok(runner, argv: list[str], what: str) -> str:  # noqa: ANN001 - an SshRunner
    r = runner.run(argv)
    assert r.returncode == 0, f"{what}: {argv}: {r.stderr or r.stdout}"
    return r.stdout


def server_setup(remote) -> None:  # noqa: ANN001 - an SshRunner into the remote guest
    """Load nfsd, make the export's tmpfs, start mountd (once per boot)."""
    _ok(remote, ["modprobe", "nfsd"], "load nfsd")
    if remote.run(["mountpoint", "-q", "/proc/fs/nfsd"]).returncode != 0:
        _ok(remote, ["mount", "-t", "nfsd", "nfsd", "/proc/fs/nfsd"], "mount nfsd fs")
    _ok(remote, ["mkdir", "-p", EXPORT_FS], "mkdir export fs")
    if remote.run(["mountpoint", "-q", EXPORT_FS]).returncode != 0:
        _ok(remote, ["mount", "-t", "tmpfs", "-o", f"size={EXPORT_SIZE},mode=0755", "tmpfs",
                     EXPORT_FS], "export tmpfs")  # fmt: skip
    _ok(remote, ["mkdir", "-p", "-m", "0755", EXPORT], "mkdir export")
    remote.write_bytes("/etc/exports", (EXPORT_LINE + "\n").encode())
    # v4 only: mountd answers the kernel's export upcalls, registers nothing with rpcbind
    _ok(remote, ["/usr/sbin/rpc.mountd", "-N", "2", "-N", "3"], "rpc.mountd")
    server_start(remote)


def server_start(remote) -> None:  # noqa: ANN001
    _ok(remote, ["/usr/sbin/exportfs", "-ra"], "exportfs -ra")
    _ok(remote, ["/usr/sbin/rpc.nfsd", "-N", "3", "-U", "-L", str(LEASE_SECONDS), "-G",
                 str(LEASE_SECONDS), "4"], "rpc.nfsd")  # fmt: skip


def server_stop(remote) -> None:  # noqa: ANN001
    """What `systemctl stop nfs-server` does: unexport everything, stop the nfsd threads."""
    _ok(remote, ["/usr/sbin/exportfs", "-ua"], "exportfs -ua")
    _ok(remote, ["/usr/sbin/rpc.nfsd", "0"], "rpc.nfsd 0")


def mount(local, where: str) -> None:  # noqa: ANN001 - an SshRunner into the local guest
    _ok(local, ["modprobe", "nfsv4"], "load nfsv4")
    _ok(local, ["mkdir", "-p", where], "mkdir mount point")
    _ok(local, ["/bin/mount", "-t", "nfs4", "-o", MOUNT_OPTIONS, f"{FABRIC['remote']}:{EXPORT}",
                where], "mount nfs")  # fmt: skip


def umount(local, where: str) -> None:  # noqa: ANN001
    _ok(local, ["/bin/umount", where], "umount nfs")


def is_mounted(local, where: str) -> bool:  # noqa: ANN001
    return local.run(["mountpoint", "-q", where]).returncode == 0
