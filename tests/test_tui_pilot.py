"""The dashboard driven by Textual's Pilot against the real speedloaderd on the test bus:
keys pressed like a user, state read from what the widgets show."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from speedloader_client.client import MODEL, POOL
from speedloader_lab.sandbox import REPO
from speedloader_tui.app import SpeedloaderApp
from speedloader_tui.screens.dialogs import ConfirmScreen, PickPoolScreen

from .buslab import GUEST, as_user, run
from .tui_helpers import SIZE, loaded, mask, notifications, row_text, rows, transfer_rows, wait


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


def test_disconnect_a_pool_demotes_its_models(daemon):
    async def scenario():
        async with await daemon.client() as c:
            await c.subscribe()
            for model in ("tiny:1b", "team/coder:7b"):
                result = await c.follow_job(await c.promote(model), timeout=60)
                assert result.success, result.message
        app = SpeedloaderApp(daemon.address)
        async with app.run_test(size=SIZE) as pilot:
            await wait(app, loaded(app))
            hot_before = rows(app, "hot")
            await pilot.press("2")  # Tiers: the pool card gets the focus
            await pilot.pause()
            await pilot.press("x")  # disconnect the (only) pool card...
            await pilot.pause()
            assert isinstance(app.screen, ConfirmScreen), (app.focused, notifications(app))
            question = str(app.screen.query_one(".dialog-question").render())
            await pilot.press("y")  # ...after confirming
            pool = app.state.pool_by_name("local")
            await wait(app, lambda: rows(app, "hot") == [] and not pool.mounted, 60)
            card = app.ui.query_one("PoolCard")
            return (
                hot_before,
                question,
                rows(app, "cold"),
                str(card.query_one(".card-title").render()),
                notifications(app),
            )

    hot_before, question, cold, title, notes = run(scenario())
    assert sorted(hot_before) == ["team/coder:7b", "tiny:1b"]
    assert "2 hot model(s) will be demoted" in question
    assert sorted(cold) == ["small:3b", "team/coder:7b", "tiny:1b"]
    assert "unmounted" in title
    assert any("disconnected" in m and "served from cold storage" in m for _, _, m in notes), notes
    objects = daemon.state()
    pool = objects["objects"]["/org/speedloader/Speedloader1/pools/local"][POOL]
    assert pool["State"] == "unmounted"
    assert objects["pool_files"] is None or objects["pool_files"] == []


def test_denied_user_sees_not_authorized_and_nothing_changes(daemon):
    before = daemon.state()
    spec = {"model": "tiny:1b", "keys": ["p"], "expect": "not authorized"}
    r = subprocess.run(
        as_user(GUEST, [sys.executable, "-m", "tests.tui_guest", json.dumps(spec)], daemon.address),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    errors = [(t, m) for sev, t, m in seen["notifications"] if sev == "error"]
    assert errors and errors[0][0] == "Not authorized", seen["notifications"]
    assert "promote tiny:1b" in errors[0][1] and "not authorized" in errors[0][1].lower()
    assert errors[0][1].count("'speedloader' group") == 1, "the advice is given once"
    assert seen["after"] == seen["before"] and "tiny:1b" in seen["after"]["cold"]
    assert seen["jobs"] == []
    after = daemon.state()
    assert after["links"] == before["links"] and after["pool_files"] == before["pool_files"]
    assert after["objects"] == before["objects"]


def test_the_view_survives_a_daemon_restart(daemon):
    async def scenario():
        app = SpeedloaderApp(daemon.address)
        async with app.run_test(size=SIZE):
            await wait(app, loaded(app))
            offline = app.ui.query_one("#offline")
            assert not offline.display
            await asyncio.to_thread(daemon.stop)
            await wait(app, lambda: offline.display and not app.state.online)
            banner = str(offline.render())
            await asyncio.to_thread(daemon.start)
            await wait(app, lambda: app.link.loads == 2 and not offline.display)
            return banner, rows(app, "cold"), notifications(app)

    banner, cold, notes = run(scenario())
    assert "not running" in banner
    assert sorted(cold) == ["small:3b", "team/coder:7b", "tiny:1b"]
    titles = [t for _, t, _ in notes]
    assert "Daemon unreachable" in titles and "Reconnected" in titles


def test_settings_are_saved_through_the_daemon(daemon):
    """Strategy and SSH key set in the form reach the daemon's validated config."""

    async def scenario():
        app = SpeedloaderApp(daemon.address)
        async with app.run_test(size=SIZE) as pilot:
            await wait(app, loaded(app))
            pane = app.ui.query_one("SettingsPane")
            await pilot.press("4")
            await wait(app, lambda: pane.base != {})
            app.ui.query_one("#cfg-strategy").value = "fill-first"
            app.ui.query_one("#cfg-ssh-key").value = "/root/.ssh/id_ed25519"
            await pilot.press("ctrl+s")
            await wait(app, lambda: any(t == "Saved" for _, t, _ in notifications(app)))
            await wait(app, lambda: app.state.manager.strategy == "fill-first")
            # A bad value is refused by the daemon, shown, and changes nothing.
            app.ui.query_one("#cfg-ssh-key").value = "relative/key"
            await pilot.press("ctrl+s")
            await wait(app, lambda: any(s == "error" for s, _, _ in notifications(app)))
            return notifications(app)

    notes = run(scenario())
    config = json.loads(daemon.state()["config"])
    assert config["modelPlacement"]["defaultStrategy"] == "fill-first"
    assert config["sshKeyPath"] == "/root/.ssh/id_ed25519"
    errors = [m for s, _, m in notes if s == "error"]
    assert errors and "save settings" in errors[0] and "relative/key" in errors[0], errors


