"""``cold`` is the tier name of cold storage, so no pool may take it.

A pool named ``cold`` used to be accepted: a promote into it said "promoted" and copied the
files, yet every link still read as pointing at cold storage, and health then called the
copies orphans (a repair would have deleted them). The name is refused at every entry a
pool comes in by: the config file at start, SetConfig (a local pool, a remote tier, a pin)
and AddPool; each time with InvalidArgument naming the reason, and nothing changed: the
config file byte for byte, the objects on the bus, the pools' files and mounts, the models
dir's links.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from speedloader_client.client import MANAGER, ROOT
from speedloaderd.config import dump_config, parse_config
from speedloaderd.errors import ConfigError

from ..buslab import mounts_below, run

REASON = "is the tier name of cold storage"


def call(member: str, sig: str = "", *args) -> dict:
    return {"path": ROOT, "iface": MANAGER, "member": member, "sig": sig, "args": list(args)}


def tree(root: Path) -> list[tuple[str, str]]:
    """Every entry below ``root`` with what it is (a link's target), for before/after."""
    if not root.exists():
        return []
    out = []
    for p in sorted(root.rglob("*")):
        kind = f"-> {os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir() else "file"
        out.append((str(p.relative_to(root)), kind))
    return out


def seen(dl) -> dict:
    lab = dl.lab
    return {
        "config_file": lab.config_path.read_bytes(),
        "pools": tree(lab.root / "pools"),
        "models": tree(lab.models),
        "mounts": mounts_below(lab.root),
    }


def with_pool(config: dict, name: str, path: Path) -> dict:
    return {**config, "pools": [*config["pools"], {"name": name, "path": str(path), "size": "8M"}]}


@pytest.mark.parametrize("name", ["cold", "Cold"])
def test_the_config_refuses_a_pool_named_cold(tmp_path, name):
    base = {
        "modelsDir": str(tmp_path / "models"),
        "storage": {"path": str(tmp_path / "cold")},
        "backend": {"type": "ollama"},
    }
    local = {**base, "pools": [{"name": name, "path": "/run/speedloader/pools/x", "size": "8M"}]}
    remote = {**base, "remoteTiers": {"hosts": {name: {"ssh": "root@h", "ramdiskSize": "1G"}}}}
    for data in (local, remote):
        with pytest.raises(ConfigError, match=REASON):
            parse_config(data)


def test_a_pool_named_cold_is_refused_over_the_bus_and_changes_nothing(daemon):
    dl = daemon
    config = json.loads(dl.state()["config"])
    cold_pool = dl.lab.pool_path("cold")
    far = {"ssh": "root@127.0.0.1:9", "ramdiskSize": "64M", "transport": "tcp"}
    steps = [
        call("AddPool", "sssu", "cold", "", "8M", 100),
        call("AddPool", "sssu", "cold", str(cold_pool), "8M", 100),
        call("SetConfig", "s", json.dumps(with_pool(config, "cold", cold_pool))),
        call("SetConfig", "s", json.dumps({**config, "remoteTiers": {"hosts": {"cold": far}}})),
        call(
            "SetConfig",
            "s",
            json.dumps({**config, "modelPlacement": {"pinned": {"tiny:1b": "cold"}}}),
        ),
    ]
    before, objects_before = seen(dl), dl.state()
    results = dl.run_as(None, steps)  # root: nothing here is a matter of permission
    for step, result in zip(steps, results, strict=True):
        assert result.get("error") == "InvalidArgument", (step, result)
        assert "Traceback" not in result["message"]
    # AddPool and the pools refuse the name itself; the pin names a pool that cannot exist.
    assert all(REASON in r["message"] for r in results[:4]), results
    assert "'cold', which is not defined" in results[4]["message"], results[4]
    assert seen(dl) == before
    assert dl.state() == objects_before
    assert not cold_pool.exists()


def test_a_config_file_naming_a_pool_cold_starts_no_engine_and_changes_nothing(
    daemon_factory,
):
    dl = daemon_factory()
    config = dump_config(dl.config)
    bad = with_pool(config, "cold", dl.lab.pool_path("cold"))
    dl.lab.config_path.write_text(json.dumps(bad, indent=2) + "\n")
    before = seen(dl)
    dl.start()

    async def read():
        async with await dl.client() as c:
            return await c.get_all(ROOT, MANAGER)

    props = run(read())
    assert props["ConfigValid"] is False
    assert REASON in props["ConfigError"], props["ConfigError"]
    assert seen(dl) == before  # no pool mounted, no models dir made, the file as it was
