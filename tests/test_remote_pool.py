"""RemotePool in the engine, without a VM: state from sysfs, adoption, connect from a clean
slate, grow and shrink, disconnect with a dead host, and the health watch that gives up a
lost pool and serves its models from cold storage.

The runners are the recording test double of the plan tests (they record argv lists and
serve a tiny sysfs and /proc/mounts); everything else is real: the engine, its journal,
the models dir, copies into the pool's directory and the readers. The same code runs
against two real kernels in tests/test_vm_nvmeof.py (test_engine_*).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from pathlib import Path

import pytest

from speedloader_lab.modelgen import make_ollama_model
from speedloaderd.config import RemoteHostConfig, parse_config
from speedloaderd.errors import Busy, Failed, InvalidArgument
from speedloaderd.pools import PoolState
from speedloaderd.remote.nvmeof import connect_plan, detach_plan
from speedloaderd.remote.pool import RemotePool
from speedloaderd.remote.runners import RemoteUnreachable

from .lab import MiB, run
from .test_nvmeof_plan import HOSTNQN, RecordingRunner

CLIENT = "gpu1"
SECTORS_1G = str((1 << 30) // 512)


def nqn(pool: str) -> str:
    return f"nqn.2024-01.org.speedloader:{CLIENT}:{pool}"


class FakeHost:
    """The local machine as the runner double shows it: identity, a controller, a mount."""

    def __init__(self, pool: str, path: Path):
        self.pool, self.path = pool, path
        self.log: list = []
        self.local = RecordingRunner("local", self.log)
        self.remote = RecordingRunner(
            "remote",
            self.log,
            outputs={"losetup --find": "/dev/loop3\n", "losetup --list": "/dev/loop3\n"},
            files={"/proc/meminfo": "MemTotal: 67108864 kB\nMemAvailable: 60000000 kB\n"},
            peer=self.local,
        )
        self.set(controller=None, mounted=False)

    def set(self, controller: str | None, mounted: bool) -> None:
        """controller: None (no controller) or its state ("live", "connecting"...)."""
        files = {
            "/proc/sys/kernel/hostname": CLIENT + "\n",
            "/etc/nvme/hostnqn": HOSTNQN + "\n",
            "/proc/mounts": "proc /proc proc rw 0 0\n",
        }
        if controller is not None:
            files |= {
                "/sys/class/nvme/nvme0/serial": self.local.files.get(
                    "/sys/class/nvme/nvme0/serial", ""
                ),
                "/sys/class/nvme/nvme0/subsysnqn": nqn(self.pool) + "\n",
                "/sys/class/nvme/nvme0/state": controller + "\n",
                "/sys/class/nvme/nvme0/nvme0c0n1/size": SECTORS_1G + "\n",
                "/sys/class/block/nvme0n1/size": SECTORS_1G + "\n",
            }
        if mounted:
            files["/proc/mounts"] += f"/dev/nvme0n1 {self.path} ext4 rw,nosuid,nodev 0 0\n"
        self.local.files = files

    def commands(self, host: str | None = None) -> list[str]:
        return [" ".join(argv) for h, argv, _ in self.log if host in (None, h)]


def host_config(path: Path, size: str = "64M") -> RemoteHostConfig:
    return RemoteHostConfig.model_validate(
        {
            "ssh": "root@ram-host",
            "rdmaIp": "10.0.0.7",
            "ramdiskSize": size,
            "transport": "tcp",
            "path": str(path),
        }
    )


def make_pool(tmp_path: Path, name: str = "far") -> tuple[RemotePool, FakeHost]:
    path = tmp_path / name
    fake = FakeHost(name, path)
    pool = RemotePool(name, host_config(path), None, local=fake.local, remote=fake.remote)
    return pool, fake


# --------------------------------------------------------------------------- the pool


def test_state_follows_the_probe_and_a_lost_pool_stays_degraded(tmp_path):
    pool, fake = make_pool(tmp_path)
    assert (pool.kind, pool.state()) == ("nvmeof", PoolState.UNMOUNTED)
    fake.set("live", mounted=True)
    assert pool.state() is PoolState.MOUNTED
    fake.set("connecting", mounted=True)  # fabric gone: the controller is reconnecting
    assert pool.state() is PoolState.DEGRADED
    fake.set(None, mounted=True)  # controller deleted, ext4 still mounted on the dead disk
    assert pool.state() is PoolState.DEGRADED
    fake.set(None, mounted=False)
    assert pool.state() is PoolState.UNMOUNTED
    pool.connected = True  # connected by us, now nothing of it is here
    assert pool.state() is PoolState.DEGRADED
    pool.connected, pool.lost = False, "controller is connecting"
    fake.set("live", mounted=True)  # back by itself: still given up until a Connect
    assert pool.state() is PoolState.DEGRADED
    assert fake.log == []  # looking never runs a command


def test_startup_adopts_a_connected_pool_and_never_connects(tmp_path):
    pool, fake = make_pool(tmp_path)
    pool.startup()
    assert (pool.connected, pool.state()) == (False, PoolState.UNMOUNTED)
    fake.set("live", mounted=True)
    pool.startup()
    assert (pool.connected, pool.state()) == (True, PoolState.MOUNTED)
    assert fake.log == []


def test_a_pool_without_path_gets_one_and_bad_entries_name_their_key(tmp_path):
    cfg = RemoteHostConfig.model_validate({"ssh": "root@10.0.0.2", "ramdiskSize": "1G"})
    assert RemotePool("gpu-node-2", cfg, None).path == Path("/run/speedloader/pools/gpu-node-2")
    bad = host_config(tmp_path / "p", size="1000000000")
    with pytest.raises(InvalidArgument, match=r"remoteTiers.hosts.p.ramdiskSize"):
        RemotePool("p", bad, None)


def test_connect_starts_from_a_clean_slate_and_reports_each_step(tmp_path):
    pool, fake = make_pool(tmp_path)
    fake.set("new", mounted=False)  # what nvme connect leaves before the namespace is live
    fake.local.exists = fake.remote.exists = False  # guards: nothing else is left
    reports: list[tuple[int, int, str]] = []
    pool.mount(lambda done, total, step: reports.append((done, total, step)))
    spec = dataclasses.replace(pool.spec(), serial="0" * 20)  # with the export's serial check
    names = [s.name for s in connect_plan(spec).steps]
    assert reports == [(i, len(names), n) for i, n in enumerate(names)]
    ran = fake.commands()
    # first the guarded teardown of anything left (here: an unlive controller), then the
    # checks before connect (RAM to lend, auth support) that load modules, then connect
    assert ran[0] == f"mountpoint -q {pool.path}"
    assert ran[1] == f"nvme disconnect --nqn {nqn('far')}"
    prepare = ran.index("modprobe -a nvmet nvmet-tcp")
    assert all(c.startswith(("test ", "mountpoint ", "losetup ")) for c in ran[2:prepare])
    first_connect = ran.index("modprobe -a loop nvmet nvmet-tcp")
    assert ran[prepare:first_connect] == [
        "modprobe -a nvmet nvmet-tcp", "modprobe nvme-fabrics", "cat /dev/nvme-fabrics",
    ]  # fmt: skip
    assert ran[-1] == f"mount -t ext4 -o nosuid,nodev,noatime /dev/nvme0n1 {pool.path}"
    assert (pool.connected, pool.lost) == (True, "")


def test_connect_refuses_to_hide_files_or_to_mount_over_something_else(tmp_path):
    pool, fake = make_pool(tmp_path)
    pool.path.mkdir()
    (pool.path / "precious").write_text("x")
    with pytest.raises(Busy, match="not empty and not a mount"):
        pool.mount()
    fake.local.files["/proc/mounts"] += f"tmpfs {pool.path} tmpfs rw 0 0\n"
    with pytest.raises(Busy, match=f"tmpfs is mounted at {pool.path}"):
        pool.mount()
    assert fake.log == []


def test_grow_runs_online_and_shrink_is_refused_with_the_way_to_do_it(tmp_path):
    pool, fake = make_pool(tmp_path)
    fake.set("live", mounted=True)
    with pytest.raises(InvalidArgument, match="cannot shrink .* Disconnect, Resize, then Connect"):
        pool.resize(32 * MiB)
    assert fake.log == []
    pool.resize(128 * MiB)
    assert "resize2fs /dev/nvme0n1" in fake.commands("local")
    assert f"fallocate --length {128 * MiB} /run/speedloader/nvmeof/gpu1.far/ram" in (
        fake.commands("remote")
    )
    assert (pool.size, pool.cfg.ramdisk_size) == (128 * MiB, 128 * MiB)
    fake.set(None, mounted=False)
    pool.connected = False
    pool.resize(32 * MiB)  # not connected: only the size of the next connect changes
    assert pool.size == 32 * MiB


def test_disconnect_detaches_here_even_when_the_remote_host_is_gone(tmp_path):
    pool, fake = make_pool(tmp_path)
    fake.set("connecting", mounted=True)
    pool.connected, pool.lost = True, "lost"

    def unreachable(argv, stdin=None):
        raise RemoteUnreachable("root@ram-host:22: cannot connect over SSH: timed out")

    fake.remote.run = unreachable
    with pytest.raises(Failed, match="disconnected here, but its export on ram-host was not "):
        pool.unmount()
    local = [s.do.show() for s in detach_plan(pool.spec()).steps]
    assert fake.commands("local")[:2] == [f"mountpoint -q {pool.path}", f"umount {pool.path}"]
    assert any("nvme disconnect" in c for c in local)
    assert (pool.connected, pool.lost) == (False, "")


# --------------------------------------------------------------------------- the engine


def engine_config(lab, tmp_path: Path):
    return parse_config(
        {
            "modelsDir": str(lab.models),
            "storage": {"path": str(lab.cold)},
            "backend": {"type": "ollama"},
            "stateDir": str(lab.state),
            "remoteTiers": {
                "hosts": {
                    "far": {
                        "ssh": "root@ram-host",
                        "rdmaIp": "10.0.0.7",
                        "ramdiskSize": "64M",
                        "transport": "tcp",
                        "path": str(lab.pool_path("far")),
                    }
                }
            },
        }
    )


async def remote_engine(lab, tmp_path, live: bool = True, watch_interval: float = 3600.0):
    from speedloaderd.engine import Engine

    engine = Engine(engine_config(lab, tmp_path), None)
    engine.watch_interval = watch_interval
    pool = engine.pools["far"]
    assert isinstance(pool, RemotePool)
    fake = FakeHost("far", pool.path)
    pool.local, pool._remote = fake.local, fake.remote  # the runner double, nothing else
    lab.pool_path("far").mkdir(parents=True, exist_ok=True)
    fake.set("live" if live else None, mounted=live)
    await engine.start()
    return engine, fake


def test_engine_adopts_a_connected_remote_pool_at_start_and_never_connects(lab, tmp_path):
    make_ollama_model(lab.cold, "m:1", [MiB])
    lab.seal()

    async def scenario():
        engine, fake = await remote_engine(lab, tmp_path)
        st = engine.pool_status("far")
        assert (st.kind, st.state) == ("nvmeof", "mounted")
        await engine.shutdown()
        engine2, fake2 = await remote_engine(lab, tmp_path, live=False)
        assert engine2.pool_status("far").state == "unmounted"
        await engine2.shutdown()
        assert fake.log == fake2.log == []

    run(scenario())


def test_lost_pool_serves_models_from_cold_untouched_and_connect_restores(lab, tmp_path, caplog):
    m = make_ollama_model(lab.cold, "m:1", [MiB, 4096])
    lab.seal()
    rels = [b.rel for b in m.blobs]

    async def scenario():
        engine, fake = await remote_engine(lab, tmp_path)
        await engine.promote("m:1", "far").wait()
        assert engine.model_status("m:1").tier == "far"
        pool_files = lab.pool_files("far")
        assert pool_files == sorted(rels)
        stamps = {r: os.stat(lab.pool_path("far") / r).st_mtime_ns for r in rels}

        fake.set("connecting", mounted=True)  # the fabric is gone
        with caplog.at_level(logging.ERROR, logger="speedloaderd.engine"):
            assert await engine.remote_watch.check() == ["far"]
            assert await engine.remote_watch.check() == []  # given up once, said once
        lost = [r.getMessage() for r in caplog.records if "lost pool far:" in r.getMessage()]
        assert len(lost) == 1
        assert "1 model(s) now served from cold storage" in lost[0]
        assert "nvme0 is connecting" in lost[0]
        status = engine.pool_status("far")
        assert status.state == "degraded" and "nvme0 is connecting" in status.problem
        st = engine.model_status("m:1")
        assert (st.state, st.tier) == ("cold", "cold")
        for rel in rels:
            assert lab.link(rel) == str(lab.cold / rel)
        # the dead pool's files were not touched: not deleted, not written
        assert lab.pool_files("far") == pool_files
        assert {r: os.stat(lab.pool_path("far") / r).st_mtime_ns for r in rels} == stamps
        assert fake.log == []
        with pytest.raises(Failed, match="pool 'far' is not connected"):
            await engine.promote("m:1", "far").wait()

        fake.set("live", mounted=True)  # the fabric is back: still degraded until Connect
        assert engine.pool_status("far").state == "degraded"
        job = engine.connect_pool("far")
        msg = await job.wait()
        assert "pool far connected to ram-host over tcp" in msg
        steps = connect_plan(dataclasses.replace(engine.pools["far"].spec(), serial="0")).steps
        assert job.steps_done == job.steps_total == len(steps)
        assert fake.commands()[:2] == [f"mountpoint -q {lab.pool_path('far')}",
                                       f"umount {lab.pool_path('far')}"]  # fmt: skip
        assert (engine.pool_status("far").state, engine.pool_status("far").problem) == (
            "mounted",
            "",
        )
        assert lab.pool_files("far") == []  # the stale copies were collected after connect
        await engine.promote("m:1", "far").wait()
        assert engine.model_status("m:1").state == "hot"
        await engine.shutdown()

    run(scenario())


def test_the_watch_task_notices_a_lost_pool_by_itself(lab, tmp_path):
    make_ollama_model(lab.cold, "m:1", [MiB])
    lab.seal()

    async def scenario():
        engine, fake = await remote_engine(lab, tmp_path, watch_interval=0.05)
        await engine.promote("m:1", "far").wait()
        lost = asyncio.Event()
        engine.listeners.append(
            lambda kind, name: lost.set() if (kind, name) == ("pool", "far") else None
        )
        fake.set(None, mounted=True)  # the controller was deleted
        await asyncio.wait_for(lost.wait(), timeout=30)
        assert engine.pool_status("far").state == "degraded"
        assert engine.model_status("m:1").state == "cold"
        await engine.shutdown()
        assert engine._watch is None

    run(scenario())


def test_a_local_pool_may_not_overlap_a_remote_one(lab, tmp_path):
    from speedloaderd.config import PoolConfig

    async def scenario():
        engine, fake = await remote_engine(lab, tmp_path, live=False)
        inside = PoolConfig(name="x", path=lab.pool_path("far") / "x", size=MiB)
        with pytest.raises(InvalidArgument, match="overlaps remote pool 'far'"):
            await engine.add_pool(inside)
        assert "x" not in engine.pools and "x" not in {p.name for p in engine.config.pools}
        await engine.shutdown()

    run(scenario())
