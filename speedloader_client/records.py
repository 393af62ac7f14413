"""The daemon's bus objects as records: one per interface (Manager, Pool, Model, Job), one
field per D-Bus property.

This is the one place the properties are spelled: each field names its D-Bus property, its
signature and its default (``prop``). The clients build their view of the daemon from these
records; the daemon seeds its interfaces' values from the same defaults and its value maps
are checked against the same names (tests/test_records.py, which also checks every field
against ``dbus/*.xml``). stratis-cli builds its proxies from the interface XML the daemon
publishes; here the XML is the contract the records are tested against.

Field names are the snake_case of the D-Bus name (``PinnedPool`` is ``pinned_pool``,
``StartedByUID`` is ``started_by_uid``) with one exception: the Pool's ``Path`` (where it
is mounted) is ``mount``, because ``path`` is the object's path on the bus.

No D-Bus here, and nothing of the daemon but its bus names and tier words
(``speedloaderd.bus.names``, ``speedloaderd.tiers``: constants only): the daemon imports
this module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Self

from speedloaderd.bus.names import JOB_IFACE, MANAGER_IFACE, MODEL_IFACE, POOL_IFACE
from speedloaderd.tiers import COLD as COLD  # a model's tier and state when no pool holds it

RUNNING = "running"  # a job's state until it ends

# The speed rating of a local pool whose configuration names none: speedloaderd/config.py's
# default, and what a client sends to AddPool (whose speed argument has no default of its
# own) when the user names none.
DEFAULT_SPEED = 100


@dataclass(frozen=True)
class Property:
    """One D-Bus property: its name on the bus, its signature, its default."""

    name: str
    signature: str
    default: Any
    field: str  # the record's attribute

    def fresh_default(self) -> Any:
        """The default, as a new object for mutable ones (lists)."""
        return list(self.default) if isinstance(self.default, (list, tuple)) else self.default


def prop(name: str, signature: str, default: Any) -> Any:
    """A record field for the D-Bus property ``name`` of type ``signature``."""
    meta = {"dbus": (name, signature)}
    if isinstance(default, (list, tuple)):
        items = list(default)
        return field(default_factory=lambda: list(items), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Record:
    """A bus object as this client last heard of it."""

    INTERFACE: ClassVar[str] = ""
    path: str = ""  # the object path

    @classmethod
    def properties(cls) -> dict[str, Property]:
        """The interface's properties by D-Bus name, in the order the record declares them."""
        out = {}
        for f in dataclasses.fields(cls):
            if "dbus" in f.metadata:
                name, signature = f.metadata["dbus"]
                factory = f.default_factory
                default = f.default if factory is dataclasses.MISSING else factory()
                out[name] = Property(name, signature, default, f.name)
        return out

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every property's default, by D-Bus name (what the daemon serves before it knows)."""
        return {name: p.fresh_default() for name, p in cls.properties().items()}

    @classmethod
    def from_props(cls, path: str, props: dict[str, Any]) -> Self:
        record = cls(path)
        record.update(props)
        return record

    def update(self, props: dict[str, Any]) -> None:
        """Apply a PropertiesChanged or GetAll dict (D-Bus names); unknown names are ignored
        (a newer daemon may add properties)."""
        fields = _FIELDS[type(self)]
        for key, value in props.items():
            attr = fields.get(key)
            if attr is not None:
                setattr(self, attr, value)


