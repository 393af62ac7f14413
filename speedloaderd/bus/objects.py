"""The exported interfaces: Manager, Pool, Model, Job. Each is a thin view of the engine.

Properties are served from a snapshot the server refreshes (and diffs, to emit
PropertiesChanged with only what changed), so a GetManagedObjects of 10,000 models reads
memory, not the filesystem.
"""

# No "from __future__ import annotations": dbus-fast reads D-Bus signatures from annotations.

import json
from pathlib import Path
from typing import Any, Protocol

from dbus_fast.aio import MessageBus
from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_property, method, signal

from speedloader_client.records import RECORDS

from .. import __version__
from ..config import PoolConfig, parse_config
from ..daemon import Daemon
from ..engine import Engine
from ..errors import InvalidArgument
from ..jobs import Job
from ..sizes import parse_size
from .auth import Polkit, caller_uid, exported
from .names import (
    ACTION_ADMINISTER,
    ACTION_CONFIGURE,
    ACTION_DEMOTE,
    ACTION_MANAGE_POOLS,
    ACTION_PIN,
    ACTION_PROMOTE,
    JOB_IFACE,
    MANAGER_IFACE,
    MODEL_IFACE,
    NO_OBJECT,
    POOL_IFACE,
    model_path,
    pool_path,
)

READ = PropertyAccess.READ


def _promote_options(options: dict[str, Any]) -> bool:
    """The ``reload`` flag of PromoteWithOptions' options; anything else is refused."""
    unknown = sorted(set(options) - {"reload"})
    if unknown:
        raise InvalidArgument(f"unknown promote option {unknown[0]!r}; the one option is 'reload'")
    value = options.get("reload")
    if value is None:
        return False
    if value.signature != "b":
        raise InvalidArgument(
            f"promote option 'reload' must be a boolean (b), not {value.signature!r}"
        )
    return bool(value.value)


class ObjectHost(Protocol):
    """What the exported objects use of the server (bus/server.py's Server is one): the
    connection and polkit, the daemon, and the server's publishing. The objects import
    nothing from the server, so it can import them."""

    @property
    def bus(self) -> MessageBus | None: ...

    @property
    def polkit(self) -> Polkit: ...

    @property
    def daemon(self) -> Daemon: ...

    @property
    def config_path(self) -> Path | None: ...

    def require_engine(self) -> Engine: ...

    async def settle(self) -> None:
        """Publish pending property changes before a reply."""
        ...

    def job_object(self, job: Job) -> str:
        """The object path of ``job``, exported if it was not yet."""
        ...

    def config_json(self) -> str: ...

    def list_models(self, offset: int, limit: int, filters: dict[str, Any]) -> list[Any]: ...

    def list_pools(self) -> list[Any]: ...

    def list_jobs(self) -> list[Any]: ...

    async def tiering_plan(self) -> list[Any]: ...


def _size_arg(text: str) -> int:
    try:
        size = parse_size(text)
    except ValueError as err:
        raise InvalidArgument(str(err)) from None
    if size <= 0:
        raise InvalidArgument(f"size {text!r} must be more than 0 bytes")
    return size


class Snapshot(ServiceInterface):
    """An interface whose properties come from a dict the server keeps current.

    The properties, their signatures and their defaults are the table in
    speedloader_client.records (the clients' records): every value starts at the default a
    client assumes, and a value map naming a property the table does not have is a bug.
    """

    def __init__(self, name: str, server: ObjectHost):
        super().__init__(name)
        self.server = server
        self.values: dict[str, Any] = RECORDS[name].defaults()

    def update(self, values: dict[str, Any]) -> dict[str, Any]:
        """Store new values; return those that changed (for PropertiesChanged)."""
        unknown = values.keys() - self.values.keys()
        if unknown:
            raise KeyError(f"{self.name} has no properties {sorted(unknown)}")
        changed = {k: v for k, v in values.items() if self.values[k] != v}
        self.values.update(changed)
        return changed


