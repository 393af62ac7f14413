"""The engine, run inside the "local" guest and driven by the VM tests over SSH.

``python -m tests.vm.engine_agent CONFIG`` starts a real Engine (speedloaderd.engine) with
that config, then answers one JSON request per stdin line with one JSON line on stdout:

    {"op": "connect", "pool": "p"}         -> {"ok": true, "message": ..., "steps": [...]}
    {"op": "promote", "model": "m", "pool": "p"}
    {"op": "disconnect", "pool": "p"}
    {"op": "status"}                       -> pools and models as the bus would show them
    {"op": "wait_pool", "pool": "p", "state": "degraded", "timeout": 120}
    {"op": "read", "rel": "x.gguf"}        -> sha256 and GGUF tensor names, read through the
                                              models dir, and where the link points
    {"op": "quit"}

A failed job answers {"ok": false, "error": <the job's sentence>}. Logs go to stderr.
Runs on the guest's view of this machine's /usr and venv (9p) and the checkout (/project).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from speedloaderd.config import load_config
from speedloaderd.engine import Engine
from speedloaderd.errors import SpeedloaderError


class Agent:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.changed = asyncio.Event()
        engine.listeners.append(lambda kind, name: self.changed.set())

    def status(self) -> dict[str, Any]:
        e = self.engine
        return {
            "pools": {p.name: dataclasses.asdict(p) for p in e.pool_statuses()},
            "models": {m.name: dataclasses.asdict(m) for m in e.model_statuses()},
        }

    async def job(self, job: Any) -> dict[str, Any]:
        steps: list[str] = []

        def follow(j: Any) -> None:
            if j.step and (not steps or steps[-1] != j.step):
                steps.append(j.step)

        job.listeners.append(follow)
        try:
            message = await job.wait()
        except SpeedloaderError as err:
            return {"ok": False, "error": str(err), "steps": steps}
        return {
            "ok": True,
            "message": message,
            "steps": steps,
            "steps_done": job.steps_done,
            "steps_total": job.steps_total,
        }

    async def wait_pool(self, pool: str, state: str, timeout: float) -> dict[str, Any]:
        async def until() -> None:
            while self.engine.pool_status(pool).state != state:
                self.changed.clear()
                await self.changed.wait()  # woken by the engine's events, not a timer

        try:
            await asyncio.wait_for(until(), timeout)
        except TimeoutError:
            st = self.engine.pool_status(pool).state
            return {"ok": False, "error": f"pool {pool} is {st}, not {state}, after {timeout} s"}
        return {"ok": True, **self.status()}

    def read(self, rel: str) -> dict[str, Any]:
        import gguf  # the real reader, from the venv

        path = self.engine.config.models_dir / rel
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        names = [t.name for t in gguf.GGUFReader(path).tensors]
        return {"ok": True, "sha256": h.hexdigest(), "tensors": names, "target": os.readlink(path)}

    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op, e = req["op"], self.engine
        try:
            if op == "connect":
                return await self.job(e.connect_pool(req["pool"]))
            if op == "disconnect":
                return await self.job(e.disconnect_pool(req["pool"]))
            if op == "promote":
                return await self.job(e.promote(req["model"], req.get("pool")))
            if op == "status":
                return {"ok": True, **self.status()}
            if op == "wait_pool":
                return await self.wait_pool(req["pool"], req["state"], req.get("timeout", 120))
            if op == "read":
                return await asyncio.to_thread(self.read, req["rel"])
        except (SpeedloaderError, OSError) as err:
            return {"ok": False, "error": str(err)}
        return {"ok": False, "error": f"unknown op {op!r}"}


async def main(config_path: Path) -> None:
    config, _ = load_config(config_path)
    engine = Engine(config, config_path)
    await engine.start()
    agent = Agent(engine)
    out = sys.stdout
    out.write(json.dumps({"ok": True, "ready": True, **agent.status()}) + "\n")
    out.flush()
    while line := await asyncio.to_thread(sys.stdin.readline):
        req = json.loads(line)
        if req["op"] == "quit":
            break
        out.write(json.dumps(await agent.handle(req), default=str) + "\n")
        out.flush()
    await engine.shutdown()
    out.write(json.dumps({"ok": True, "bye": True}) + "\n")
    out.flush()


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(main(Path(sys.argv[1])))
