"""What the daemon exports, as plain typed records built from one GetManagedObjects.

The JSON shape of ``slctl status --json`` is defined here (``Snapshot.to_json``); its keys
are a contract with scripts: add keys, never rename or remove one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .client import JOB, MANAGER, MODEL, POOL, ROOT, Client, fastest_first


@dataclass(frozen=True)
class PoolView:
    path: str
    name: str
    kind: str
    state: str
    mount: str
    size: int
    used: int
    free: int
    speed: int
    problem: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "state": self.state,
            "path": self.mount,
            "sizeBytes": self.size,
            "usedBytes": self.used,
            "speed": self.speed,
        }


@dataclass(frozen=True)
class ModelView:
    path: str
    name: str
    format: str
    size: int
    tier: str
    pinned: str
    state: str
    problems: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "format": self.format,
            "sizeBytes": self.size,
            "tier": self.tier,
            "pinnedPool": self.pinned or None,
            "state": self.state,
        }


@dataclass(frozen=True)
class JobView:
    path: str
    id: int
    operation: str
    model: str
    pool: str
    total: int
    done: int
    rate: float
    progress: float
    expected_end: int
    cancelable: bool
    state: str
    message: str
    started_by_uid: int = 0  # who asked for it: only they, or an admin, may cancel it

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "operation": self.operation,
            "model": self.model or None,
            "pool": self.pool or None,
            "bytesTotal": self.total,
            "bytesDone": self.done,
            "state": self.state,
        }


def job_id(path: str) -> int:
    return int(path.rsplit("/", 1)[1])


def pool_view(path: str, p: dict[str, Any]) -> PoolView:
    return PoolView(
        path,
        p["Name"],
        p["Kind"],
        p["State"],
        p["Path"],
        p["SizeBytes"],
        p["UsedBytes"],
        p.get("FreeBytes", 0),
        p["Speed"],
        p.get("Problem", ""),
    )


def model_view(path: str, m: dict[str, Any]) -> ModelView:
    return ModelView(
        path,
        m["Name"],
        m["Format"],
        m["SizeBytes"],
        m["Tier"],
        m["PinnedPool"],
        m["State"],
        tuple(m.get("Problems", ())),
    )


def job_view(path: str, j: dict[str, Any]) -> JobView:
    return JobView(
        path,
        job_id(path),
        j["Operation"],
        j.get("Model", ""),
        j.get("Pool", ""),
        j["BytesTotal"],
        j["BytesDone"],
        j["Rate"],
        j["Progress"],
        j["ExpectedEndTime"],
        j["Cancelable"],
        j["State"],
        j.get("Message", ""),
        j.get("StartedByUID", 0),
    )


@dataclass(frozen=True)
class Snapshot:
    manager: dict[str, Any]
    pools: list[PoolView]
    models: list[ModelView]
    jobs: list[JobView]

    @classmethod
    def from_objects(cls, objects: dict[str, dict[str, dict[str, Any]]]) -> Snapshot:
        manager = objects.get(ROOT, {}).get(MANAGER, {})
        pools, models, jobs = [], [], []
        for path, ifaces in objects.items():
            if POOL in ifaces:
                pools.append(pool_view(path, ifaces[POOL]))
            elif MODEL in ifaces:
                models.append(model_view(path, ifaces[MODEL]))
            elif JOB in ifaces:
                jobs.append(job_view(path, ifaces[JOB]))
        return cls(
            manager,
            fastest_first(pools),
            sorted(models, key=lambda m: m.name),
            sorted(jobs, key=lambda j: j.id),
        )

    @property
    def running_jobs(self) -> list[JobView]:
        return [j for j in self.jobs if j.state == "running"]

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": {
                "type": self.manager.get("Backend") or None,
                "apiUrl": self.manager.get("BackendApiUrl") or None,
            },
            "coldStorage": {
                "path": self.manager.get("ColdStorage") or None,
                "state": self.manager.get("ColdStorageState") or None,
                "problem": self.manager.get("ColdStorageProblem") or None,
            },
            "scanProblems": list(self.manager.get("ScanProblems", [])),
            "pools": [p.to_json() for p in self.pools],
            "models": [m.to_json() | {"problems": list(m.problems)} for m in self.models],
            "jobs": [j.to_json() for j in self.running_jobs],
        }


async def snapshot(client: Client) -> Snapshot:
    objects = await client.managed_objects()
    # The Manager lives on the ObjectManager's own path, which GetManagedObjects leaves out.
    objects[ROOT] = {MANAGER: await client.get_all(ROOT, MANAGER)}
    return Snapshot.from_objects(objects)
