"""Cold storage over NFS for real: the kernel's nfsd in the "remote" guest, the kernel's NFS
client in the "local" one, and the whole daemon there reading its cold storage from the mount.

The remote guest exports a tmpfs with nfs-kernel-server (NFSv4.2, read-only, root_squash);
the local guest mounts it read-only (tests/vm/nfs.py: MOUNT_OPTIONS says which options and
why) at the daemon's storage.path and runs speedloaderd with one tmpfs pool
(tests/vm/daemon_agent.py). What is checked: catalog, promote and read-back through the
models dir; the NFS server stopped in the middle of a promote (the job fails with a sentence,
nothing partial in the pool, the link stays on cold, a retry works once the server is back);
the daemon started before the mount (cold storage unavailable, nothing wiped, the models back
at the Rescan after the mount); the export unmounted or emptied at a Rescan (nothing wiped,
hot models keep serving from RAM). Then the copy itself is measured on NFS: which method
(copy_file_range, sendfile...), O_NOATIME, page cache residue, and a promote against `cp`;
and a 4-shard model promoted with storage.copyStreams 1, 2 and 4 (reported, not asserted).

The guests are booted once for this module (test_vm_nvmeof.py boots its own pair later).
Needs root and the packages of tests/vm/README.md; skipped loudly without them, failed with
SPEEDLOADER_VM_REQUIRED=1.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator

import pytest

from speedloader_lab.modelgen import make_gguf
from speedloaderd.remote.runners import SshRunner
from speedloaderd.remote.values import SshTarget

from .test_vm_nvmeof import _loud_skip, _ok, _report
from .vm import nfs
from .vm.guests import (
    PROJECT_IN_GUEST,
    VENV,
    CannotBoot,
    DaemonAgent,
    Pair,
    booted_pair,
    share_host,
)

pytestmark = pytest.mark.vm

ROOT = "/srv/speedloader"
CONFIG = f"{ROOT}/config.json"
LOG = f"{ROOT}/engine.log"
COLD = f"{ROOT}/cold"  # the NFS mount point
POOL = "ram"
POOL_PATH = f"/run/speedloader/pools/{POOL}"
SMALL = "small"  # a real GGUF, read back with the gguf reader
BIG = "big"  # random bytes under a .gguf name: the scan only stats; big enough to stop mid-copy
BIG_MIB = 64  # ~5 s for a promote over the TCG guests' NFS (about 12 MB/s measured)


@pytest.fixture(scope="module")
def pair(request, tmp_path_factory) -> Iterator[Pair]:
    try:
        with booted_pair(tmp_path_factory.mktemp("vmnfs")) as p:
            _report(request, f"NFS guests booted to sshd in {p.boot_seconds:.1f} s")
            yield p
    except CannotBoot as err:
        _loud_skip(request, str(err))


def _runner(pair: Pair, name: str) -> SshRunner:
    g = pair.remote if name == "remote" else pair.local
    return SshRunner(
        SshTarget("root", "127.0.0.1", g.ssh_port), pair.client_key, known_hosts=[pair.known_hosts]
    )


class Lab:
    """Both guests set up: the export with the models, the mount, the daemon's config."""

    def __init__(self, remote: SshRunner, local: SshRunner, sums: dict[str, str]):
        self.remote, self.local, self.sums = remote, local, sums
        self.agent: DaemonAgent | None = None

    def start(self) -> DaemonAgent:
        assert self.agent is None
        self.agent = DaemonAgent(self.local, CONFIG, LOG)
        assert self.agent.ready["ok"], self.agent.ready
        return self.agent

    def stop(self) -> None:
        if self.agent is not None:
            agent, self.agent = self.agent, None
            bye = agent.close()
            assert bye.get("daemon_exit") == 0, bye

    def links(self) -> dict[str, str]:
        assert self.agent is not None
        return _ok(self.agent("links"))["links"]

    def partials(self) -> list[str]:
        return [n for n in self.local.listdir(POOL_PATH) if ".sl-partial-" in n]


