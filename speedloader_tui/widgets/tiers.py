"""The Tiers tab: a card per RAM pool (usage bar, state, speed, path) with its lifecycle
actions, each confirmed first; and "+ Add tier". What the person chose and confirmed goes
out as a request message (messages.py) that the app sends to the daemon."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, Static

from speedloader_client.client import fastest_first
from speedloader_client.records import Job, Pool

from .. import fmt
from ..messages import AddPool, AddRemotePool, ConnectPool, DisconnectPool, RemovePool, ResizePool
from ..screens.dialogs import ConfirmScreen
from ..screens.pool_forms import (
    AddPoolScreen,
    AddRemotePoolScreen,
    NewPool,
    NewRemotePool,
    ResizePoolScreen,
)
from ..state import DaemonState
from .pool_usage import pool_jobs, transfers_text

POOL_OPERATIONS = {
    "pool-connect": "connecting",
    "pool-disconnect": "disconnecting (demoting its models first)",
    "pool-resize": "resizing",
}


class PoolCard(Vertical, can_focus=True):
    """One pool. Focus it (Tab, click) and use the keys, or click its buttons (the pane
    handles their presses)."""

    def __init__(self, pool: Pool, show_path: Callable[[str], str], **kw: Any):
        super().__init__(classes="pool-card", **kw)
        self.pool = pool
        self.show_path = show_path
        self.job: Job | None = None
        self.transfers: list[Job] = []
        self.ready = False  # children composed and mounted
        self.drawn: tuple[Pool, str | None, str] | None = None

    def on_mount(self) -> None:
        self.ready = True
        self.draw(self.pool, self.job, self.transfers)

    def compose(self) -> ComposeResult:
        yield Static(classes="card-title")
        yield Static(classes="card-usage")
        yield Static(classes="card-details")
        with Horizontal(classes="card-buttons"):
            yield Button("Connect", classes="do-connect", variant="success", compact=True)
            yield Button(
                "Disconnect",
                classes="do-disconnect",
                variant="warning",
                compact=True,
            )
            yield Button("Resize", classes="do-resize", compact=True)
            yield Button("Remove", classes="do-remove", variant="error", compact=True)

    def draw(self, pool: Pool, job: Job | None, transfers: list[Job]) -> None:
        """``job``: the pool's own running lifecycle job; ``transfers``: the models being
        copied into (or out of) it now."""
        self.pool, self.job, self.transfers = pool, job, transfers
        if not self.ready:
            return  # on_mount draws it
        moving = transfers_text(transfers)
        drawn = (replace(pool), f"{job.operation} {job.step}" if job else None, moving.plain)
        if drawn == self.drawn:
            return  # the transfer bars redraw 10 times a second; a card only on a change
        self.drawn = drawn
        show_path = self.show_path
        title = Text(pool.name, style="bold")
        title.append(f"  ({pool.kind or 'tmpfs'})", style="dim")
        title.append("  ")
        title.append_text(fmt.state(pool.state or "unknown"))
        if pool.problem:  # why it is degraded (the fabric was lost...)
            title.append(f"  {pool.problem}", style="bold red")
        if job is not None:
            doing = POOL_OPERATIONS.get(job.operation, job.operation)
            step = f": {job.step}" if job.step else ""
            title.append(f"  ⟳ {doing}{step}…", style="bold yellow")
        self.query_one(".card-title", Static).update(title)
        usage = Text()
        if pool.mounted:
            usage.append_text(fmt.bar(pool.fraction, 40, fmt.usage_style(pool.fraction)))
            usage.append(
                f" {pool.fraction * 100:3.0f}%  {fmt.size(pool.used_bytes)} used of "
                f"{fmt.size(pool.size_bytes)}, {fmt.size(pool.free_bytes)} free"
            )
            if pool.held_bytes:  # counted in the usage: freed when the holder lets go
                usage.append(f", {fmt.held(pool.held_bytes)}", style="bold yellow")
            usage.append_text(moving)
        else:
            usage.append("·" * 40, style="dim")
            usage.append(f"   not mounted ({fmt.size(pool.size_bytes)} when mounted)", style="dim")
        self.query_one(".card-usage", Static).update(usage)
        details = Text()
        details.append("speed ", style="dim")
        details.append(str(pool.speed), style="cyan")
        details.append("   path ", style="dim")
        details.append(show_path(pool.mount))
        self.query_one(".card-details", Static).update(details)
        busy = job is not None
        self.query_one(".do-connect", Button).disabled = busy or pool.mounted
        self.query_one(".do-disconnect", Button).disabled = busy or not pool.mounted
        self.query_one(".do-resize", Button).disabled = busy
        self.query_one(".do-remove", Button).disabled = busy or pool.mounted


class TiersPane(VerticalScroll):
    BINDINGS = [
        Binding("n", "connect", "Connect"),
        Binding("x", "disconnect", "Disconnect"),
        Binding("z", "resize", "Resize"),
        Binding("delete", "remove", "Remove"),
        Binding("a", "add", "+ Add tier"),
        Binding("A", "add_remote", "+ Add remote tier"),
    ]

    def __init__(self, show_path: Callable[[str], str] | None = None, **kw: Any):
        """``show_path`` rewrites paths for display (tests mask temp dirs)."""
        super().__init__(**kw)
        self.state = DaemonState()  # the app's, from the first redraw on
        self.show_path: Callable[[str], str] = show_path or (lambda p: p)

    def compose(self) -> ComposeResult:
        yield Vertical(id="pool-cards")
        with Horizontal(classes="buttons"):
            yield Button("+ Add tier", id="add-tier", compact=True)
            yield Button("+ Add remote tier", id="add-remote-tier", compact=True)

    def redraw(self, state: DaemonState) -> None:
        self.state = state
        box = self.query_one("#pool-cards", Vertical)
        pools = fastest_first(state.pools.values())
        cards = {c.pool.path: c for c in box.query(PoolCard)}
        if [p.path for p in pools] != list(cards):
            box.remove_children()
            cards = {p.path: PoolCard(p, self.show_path) for p in pools}
            box.mount_all(cards.values())
            if not pools:
                box.mount(Static("No RAM pools. Add one with '+ Add tier' (a).", classes="empty"))
        self._draw_cards(state)

    def _draw_cards(self, state: DaemonState) -> None:
        for card in self.query(PoolCard):
            pool = state.pools.get(card.pool.path)
            if pool is None:
                continue
            job = next(
                (
                    j
                    for j in state.jobs.values()
                    if j.running and j.pool == pool.name and j.operation.startswith("pool-")
                ),
                None,
            )
            card.draw(pool, job, pool_jobs(state, pool))

    def selected(self) -> Pool | None:
        """The focused card's pool (or the only pool there is)."""
        focused = self.screen.focused
        if focused is not None:
            for node in focused.ancestors_with_self:
                if isinstance(node, PoolCard):
                    return node.pool
        cards = list(self.query(PoolCard))
        return cards[0].pool if len(cards) == 1 else None

    # --- what a person can do to a pool: asked here, then one request to the app --------

    def connect_pool(self, pool: Pool) -> None:
        self.post_message(ConnectPool(pool.name))

    def disconnect_pool(self, pool: Pool) -> None:
        name = pool.name
        hot = [m.name for m in self.state.models.values() if m.tier == name]
        self._confirm_then(
            f"Disconnect pool {name}? "
            + (
                f"Its {len(hot)} hot model(s) will be demoted to cold storage first."
                if hot
                else "It holds no models."
            ),
            lambda: self.post_message(DisconnectPool(name)),
        )

    def resize_pool(self, pool: Pool) -> None:
        """The form refuses what is not a size, with the reason, before anything is asked
        or sent; a size it takes is confirmed, then sent."""
        name = pool.name

        def resize_to(size: str | None) -> None:
            if size:
                self._confirm_then(
                    f"Resize pool {name} to {size}?",
                    lambda: self.post_message(ResizePool(name, size)),
                )

        self.app.push_screen(ResizePoolScreen(name), resize_to)

    def remove_pool(self, pool: Pool) -> None:
        name = pool.name
        self._confirm_then(
            f"Remove pool {name} from the configuration?",
            lambda: self.post_message(RemovePool(name)),
        )

    def add_pool(self) -> None:
        def added(new: NewPool | None) -> None:
            if new is not None:
                self.post_message(AddPool(new.name, new.path, new.size, new.speed))

        self.app.push_screen(AddPoolScreen(), added)

    def add_remote_pool(self) -> None:
        def added(new: NewRemotePool | None) -> None:
            if new is not None:
                self.post_message(AddRemotePool(new.name, new.entry))

        self.app.push_screen(AddRemotePoolScreen(), added)

    def _confirm_then(self, question: str, action: Callable[[], object]) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                action()

        self.app.push_screen(ConfirmScreen(question), answered)

    # --- keys and buttons -------------------------------------------------------------

    def _need_pool(self) -> Pool | None:
        pool = self.selected()
        if pool is None:
            self.notify("Select a pool card first (Tab or click).", severity="warning")
        return pool

    def action_connect(self) -> None:
        if (pool := self._need_pool()) is not None:
            self.connect_pool(pool)

    def action_disconnect(self) -> None:
        if (pool := self._need_pool()) is not None:
            self.disconnect_pool(pool)

    def action_resize(self) -> None:
        if (pool := self._need_pool()) is not None:
            self.resize_pool(pool)

    def action_remove(self) -> None:
        if (pool := self._need_pool()) is not None:
            self.remove_pool(pool)

    def action_add(self) -> None:
        self.add_pool()

    def action_add_remote(self) -> None:
        self.add_remote_pool()

    def _card_of(self, event: Button.Pressed) -> Pool:
        """The pool of the card whose button was pressed; that card takes the focus."""
        event.stop()
        card = next(n for n in event.button.ancestors if isinstance(n, PoolCard))
        card.focus()
        return card.pool

    @on(Button.Pressed, ".do-connect")
    def _connect_pressed(self, event: Button.Pressed) -> None:
        self.connect_pool(self._card_of(event))

    @on(Button.Pressed, ".do-disconnect")
    def _disconnect_pressed(self, event: Button.Pressed) -> None:
        self.disconnect_pool(self._card_of(event))

    @on(Button.Pressed, ".do-resize")
    def _resize_pressed(self, event: Button.Pressed) -> None:
        self.resize_pool(self._card_of(event))

    @on(Button.Pressed, ".do-remove")
    def _remove_pressed(self, event: Button.Pressed) -> None:
        self.remove_pool(self._card_of(event))

    @on(Button.Pressed, "#add-tier")
    def _add_pressed(self) -> None:
        self.add_pool()

    @on(Button.Pressed, "#add-remote-tier")
    def _add_remote_pressed(self) -> None:
        self.add_remote_pool()

    def focus_first(self) -> None:
        cards = list(self.query(PoolCard))
        if cards:
            cards[0].focus()