@dataclass
class Manager(Record):
    INTERFACE: ClassVar[str] = MANAGER_IFACE
    backend: str = prop("Backend", "s", "")
    backend_api_url: str = prop("BackendApiUrl", "s", "")
    # up, down or unknown, with one sentence why (the daemon asks the server every 15 s).
    backend_state: str = prop("BackendState", "s", "unknown")
    backend_state_reason: str = prop("BackendStateReason", "s", "")
    cold_storage: str = prop("ColdStorage", "s", "")
    # Either available, or unavailable (missing, empty, another filesystem): then the
    # catalog, the links and the RAM copies are kept as they were, and retried.
    cold_storage_state: str = prop("ColdStorageState", "s", "unavailable")
    cold_storage_problem: str = prop("ColdStorageProblem", "s", "")  # "" when available
    config_error: str = prop("ConfigError", "s", "")
    config_path: str = prop("ConfigPath", "s", "")
    # True until the daemon says otherwise: it always sends ConfigValid, and a client that
    # has not heard it yet has no invalid configuration to report.
    config_valid: bool = prop("ConfigValid", "b", True)
    model_count: int = prop("ModelCount", "u", 0)  # ListModels reads them in pages
    models_dir: str = prop("ModelsDir", "s", "")
    # What the last scan found wrong that belongs to no model (at most a few hundred).
    scan_problems: list[str] = prop("ScanProblems", "as", [])
    strategy: str = prop("Strategy", "s", "")
    version: str = prop("Version", "s", "")
    # Automatic tiering (autoTiering.enabled): "on" or "off"; while on, why it does nothing
    # now ("" when it acts), e.g. cold storage being unavailable.
    tiering: str = prop("Tiering", "s", "off")
    tiering_paused: str = prop("TieringPaused", "s", "")
    # Whether the kernel's file opens of model files are seen (fanotify): watching,
    # unavailable (then with why) or off; tiering then hears only of backend loads.
    tiering_watch: str = prop("TieringWatch", "s", "off")
    tiering_watch_reason: str = prop("TieringWatchReason", "s", "")
    # The model an eviction would take next: "name from pool (why)"; "" when none may go.
    tiering_next_eviction: str = prop("TieringNextEviction", "s", "")


@dataclass
class Pool(Record):
    INTERFACE: ClassVar[str] = POOL_IFACE
    name: str = prop("Name", "s", "")
    kind: str = prop("Kind", "s", "")
    state: str = prop("State", "s", "")
    mount: str = prop("Path", "s", "")  # where it is mounted (``path`` is the object's)
    size_bytes: int = prop("SizeBytes", "t", 0)
    used_bytes: int = prop("UsedBytes", "t", 0)
    free_bytes: int = prop("FreeBytes", "t", 0)
    speed: int = prop("Speed", "u", 0)
    problem: str = prop("Problem", "s", "")  # why it is degraded; "" when it is not
    # RAM of deleted copies that a process still maps or has open: part of used_bytes, freed
    # when the last holder lets go (the daemon looks every second while any is held).
    held_bytes: int = prop("HeldBytes", "t", 0)

    @property
    def mounted(self) -> bool:
        return self.state == "mounted"

    @property
    def fraction(self) -> float:
        """How full it is, 0 to 1."""
        return min(self.used_bytes / self.size_bytes, 1.0) if self.size_bytes else 0.0

    def to_json(self) -> dict[str, Any]:
        """``slctl status --json``'s pool: a contract (add keys, never rename one)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "state": self.state,
            "path": self.mount,
            "sizeBytes": self.size_bytes,
            "usedBytes": self.used_bytes,
            "speed": self.speed,
            "heldBytes": self.held_bytes,
        }


@dataclass
class Model(Record):
    INTERFACE: ClassVar[str] = MODEL_IFACE
    name: str = prop("Name", "s", "")
    format: str = prop("Format", "s", "")
    size_bytes: int = prop("SizeBytes", "t", 0)
    tier: str = prop("Tier", "s", COLD)  # "cold" or a pool's name
    pinned_pool: str = prop("PinnedPool", "s", "")  # "" when not pinned
    state: str = prop("State", "s", COLD)  # cold | hot | promoting | demoting | degraded
    problems: list[str] = prop("Problems", "as", [])
    # The backend (backend.type at backend.apiUrl) says it has the model loaded.
    loaded: bool = prop("Loaded", "b", False)
    # Processes that map or have open one of its files (cold file or pool copy): [pid,
    # command], the command escaped (any process names itself).
    holders: list[list[Any]] = prop("Holders", "a(us)", [])
    # When the backend was last seen using it (µs since the epoch; 0: never) and how many
    # times it was seen loading it: the daemon's looks, every 15 s (speedloaderd/usage.py).
    last_used: int = prop("LastUsed", "t", 0)
    load_count: int = prop("LoadCount", "u", 0)
    # Uses seen by automatic tiering (a process opening its files, a backend load; repeats
    # within autoTiering.coalesce are one use), its value (estimated uses per hour, decayed;
    # as of the model's last change) and why it is where it is ("pinned to fast", "in use
    # (loaded)", "auto: used 14x in 1 h"; "" when nothing is known).
    use_count: int = prop("UseCount", "u", 0)
    value: float = prop("Value", "d", 0.0)
    why: str = prop("Why", "s", "")

    @property
    def hot(self) -> bool:
        """In a pool's column: hot, or on its way out of one (demoting), or degraded there."""
        return self.tier != COLD

    def to_json(self) -> dict[str, Any]:
        """``slctl status --json``'s model: a contract (add keys, never rename one)."""
        return {
            "name": self.name,
            "format": self.format,
            "sizeBytes": self.size_bytes,
            "tier": self.tier,
            "pinnedPool": self.pinned_pool or None,
            "state": self.state,
            "loaded": self.loaded,
            "holders": [{"pid": int(pid), "command": str(cmd)} for pid, cmd in self.holders],
            "lastUsed": iso_utc(self.last_used),
            "loadCount": self.load_count,
            "useCount": self.use_count,
            "value": self.value,
            "why": self.why,
        }


