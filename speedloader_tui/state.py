"""What the dashboard knows about the daemon: a mirror of its objects, kept current from
one GetManagedObjects and then the ObjectManager and Properties signals alone.

No Textual and no D-Bus connection here: the link feeds it plain dicts, which the records
of speedloader_client.records take in (``update``); the widgets read the records. Every
change records what it touched (``dirty``) so the screens redraw only that, at their own
pace.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from speedloader_client.client import JOB, MANAGER, MODEL, POOL, ROOT
from speedloader_client.records import Job, Manager, Model, Pool

# What a change touched; the screens redraw by these.
MODELS, POOLS, JOBS, MANAGER_PART = "models", "pools", "jobs", "manager"


@dataclass
class DaemonState:
    """The daemon's objects as this client last heard of them."""

    manager: Manager = field(default_factory=lambda: Manager(ROOT))
    models: dict[str, Model] = field(default_factory=dict)
    pools: dict[str, Pool] = field(default_factory=dict)
    jobs: dict[str, Job] = field(default_factory=dict)
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
            self.models.setdefault(path, Model(path)).update(props)
            self.dirty.add(MODELS)
        elif iface == POOL:
            self.pools.setdefault(path, Pool(path)).update(props)
            self.dirty.add(POOLS)
            self.dirty.add(MODELS)  # the pool strip on the models tab
        elif iface == JOB:
            self.jobs.setdefault(path, Job(path)).update(props)
            self.dirty.add(JOBS)
        elif iface == MANAGER and path == ROOT:
            self.manager.update(props)
            self.dirty.add(MANAGER_PART)

    def completed(self, path: str, success: bool, message: str) -> Job | None:
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

    def model_by_name(self, name: str) -> Model | None:
        return next((m for m in self.models.values() if m.name == name), None)

    def pool_by_name(self, name: str) -> Pool | None:
        return next((p for p in self.pools.values() if p.name == name), None)

    def pool_names(self) -> list[str]:
        return sorted(p.name for p in self.pools.values())

    def running_job_for(self, model: str) -> Job | None:
        return next((j for j in self.jobs.values() if j.running and j.model == model), None)

    def pins(self) -> list[tuple[str, str]]:
        return sorted((m.name, m.pinned_pool) for m in self.models.values() if m.pinned_pool)
