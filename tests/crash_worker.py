"""A real speedloader engine process for the crash tests: start (recovery included), print
READY, run one promote or demote, print DONE. The test SIGKILLs it at random instants.

``auto``: the whole daemon instead (speedloaderd.daemon.Daemon, without the bus), with
automatic tiering on: READY once started, STARTED once its plan started a job on the model
(the promote or the eviction), DONE once those jobs have ended. The kills are timed from
STARTED: from READY, the wait for the plan took most of the time and a CI run's kills
landed before the job, with the journal replayed once in 36 kills."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from speedloaderd.config import load_config
from speedloaderd.daemon import Daemon
from speedloaderd.engine import Engine


async def auto(config_path: str, model: str) -> None:
    config, path = load_config(Path(config_path))
    daemon = Daemon(config, path)
    await daemon.start()
    print("READY", flush=True)
    started = False
    while True:
        engine = daemon.engine
        assert engine is not None, daemon.config_error
        mine = [j for j in engine.jobs.values() if j.model == model and j.reason]
        if mine and not started:
            print("STARTED", flush=True)
            started = True
        if mine and all(j.finished for j in mine):
            break
        await asyncio.sleep(0.005)
    print("DONE", flush=True)


async def main(config_path: str, op: str, model: str) -> None:
    if op == "auto":
        return await auto(config_path, model)
    config, _ = load_config(Path(config_path))
    engine = Engine(config)
    await engine.start()
    print("READY", flush=True)
    job = engine.promote(model) if op == "promote" else engine.demote(model)
    await job.wait()
    print("DONE", flush=True)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
