"""Issue 9, finding 9 (how much remote RAM), against the real daemon on the test bus with
real polkitd: an absurd remote RAM size is refused with a named error, by SetConfig and by
Resize, and nothing changes (config file, pool objects, the pool's size).

The check against the remote host's MemAvailable, DH-HMAC-CHAP and the export's serial
need two kernels: tests/test_vm_nvmeof.py (an oversized connect and grow refused with
nothing left on either guest; no key and a wrong key refused by the target; a target that
is not our export never formatted). The plans: tests/test_nvmeof_plan.py.
"""

from __future__ import annotations

import json

from speedloader_client.client import POOL, ClientError
from speedloaderd.bus.names import pool_path

from ..buslab import run

FAR = {"ssh": "root@127.0.0.1:9", "rdmaIp": "127.0.0.1", "ramdiskSize": "64M", "transport": "tcp"}


def test_an_absurd_remote_ram_size_is_refused_by_set_config_and_nothing_changes(daemon):
    before = daemon.lab.config_path.read_bytes()
    config = json.loads(daemon.state()["config"])
    far = FAR | {"path": str(daemon.lab.pool_path("far")), "ramdiskSize": "1P"}
    config["remoteTiers"] = {"hosts": {"far": far}}

    async def scenario():
        async with await daemon.client() as c:
            try:
                await c.manager("SetConfig", "s", json.dumps(config))
            except ClientError as err:
                refused = err
            else:
                raise AssertionError("SetConfig took 1 PiB of remote RAM")
            assert refused.name == "InvalidArgument"
            assert "remoteTiers.hosts.far.ramdiskSize" in refused.message
            assert "out of range (16M to 16T)" in refused.message
            assert pool_path("far") not in await c.managed_objects()

    run(scenario())
    assert daemon.lab.config_path.read_bytes() == before


def test_resizing_a_remote_pool_to_an_absurd_size_is_refused_and_nothing_changes(daemon):
    config = json.loads(daemon.state()["config"])
    config["remoteTiers"] = {"hosts": {"far": FAR | {"path": str(daemon.lab.pool_path("far"))}}}

    async def scenario():
        async with await daemon.client() as c:
            await c.manager("SetConfig", "s", json.dumps(config))
            before = daemon.lab.config_path.read_bytes()
            far = pool_path("far")
            size = (await c.get_all(far, POOL))["SizeBytes"]
            await c.subscribe()
            job = await c.pool_call(far, "Resize", "s", "1P")
            result = await c.follow_job(job, timeout=60)
            assert not result.success
            assert "out of range (16M to 16T)" in result.message
            assert "\n" not in result.message and "Traceback" not in result.message
            p = await c.get_all(far, POOL)
            assert (p["SizeBytes"], p["State"]) == (size, "unmounted")
            assert daemon.lab.config_path.read_bytes() == before
            assert json.loads(before)["remoteTiers"]["hosts"]["far"]["ramdiskSize"] == "64M"

    run(scenario())