def test_pin_to_a_picked_pool_then_unpin_from_settings(daemon):
    async def scenario():
        app = SpeedloaderApp(daemon.address)
        async with app.run_test(size=SIZE) as pilot:
            await wait(app, loaded(app))
            assert app.ui.query_one("ModelsPane").select_model("small:3b")
            await pilot.press("i")  # pin: pick the pool
            await pilot.pause()
            assert isinstance(app.screen, PickPoolScreen)
            await pilot.press("enter")  # the first (only) pool
            model = app.state.model_by_name("small:3b")
            await wait(app, lambda: model.pinned_pool == "local")
            pinned = rows(app, "cold")
            await pilot.press("4")
            settings = app.ui.query_one("SettingsPane")
            await wait(app, lambda: settings.pin_keys == ["small:3b"])
            settings.query_one("#pins").focus()
            await pilot.press("u")
            await wait(app, lambda: model.pinned_pool == "" and settings.pin_keys == [])
            return pinned, settings.pin_keys

    pinned, pins_after = run(scenario())
    assert "small:3b" in pinned
    config = json.loads(daemon.state()["config"])
    assert config.get("modelPlacement", {}).get("pinned", {}) == {}
    assert pins_after == []


def test_cancel_a_running_transfer_from_the_transfers_tab(daemon_factory):
    dl = daemon_factory(big=1 << 30)
    dl.start()
    before = dl.state()

    async def scenario():
        app = SpeedloaderApp(dl.address)
        async with app.run_test(size=SIZE) as pilot:
            await wait(app, loaded(app))
            assert app.ui.query_one("ModelsPane").select_model("big:70b")
            await pilot.press("p", "3")
            # Cancel as soon as the bar has moved: the copy is under way.
            await wait(
                app,
                lambda: any(j.running and j.bytes_done > 0 for j in app.state.jobs.values()),
                120,
            )
            # The pool shows the copy under way, on the Models strip and on its Tiers card
            # (its usage bar is the daemon's UsedBytes, which lags the copy).
            strip = app.ui.query_one("#pool-strip")
            card = app.ui.query_one("PoolCard .card-usage")
            await wait(
                app,
                lambda: all("⟳ promote big:70b" in str(w.render()) for w in (strip, card)),
                120,
            )
            await pilot.press("c")
            await wait(
                app, lambda: any(r[6] == "cancelled" for r in transfer_rows(app).values()), 120
            )
            await wait(app, lambda: "big:70b" in rows(app, "cold"))
            return transfer_rows(app), notifications(app)

    transfers, notes = run(scenario())
    (row,) = transfers.values()
    assert row[1].startswith("promote big:70b") and row[6] == "cancelled", row
    assert any(t.startswith("Cancelled") for _, t, _ in notes), notes
    after = dl.state()
    assert after["links"] == before["links"] and after["pool_files"] == []


