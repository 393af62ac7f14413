"""Run bus calls as whoever runs this script; print one JSON result per call.

The tests run it through ``setpriv`` as unprivileged users, so that polkit sees a real
caller of that uid. Argument: a JSON list of steps ``{"path", "iface", "member", "sig",
"args", "follow"}``; ``follow`` waits for the returned job's Completed signal.
Also ``{"own": NAME}``: try to own a bus name (the D-Bus policy must refuse).
"""

from __future__ import annotations

import asyncio
import json
import sys

from dbus_fast import DBusError

from speedloader_client.client import Client, ClientError


async def run(steps: list[dict]) -> list[dict]:
    results = []
    async with await Client.connect() as client:
        await client.subscribe()
        for step in steps:
            try:
                if "own" in step:
                    from dbus_fast import RequestNameReply

                    reply = await client.bus.request_name(step["own"])
                    results.append({"ok": RequestNameReply(reply).name})
                    continue
                value = await client.call(
                    step["path"],
                    step["iface"],
                    step["member"],
                    step.get("sig", ""),
                    step.get("args", []),
                )
                result: dict = {"ok": value}
                if step.get("follow") and isinstance(value, str) and "/jobs/" in value:
                    job = await client.follow_job(value, timeout=120)
                    result["job"] = {"success": job.success, "message": job.message}
                results.append(result)
            except ClientError as err:
                results.append({"error": err.name, "message": err.message})
            except DBusError as err:  # e.g. the bus refusing to let us own a name
                results.append({"error": err.type, "message": err.text})
    return results


if __name__ == "__main__":
    print(json.dumps(asyncio.run(run(json.loads(sys.argv[1])))))
