"""Run the dashboard headless as whoever runs this script, press keys, print what it showed.

tests/test_tui_pilot.py runs it through ``setpriv`` as an unprivileged user, so that
polkit judges a real caller of that uid. Argument: JSON ``{"model": NAME, "keys": [...],
"expect": TEXT}``; waits until a notification containing ``expect`` is on screen.
Prints JSON: the notifications, and the HOT and COLD tables before and after.
"""

from __future__ import annotations

import asyncio
import json
import sys

from speedloader_tui.app import SpeedloaderApp
from tests.tui_helpers import SIZE, loaded, notifications, rows, wait


async def main(spec: dict) -> dict:
    app = SpeedloaderApp()
    async with app.run_test(size=SIZE) as pilot:
        await wait(app, loaded(app))
        before = {"hot": rows(app, "hot"), "cold": rows(app, "cold")}
        assert app.ui.query_one("ModelsPane").select_model(spec["model"]), spec["model"]
        await pilot.press(*spec["keys"])
        expect = spec["expect"].lower()
        await wait(app, lambda: any(expect in f"{t} {m}".lower() for _, t, m in notifications(app)))
        return {
            "notifications": notifications(app),
            "before": before,
            "after": {"hot": rows(app, "hot"), "cold": rows(app, "cold")},
            "jobs": sorted(app.state.jobs),
        }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(json.loads(sys.argv[1])))))