class ManagerInterface(Snapshot):
    def __init__(self, server: ObjectHost):
        super().__init__(MANAGER_IFACE, server)

    @property
    def engine(self):
        return self.server.require_engine()

    # --- properties ---

    @dbus_property(access=READ)
    def Version(self) -> "s":
        return self.values["Version"]

    @dbus_property(access=READ)
    def ConfigValid(self) -> "b":
        return self.values["ConfigValid"]

    @dbus_property(access=READ)
    def ConfigPath(self) -> "s":
        return self.values["ConfigPath"]

    @dbus_property(access=READ)
    def ConfigError(self) -> "s":
        return self.values["ConfigError"]

    @dbus_property(access=READ)
    def Backend(self) -> "s":
        return self.values["Backend"]

    @dbus_property(access=READ)
    def BackendApiUrl(self) -> "s":
        return self.values["BackendApiUrl"]

    @dbus_property(access=READ)
    def BackendState(self) -> "s":
        """up, down (nothing answered at apiUrl) or unknown (no server to ask, or an answer
        that could not be read); asked every 15 s."""
        return self.values["BackendState"]

    @dbus_property(access=READ)
    def BackendStateReason(self) -> "s":
        """BackendState's reason, one sentence naming the URL and what came back."""
        return self.values["BackendStateReason"]

    @dbus_property(access=READ)
    def ModelsDir(self) -> "s":
        return self.values["ModelsDir"]

    @dbus_property(access=READ)
    def ColdStorage(self) -> "s":
        return self.values["ColdStorage"]

    @dbus_property(access=READ)
    def ColdStorageState(self) -> "s":
        """Either available, or unavailable (missing, empty, another filesystem): then the
        catalog, the links and the RAM copies are kept as they were, and retried."""
        return self.values["ColdStorageState"]

    @dbus_property(access=READ)
    def ColdStorageProblem(self) -> "s":
        """Why cold storage is unavailable, in one sentence; "" when it is available."""
        return self.values["ColdStorageProblem"]

    @dbus_property(access=READ)
    def ScanProblems(self) -> "as":
        """What the last scan found wrong that belongs to no model (at most a few hundred)."""
        return self.values["ScanProblems"]

    @dbus_property(access=READ)
    def Strategy(self) -> "s":
        return self.values["Strategy"]

    @dbus_property(access=READ)
    def ModelCount(self) -> "u":
        """How many Model objects there are; ListModels reads them in pages."""
        return self.values["ModelCount"]

    @dbus_property(access=READ)
    def Tiering(self) -> "s":
        """Automatic tiering: "on" or "off" (autoTiering.enabled)."""
        return self.values["Tiering"]

    @dbus_property(access=READ)
    def TieringPaused(self) -> "s":
        """While tiering is on: why it does nothing now; "" when it acts."""
        return self.values["TieringPaused"]

    @dbus_property(access=READ)
    def TieringWatch(self) -> "s":
        """Whether file opens are seen: watching, unavailable or off."""
        return self.values["TieringWatch"]

    @dbus_property(access=READ)
    def TieringWatchReason(self) -> "s":
        return self.values["TieringWatchReason"]

    @dbus_property(access=READ)
    def TieringNextEviction(self) -> "s":
        """The model the next eviction would take: "name from pool (why)"; "" if none."""
        return self.values["TieringNextEviction"]

    # --- methods ---

    @method()
    @exported(ACTION_PROMOTE)
    async def Promote(self, model: "s", pool: "s") -> "o":
        uid = await caller_uid(self.server.bus)  # the Job's StartedByUID
        return self.server.job_object(self.engine.promote(model, pool or None, uid))

    @method()
    @exported(ACTION_PROMOTE)
    async def PromoteWithOptions(self, model: "s", pool: "s", options: "a{sv}") -> "o":
        """Promote, with options (UDisks2's a{sv} idiom, so more can come without a new
        method): ``reload`` (b) has the backend load the model again from the pool when it
        had it loaded from cold storage. An unknown option is InvalidArgument, not ignored."""
        reload = _promote_options(options)
        uid = await caller_uid(self.server.bus)
        return self.server.job_object(self.engine.promote(model, pool or None, uid, reload))

    @method()
    @exported(ACTION_DEMOTE)
    async def Demote(self, model: "s") -> "o":
        uid = await caller_uid(self.server.bus)  # the Job's StartedByUID
        return self.server.job_object(self.engine.demote(model, uid))

    @method()
    @exported(ACTION_PIN)
    async def Pin(self, model: "s", pool: "s") -> "o":
        uid = await caller_uid(self.server.bus)  # the Job's StartedByUID
        job = await self.engine.pin(model, pool, uid)
        return self.server.job_object(job) if job is not None else NO_OBJECT

    @method()
    @exported(ACTION_PIN)
    async def Unpin(self, model: "s"):
        await self.engine.unpin(model)

    @method()
    @exported(ACTION_ADMINISTER, "adding a pool needs an administrator (it names a path)")
    async def AddPool(self, name: "s", path: "s", size: "s", speed: "u") -> "o":
        # An empty path means the one place a new pool may go: <poolsRoot>/<name>.
        where = path or str(self.engine.config.pools_root / name)
        try:
            fields = {"name": name, "path": where, "size": _size_arg(size), "speed": speed}
            pc = PoolConfig.model_validate(fields)  # the path as given: the config checks it
        except ValueError as err:
            raise InvalidArgument(f"pool {name!r}: {_first_error(err)}") from None
        await self.engine.add_pool(pc)
        return pool_path(name)

    @method()
    @exported(ACTION_ADMINISTER, "removing a pool needs an administrator")
    async def RemovePool(self, name: "s"):
        await self.engine.remove_pool(name)

    @method()
    @exported(ACTION_MANAGE_POOLS)
    async def Rescan(self) -> "u":
        return await self.engine.rescan()

    @method()
    @exported()
    async def Health(self, repair: "b", verify_digests: "b") -> "(ba(ssssb))":
        # A look is free; repairing changes the models dir, and verifying reads every
        # byte of every hot model: both need the right to manage pools.
        if repair or verify_digests:
            await self.server.polkit.check(ACTION_MANAGE_POOLS)
        report = await self.engine.health(repair=repair, verify_digests=verify_digests)
        if repair:
            await self.server.settle()
        return [report.ok, bounded_findings(report.findings)]

    @method()
    @exported()
    async def ListModels(self, offset: "u", limit: "u", filters: "a{sv}") -> "ua(oa{sv})":
        """Models in name order, a page at a time: what GetManagedObjects answers for a
        catalog too big for one message (it then says TooLarge). ``filters``: ``name``
        (substring, any case), ``state``, ``tier``, ``format`` (exact), ``after`` (names
        after this one: a cursor that insertions and removals do not shift). ``limit`` 0
        or above 2,000 means 2,000; a page also ends at 4 MiB. Returns how many models
        match, and the page: object paths with the Model interface's properties."""
        return self.server.list_models(offset, limit, filters)

    @method()
    @exported()
    async def ListPools(self) -> "a(oa{sv})":
        """Every pool with the Pool interface's properties (with ListModels and ListJobs,
        the state without GetManagedObjects)."""
        return self.server.list_pools()

    @method()
    @exported()
    async def ListJobs(self) -> "a(oa{sv})":
        """Every job still exported (running, or finished in the last minutes), with the
        Job interface's properties."""
        return self.server.list_jobs()

    @method()
    @exported()
    async def TieringPlan(self) -> "a(ssss)":
        """What automatic tiering would do now, in order, whether it is on or off (a dry
        run: nothing moves): (action "promote" or "evict", model, pool, reason); an
        eviction's pool is the one it leaves."""
        return await self.server.tiering_plan()

    @method()
    @exported()
    async def GetConfig(self) -> "s":
        return self.server.config_json()

    @method()
    @exported(ACTION_CONFIGURE)
    async def SetConfig(self, config_json: "s"):
        # Past .configure (strategy, pins, speeds); anything else the new config changes
        # needs .administer too, asked before anything is saved or applied.
        try:
            data = json.loads(config_json)
        except ValueError as err:
            raise InvalidArgument(f"the configuration is not valid JSON: {err}") from None
        except RecursionError:  # "[" * 100000: the parser's stack, not a config
            raise InvalidArgument(
                "the configuration is nested too deeply to be read; send a flat JSON object"
            ) from None
        new = parse_config(data, "new configuration")
        admin_keys = self.server.daemon.admin_changes(new)
        if admin_keys:
            await self.server.polkit.check(
                ACTION_ADMINISTER,
                f"changing {', '.join(admin_keys)} needs an administrator "
                "(a member may change only the strategy, pins and pool speeds)",
            )
        await self.server.daemon.set_config(new)

    @method()
    @exported()
    async def GetVersion(self) -> "s":
        return __version__


