"""SVG snapshots of every tab and dialog of the dashboard, drawn from a real speedloaderd.

Deterministic by construction: a fixed terminal size, the lab always at the same path
(so paths on screen never change), only finished jobs whose messages carry no timing,
no notification on screen. The textual version is pinned in pyproject.toml; a new one
may draw differently: look at the report (snapshot_report.html), then re-accept with
``--snapshot-update``.
"""

from __future__ import annotations

import fcntl
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from speedloader_tui.app import SpeedloaderApp

from .buslab import DaemonLab, run
from .conftest import unmount_below
from .tui_helpers import SIZE, loaded, rows, wait

LAB = Path("/tmp/sl-tui-snapshot-lab")


def _clear() -> None:
    if LAB.exists():
        left = unmount_below(LAB)
        assert not left, f"cannot unmount {left}"
        shutil.rmtree(LAB)


@pytest.fixture
def fixed_lab(sandbox) -> Iterator[DaemonLab]:
    """A daemon lab at a fixed path, so that the paths on screen are the same every run;
    a second run of the suite on this machine waits for the first instead of clobbering."""
    with open("/tmp/sl-tui-snapshot-lab.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _clear()
        LAB.mkdir(mode=0o755)
        dl = DaemonLab(sandbox, LAB)
        try:
            yield dl
        finally:
            if dl.proc is not None:
                dl.stop()
            dl.lab.check_cold_unchanged()
            _clear()


async def _promote_and_pin(dl: DaemonLab) -> None:
    async with await dl.client() as c:
        await c.subscribe()
        result = await c.follow_job(await c.promote("tiny:1b"), timeout=60)
        assert result.success, result.message
        assert await c.pin("team/coder:7b", "local") == "/"


def _loaded_then(*keys: str, until=None):
    async def before(pilot) -> None:
        app = pilot.app
        await wait(app, loaded(app))
        for key in keys:  # one at a time, each handled before the next
            await pilot.press(key)
            await pilot.pause()
        if until is not None:
            await wait(app, lambda: until(app))
        await pilot.pause()

    return before


def test_models_tab(fixed_lab, snap_compare):
    fixed_lab.start()
    run(_promote_and_pin(fixed_lab))
    app = SpeedloaderApp(fixed_lab.address)
    assert snap_compare(app, terminal_size=SIZE, run_before=_loaded_then())


def test_models_tab_filtered_and_sorted_by_size(fixed_lab, snap_compare):
    fixed_lab.start()
    app = SpeedloaderApp(fixed_lab.address)
    assert snap_compare(
        app,
        terminal_size=SIZE,
        run_before=_loaded_then(
            "slash",
            "m",
            "enter",
            "o",
            until=lambda a: rows(a, "cold") == ["team/coder:7b", "small:3b"],
        ),
    )


def test_tiers_tab(fixed_lab, snap_compare):
    fixed_lab.start()
    run(_promote_and_pin(fixed_lab))
    app = SpeedloaderApp(fixed_lab.address)
    assert snap_compare(app, terminal_size=SIZE, run_before=_loaded_then("2"))


def test_disconnect_confirmation(fixed_lab, snap_compare):
    fixed_lab.start()
    run(_promote_and_pin(fixed_lab))
    app = SpeedloaderApp(fixed_lab.address)
    assert snap_compare(app, terminal_size=SIZE, run_before=_loaded_then("2", "x"))


def test_resize_form_refuses_what_is_not_a_size(fixed_lab, snap_compare):
    """The form stays open with what was typed, says why under it, keeps the cursor in the
    field; no confirmation is asked."""
    fixed_lab.start()
    app = SpeedloaderApp(fixed_lab.address)
    assert snap_compare(
        app,
        terminal_size=SIZE,
        run_before=_loaded_then(
            "2",
            "z",
            "a",
            "b",
            "c",
            "enter",
            until=lambda a: a.screen.query_one("#form-error").display,
        ),  # fmt: skip
    )


def test_pick_a_pool_dialog(fixed_lab, snap_compare):
    fixed_lab.start()
    app = SpeedloaderApp(fixed_lab.address)
    assert snap_compare(app, terminal_size=SIZE, run_before=_loaded_then("P"))


def test_transfers_tab(fixed_lab, snap_compare):
    """Finished pool jobs and a demote: their messages carry no timings."""
    fixed_lab.start()
    pool = "/org/speedloader/Speedloader1/pools/local"

    async def jobs() -> None:
        async with await fixed_lab.client() as c:
            await c.subscribe()
            for member, sig, args in (
                ("Disconnect", "", ()),
                ("Connect", "", ()),
                ("Resize", "s", ("512M",)),
            ):
                job = await c.pool_call(pool, member, sig, *args)
                result = await c.follow_job(job, timeout=60)
                assert result.success, result.message
            await c.follow_job(await c.demote("tiny:1b"), timeout=60)

    run(jobs())
    app = SpeedloaderApp(fixed_lab.address)
    assert snap_compare(app, terminal_size=SIZE, run_before=_loaded_then("3"))


def test_settings_tab(fixed_lab, snap_compare):
    fixed_lab.start()
    run(_promote_and_pin(fixed_lab))
    app = SpeedloaderApp(fixed_lab.address)
    assert snap_compare(
        app,
        terminal_size=SIZE,
        run_before=_loaded_then("4", until=lambda a: a.ui.query_one("SettingsPane").base != {}),
    )


def test_health_tab_after_a_check(fixed_lab, snap_compare):
    fixed_lab.start()
    run(_promote_and_pin(fixed_lab))
    app = SpeedloaderApp(fixed_lab.address)
    assert snap_compare(
        app,
        terminal_size=SIZE,
        run_before=_loaded_then(
            "5",
            "h",
            until=lambda a: "finding" in str(a.ui.query_one("#health-summary").render()),
        ),
    )


def test_help_screen(fixed_lab, snap_compare):
    fixed_lab.start()
    app = SpeedloaderApp(fixed_lab.address)
    assert snap_compare(app, terminal_size=SIZE, run_before=_loaded_then("question_mark"))


def test_first_run_banner(fixed_lab, snap_compare):
    """No valid configuration: the daemon runs without an engine and says why."""
    fixed_lab.lab.config_path.write_text('{"modelsDir": "relative/path"}\n')
    fixed_lab.start()
    app = SpeedloaderApp(fixed_lab.address)

    async def before(pilot) -> None:
        await wait(app, lambda: app.link.loads > 0 and app.ui.query_one("#first-run").display)
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=before)


def test_daemon_not_running(sandbox, snap_compare):
    """The bus is there, the daemon is not: say so, and wait for it."""
    app = SpeedloaderApp(sandbox.address)

    async def before(pilot) -> None:
        await wait(app, lambda: app.ui.query_one("#offline").display and bool(app._notifications))
        app.clear_notifications()
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=before)