@pytest.fixture(scope="module")
def lab(request, pair, tmp_path_factory) -> Iterator[Lab]:
    remote, local = _runner(pair, "remote"), _runner(pair, "local")
    missing = [t for t in ("/usr/sbin/rpc.nfsd", "/usr/sbin/exportfs", "/sbin/mount.nfs")
               if remote.run(["test", "-x", t]).returncode != 0]  # fmt: skip
    if missing:
        _loud_skip(request, f"the guest image has no {', '.join(missing)}: install "
                            "nfs-kernel-server and nfs-common (tests/vm/README.md)")  # fmt: skip
    t0 = time.monotonic()
    share_host(local)
    nfs.server_setup(remote)
    work = tmp_path_factory.mktemp("nfsmodels")
    make_gguf(work / f"{SMALL}.gguf", n_tensors=2, tensor_bytes=1 << 20)
    data = (work / f"{SMALL}.gguf").read_bytes()
    remote.write_bytes(f"{nfs.EXPORT}/{SMALL}.gguf", data)
    r = remote.run(["dd", "if=/dev/urandom", f"of={nfs.EXPORT}/{BIG}.gguf", "bs=1M",
                    f"count={BIG_MIB}"])  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = remote.run(["chmod", "0644", f"{nfs.EXPORT}/{SMALL}.gguf", f"{nfs.EXPORT}/{BIG}.gguf"])
    assert r.returncode == 0, r.stderr
    big_sum = remote.run(["sha256sum", f"{nfs.EXPORT}/{BIG}.gguf"]).stdout.split()[0]
    sums = {SMALL: hashlib.sha256(data).hexdigest(), BIG: big_sum}
    nfs.mount(local, COLD)
    config = {
        "modelsDir": f"{ROOT}/models",
        "storage": {"path": COLD, "type": "nfs"},
        "backend": {"type": "llamacpp"},
        "stateDir": f"{ROOT}/state",
        "pools": [{"name": POOL, "path": POOL_PATH, "size": "96M"}],
    }
    local.write_bytes(CONFIG, json.dumps(config).encode())
    _report(request, f"NFS export, models and mount ready in {time.monotonic() - t0:.1f} s "
                     f"(options {nfs.MOUNT_OPTIONS})")  # fmt: skip
    lab = Lab(remote, local, sums)
    yield lab
    lab.stop()
    remote.close()
    local.close()


def _model(agent: DaemonAgent, name: str) -> tuple[str, str]:
    m = _ok(agent("status"))["models"][name]
    return m["state"], m["tier"]


def test_nfs_catalog_promote_and_read_back_through_the_models_dir(request, lab):
    agent = lab.start()
    assert _ok(agent("cold"))["state"] == "available"
    assert _model(agent, SMALL) == ("cold", "cold")
    assert _model(agent, BIG) == ("cold", "cold")
    got = _ok(agent("read", rel=f"{SMALL}.gguf"))  # the gguf reader, through the link, cold
    assert (got["sha256"], got["target"]) == (lab.sums[SMALL], f"{COLD}/{SMALL}.gguf")

    t0 = time.monotonic()
    _ok(agent("promote", model=SMALL, pool=POOL))
    t_promote = time.monotonic() - t0
    assert _model(agent, SMALL) == ("hot", POOL)
    got = _ok(agent("read", rel=f"{SMALL}.gguf"))
    assert (got["sha256"], got["target"]) == (lab.sums[SMALL], f"{POOL_PATH}/{SMALL}.gguf")
    assert lab.partials() == []
    _report(request, f"NFS promote of a 2 MiB GGUF through the daemon: {t_promote:.1f} s")


