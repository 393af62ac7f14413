"""A real speedloader engine process for the crash tests: start (recovery included), print
READY, run one promote or demote, print DONE. The test SIGKILLs it at random instants."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from speedloaderd.config import load_config
from speedloaderd.engine import Engine


async def main(config_path: str, op: str, model: str) -> None:
    config, _ = load_config(Path(config_path))
    engine = Engine(config)
    await engine.start()
    print("READY", flush=True)
    job = engine.promote(model) if op == "promote" else engine.demote(model)
    await job.wait()
    print("DONE", flush=True)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
