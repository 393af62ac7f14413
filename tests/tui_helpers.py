"""Helpers for the dashboard's tests: read what the app shows, wait for what it should
show. Waiting is on the app's own redraws and notifications, with a timeout; never a
sleep."""

from __future__ import annotations

from collections.abc import Callable

from speedloader_tui.app import SpeedloaderApp
from speedloader_tui.widgets.models import ModelTable
from speedloader_tui.widgets.transfers import TransfersPane

SIZE = (120, 40)


def rows(app: SpeedloaderApp, table: str) -> list[str]:
    """Model names in the HOT or COLD table, in display order."""
    t = app.query_one(f"#{table}", ModelTable)
    return [app.state.models[k].name for k in t.keys]


def row_text(app: SpeedloaderApp, table_id: str, key: str) -> list[str]:
    from textual.widgets import DataTable

    t = app.query_one(f"#{table_id}", DataTable)
    return [str(c) for c in t.get_row(key)]


def transfer_rows(app: SpeedloaderApp) -> dict[str, list[str]]:
    pane = app.query_one(TransfersPane)
    return {k: row_text(app, "jobs", k) for k in pane.keys}


def notifications(app: SpeedloaderApp) -> list[tuple[str, str, str]]:
    """(severity, title, message) of every notification still on screen."""
    return [(n.severity, n.title, n.message) for n in app._notifications]


async def wait(app: SpeedloaderApp, what: Callable[[], bool], timeout: float = 60) -> None:
    try:
        await app.wait_until(what, timeout)
    except TimeoutError:
        raise AssertionError(
            f"not seen within {timeout} s; hot={rows(app, 'hot')} cold={rows(app, 'cold')} "
            f"notifications={notifications(app)}"
        ) from None


def loaded(app: SpeedloaderApp) -> Callable[[], bool]:
    return lambda: app.link.loads > 0 and bool(rows(app, "cold") or rows(app, "hot"))


def mask(*prefixes: str) -> Callable[[str], str]:
    """Display paths with the test's temporary directories replaced by fixed words."""

    def show(path: str) -> str:
        for prefix, word in zip(prefixes, ("<lab>", "<sandbox>"), strict=False):
            path = path.replace(prefix, word)
        return path

    return show