def test_nfs_server_stopped_mid_promote_fails_cleanly_and_a_retry_works(request, lab):
    agent = lab.agent or lab.start()
    before = lab.links()
    job = _ok(agent("promote_start", model=BIG, pool=POOL))["job"]
    # BytesDone moves per 64 MiB chunk, so "mid-copy" is seen as the partial file in the pool
    deadline = time.monotonic() + 300
    while not lab.partials():
        assert time.monotonic() < deadline, "the promote never started its copy"
        time.sleep(0.05)
    t0 = time.monotonic()
    nfs.server_stop(lab.remote)  # exportfs -ua + rpc.nfsd 0, as `systemctl stop nfs-server`
    try:
        failed = agent("follow", job=job)
        t_fail = time.monotonic() - t0
    finally:
        nfs.server_start(lab.remote)
    assert not failed["ok"], failed
    assert failed["error"], failed  # one sentence, shown as is
    assert lab.partials() == []
    assert lab.local.run(["test", "-e", f"{POOL_PATH}/{BIG}.gguf"]).returncode != 0
    assert lab.links() == before  # the big model's link still points at cold storage
    assert before[f"{BIG}.gguf"] == f"{COLD}/{BIG}.gguf"
    # on cold storage; "degraded" while the daemon saw the cold file unreadable (ESTALE)
    state, tier = _model(agent, BIG)
    assert tier == "cold" and state in ("cold", "degraded"), (state, tier)
    assert _model(agent, SMALL) == ("hot", POOL)  # untouched by the failure

    t1 = time.monotonic()  # the server is back (a 10 s grace period first): a retry works
    _ok(agent("promote", model=BIG, pool=POOL))
    t_retry = time.monotonic() - t1
    got = _ok(agent("sha256", rel=f"{BIG}.gguf"))
    assert (got["sha256"], got["target"]) == (lab.sums[BIG], f"{POOL_PATH}/{BIG}.gguf")
    _report(request, f"NFS server stopped mid-promote: the job failed {t_fail:.1f} s later "
                     f"with {failed['error']!r}; the retry promoted {BIG_MIB} MiB in "
                     f"{t_retry:.1f} s")  # fmt: skip


def test_nfs_daemon_started_before_the_mount_waits_and_wipes_nothing(request, lab):
    lab.agent or lab.start()
    kept = lab.links()
    lab.stop()
    nfs.umount(lab.local, COLD)  # the daemon starts first, the mount comes late
    try:
        agent = lab.start()
        cold = _ok(agent("cold"))
        assert cold["state"] == "unavailable", cold
        assert cold["problem"], cold
        assert lab.links() == kept
        # The catalog is what a scan of cold storage finds, so it is empty until the mount
        # appears; the models dir and the RAM copy are kept, and a reader is served from RAM.
        assert _ok(agent("status"))["models"] == {}
        got = _ok(agent("sha256", rel=f"{SMALL}.gguf"))
        assert (got["sha256"], got["target"]) == (lab.sums[SMALL], f"{POOL_PATH}/{SMALL}.gguf")
        assert lab.local.run(["test", "-f", f"{POOL_PATH}/{SMALL}.gguf"]).returncode == 0
    finally:
        if not nfs.is_mounted(lab.local, COLD):
            nfs.mount(lab.local, COLD)
    # A new NFS mount has a new st_dev and NFS reports no f_fsid, so the daemon's own retry
    # sees "another filesystem than at the last scan" and waits for a person: the admin's
    # Rescan after mounting adopts it (tests/vm/README.md).
    t0 = time.monotonic()
    _ok(agent("rescan"))
    t_back = time.monotonic() - t0
    back = _ok(agent("cold"))
    assert back["state"] == "available", back
    assert set(_ok(agent("status"))["models"]) == {SMALL, BIG}
    assert lab.links() == kept
    assert _model(agent, SMALL) == ("hot", POOL)  # its RAM copy adopted, not copied again
    assert _model(agent, BIG) == ("hot", POOL)  # promoted by the retry of the test before
    _report(
        request,
        f"daemon started before the NFS mount: cold storage unavailable ({cold['problem']}); "
        f"after the mount a Rescan brought the models back in {t_back:.1f} s",
    )