# Health's reply grows with the catalog (a finding per broken model): it carries at most
# this much, problems before the checks that passed, and says how many it left out.
HEALTH_BYTES = 4 << 20


def bounded_findings(findings: list) -> list[list]:
    ordered = sorted(findings, key=lambda f: f.status.value == "ok")  # stable: problems first
    out: list[list] = []
    size = 0
    for n, f in enumerate(ordered):
        row = [f.check, f.status.value, f.subject, f.message, f.repaired]
        size += 32 + 4 * sum(len(str(v)) for v in row)
        if size > HEALTH_BYTES:
            left = ordered[n:]
            bad = sum(1 for x in left if x.status.value != "ok")
            out.append(
                [
                    "findings",
                    "warning" if bad else "ok",
                    "",
                    f"{len(left)} more findings ({bad} of them problems) do not fit in one "
                    "reply; fix the problems shown and run health again",
                    False,
                ]
            )
            break
        out.append(row)
    return out


def _first_error(err: ValueError) -> str:
    errors = getattr(err, "errors", None)
    if callable(errors):
        e = errors()[0]
        loc = ".".join(str(p) for p in e["loc"])
        return f"{loc}: {e['msg'].removeprefix('Value error, ')}"
    return str(err)


class PoolInterface(Snapshot):
    def __init__(self, server: ObjectHost, name: str):
        super().__init__(POOL_IFACE, server)
        self.pool_name = name
        self.values["Name"] = name

    @dbus_property(access=READ)
    def Name(self) -> "s":
        return self.values["Name"]

    @dbus_property(access=READ)
    def Kind(self) -> "s":
        return self.values["Kind"]

    @dbus_property(access=READ)
    def State(self) -> "s":
        return self.values["State"]

    @dbus_property(access=READ)
    def Path(self) -> "s":
        return self.values["Path"]

    @dbus_property(access=READ)
    def SizeBytes(self) -> "t":
        return self.values["SizeBytes"]

    @dbus_property(access=READ)
    def UsedBytes(self) -> "t":
        return self.values["UsedBytes"]

    @dbus_property(access=READ)
    def FreeBytes(self) -> "t":
        return self.values["FreeBytes"]

    @dbus_property(access=READ)
    def Speed(self) -> "u":
        return self.values["Speed"]

    @dbus_property(access=READ)
    def Problem(self) -> "s":
        """Why the pool is degraded (e.g. the fabric was lost); empty when it is not."""
        return self.values["Problem"]

    @dbus_property(access=READ)
    def HeldBytes(self) -> "t":
        """RAM of deleted copies a process still maps or has open (counted in UsedBytes)."""
        return self.values["HeldBytes"]

    # Connecting a configured remote tier is operating a configured pool: the host, the
    # address and the size it uses were all set by an admin.
    @method()
    @exported(ACTION_MANAGE_POOLS)
    async def Connect(self) -> "o":
        uid = await caller_uid(self.server.bus)
        engine = self.server.require_engine()
        return self.server.job_object(engine.connect_pool(self.pool_name, uid))

    @method()
    @exported(ACTION_MANAGE_POOLS)
    async def Disconnect(self) -> "o":
        uid = await caller_uid(self.server.bus)
        engine = self.server.require_engine()
        return self.server.job_object(engine.disconnect_pool(self.pool_name, uid))

    @method()
    @exported()
    async def Resize(self, size: "s") -> "o":
        # A local tmpfs is the admin's pool, resized in this host's RAM: a member's. A
        # remote pool's size is RAM taken on another host: an admin's. Decided from the
        # kind we export, before the engine is asked anything; unknown kinds are remote.
        if self.values.get("Kind") == "tmpfs":
            await self.server.polkit.check(ACTION_MANAGE_POOLS)
        else:
            await self.server.polkit.check(
                ACTION_ADMINISTER,
                f"resizing remote pool {self.pool_name} needs an administrator "
                "(it sizes RAM on another host)",
            )
        uid = await caller_uid(self.server.bus)
        engine = self.server.require_engine()
        job = self.server.job_object(engine.resize_pool(self.pool_name, _size_arg(size), uid))
        await self.server.settle()
        return job