@dataclass
class Job(Record):
    INTERFACE: ClassVar[str] = JOB_IFACE
    operation: str = prop("Operation", "s", "")
    objects: list[str] = prop("Objects", "ao", [])
    model: str = prop("Model", "s", "")
    pool: str = prop("Pool", "s", "")
    bytes_total: int = prop("BytesTotal", "t", 0)
    bytes_done: int = prop("BytesDone", "t", 0)
    rate: float = prop("Rate", "d", 0.0)  # bytes per second
    progress: float = prop("Progress", "d", 0.0)  # 0 to 1
    expected_end_time: int = prop("ExpectedEndTime", "t", 0)  # µs since the epoch; 0: unknown
    start_time: int = prop("StartTime", "t", 0)  # µs since the epoch
    # The uid that asked for it (UDisks2's name); 0 for root and the daemon. Cancelling
    # another uid's job is an admin's right.
    started_by_uid: int = prop("StartedByUID", "u", 0)
    cancelable: bool = prop("Cancelable", "b", False)
    state: str = prop("State", "s", RUNNING)  # running | succeeded | failed | cancelled
    message: str = prop("Message", "s", "")
    # The named step running now, for jobs made of steps (pool connect); else "".
    step: str = prop("Step", "s", "")
    # The short name of the error a failed job ended with (NoSpace, Cancelled...);
    # "" while it runs and after it succeeded.
    error_name: str = prop("ErrorName", "s", "")
    # Why the daemon started it itself (automatic tiering); "" for a caller's job.
    reason: str = prop("Reason", "s", "")

    @property
    def id(self) -> int:
        return job_id(self.path)

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    def to_json(self) -> dict[str, Any]:
        """``slctl status --json``'s job: a contract (add keys, never rename one)."""
        return {
            "id": self.id,
            "operation": self.operation,
            "model": self.model or None,
            "pool": self.pool or None,
            "bytesTotal": self.bytes_total,
            "bytesDone": self.bytes_done,
            "state": self.state,
            "reason": self.reason,
        }


RECORDS: dict[str, type[Record]] = {r.INTERFACE: r for r in (Manager, Pool, Model, Job)}
"""Every record by its interface name."""

_FIELDS: dict[type[Record], dict[str, str]] = {
    r: {name: p.field for name, p in r.properties().items()} for r in RECORDS.values()
}


def iso_utc(micros: int) -> str | None:
    """µs since the epoch as ISO 8601 UTC (``2026-12-02T04:05:06.123456Z``); None for 0."""
    if not micros:
        return None
    try:  # whole seconds and µs apart: a float of µs since 1970 rounds the last digit
        t = datetime.fromtimestamp(micros // 1_000_000, UTC)
        t += timedelta(microseconds=micros % 1_000_000)
    except (OverflowError, OSError, ValueError):  # past year 9999: no daemon sends that
        return None
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def job_id(path: str) -> int:
    """A job's number from its object path (``.../jobs/12`` is 12); 0 for no job ("/")."""
    tail = path.rsplit("/", 1)[-1]
    return int(tail) if tail.isdigit() else 0