def test_nfs_export_unmounted_or_emptied_at_rescan_wipes_nothing(request, lab):
    agent = lab.agent or lab.start()
    kept = lab.links()
    assert _model(agent, SMALL)[0] == "hot"

    nfs.umount(lab.local, COLD)
    try:
        gone = agent("rescan")
        assert not gone["ok"] and "kept" in gone["error"], gone
        # The new state arrives by PropertiesChanged: a failed call does not settle the
        # bus before its error reply (bus/auth.py), so a read right after may be stale.
        _ok(agent("wait_cold", state="unavailable", timeout=60))
        assert lab.links() == kept
        assert _ok(agent("sha256", rel=f"{SMALL}.gguf"))["sha256"] == lab.sums[SMALL]
    finally:
        nfs.mount(lab.local, COLD)
    _ok(agent("rescan"))
    assert _ok(agent("cold"))["state"] == "available"

    # emptied on the server: every file moved out of the export (renames on its filesystem)
    hide = f"{nfs.EXPORT_FS}/hidden"
    files = [f"{name}.gguf" for name in (SMALL, BIG)]
    assert lab.remote.run(["mkdir", "-p", hide]).returncode == 0
    r = lab.remote.run(["mv", *(f"{nfs.EXPORT}/{f}" for f in files), f"{hide}/"])
    assert r.returncode == 0, r.stderr
    try:
        emptied = agent("rescan")
        assert not emptied["ok"] and "kept" in emptied["error"], emptied
        assert lab.links() == kept
        assert _ok(agent("sha256", rel=f"{SMALL}.gguf"))["sha256"] == lab.sums[SMALL]
        status = _ok(agent("status"))
        assert set(status["models"]) == {SMALL, BIG}
    finally:
        # Back in one command, renames microseconds apart: the daemon's own retry (every
        # 5 s while cold storage is unavailable) must not scan a half-restored export, which
        # it would rightly take as the other model deleted.
        r = lab.remote.run(["mv", *(f"{hide}/{f}" for f in files), f"{nfs.EXPORT}/"])
        assert r.returncode == 0, r.stderr
    _ok(agent("rescan"))
    assert _ok(agent("cold"))["state"] == "available"
    assert lab.links() == kept
    _report(request, f"NFS unmounted at Rescan: {gone['error']!r}; emptied: "
                     f"{emptied['error']!r}")  # fmt: skip


def test_nfs_copy_method_noatime_page_cache_and_cp_benchmark(request, lab):
    """The engine's copy function from the NFS mount into a tmpfs, in the local guest,
    against cp of the same file; what the server's atime did."""
    lab.stop()  # the daemon's RAM is not needed here; give the guest's CPU to the copy
    local, remote = lab.local, lab.remote
    dst = "/mnt/nfsbench"
    assert local.run(["mkdir", "-p", dst]).returncode == 0
    r = local.run(["mount", "-t", "tmpfs", "-o", "size=96m,huge=within_size", "tmpfs", dst])
    assert r.returncode == 0, r.stderr
    src = f"{nfs.EXPORT}/{BIG}.gguf"
    atime0 = remote.run(["stat", "-c", "%X", src]).stdout.strip()
    try:
        r = local.run(["sh", "-c", f"cd {PROJECT_IN_GUEST} && PYTHONPATH={PROJECT_IN_GUEST} "
                       f"PYTHONDONTWRITEBYTECODE=1 {VENV}/bin/python -m tests.vm.nfs_probe "
                       f"{COLD}/{BIG}.gguf {dst}"])  # fmt: skip
        assert r.returncode == 0, r.stderr
    finally:
        local.run(["umount", dst])
    atime1 = remote.run(["stat", "-c", "%X", src]).stdout.strip()
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["same"], m
    assert m["method"] in ("copy_file_range", "sendfile", "readwrite")
    _report(
        request,
        f"NFS copy of {m['size'] >> 20} MiB: method {m['method']}, {m['seconds']:.1f} s; "
        f"cp {m['cp_seconds']:.1f} s (ratio cp/promote {m['cp_seconds'] / m['seconds']:.2f}); "
        f"O_NOATIME open: {m['o_noatime']}; source pages cached after the copy "
        f"{m['resident_after_copy']}/{m['pages']}, after cp {m['resident_after_cp']}/"
        f"{m['pages']}; Cached kB {m['cached_kib_before']} -> {m['cached_kib_after_copy']} "
        f"(copy) / {m['cached_kib_after_cp']} (cp); server atime {atime0} -> {atime1}; "
        f"f_fsid of the mount {m['f_fsid']}",
    )


PAR_SHARDS = 4
PAR_SHARD_MIB = 16  # 64 MiB: ~5 s a promote at the ~12 MB/s of the TCG guests' NFS
PAR_ROUNDS = 3