class ModelInterface(Snapshot):
    def __init__(self, server: ObjectHost, name: str):
        super().__init__(MODEL_IFACE, server)
        self.model_name = name
        self.values["Name"] = name

    @dbus_property(access=READ)
    def Name(self) -> "s":
        return self.values["Name"]

    @dbus_property(access=READ)
    def Format(self) -> "s":
        return self.values["Format"]

    @dbus_property(access=READ)
    def SizeBytes(self) -> "t":
        return self.values["SizeBytes"]

    @dbus_property(access=READ)
    def Tier(self) -> "s":
        return self.values["Tier"]

    @dbus_property(access=READ)
    def PinnedPool(self) -> "s":
        return self.values["PinnedPool"]

    @dbus_property(access=READ)
    def State(self) -> "s":
        return self.values["State"]

    @dbus_property(access=READ)
    def Problems(self) -> "as":
        return self.values["Problems"]

    @dbus_property(access=READ)
    def Loaded(self) -> "b":
        """The backend says it has this model loaded (asked every 15 s, and at once when
        the holders of its files change)."""
        return self.values["Loaded"]

    @dbus_property(access=READ)
    def Holders(self) -> "a(us)":
        """Processes mapping or holding open one of its files: (pid, command escaped)."""
        return self.values["Holders"]

    @dbus_property(access=READ)
    def LastUsed(self) -> "t":
        """When the backend was last seen using it, µs since the epoch; 0: never (a load,
        an Ollama request, or loaded on a server that reports no requests: see
        speedloaderd/usage.py for what counts and what a look cannot see)."""
        return self.values["LastUsed"]

    @dbus_property(access=READ)
    def LoadCount(self) -> "u":
        """How many times the backend was seen loading it (kept across restarts)."""
        return self.values["LoadCount"]

    @dbus_property(access=READ)
    def UseCount(self) -> "u":
        """Uses automatic tiering has seen: a process opening its files, a backend load
        (repeats within autoTiering.coalesce seconds are one use)."""
        return self.values["UseCount"]

    @dbus_property(access=READ)
    def Value(self) -> "d":
        """Its worth to tiering: estimated uses per hour, decayed by autoTiering.halfLife;
        as of the model's last change, not recomputed as time passes."""
        return self.values["Value"]

    @dbus_property(access=READ)
    def Why(self) -> "s":
        """Why it is where it is: "pinned to fast", "in use (loaded)", "auto: used 14x in
        1 h", its uses when cold; "" when nothing is known."""
        return self.values["Why"]


