"""The whole daemon, run inside the "local" guest and driven by the VM tests over SSH.

``python -m tests.vm.daemon_agent CONFIG`` starts a private system bus with the project's
policy, a real polkitd with the project's actions and rules (speedloader_lab.sandbox) and
``speedloaderd --config CONFIG`` on it, then answers one JSON request per stdin line with
one JSON line on stdout, each made of D-Bus calls and signals, as slctl would:

    {"op": "connect", "pool": "p"}     -> Pool.Connect, Job followed by signals to Completed:
                                          {"ok": true, "message": ..., "steps": [Step, ...]}
    {"op": "promote", "model": "m", "pool": "p"}
    {"op": "disconnect", "pool": "p"}
    {"op": "status"}                   -> pools and models from GetManagedObjects
    {"op": "wait_pool", "pool": "p", "state": "degraded", "timeout": 120}
                                       -> waits for the Pool's PropertiesChanged signal
    {"op": "read", "rel": "x.gguf"}    -> sha256 and GGUF tensor names read through the
                                          models dir (as an inference server would), and
                                          where the link points
    {"op": "promote_start", "model": "m", "pool": "p"} -> {"ok": true, "job": path}, at once
    {"op": "wait_bytes", "job": path, "bytes": n, "timeout": 120}
                                       -> waits until the Job's BytesDone reaches n
    {"op": "follow", "job": path}      -> that Job followed to Completed, as for promote
    {"op": "cold"}                     -> the Manager's ColdStorageState and ColdStorageProblem
    {"op": "wait_cold", "state": "available", "timeout": 120}
                                       -> waits for ColdStorageState (PropertiesChanged)
    {"op": "rescan"}                   -> Manager.Rescan: {"ok": true, "count": n}
    {"op": "links"}                    -> every symlink in the models dir and its target
                                          (readlink only: nothing is read through them)
    {"op": "sha256", "rel": "x.gguf"}  -> sha256 of what a reader gets through the link
    {"op": "quit"}                     -> SIGTERM to the daemon, sandbox removed

A failed job or call answers {"ok": false, "error": <its one sentence>}. Runs on the
guest's view of this machine's /usr and venv (9p) and the checkout (/project).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from speedloader_client.client import JOB, MANAGER, MODEL, POOL, Client, ClientError, unwrap
from speedloader_lab.sandbox import Sandbox
from speedloaderd.bus.names import ROOT, pool_path
from speedloaderd.config import Config, load_config

JOB_TIMEOUT = 600.0


class Agent:
    def __init__(self, client: Client, config: Config):
        self.c = client
        self.config = config

    async def status(self) -> dict[str, Any]:
        pools, models = {}, {}
        for ifaces in (await self.c.managed_objects()).values():
            if POOL in ifaces:
                p = ifaces[POOL]
                pools[p["Name"]] = {
                    "kind": p["Kind"],
                    "state": p["State"],
                    "path": p["Path"],
                    "size": p["SizeBytes"],
                }
            if MODEL in ifaces:
                m = ifaces[MODEL]
                models[m["Name"]] = {"state": m["State"], "tier": m["Tier"]}
        return {"pools": pools, "models": models}

    async def job(self, started: Any) -> dict[str, Any]:
        steps: list[str] = []
        last: dict[str, Any] = {}

        def on_update(props: dict[str, Any]) -> None:
            last.update(props)
            step = props.get("Step", "")
            if step and (not steps or steps[-1] != step):
                steps.append(step)

        path = await started
        result = await self.c.follow_job(path, on_update=on_update, timeout=JOB_TIMEOUT)
        if not result.success:
            return {"ok": False, "error": result.message, "steps": steps}
        return {
            "ok": True,
            "message": result.message,
            "steps": steps,
            "progress": last.get("Progress"),
        }

    async def wait_pool(self, pool: str, state: str, timeout: float) -> dict[str, Any]:
        path = pool_path(pool)
        reached = asyncio.get_running_loop().create_future()

        def on_signal(msg: Any) -> None:
            if msg.path != path or msg.member != "PropertiesChanged" or msg.body[0] != POOL:
                return
            if unwrap(msg.body[1]).get("State") == state and not reached.done():
                reached.set_result(None)

        remove = self.c.add_listener(on_signal)  # subscribed at start: no signal is missed
        try:
            if (await self.c.get_all(path, POOL))["State"] != state:
                await asyncio.wait_for(reached, timeout)
        except TimeoutError:
            now = (await self.c.get_all(path, POOL))["State"]
            return {"ok": False, "error": f"pool {pool} is {now}, not {state}, after {timeout} s"}
        finally:
            remove()
        return {"ok": True, **await self.status()}

    async def cold(self) -> dict[str, Any]:
        props = await self.c.get_all(ROOT, MANAGER)
        return {
            "ok": True,
            "state": props["ColdStorageState"],
            "problem": props["ColdStorageProblem"],
        }

    async def wait_cold(self, state: str, timeout: float) -> dict[str, Any]:
        reached = asyncio.get_running_loop().create_future()

        def on_signal(msg: Any) -> None:
            if msg.path != ROOT or msg.member != "PropertiesChanged" or msg.body[0] != MANAGER:
                return
            if unwrap(msg.body[1]).get("ColdStorageState") == state and not reached.done():
                reached.set_result(None)

        remove = self.c.add_listener(on_signal)  # subscribed first: no signal is missed
        try:
            if (await self.cold())["state"] != state:
                await asyncio.wait_for(reached, timeout)
        except TimeoutError:
            now = await self.cold()
            return {"ok": False, "error": f"cold storage is {now['state']}, not {state}, "
                                          f"after {timeout} s: {now['problem']}"}  # fmt: skip
        finally:
            remove()
        return {**await self.cold(), **await self.status()}

    async def wait_bytes(self, job: str, done: int, timeout: float) -> dict[str, Any]:
        """Poll the Job's BytesDone (its signals are coalesced, a poll is simplest here)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            props = await self.c.get_all(job, JOB)
            if props["BytesDone"] >= done:
                return {"ok": True, "bytes_done": props["BytesDone"], "total": props["BytesTotal"]}
            if asyncio.get_running_loop().time() > deadline:
                return {
                    "ok": False,
                    "error": f"job at {props['BytesDone']} bytes after {timeout} s",
                }
            await asyncio.sleep(0.1)

    def links(self) -> dict[str, Any]:
        found = {}
        for top, dirs, files in os.walk(self.config.models_dir):
            for name in dirs + files:
                p = Path(top) / name
                if p.is_symlink():
                    found[str(p.relative_to(self.config.models_dir))] = os.readlink(p)
        return {"ok": True, "links": found}

    def sha256(self, rel: str) -> dict[str, Any]:
        path = self.config.models_dir / rel
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return {"ok": True, "sha256": h.hexdigest(), "target": os.readlink(path)}

    def read(self, rel: str) -> dict[str, Any]:
        import gguf  # the real reader, from the venv

        path = self.config.models_dir / rel
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        names = [t.name for t in gguf.GGUFReader(path).tensors]
        return {"ok": True, "sha256": h.hexdigest(), "tensors": names, "target": os.readlink(path)}

    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op, c = req["op"], self.c
        try:
            if op == "connect":
                return await self.job(c.pool_call(pool_path(req["pool"]), "Connect"))
            if op == "disconnect":
                return await self.job(c.pool_call(pool_path(req["pool"]), "Disconnect"))
            if op == "promote":
                return await self.job(c.promote(req["model"], req.get("pool", "")))
            if op == "promote_start":
                return {"ok": True, "job": await c.promote(req["model"], req.get("pool", ""))}
            if op == "wait_bytes":
                return await self.wait_bytes(req["job"], req["bytes"], req.get("timeout", 120))
            if op == "follow":
                return await self.job(asyncio.sleep(0, req["job"]))
            if op == "cold":
                return await self.cold()
            if op == "wait_cold":
                return await self.wait_cold(req["state"], req.get("timeout", 120))
            if op == "rescan":
                return {"ok": True, "count": await c.manager("Rescan")}
            if op == "links":
                return await asyncio.to_thread(self.links)
            if op == "sha256":
                return await asyncio.to_thread(self.sha256, req["rel"])
            if op == "status":
                return {"ok": True, **await self.status()}
            if op == "wait_pool":
                return await self.wait_pool(req["pool"], req["state"], req.get("timeout", 120))
            if op == "read":
                return await asyncio.to_thread(self.read, req["rel"])
        except (ClientError, OSError) as err:
            return {"ok": False, "error": str(err)}
        return {"ok": False, "error": f"unknown op {op!r}"}


def say(answer: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(answer, default=str) + "\n")
    sys.stdout.flush()


async def serve(address: str, config: Config, log: Path) -> None:
    async with await Client.connect(address) as client:
        await client.subscribe()
        agent = Agent(client, config)
        say({"ok": True, "ready": True, "log": str(log), **await agent.status()})
        while line := await asyncio.to_thread(sys.stdin.readline):
            req = json.loads(line)
            if req["op"] == "quit":
                break
            say(await agent.handle(req))


def main(config_path: Path) -> None:
    config, _ = load_config(config_path)
    with Sandbox() as sandbox:
        daemon = sandbox.start_daemon(config_path, timeout=300)
        try:
            asyncio.run(serve(sandbox.address, config, sandbox.log_dir / "speedloaderd.log"))
        finally:
            rc = sandbox.stop_daemon(daemon)
            sys.stderr.write(sandbox.daemon_log())
        say({"ok": rc == 0, "bye": True, "daemon_exit": rc})


if __name__ == "__main__":
    main(Path(sys.argv[1]))