def test_nfs_parallel_copy_streams_measured(request, lab):
    """A 4-shard split GGUF on the export promoted by the engine in the local guest with
    storage.copyStreams 1, 2 and 4, interleaved rounds (tests/vm/parallel_probe.py). Reported,
    never asserted: the speed-up of parallel streams and how busy each guest's one vCPU was,
    which says whether NFS itself or the TCG CPU bounds a promote here."""
    lab.stop()  # the daemon is not needed; its catalog would otherwise see the new model
    local, remote = lab.local, lab.remote
    src = f"{nfs.EXPORT}/parallel"
    names = [f"par-{i + 1:05d}-of-{PAR_SHARDS:05d}.gguf" for i in range(PAR_SHARDS)]
    assert remote.run(["mkdir", "-p", "-m", "0755", src]).returncode == 0
    work = f"{ROOT}/parallel"
    try:
        for n in names:
            r = remote.run(["dd", "if=/dev/urandom", f"of={src}/{n}", "bs=1M",
                            f"count={PAR_SHARD_MIB}"])  # fmt: skip
            assert r.returncode == 0, r.stderr
        assert remote.run(["chmod", "0644", *(f"{src}/{n}" for n in names)]).returncode == 0
        assert local.run(["mkdir", "-p", "-m", "0755", work]).returncode == 0
        idle0, total0 = _cpu(remote)
        r = local.run(["sh", "-c", f"cd {PROJECT_IN_GUEST} && PYTHONPATH={PROJECT_IN_GUEST} "
                       f"PYTHONDONTWRITEBYTECODE=1 {VENV}/bin/python -m tests.vm.parallel_probe "
                       f"{COLD}/parallel {work} {PAR_ROUNDS}"])  # fmt: skip
        idle1, total1 = _cpu(remote)
        assert r.returncode == 0, r.stderr
    finally:
        local.run(["rm", "-rf", work])
        remote.run(["rm", "-rf", src])
    rows = [json.loads(line) for line in r.stdout.strip().splitlines() if line.startswith("{")]
    size = rows[-1]["size"]
    assert rows[-1]["done"] and size == PAR_SHARDS * PAR_SHARD_MIB << 20, rows[-1]
    runs = [x for x in rows[:-1] if "streams" in x]
    assert len(runs) == 3 * PAR_ROUNDS, runs
    by = {s: [x for x in runs if x["streams"] == s] for s in (1, 2, 4)}
    cats = {n: [x for x in rows[:-1] if x.get("cat") == n] for n in (1, 4)}
    assert [len(c) for c in cats.values()] == [PAR_ROUNDS, PAR_ROUNDS], rows

    def median(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    def speed(s: int) -> float:
        return size / median([x["seconds"] for x in by[s]]) / 1e6

    def ratio(s: int) -> float:  # per round, against that round's 1-stream promote
        one = {x["round"]: x["seconds"] for x in by[1]}
        return median([one[x["round"]] / x["seconds"] for x in by[s]])

    def busy(s: int) -> float:
        return 100 * median([x["cpu_busy"] for x in by[s]])

    def cat_ratio() -> float:  # per round: one cat of the four shards / four cats at once
        one = {x["round"]: x["seconds"] for x in cats[1]}
        return median([one[x["round"]] / x["seconds"] for x in cats[4]])

    def cat_speed(n: int) -> float:
        return size / median([x["seconds"] for x in cats[n]]) / 1e6

    def cat_busy(n: int) -> float:
        return 100 * median([x["cpu_busy"] for x in cats[n]])

    remote_busy = 100 * (1 - (idle1 - idle0) / max(total1 - total0, 1))
    _report(
        request,
        f"NFS promote of a {PAR_SHARDS}-shard {size >> 20} MiB model, median of {PAR_ROUNDS} "
        "interleaved rounds: "
        + ", ".join(
            f"copyStreams {s} {speed(s):.1f} MB/s ({ratio(s):.2f}x, local vCPU busy "
            f"{busy(s):.0f} %)"
            for s in (1, 2, 4)
        )
        + f"; reference without the engine: cat of the shards in turn {cat_speed(1):.1f} MB/s "
        f"(local vCPU busy {cat_busy(1):.0f} %), four cats at once {cat_speed(4):.1f} MB/s "
        f"({cat_ratio():.2f}x, busy {cat_busy(4):.0f} %); server vCPU busy "
        f"{remote_busy:.0f} % over the run",
    )


def _cpu(runner: SshRunner) -> tuple[int, int]:
    """(idle + iowait, total) jiffies of a guest's /proc/stat."""
    fields = [int(x) for x in runner.run(["head", "-n1", "/proc/stat"]).stdout.split()[1:]]
    return fields[3] + fields[4], sum(fields)