_CANCEL_ACTION = {
    "promote": ACTION_PROMOTE,
    "demote": ACTION_DEMOTE,
}


class JobInterface(Snapshot):
    def __init__(self, server: ObjectHost, job: Job):
        super().__init__(JOB_IFACE, server)
        self.job = job

    @dbus_property(access=READ)
    def Operation(self) -> "s":
        return self.values["Operation"]

    @dbus_property(access=READ)
    def Objects(self) -> "ao":
        return self.values["Objects"]

    @dbus_property(access=READ)
    def Model(self) -> "s":
        return self.values["Model"]

    @dbus_property(access=READ)
    def Pool(self) -> "s":
        return self.values["Pool"]

    @dbus_property(access=READ)
    def BytesTotal(self) -> "t":
        return self.values["BytesTotal"]

    @dbus_property(access=READ)
    def BytesDone(self) -> "t":
        return self.values["BytesDone"]

    @dbus_property(access=READ)
    def Rate(self) -> "d":
        return self.values["Rate"]

    @dbus_property(access=READ)
    def Step(self) -> "s":
        """The named step running now, for jobs made of steps (pool connect); else ""."""
        return self.values["Step"]

    @dbus_property(access=READ)
    def Progress(self) -> "d":
        return self.values["Progress"]

    @dbus_property(access=READ)
    def ExpectedEndTime(self) -> "t":
        return self.values["ExpectedEndTime"]

    @dbus_property(access=READ)
    def StartTime(self) -> "t":
        return self.values["StartTime"]

    @dbus_property(access=READ)
    def StartedByUID(self) -> "u":
        """The uid that asked for the job (UDisks2's name); 0 for root and the daemon."""
        return self.values["StartedByUID"]

    @dbus_property(access=READ)
    def Cancelable(self) -> "b":
        return self.values["Cancelable"]

    @dbus_property(access=READ)
    def State(self) -> "s":
        return self.values["State"]

    @dbus_property(access=READ)
    def Message(self) -> "s":
        return self.values["Message"]

    @dbus_property(access=READ)
    def Reason(self) -> "s":
        """Why the daemon started it itself (automatic tiering); "" for a caller's job."""
        return self.values["Reason"]

    @dbus_property(access=READ)
    def ErrorName(self) -> "s":
        """The short name of the error a failed job ended with (NoSpace, Cancelled...), as
        a failed call would have said it; "" while it runs and after it succeeded."""
        return self.values["ErrorName"]

    @method()
    @exported()
    async def Cancel(self):
        # Your own job (or, for root, any): the right to start this kind of operation.
        # Someone else's, root's and the daemon's own included: an admin's right.
        uid = await caller_uid(self.server.bus)
        if uid in (0, self.job.started_by_uid):
            action = _CANCEL_ACTION.get(self.job.operation, ACTION_MANAGE_POOLS)
            await self.server.polkit.check(action)
        else:
            await self.server.polkit.check(
                ACTION_ADMINISTER,
                f"cancelling job {self.job.id} needs an administrator "
                f"(uid {self.job.started_by_uid} started it, not you)",
            )
        if self.job.finished:
            raise InvalidArgument(f"job {self.job.id} has already finished")
        if not self.job.cancelable:
            raise InvalidArgument(
                f"job {self.job.id} ({self.job.operation}) cannot be cancelled now"
            )
        self.job.cancel()

    @signal()
    def Completed(self, success: bool, message: str) -> "bs":
        return [success, message]


def job_values(job: Job) -> dict[str, Any]:
    objects = []
    if job.model:
        objects.append(model_path(job.model))
    if job.pool:
        objects.append(pool_path(job.pool))
    if job.bytes_total:
        progress = job.bytes_done / job.bytes_total
    elif job.steps_total:  # a job made of named steps: the share of steps done
        progress = job.steps_done / job.steps_total
    else:
        progress = 1.0 if job.finished else 0.0
    end = job.expected_end
    return {
        "Operation": job.operation,
        "Model": job.model or "",
        "StartTime": int(job.started * 1_000_000),
        "StartedByUID": job.started_by_uid,
        "ErrorName": job.error_name,
        "Objects": objects,
        "Pool": job.pool or "",
        "BytesTotal": job.bytes_total,
        "BytesDone": job.bytes_done,
        "Rate": float(job.rate),
        "Step": job.step,
        "Progress": float(min(progress, 1.0)),
        "ExpectedEndTime": int(end * 1_000_000) if end else 0,
        "Cancelable": job.cancelable and not job.finished,
        "State": job.state.value,
        "Message": job.message,
        "Reason": job.reason,
    }
