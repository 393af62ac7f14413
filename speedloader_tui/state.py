"""What the dashboard knows about the daemon: a mirror of its objects, kept current from
one GetManagedObjects and then the ObjectManager and Properties signals alone.

No Textual and no D-Bus connection here: the link feeds it plain dicts, the widgets read
it. Every change records what it touched (``dirty``) so the screens redraw only that, at
their own pace.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from speedloader_cli.client import JOB, MANAGER, MODEL, POOL, ROOT

COLD = "cold"
RUNNING = "running"


@dataclass
class ModelInfo:
    path: str
    name: str = ""
    format: str = ""
    size: int = 0
    tier: str = COLD
    pinned_pool: str = ""
    state: str = COLD
    problems: list[str] = field(default_factory=list)

    @property
    def hot(self) -> bool:
        """In a pool's column: hot, or on its way out of one (demoting), or degraded there."""
        return self.tier != COLD

    def update(self, props: dict[str, Any]) -> None:
        for key, attr in _MODEL_ATTRS.items():
            if key in props:
                setattr(self, attr, props[key])


@dataclass
class PoolInfo:
    path: str
    name: str = ""
    kind: str = ""
    state: str = ""
    mount: str = ""
    size: int = 0
    used: int = 0
    free: int = 0
    speed: int = 0

    @property
    def connected(self) -> bool:
        return self.state == "mounted"

    @property
    def fraction(self) -> float:
        return min(self.used / self.size, 1.0) if self.size else 0.0

    def update(self, props: dict[str, Any]) -> None:
        for key, attr in _POOL_ATTRS.items():
            if key in props:
                setattr(self, attr, props[key])