def test_health_check_and_repair(daemon):
    """A pool copy deleted behind the daemon's back: the check finds it, repair fixes it."""

    async def scenario():
        async with await daemon.client() as c:
            await c.subscribe()
            await c.follow_job(await c.promote("team/coder:7b"), timeout=60)
        for f in daemon.lab.pool_path("local").rglob("*"):
            if f.is_file():
                f.unlink()
        app = SpeedloaderApp(daemon.address)
        async with app.run_test(size=SIZE) as pilot:
            await wait(app, loaded(app))
            summary = app.ui.query_one("#health-summary")
            await pilot.press("5", "h")
            await wait(app, lambda: "finding" in str(summary.render()))
            checked = str(summary.render())
            await pilot.press("r")
            await pilot.pause()
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("y")
            await wait(app, lambda: "repair was run" in str(summary.render()))
            repaired = str(summary.render())
            assert await pilot.click("#health-check")  # the button does what h does
            await wait(app, lambda: "repair was run" not in str(summary.render()))
            return checked, repaired, str(summary.render())

    checked, repaired, again = run(scenario())
    assert checked.startswith("Problems found"), checked
    assert "repair was run" in repaired
    assert again.startswith("Healthy"), again


def test_first_run_banner_leads_to_settings_and_a_saved_config(daemon_factory):
    dl = daemon_factory()
    dl.lab.config_path.write_text("{}\n")  # as after installation: nothing configured
    dl.start()
    lab = dl.lab

    async def scenario():
        app = SpeedloaderApp(dl.address)
        async with app.run_test(size=SIZE) as pilot:
            banner = app.ui.query_one("#first-run")
            await wait(app, lambda: app.link.loads > 0 and banner.display)
            text = str(app.ui.query_one("#first-run-text").render())
            await pilot.pause()  # the banner's layout, before clicking its button
            assert await pilot.click("#open-settings")
            await pilot.pause()
            assert app.ui.query_one("TabbedContent").active == "settings"
            for field, value in (
                ("models-dir", str(lab.models)),
                ("cold", str(lab.cold)),
                ("state-dir", str(lab.state)),
            ):
                app.ui.query_one(f"#cfg-{field}").value = value
            app.ui.query_one("#cfg-backend").value = "ollama"
            await pilot.click("#save-settings")
            await wait(app, lambda: not banner.display and len(rows(app, "cold")) == 3)
            return text, rows(app, "cold")

    text, cold = run(scenario())
    assert "no valid configuration" in text
    assert sorted(cold) == ["small:3b", "team/coder:7b", "tiny:1b"]
    saved = json.loads(lab.config_path.read_text())
    assert saved["modelsDir"] == str(lab.models) and saved["backend"] == {"type": "ollama"}


def test_no_space_is_one_readable_notification(daemon_factory):
    """The daemon takes the promote and its job fails for lack of room: one notification
    with the daemon's sentence, and the model stays cold."""
    dl = daemon_factory(big=300 << 20, pool_size=256 << 20)  # the big model cannot fit
    dl.start()

    async def scenario():
        app = SpeedloaderApp(dl.address)
        async with app.run_test(size=SIZE) as pilot:
            await wait(app, loaded(app))
            assert app.ui.query_one("ModelsPane").select_model("big:70b")
            await pilot.press("p")
            await wait(app, lambda: any(s == "error" for s, _, _ in notifications(app)))
            return notifications(app), rows(app, "hot")

    notes, hot = run(scenario())
    (error,) = [(t, m) for s, t, m in notes if s == "error"]
    assert error[0] == "Failed: promote big:70b", error
    assert error[1].startswith("no connected pool has room") and "Traceback" not in error[1]
    assert hot == []


