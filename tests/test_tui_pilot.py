"""The dashboard driven by Textual's Pilot against the real speedloaderd on the test bus:
keys pressed like a user, state read from what the widgets show."""

from __future__ import annotations

from speedloader_cli.client import MODEL
from speedloader_tui.app import SpeedloaderApp

from .buslab import run
from .tui_helpers import SIZE, loaded, mask, notifications, rows, transfer_rows, wait


def test_models_tab_shows_the_daemons_models(daemon):
    async def scenario():
        app = SpeedloaderApp(daemon.address, show_path=mask(str(daemon.lab.root)))
        async with app.run_test(size=SIZE) as pilot:
            await wait(app, loaded(app))
            cold, hot = rows(app, "cold"), rows(app, "hot")
            await pilot.press("slash", *"co")
            await wait(app, lambda: rows(app, "cold") == ["team/coder:7b"])
            return cold, hot, app.link.loads

    cold, hot, loads = run(scenario())
    assert sorted(cold) == ["small:3b", "team/coder:7b", "tiny:1b"] and hot == []
    assert loads == 1


def test_promote_from_the_models_tab(daemon_factory):
    """p on a cold model: it moves from COLD to HOT and its transfer bar reaches 100 %."""
    dl = daemon_factory(big=256 << 20)
    dl.start()

    async def scenario():
        app = SpeedloaderApp(dl.address, show_path=mask(str(dl.lab.root)))
        async with app.run_test(size=SIZE) as pilot:
            await wait(app, loaded(app))
            assert "big:70b" in rows(app, "cold")
            await pilot.press("slash", *"big", "enter")  # filter, then into the list
            await wait(app, lambda: rows(app, "cold") == ["big:70b"])
            await pilot.press("p")
            await wait(app, lambda: "big:70b" in rows(app, "hot"), timeout=120)
            seen = []

            def done() -> bool:
                seen.append(transfer_rows(app))
                return any("100%" in r[2] and "succeeded" in r[6] for r in seen[-1].values())

            await wait(app, done, timeout=120)
            return rows(app, "hot"), rows(app, "cold"), seen[-1], notifications(app)

    hot, cold, transfers, notes = run(scenario())
    assert hot == ["big:70b"] and cold == []
    (job,) = transfers.values()
    assert job[1].startswith("promote big:70b")
    assert [n for n in notes if n[0] == "error"] == []
    model = dl.state()["objects"]
    (props,) = [v[MODEL] for v in model.values() if MODEL in v and v[MODEL]["Name"] == "big:70b"]
    assert props["State"] == "hot" and props["Tier"] == "local"
