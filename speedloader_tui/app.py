"""speedloader-tui: the live dashboard of speedloaderd, an unprivileged bus client.

State flows one way: the link applies the daemon's signals to ``DaemonState`` and calls
``on_change``; the app redraws what changed, transfers at most every ``FAST`` seconds
and everything else at most every ``SLOW`` seconds, and nothing at all while the bus is
quiet (no timer runs when nothing is pending). Requests flow the other way: a pane posts
one of the messages in messages.py (after asking whatever it had to ask), the app's
handler for it makes the call; its failure comes back as one readable notification.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from rich.text import Text
from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.notifications import SeverityLevel
from textual.timer import Timer
from textual.widgets import Button, Footer, Header, Static, TabbedContent, TabPane

from speedloader_client.client import ERROR_PREFIX, MANAGER, ROOT, Client, ClientError
from speedloader_client.records import Job, Manager

from .errors import explain
from .link import DaemonLink
from .messages import (
    AddPool,
    AddRemotePool,
    CancelJob,
    CheckHealth,
    ConnectPool,
    Demote,
    DisconnectPool,
    Pin,
    Promote,
    ReloadConfig,
    RemovePool,
    ResizePool,
    SaveConfig,
    Unpin,
)
from .screens.help import HelpScreen
from .state import JOBS, MANAGER_PART, MODELS, POOLS, DaemonState
from .widgets.health import HealthPane
from .widgets.models import ModelsPane
from .widgets.settings import SettingsPane
from .widgets.tiers import TiersPane
from .widgets.transfers import TransfersPane

FAST = 0.1  # transfers: ~10 Hz at most
SLOW = 0.5  # tables, cards, banners: 2 Hz at most


class SpeedloaderApp(App[None]):
    CSS_PATH = "speedloader.tcss"
    AUTO_FOCUS = "#hot"
    TITLE = "Speedloader"
    SUB_TITLE = "models in RAM"
    BINDINGS = [
        Binding("1", "tab('models')", "Models", show=False),
        Binding("2", "tab('tiers')", "Tiers", show=False),
        Binding("3", "tab('transfers')", "Transfers", show=False),
        Binding("4", "tab('settings')", "Settings", show=False),
        Binding("5", "tab('health')", "Health", show=False),
        Binding("question_mark,f1", "help", "Help"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(
        self,
        address: str | None = None,
        *,
        show_path: Callable[[str], str] | None = None,
        connect: bool = True,
    ):
        """``address``: the system bus (default: DBUS_SYSTEM_BUS_ADDRESS or the usual
        socket). ``show_path`` rewrites paths for display (tests mask temp dirs)."""
        super().__init__()
        self.state = DaemonState()
        self.show_path: Callable[[str], str] = show_path or (lambda p: p)
        self.link = DaemonLink(self.state, address, self._on_change, self._on_link_event)
        self._connect = connect
        self._pending: set[str] = set()
        self._fast: Timer | None = None
        self._slow: Timer | None = None
        self.redraws = 0
        self.redrawn = asyncio.Event()  # set after every redraw; tests wait on it
        self._notified_offline = False
        self._focused_tab = "models"  # AUTO_FOCUS starts there
        self._my_jobs: set[str] = set()  # started here: their ends are told here
        self._unclaimed: dict[str, Job] = {}

    # --- layout --------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="first-run", classes="banner"):
            yield Static(id="first-run-text")
            yield Button("Open Settings", id="open-settings", variant="warning", compact=True)
        yield Static(id="offline", classes="banner")
        with TabbedContent(id="tabs"):
            with TabPane("Models [1]", id="models"):
                yield ModelsPane(self.show_path, id="models-pane")
            with TabPane("Tiers [2]", id="tiers"):
                yield TiersPane(self.show_path, id="tiers-pane")
            with TabPane("Transfers [3]", id="transfers"):
                yield TransfersPane(id="transfers-pane")
            with TabPane("Settings [4]", id="settings"):
                yield SettingsPane(id="settings-pane")
            with TabPane("Health [5]", id="health"):
                yield HealthPane(self.show_path, id="health-pane")
        yield Footer()

    def on_mount(self) -> None:
        # The main screen, also while a dialog is on top: signals keep arriving then.
        self.ui = self.screen
        self.ui.query_one("#first-run").display = False
        self.ui.query_one("#offline", Static).update("Connecting to speedloaderd…")
        if self._connect:
            self.run_worker(self.link.run(), name="daemon-link", exclusive=True)

    async def on_unmount(self) -> None:
        self.link.stop()
        for timer in (self._fast, self._slow):
            if timer is not None:
                timer.stop()
        self._fast = self._slow = None

    # --- from the link -------------------------------------------------------------------

    def _on_change(self) -> None:
        self._pending |= self.state.take_dirty()
        if JOBS in self._pending and self._fast is None:
            self._fast = self.set_timer(FAST, self._flush_fast)
        if self._pending - {JOBS} and self._slow is None:
            self._slow = self.set_timer(SLOW, self._flush_slow)

    def _flush_fast(self) -> None:
        self._fast = None
        if not self.ui.is_attached:
            return  # the app is closing
        if JOBS in self._pending:
            self._pending.discard(JOBS)
            self.ui.query_one(TransfersPane).redraw(self.state)
            # A card and a strip line show their pool's jobs (each redraws only on a change).
            self.ui.query_one(TiersPane).redraw(self.state)
            self.ui.query_one(ModelsPane).redraw_pools(self.state)
        self._redrawn()

    def _flush_slow(self) -> None:
        self._slow = None
        if not self.ui.is_attached:
            return
        parts, self._pending = self._pending - {JOBS}, self._pending & {JOBS}
        self.redraw(parts)

    def redraw(self, parts: set[str]) -> None:
        if MODELS in parts or POOLS in parts:
            self.ui.query_one(ModelsPane).redraw(self.state)
        elif MANAGER_PART in parts:  # tiering on/off and the next eviction, under the pools
            self.ui.query_one(ModelsPane).redraw_pools(self.state)
        if POOLS in parts:
            self.ui.query_one(TiersPane).redraw(self.state)
        if MODELS in parts or MANAGER_PART in parts:
            self.ui.query_one(SettingsPane).redraw(self.state)
        if MANAGER_PART in parts:
            self._draw_banners()
        self._redrawn()

    def _redrawn(self) -> None:
        self.redraws += 1
        self.redrawn.set()

    def _draw_banners(self) -> None:
        m = self.state.manager
        first_run = self.state.online and not m.config_valid
        self.ui.query_one("#first-run").display = first_run
        if first_run:
            self.ui.query_one("#first-run-text", Static).update(
                Text.assemble(
                    ("Welcome to Speedloader.", "bold"),
                    " The daemon has no valid configuration yet: ",
                    m.config_error or "none found",  # the daemon's words: literal, no markup
                    ". Set it up in Settings.",
                )
            )
        offline = self.ui.query_one("#offline", Static)
        offline.display = not self.state.online
        offline.update(
            "speedloaderd is not running (or not reachable). What you see may be stale; "
            "this view reconnects by itself when the daemon is back."
        )

    def _on_link_event(self, kind: str, detail: Any) -> None:
        if kind in ("online", "offline", "bus-lost"):
            self._redraw_now()
        if kind == "online":
            assert isinstance(detail, Manager)
            hot = self.ui.query_one("#hot")
            if hot.has_focus and not self.state_has_hot():
                self.ui.query_one("#cold").focus()  # the list with something to act on
            if self._notified_offline:
                self.notify("speedloaderd is back; view reloaded.", title="Reconnected")
                self._notified_offline = False
            self.load_config()
        elif kind in ("offline", "bus-lost"):
            if not self._notified_offline:
                self.notify(str(detail), title="Daemon unreachable", severity="warning")
                self._notified_offline = True
        elif kind == "job-done":
            assert isinstance(detail, Job)
            if detail.path in self._my_jobs:
                self._my_jobs.discard(detail.path)
                self._job_done(detail)
            elif detail.state == "failed":
                self._job_done(detail)  # someone else's, but a failure is news to all
            else:
                # Possibly ours, its Completed handled before the call's reply: keep it.
                self._unclaimed[detail.path] = detail
                while len(self._unclaimed) > 100:
                    self._unclaimed.pop(next(iter(self._unclaimed)))
        elif kind == "error":
            self.report(detail, "reading the daemon's state")

    def _redraw_now(self) -> None:
        """A (new) daemon appeared or went away: draw everything now, not in 0.5 s."""
        for timer in (self._fast, self._slow):
            if timer is not None:
                timer.stop()
        self._fast = self._slow = None
        self.state.take_dirty()
        self._pending = set()
        self.ui.query_one(TransfersPane).redraw(self.state)
        self.redraw({MODELS, POOLS, MANAGER_PART})

    def state_has_hot(self) -> bool:
        return any(m.hot for m in self.state.models.values())

    def _job_done(self, job: Job) -> None:
        what = f"{job.operation} {job.model or job.pool}".strip()
        if job.state == "succeeded":
            self.notify(job.message or f"{what}: done", title=f"Done: {what}", timeout=4)
        elif job.state == "cancelled" or job.error_name == ERROR_PREFIX + "Cancelled":
            self.notify(
                job.message or f"{what}: cancelled", title=f"Cancelled: {what}", severity="warning"
            )
        else:
            self.notify(
                job.message or f"{what}: failed",
                title=f"Failed: {what}",
                severity="error",
                timeout=10,
            )

    # --- calls ---------------------------------------------------------------------------

    def notify(
        self,
        message: str,
        *,
        title: str = "",
        severity: SeverityLevel = "information",
        timeout: float | None = None,
        markup: bool = False,
    ) -> None:
        """Textual's notify, but reading no markup by default: most notifications carry
        the daemon's words (a job's message, a name), which must show as they are."""
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=markup)

    def _on_notify(self, event: Any) -> None:
        super()._on_notify(event)
        self.redrawn.set()  # the notification is on screen now: whoever waits for it wakes

    def report(self, err: BaseException, doing: str = "") -> None:
        e = explain(err, doing)
        self.notify(
            e.sentence,
            title=e.title,
            severity=e.severity,  # type: ignore[arg-type]
            timeout=10,
        )

    def call_daemon(
        self,
        doing: str,
        fn: Callable[[Client], Awaitable[Any]],
        then: Callable[[Any], None] | None = None,
    ) -> None:
        """Run one call in a worker; on failure, one notification that says why."""

        async def work() -> None:
            try:
                result = await self.link.call(fn)
            except ClientError as err:
                self.report(err, doing)
                return
            if then is not None:
                then(result)
                self._redrawn()

        self.run_worker(work(), group="calls")

    def _started(self, path: Any) -> None:
        """A call returned a job: tell how it ends (it may have ended already)."""
        if not isinstance(path, str) or "/jobs/" not in path:
            return
        done = self._unclaimed.pop(path, None)
        if done is not None:
            self._job_done(done)
        else:
            self._my_jobs.add(path)

    # --- requests from the panes (messages.py): one call each -----------------------

    @on(Promote)
    def promote(self, request: Promote) -> None:
        model, pool = request.model, request.pool
        self.call_daemon(f"promote {model}", lambda c: c.promote(model, pool), self._started)

    @on(Demote)
    def demote(self, request: Demote) -> None:
        model = request.model
        self.call_daemon(f"demote {model}", lambda c: c.demote(model), self._started)

    @on(Pin)
    def pin(self, request: Pin) -> None:
        model, pool = request.model, request.pool

        def pinned(job: Any) -> None:
            self.notify(f"{model} is pinned to {pool}.", title="Pinned", timeout=4)
            self._started(job)  # hot elsewhere: the pin moves it

        self.call_daemon(f"pin {model} to {pool}", lambda c: c.pin(model, pool), pinned)

    @on(Unpin)
    def unpin(self, request: Unpin) -> None:
        model = request.model
        self.call_daemon(
            f"unpin {model}",
            lambda c: c.unpin(model),
            lambda _: self.notify(f"{model} is no longer pinned.", title="Unpinned", timeout=4),
        )

    @on(CancelJob)
    def cancel_job(self, request: CancelJob) -> None:
        path = request.path
        self.call_daemon("cancel", lambda c: c.cancel(path))

    def _pool_job(self, doing: str, name: str, member: str, *args: str) -> None:
        """A Pool method that returns a job; the pool may be gone since the pane asked."""
        pool = self.state.pool_by_name(name)
        if pool is None:
            return
        sig = "s" * len(args)
        self.call_daemon(doing, lambda c: c.pool_call(pool.path, member, sig, *args), self._started)

    @on(ConnectPool)
    def connect_pool(self, request: ConnectPool) -> None:
        self._pool_job(f"connect {request.pool}", request.pool, "Connect")

    @on(DisconnectPool)
    def disconnect_pool(self, request: DisconnectPool) -> None:
        self._pool_job(f"disconnect {request.pool}", request.pool, "Disconnect")

    @on(ResizePool)
    def resize_pool(self, request: ResizePool) -> None:
        self._pool_job(f"resize {request.pool}", request.pool, "Resize", request.size)

    @on(RemovePool)
    def remove_pool(self, request: RemovePool) -> None:
        name = request.pool
        self.call_daemon(
            f"remove {name}",
            lambda c: c.manager("RemovePool", "s", name),
            lambda _: self.notify(f"Pool {name} removed.", title="Removed", timeout=4),
        )

    @on(AddPool)
    def add_pool(self, request: AddPool) -> None:
        name, path, size, speed = request.name, request.path, request.size, request.speed
        self.call_daemon(
            f"add pool {name}",
            lambda c: c.manager("AddPool", "sssu", name, path, size, speed),
            lambda _: self.notify(
                f"Pool {name} added; connect it with n.", title="Added", timeout=4
            ),
        )

    @on(AddRemotePool)
    def add_remote_pool(self, request: AddRemotePool) -> None:
        """Saved in remoteTiers through the daemon's validated SetConfig (the same edit as
        `slctl pool add --remote`); Connect follows."""
        name, entry = request.name, request.entry
        self.call_daemon(
            f"add remote pool {name}",
            lambda c: c.add_remote_pool(name, entry),
            lambda _: self.notify(
                f"Remote pool {name} added; connect it with n.", title="Added", timeout=4
            ),
        )

    @on(CheckHealth)
    def run_health(self, request: CheckHealth) -> None:
        repair, verify = request.repair, request.verify
        self.call_daemon(
            "repair" if repair else "health check",
            lambda c: c.manager("Health", "bb", repair, verify),
            lambda r: self.ui.query_one(HealthPane).show_report(bool(r[0]), list(r[1]), repair),
        )

    @on(ReloadConfig)
    def reload_config(self) -> None:
        self.load_config()

    def load_config(self) -> None:
        if not self.state.online:
            return
        self.call_daemon(
            "read the configuration",
            lambda c: c.get_config(),
            lambda config: self.ui.query_one(SettingsPane).fill(config),
        )

    @on(SaveConfig)
    def save_config(self, request: SaveConfig) -> None:
        config = request.config

        def saved(_: Any) -> None:
            self.notify("Configuration saved and adopted by the daemon.", title="Saved", timeout=4)
            self.load_config()  # the Manager's properties follow by PropertiesChanged

        self.call_daemon(
            "save settings", lambda c: c.manager("SetConfig", "s", json.dumps(config)), saved
        )

    def _manager_read(self, props: dict[str, Any]) -> None:
        self.state.changed(ROOT, MANAGER, props)
        self._on_change()

    # --- actions -------------------------------------------------------------------------

    def action_tab(self, tab: str) -> None:
        # Let go of the focus first: a focused widget in the old pane would pull it back.
        self.ui.set_focus(None)
        self.ui.query_one(TabbedContent).active = tab
        self._focus_tab(tab)

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        # A click on a tab: give its pane the focus (keys 1-5 did so already).
        if event.pane.id != self._focused_tab:
            self._focus_tab(event.pane.id or "models")

    def _focus_tab(self, tab: str) -> None:
        self._focused_tab = tab
        widget = self.ui.query_one(f"#{tab}-pane")  # as composed: the tab's id + "-pane"
        focus = getattr(widget, "focus_models", None) or getattr(widget, "focus_first", None)

        def focus_if_still_there() -> None:
            # Focusing a widget in a hidden pane would switch back to it: only if current.
            if focus is not None and self.ui.query_one(TabbedContent).active == tab:
                focus()

        self.call_after_refresh(focus_if_still_there)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    @on(Button.Pressed, "#open-settings")
    def _open_settings_pressed(self) -> None:
        self.action_tab("settings")

    # --- for tests and scripts -----------------------------------------------------------

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 30) -> None:
        """Return once ``predicate()`` holds after a redraw; TimeoutError otherwise."""

        async def wait() -> None:
            while not predicate():
                self.redrawn.clear()
                await self.redrawn.wait()

        await asyncio.wait_for(wait(), timeout)