def test_add_a_remote_tier_from_the_tiers_tab(daemon):
    """'+ Add remote tier' saves a remoteTiers entry through the daemon. A port that is not
    a number is refused in the form (it stays open, nothing is sent); a bad address is
    refused by the daemon, shown, and saves nothing."""
    from speedloader_tui.screens.pool_forms import AddRemotePoolScreen

    async def fill(app, pilot, values: dict[str, str]) -> None:
        await pilot.press("A")
        await wait(app, lambda: isinstance(app.screen, AddRemotePoolScreen))
        for key, value in values.items():
            app.screen.query_one(f"#f-{key}").value = value
        await pilot.click("#ok")
        await pilot.pause()

    async def scenario():
        app = SpeedloaderApp(daemon.address)
        async with app.run_test(size=SIZE) as pilot:
            await wait(app, loaded(app))
            await pilot.press("2")
            await fill(app, pilot, {"name": "far", "ssh": "root@127.0.0.1:9",
                                    "address": "127.0.0.1", "size": "64M",
                                    "port": "44x"})  # fmt: skip
            form = app.screen
            assert isinstance(form, AddRemotePoolScreen), "the form closed on a bad port"
            inline = str(form.query_one("#form-error").render())
            at_fault = app.focused.id
            await pilot.press("escape")
            await fill(app, pilot, {"name": "far", "ssh": "root@127.0.0.1:9",
                                    "address": "not-an-ip", "size": "64M"})  # fmt: skip
            await wait(app, lambda: any("not-an-ip" in m for _, _, m in notifications(app)))
            refused = json.loads(daemon.lab.config_path.read_text())
            await fill(app, pilot, {"name": "far", "ssh": "root@127.0.0.1:9",
                                    "address": "127.0.0.1", "size": "64M",
                                    "transport": "tcp"})  # fmt: skip
            await wait(app, lambda: any(p.name == "far" for p in app.state.pools.values()))
            far = next(p for p in app.state.pools.values() if p.name == "far")
            return inline, at_fault, refused, far.kind, far.state, notifications(app)

    inline, at_fault, refused, kind, state, notes = run(scenario())
    assert "port '44x' is not a whole number" in inline and at_fault == "f-port", inline
    assert "far" not in refused.get("remoteTiers", {}).get("hosts", {})
    errors = [m for s, _, m in notes if s == "error"]
    assert len(errors) == 1 and "not-an-ip" in errors[0], errors
    assert (kind, state) == ("nvmeof", "unmounted")
    saved = json.loads(daemon.lab.config_path.read_text())["remoteTiers"]["hosts"]["far"]
    assert saved["ssh"] == "root@127.0.0.1:9" and saved["transport"] == "tcp"


def test_the_tier_forms_open_with_their_first_field_focused(daemon):
    """Resize and '+ Add tier': what a person types goes into the first field at once."""
    from speedloader_tui.screens.pool_forms import AddPoolScreen, ResizePoolScreen

    async def scenario():
        app = SpeedloaderApp(daemon.address)
        async with app.run_test(size=SIZE) as pilot:
            await wait(app, loaded(app))
            await pilot.press("2", "z")
            await wait(app, lambda: isinstance(app.screen, ResizePoolScreen))
            await pilot.press(*"64M")
            resize = (app.focused.id, app.screen.query_one("#f-size").value)
            await pilot.press("escape", "a")
            await wait(app, lambda: isinstance(app.screen, AddPoolScreen))
            await pilot.press(*"fast")
            add = (app.focused.id, app.screen.query_one("#f-name").value)
            await pilot.press("escape")
            return resize, add

    resize, add = run(scenario())
    assert resize == ("f-size", "64M")
    assert add == ("f-name", "fast")


def test_resize_refuses_what_is_not_a_size_in_the_form(daemon):
    """'abc' is refused under the field, with the daemon's parser's reason: no confirmation
    asked, nothing sent (the daemon and its config are as before). A size it takes is
    confirmed, then done by the daemon."""
    from speedloader_tui.screens.pool_forms import ResizePoolScreen

    before = daemon.state()  # its objects, links, pool files and config

    async def scenario():
        app = SpeedloaderApp(daemon.address)
        async with app.run_test(size=SIZE) as pilot:
            await wait(app, loaded(app))
            await pilot.press("2", "z")
            await wait(app, lambda: isinstance(app.screen, ResizePoolScreen))
            await pilot.press(*"abc", "enter")
            await pilot.pause()
            form = app.screen
            refused = (
                type(form).__name__,
                str(form.query_one("#form-error").render()),
                app.focused.id,
                dict(app.state.jobs),
                notifications(app),
            )
            during = await asyncio.to_thread(daemon.state)
            form.query_one("#f-size").value = ""
            await pilot.press(*"128M", "enter")
            await wait(app, lambda: isinstance(app.screen, ConfirmScreen))
            question = str(app.screen.query_one(".dialog-question").render())
            await pilot.press("y")
            pool = app.state.pool_by_name("local")
            await wait(app, lambda: pool.size_bytes == 128 << 20, 60)
            return refused, during, question

    (screen, inline, focused, jobs, notes), during, question = run(scenario())
    assert screen == "ResizePoolScreen", "the form closed (or asked to confirm) on 'abc'"
    assert "'abc' is not a size" in inline and focused == "f-size", inline
    assert jobs == {} and notes == [], (jobs, notes)
    assert during == before, "something reached the daemon"
    assert question == "Resize pool local to 128M?"
    assert json.loads(daemon.state()["config"])["pools"][0]["size"] == "128M"


