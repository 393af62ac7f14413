"""The bus contract is spelled once: the clients' records (speedloader_client.records) agree
with the published interfaces (dbus/*.xml), property by property, and the daemon's value
maps and defaults come from the same table. No bus here: these are the tables themselves."""

from __future__ import annotations

import dataclasses
import re
import xml.etree.ElementTree as ET

import pytest

from speedloader_client.records import (
    COLD,
    DEFAULT_SPEED,
    RECORDS,
    Job,
    Manager,
    Model,
    Pool,
    Record,
    job_id,
)
from speedloader_lab.sandbox import REPO
from speedloaderd.bus.names import JOB_IFACE, MANAGER_IFACE, MODEL_IFACE, POOL_IFACE


def published() -> dict[str, dict[str, str]]:
    """Every interface of dbus/*.xml: its properties' names and signatures."""
    out: dict[str, dict[str, str]] = {}
    for path in sorted((REPO / "dbus").glob("org.speedloader.Speedloader1.*.xml")):
        for iface in ET.parse(path).getroot().iter("interface"):
            out[iface.get("name", "")] = {
                p.get("name", ""): p.get("type", "") for p in iface.iter("property")
            }
    return out


def snake(name: str) -> str:
    """``PinnedPool`` -> ``pinned_pool``, ``StartedByUID`` -> ``started_by_uid``."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])", "_", name).lower()


def test_every_interface_has_a_record():
    assert set(published()) == set(RECORDS) == {MANAGER_IFACE, POOL_IFACE, MODEL_IFACE, JOB_IFACE}


@pytest.mark.parametrize("iface", sorted(RECORDS))
def test_record_fields_are_the_published_properties(iface):
    record = RECORDS[iface]
    props = record.properties()
    assert {name: p.signature for name, p in props.items()} == published()[iface]
    # Every field but the object path is a property, named after it.
    fields = {f.name for f in dataclasses.fields(record)}
    assert fields - {p.field for p in props.values()} == {"path"}
    renamed = {(iface, "Path"): "mount"}  # Pool.Path is where it is mounted: path is taken
    for name, p in props.items():
        assert p.field == renamed.get((iface, name), snake(name)), (iface, name)


SIGNATURE_TYPES = {
    "s": str,
    "b": bool,
    "u": int,
    "t": int,
    "d": float,
    "as": list,
    "ao": list,
    "a(us)": list,
}


@pytest.mark.parametrize("iface", sorted(RECORDS))
def test_defaults_have_the_type_of_their_signature(iface):
    for name, p in RECORDS[iface].properties().items():
        assert type(p.default) is SIGNATURE_TYPES[p.signature], (iface, name, p.default)


def test_update_applies_a_getall_dict_by_dbus_names_and_ignores_unknown_ones():
    pool = Pool.from_props("/p", {"Name": "fast", "SizeBytes": 10, "UsedBytes": 5, "New": 1})
    assert (pool.name, pool.size_bytes, pool.used_bytes, pool.fraction) == ("fast", 10, 5, 0.5)
    pool.update({"State": "mounted", "Path": "/run/x", "Problem": "fabric lost"})
    assert pool.mounted and pool.mount == "/run/x" and pool.problem == "fabric lost"
    assert not hasattr(pool, "New")
    # Lists are the record's own: one record's problems are not another's.
    a, b = Model("/a"), Model("/b")
    a.problems.append("x")
    assert b.problems == [] and Model.defaults()["Problems"] == []
    assert (b.tier, b.state, b.hot) == (COLD, COLD, False)


def test_to_json_keeps_the_documented_slctl_keys():
    """``slctl status --json``: a contract with scripts (README), add keys, never rename."""
    pool = Pool.from_props("/p", {"Name": "local", "Path": "/run/p", "SizeBytes": 2})
    assert list(pool.to_json()) == [
        "name", "kind", "state", "path", "sizeBytes", "usedBytes", "speed", "heldBytes",
    ]  # fmt: skip
    assert pool.to_json()["path"] == "/run/p"
    model = Model.from_props("/m", {"Name": "tiny:1b", "PinnedPool": ""})
    assert list(model.to_json()) == [
        "name", "format", "sizeBytes", "tier", "pinnedPool", "state", "loaded", "holders",
        "lastUsed", "loadCount", "useCount", "value", "why",
    ]  # fmt: skip
    assert model.to_json()["pinnedPool"] is None
    assert (model.to_json()["lastUsed"], model.to_json()["loadCount"]) == (None, 0)  # never
    model.update({"Holders": [[900, "python3"]], "LastUsed": 1_764_648_306_123_456})
    assert model.to_json()["holders"] == [{"pid": 900, "command": "python3"}]
    assert model.to_json()["lastUsed"] == "2025-12-02T04:05:06.123456Z"  # µs, UTC
    job = Job.from_props("/org/speedloader/Speedloader1/jobs/7", {"BytesTotal": 3})
    assert job.to_json() == {
        "id": 7, "operation": "", "model": None, "pool": None,
        "bytesTotal": 3, "bytesDone": 0, "state": "running", "reason": "",
    }  # fmt: skip


def test_job_id_from_a_path():
    assert job_id("/org/speedloader/Speedloader1/jobs/12") == 12
    assert job_id("/") == 0  # NO_OBJECT: no job was started


def test_config_valid_defaults_alike_on_daemon_and_clients():
    """The drift the issue named: the daemon said False, both clients True."""
    assert Manager().config_valid is True
    assert Manager.defaults()["ConfigValid"] is True


def test_default_speed_is_the_daemons_config_default():
    from speedloaderd.config import PoolConfig

    assert PoolConfig(name="p", path="/run/speedloader/pools/p", size=1 << 20).speed == (
        DEFAULT_SPEED
    )


# --- the daemon's side ------------------------------------------------------------------


def _interfaces():
    from speedloaderd.bus.objects import JobInterface, ModelInterface, PoolInterface
    from speedloaderd.bus.server import Server
    from speedloaderd.jobs import Job as DaemonJob

    server = Server(None, None, "no config")
    return server, {
        MANAGER_IFACE: server.manager,
        POOL_IFACE: PoolInterface(server, "p"),
        MODEL_IFACE: ModelInterface(server, "m"),
        JOB_IFACE: JobInterface(server, DaemonJob("promote")),
    }


@pytest.mark.parametrize("iface", sorted(RECORDS))
def test_daemon_getters_serve_the_records_defaults(iface):
    """A fresh interface answers every property with the default the clients assume."""
    from dbus_fast.service import ServiceInterface

    _, interfaces = _interfaces()
    exported = interfaces[iface]
    served = {
        p.name: getattr(exported, p.prop_getter.__name__)
        for p in ServiceInterface._get_properties(exported)
    }
    named = {POOL_IFACE: {"Name": "p"}, MODEL_IFACE: {"Name": "m"}}.get(iface, {})
    assert served == RECORDS[iface].defaults() | named  # a Pool or Model knows its name


def test_a_value_map_naming_no_property_is_refused():
    _, interfaces = _interfaces()
    with pytest.raises(KeyError, match="Sizebytes"):
        interfaces[POOL_IFACE].update({"Sizebytes": 1})


def _keys(record: type[Record]) -> set[str]:
    return set(record.properties())


def test_daemon_value_maps_produce_exactly_the_properties(lab):
    from speedloaderd.bus.objects import job_values
    from speedloaderd.bus.server import model_values, pool_values
    from speedloaderd.engine import Engine, ModelStatus, PoolStatus
    from speedloaderd.jobs import Job as DaemonJob

    model = ModelStatus("m", "gguf", 1, COLD, "", COLD, ("bad",))
    assert set(model_values(model)) == _keys(Model)
    pool = PoolStatus("p", "tmpfs", "mounted", "/run/p", 2, 1, 1, DEFAULT_SPEED)
    assert set(pool_values(pool)) == _keys(Pool)
    assert set(job_values(DaemonJob("promote", model="m", pool="p"))) == _keys(Job)

    server, _ = _interfaces()
    # Without a configuration the Manager says why, and keeps the rest as it was.
    assert set(server._manager_values()) < _keys(Manager)
    server.daemon.engine = Engine(lab.config(), None)  # not started: its config is all it reads
    assert set(server._manager_values()) == _keys(Manager)


def test_job_error_name_is_served_from_the_job():
    import asyncio

    from speedloaderd.bus.objects import job_values
    from speedloaderd.errors import ERROR_PREFIX, NoSpace
    from speedloaderd.jobs import Job as DaemonJob
    from speedloaderd.jobs import run_job

    async def fail(job: DaemonJob) -> str:
        raise NoSpace("pool local has 1M free; the model needs 2M")

    async def scenario() -> tuple[str, str]:
        job = DaemonJob("promote", model="m")
        running = job_values(job)["ErrorName"]
        await run_job(job, fail)
        return running, job_values(job)["ErrorName"]

    assert asyncio.run(scenario()) == ("", ERROR_PREFIX + "NoSpace")  # as a failed call's