@dataclass
class JobInfo:
    path: str
    operation: str = ""
    model: str = ""
    pool: str = ""
    bytes_total: int = 0
    bytes_done: int = 0
    rate: float = 0.0
    progress: float = 0.0
    expected_end: int = 0  # microseconds since the epoch, 0 if unknown
    start: int = 0
    cancelable: bool = False
    state: str = RUNNING
    message: str = ""
    step: str = ""  # the named step running now, for jobs made of steps (pool connect)
    started_by_uid: int = 0  # who asked for it; cancelling another uid's job is an admin's

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    @property
    def number(self) -> int:
        tail = self.path.rsplit("/", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    def update(self, props: dict[str, Any]) -> None:
        for key, attr in _JOB_ATTRS.items():
            if key in props:
                setattr(self, attr, props[key])


@dataclass
class ManagerInfo:
    config_valid: bool = True
    config_error: str = ""
    backend: str = ""
    backend_api_url: str = ""
    models_dir: str = ""
    cold_storage: str = ""
    strategy: str = ""
    version: str = ""
    model_count: int = 0

    def update(self, props: dict[str, Any]) -> None:
        for key, attr in _MANAGER_ATTRS.items():
            if key in props:
                setattr(self, attr, props[key])


_MODEL_ATTRS = {
    "Name": "name",
    "Format": "format",
    "SizeBytes": "size",
    "Tier": "tier",
    "PinnedPool": "pinned_pool",
    "State": "state",
    "Problems": "problems",
}
_POOL_ATTRS = {
    "Name": "name",
    "Kind": "kind",
    "State": "state",
    "Path": "mount",
    "SizeBytes": "size",
    "UsedBytes": "used",
    "FreeBytes": "free",
    "Speed": "speed",
}
_JOB_ATTRS = {
    "Operation": "operation",
    "Model": "model",
    "Pool": "pool",
    "BytesTotal": "bytes_total",
    "BytesDone": "bytes_done",
    "Rate": "rate",
    "Progress": "progress",
    "ExpectedEndTime": "expected_end",
    "StartTime": "start",
    "Cancelable": "cancelable",
    "State": "state",
    "Message": "message",
    "Step": "step",
    "StartedByUID": "started_by_uid",
}
_MANAGER_ATTRS = {
    "ConfigValid": "config_valid",
    "ConfigError": "config_error",
    "Backend": "backend",
    "BackendApiUrl": "backend_api_url",
    "ModelsDir": "models_dir",
    "ColdStorage": "cold_storage",
    "Strategy": "strategy",
    "Version": "version",
    "ModelCount": "model_count",
}

# What a change touched; the screens redraw by these.
MODELS, POOLS, JOBS, MANAGER_PART = "models", "pools", "jobs", "manager"


@dataclass
class DaemonState:
    """The daemon's objects as this client last heard of them."""

    manager: ManagerInfo = field(default_factory=ManagerInfo)
    models: dict[str, ModelInfo] = field(default_factory=dict)
    pools: dict[str, PoolInfo] = field(default_factory=dict)
    jobs: dict[str, JobInfo] = field(default_factory=dict)
    online: bool = False
    dirty: set[str] = field(default_factory=set)

    # --- feeding -------------------------------------------------------------------------

    def load(self, objects: dict[str, dict[str, dict[str, Any]]]) -> None:
        """Replace everything with a GetManagedObjects answer (also the root's Manager)."""
        self.begin_load()
        for path, ifaces in objects.items():
            self.add(path, ifaces)

    def begin_load(self) -> None:
        """Forget every object: a fresh state follows (whole, or in pages), and signals
        apply from now on."""
        self.models.clear()
        self.pools.clear()
        self.jobs.clear()
        self.online = True
        self.dirty |= {MODELS, POOLS, JOBS, MANAGER_PART}

    def go_offline(self) -> None:
        """The daemon left the bus: its jobs went with it; models and pools are stale."""
        self.online = False
        self.jobs.clear()
        self.dirty |= {MODELS, POOLS, JOBS, MANAGER_PART}

    def add(self, path: str, ifaces: dict[str, dict[str, Any]]) -> None:
        for iface, props in ifaces.items():
            self.changed(path, iface, props)

    def remove(self, path: str, ifaces: list[str]) -> None:
        if MODEL in ifaces and self.models.pop(path, None) is not None:
            self.dirty.add(MODELS)
        if POOL in ifaces and self.pools.pop(path, None) is not None:
            self.dirty.add(POOLS)
        if JOB in ifaces and self.jobs.pop(path, None) is not None:
            self.dirty.add(JOBS)

    def changed(self, path: str, iface: str, props: dict[str, Any]) -> None:
        if iface == MODEL:
            self.models.setdefault(path, ModelInfo(path)).update(props)
            self.dirty.add(MODELS)
        elif iface == POOL:
            self.pools.setdefault(path, PoolInfo(path)).update(props)
            self.dirty.add(POOLS)
            self.dirty.add(MODELS)  # the pool strip on the models tab
        elif iface == JOB:
            self.jobs.setdefault(path, JobInfo(path)).update(props)
            self.dirty.add(JOBS)
        elif iface == MANAGER and path == ROOT:
            self.manager.update(props)
            self.dirty.add(MANAGER_PART)

    def completed(self, path: str, success: bool, message: str) -> JobInfo | None:
        job = self.jobs.get(path)
        if job is not None:
            if job.running:
                job.state = "succeeded" if success else "failed"
            job.message = message or job.message
            job.cancelable = False
            self.dirty.add(JOBS)
        return job

    def take_dirty(self) -> set[str]:
        out, self.dirty = self.dirty, set()
        return out

    # --- reading -------------------------------------------------------------------------

    def model_by_name(self, name: str) -> ModelInfo | None:
        return next((m for m in self.models.values() if m.name == name), None)

    def pool_by_name(self, name: str) -> PoolInfo | None:
        return next((p for p in self.pools.values() if p.name == name), None)

    def pool_names(self) -> list[str]:
        return sorted(p.name for p in self.pools.values())

    def running_job_for(self, model: str) -> JobInfo | None:
        return next((j for j in self.jobs.values() if j.running and j.model == model), None)

    def pins(self) -> list[tuple[str, str]]:
        return sorted((m.name, m.pinned_pool) for m in self.models.values() if m.pinned_pool)