def test_a_demote_from_the_models_table_goes_out_as_a_message(daemon):
    """d on a hot model: the pane posts a Demote request, the app's handler runs the job.
    The model demoted is the one selected, also after another client's promote redrew
    both tables (the redrawn COLD table must not take over the keys)."""
    from speedloader_tui.messages import Demote

    async def scenario():
        async with await daemon.client() as c:
            await c.subscribe()
            result = await c.follow_job(await c.promote("tiny:1b"), timeout=60)
            assert result.success, result.message
        posted: list[str] = []

        def hook(message) -> None:
            if isinstance(message, Demote):
                posted.append(message.model)

        app = SpeedloaderApp(daemon.address)
        async with app.run_test(size=SIZE, message_hook=hook) as pilot:
            await wait(app, loaded(app))
            assert app.ui.query_one("ModelsPane").select_model("tiny:1b")
            await pilot.pause()
            async with await daemon.client() as c:
                await c.subscribe()
                result = await c.follow_job(await c.promote("small:3b"), timeout=60)
                assert result.success, result.message
            await wait(app, lambda: rows(app, "hot") == ["small:3b", "tiny:1b"])
            await pilot.press("d")
            await wait(app, lambda: "tiny:1b" in rows(app, "cold"), 60)
            await wait(app, lambda: any(t.startswith("Done") for _, t, _ in notifications(app)))
            jobs = [(j.operation, j.model, j.state) for j in app.state.jobs.values()]
            return posted, jobs, rows(app, "hot")

    posted, jobs, hot = run(scenario())
    assert posted and set(posted) == {"tiny:1b"}, posted  # once per node it bubbled through
    assert ("demote", "tiny:1b", "succeeded") in jobs, jobs
    assert hot == ["small:3b"]
    objects = daemon.state()["objects"]
    (props,) = [v[MODEL] for v in objects.values() if MODEL in v and v[MODEL]["Name"] == "tiny:1b"]
    assert props["State"] == "cold"


def test_a_degraded_pools_problem_is_on_its_card(daemon):
    """Pool.Problem (why a pool is degraded) reaches the Tiers card, as the link delivers it:
    a PropertiesChanged as the daemon sends for a remote pool whose fabric was lost."""
    from textual.widgets import Static

    from speedloader_tui.widgets.tiers import PoolCard

    problem = "pool far lost its fabric: nvme0 disconnected; models served from cold"

    async def scenario():
        app = SpeedloaderApp(daemon.address)
        async with app.run_test(size=SIZE) as pilot:
            await wait(app, loaded(app))
            await pilot.press("2")
            [path] = app.state.pools
            app.state.changed(path, POOL, {"State": "degraded", "Problem": problem})
            app.link.on_change()

            def title() -> str:
                cards = app.query(PoolCard)
                return str(cards.first().query_one(".card-title", Static).render()) if cards else ""

            await wait(app, lambda: problem in title())
            return title()

    shown = run(scenario())
    assert "degraded" in shown and problem in shown


def test_why_a_model_is_hot_its_uses_and_the_next_eviction_show(daemon_factory):
    """Automatic tiering on, a model opened twice through the models dir: the daemon promotes
    it by itself; the dashboard says why it is hot, how often it was used, that tiering is
    on and what the next eviction would take, and the job's reason in Transfers."""
    from .test_autotiering import tiering_lab, use

    dl, models = tiering_lab(daemon_factory)
    dl.start()

    async def scenario():
        app = SpeedloaderApp(dl.address, show_path=mask(str(dl.lab.root)))
        async with app.run_test(size=SIZE) as pilot:
            await wait(app, loaded(app))
            strip = app.ui.query_one("#pool-strip")

            def tiering() -> str:
                return str(strip.render()).splitlines()[-1]

            assert tiering() == "automatic tiering on  next eviction: none"
            use(dl, models["a:1"], 2)
            await wait(app, lambda: rows(app, "hot") == ["a:1"])
            key = app.state.model_by_name("a:1").path
            await wait(app, lambda: row_text(app, "hot", key)[4:] == ["2", "auto: used 2x in 1 h"])
            await wait(
                app,
                lambda: (
                    tiering()
                    == "automatic tiering on  next eviction: a:1 from local (used 2x in 1 h)"
                ),
            )
            await pilot.press("3")
            await wait(app, lambda: bool(transfer_rows(app)))
            return row_text(app, "hot", key), transfer_rows(app)

    hot, transfers = run(scenario())
    assert hot[0] == "a:1" and hot[2] == "local", hot
    (job,) = transfers.values()
    assert job[1] == "promote a:1 → local" and job[7].startswith("auto: used 2x in 1 h"), job
