"""What the daemon exports, as the records of speedloader_client.records built from one
GetManagedObjects.

The JSON shape of ``slctl status --json`` is defined here (``Snapshot.to_json``) and by the
records' ``to_json``; its keys are a contract with scripts: add keys, never rename or
remove one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from speedloader_client.client import JOB, MANAGER, MODEL, POOL, ROOT, Client, fastest_first
from speedloader_client.records import Job, Manager, Model, Pool


@dataclass(frozen=True)
class Snapshot:
    manager: Manager
    pools: list[Pool]
    models: list[Model]
    jobs: list[Job]

    @classmethod
    def from_objects(cls, objects: dict[str, dict[str, dict[str, Any]]]) -> Snapshot:
        manager = Manager.from_props(ROOT, objects.get(ROOT, {}).get(MANAGER, {}))
        pools: list[Pool] = []
        models: list[Model] = []
        jobs: list[Job] = []
        for path, ifaces in objects.items():
            if POOL in ifaces:
                pools.append(Pool.from_props(path, ifaces[POOL]))
            elif MODEL in ifaces:
                models.append(Model.from_props(path, ifaces[MODEL]))
            elif JOB in ifaces:
                jobs.append(Job.from_props(path, ifaces[JOB]))
        return cls(
            manager,
            fastest_first(pools),
            sorted(models, key=lambda m: m.name),
            sorted(jobs, key=lambda j: j.id),
        )

    @property
    def running_jobs(self) -> list[Job]:
        return [j for j in self.jobs if j.state == "running"]

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": {
                "type": self.manager.backend or None,
                "apiUrl": self.manager.backend_api_url or None,
            },
            "coldStorage": {
                "path": self.manager.cold_storage or None,
                "state": self.manager.cold_storage_state or None,
                "problem": self.manager.cold_storage_problem or None,
            },
            "scanProblems": list(self.manager.scan_problems),
            "pools": [p.to_json() for p in self.pools],
            "models": [m.to_json() | {"problems": list(m.problems)} for m in self.models],
            "jobs": [j.to_json() for j in self.running_jobs],
        }


async def snapshot(client: Client) -> Snapshot:
    objects = await client.managed_objects()
    # The Manager lives on the ObjectManager's own path, which GetManagedObjects leaves out.
    objects[ROOT] = {MANAGER: await client.get_all(ROOT, MANAGER)}
    return Snapshot.from_objects(objects)
