"""A remote pool on the bus, with the real daemon: its Pool object, and a Connect Job whose
host cannot be reached (a closed port on 127.0.0.1) failing with one sentence and leaving
the pool as it was. Connecting for real needs two kernels: tests/test_vm_nvmeof.py."""

from __future__ import annotations

import json
import socket

from speedloader_client.client import POOL
from speedloaderd.bus.names import pool_path
from speedloaderd.config import dump_config

from .buslab import run


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_remote_pool_is_on_the_bus_and_an_unreachable_connect_fails_cleanly(daemon_factory):
    dl = daemon_factory()
    port = closed_port()
    config = dump_config(dl.config)
    config["remoteTiers"] = {
        "hosts": {
            "far": {
                "ssh": f"root@127.0.0.1:{port}",
                "rdmaIp": "127.0.0.1",
                "ramdiskSize": "64M",
                "transport": "tcp",
                "path": str(dl.lab.pool_path("far")),
            }
        }
    }
    dl.lab.config_path.write_text(json.dumps(config))
    dl.start()

    async def scenario():
        async with await dl.client() as c:
            far = pool_path("far")
            p = await c.get_all(far, POOL)
            assert (p["Kind"], p["State"], p["Path"], p["Speed"]) == (
                "nvmeof",
                "unmounted",
                str(dl.lab.pool_path("far")),
                50,
            )
            await c.subscribe()
            job = await c.pool_call(far, "Connect")
            result = await c.follow_job(job, timeout=120)
            assert not result.success
            assert f"root@127.0.0.1:{port}: cannot connect over SSH" in result.message
            assert "\n" not in result.message and "Traceback" not in result.message
            assert (await c.get_all(far, POOL))["State"] == "unmounted"
            local = await c.get_all(pool_path("local"), POOL)
            assert local["State"] == "mounted"

    run(scenario())
    assert not dl.lab.pool_path("far").exists() or not any(dl.lab.pool_path("far").iterdir())


def test_remote_tiers_set_live_add_a_pool_and_a_bad_one_is_refused_unsaved(daemon):
    good = json.loads(daemon.state()["config"])
    far = {"ssh": "root@127.0.0.1:9", "rdmaIp": "127.0.0.1", "ramdiskSize": "64M",
           "transport": "tcp"}  # fmt: skip
    overlapping = json.loads(json.dumps(good))
    overlapping["remoteTiers"] = {"hosts": {"far": far | {"path": str(daemon.lab.models)}}}
    added = json.loads(json.dumps(good))
    added["remoteTiers"] = {"hosts": {"far": far | {"path": str(daemon.lab.pool_path("far"))}}}

    async def scenario():
        async with await daemon.client() as c:
            from speedloader_client.client import ClientError

            try:
                await c.manager("SetConfig", "s", json.dumps(overlapping))
            except ClientError as err:
                refused = err
            else:
                raise AssertionError("SetConfig took a remote pool mounted over the models dir")
            assert refused.name.endswith("InvalidArgument")
            assert "remoteTiers.hosts.far.path" in refused.message
            assert "overlap" in refused.message
            assert json.loads(daemon.lab.config_path.read_text()) == good
            assert pool_path("far") not in await c.managed_objects()

            await c.manager("SetConfig", "s", json.dumps(added))
            p = await c.get_all(pool_path("far"), POOL)
            assert (p["Kind"], p["State"]) == ("nvmeof", "unmounted")
            assert json.loads(daemon.lab.config_path.read_text())["remoteTiers"] == {
                "hosts": {"far": far | {"path": str(daemon.lab.pool_path("far"))}}
            }

    run(scenario())
