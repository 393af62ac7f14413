"""The Tiers tab: a card per RAM pool (usage bar, state, speed, path) with its lifecycle
actions, each confirmed first; and "+ Add tier"."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, Static

from speedloader_cli.client import fastest_first

from .. import fmt
from ..state import DaemonState, JobInfo, PoolInfo

if TYPE_CHECKING:
    from ..app import SpeedloaderApp

POOL_OPERATIONS = {
    "pool-connect": "connecting",
    "pool-disconnect": "disconnecting (demoting its models first)",
    "pool-resize": "resizing",
}


class PoolCard(Vertical, can_focus=True):
    """One pool. Focus it (Tab, click) and use the keys, or click its buttons."""

    app: SpeedloaderApp

    def __init__(self, pool: PoolInfo, **kw: Any):
        super().__init__(classes="pool-card", **kw)
        self.pool = pool
        self.job: JobInfo | None = None
        self.ready = False  # children composed and mounted
        self.drawn: tuple[PoolInfo, str | None] | None = None

    def on_mount(self) -> None:
        self.ready = True
        self.draw(self.pool, self.job)

    def compose(self) -> ComposeResult:
        yield Static(classes="card-title")
        yield Static(classes="card-usage")
        yield Static(classes="card-details")
        with Horizontal(classes="card-buttons"):
            yield Button(
                "Connect", name="connect", classes="do-connect", variant="success", compact=True
            )
            yield Button(
                "Disconnect",
                name="disconnect",
                classes="do-disconnect",
                variant="warning",
                compact=True,
            )
            yield Button("Resize", name="resize", classes="do-resize", compact=True)
            yield Button(
                "Remove", name="remove", classes="do-remove", variant="error", compact=True
            )

    def draw(self, pool: PoolInfo, job: JobInfo | None) -> None:
        self.pool, self.job = pool, job
        if not self.ready:
            return  # on_mount draws it
        drawn = (replace(pool), f"{job.operation} {job.step}" if job else None)
        if drawn == self.drawn:
            return  # the transfer bars redraw 10 times a second; a card needs not
        self.drawn = drawn
        show_path = self.app.show_path
        title = Text(pool.name, style="bold")
        title.append(f"  ({pool.kind or 'tmpfs'})", style="dim")
        title.append("  ")
        title.append_text(fmt.state("connected" if pool.connected else pool.state or "unknown"))
        if job is not None:
            doing = POOL_OPERATIONS.get(job.operation, job.operation)
            step = f": {job.step}" if job.step else ""
            title.append(f"  ⟳ {doing}{step}…", style="bold yellow")
        self.query_one(".card-title", Static).update(title)
        usage = Text()
        if pool.connected:
            usage.append_text(fmt.bar(pool.fraction, 40, fmt.usage_style(pool.fraction)))
            usage.append(
                f" {pool.fraction * 100:3.0f}%  {fmt.size(pool.used)} used of "
                f"{fmt.size(pool.size)}, {fmt.size(pool.free)} free"
            )
        else:
            usage.append("·" * 40, style="dim")
            usage.append(f"   disconnected ({fmt.size(pool.size)} when connected)", style="dim")
        self.query_one(".card-usage", Static).update(usage)
        details = Text()
        details.append("speed ", style="dim")
        details.append(str(pool.speed), style="cyan")
        details.append("   path ", style="dim")
        details.append(show_path(pool.mount))
        self.query_one(".card-details", Static).update(details)
        busy = job is not None
        self.query_one(".do-connect", Button).disabled = busy or pool.connected
        self.query_one(".do-disconnect", Button).disabled = busy or not pool.connected
        self.query_one(".do-resize", Button).disabled = busy
        self.query_one(".do-remove", Button).disabled = busy or pool.connected

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.focus()
        self.app.pool_action(str(event.button.name), self.pool.name)


class TiersPane(VerticalScroll):
    BINDINGS = [
        Binding("n", "pool('connect')", "Connect"),
        Binding("x", "pool('disconnect')", "Disconnect"),
        Binding("z", "pool('resize')", "Resize"),
        Binding("delete", "pool('remove')", "Remove"),
        Binding("a", "add", "+ Add tier"),
        Binding("A", "add_remote", "+ Add remote tier"),
    ]

    app: SpeedloaderApp

    def compose(self) -> ComposeResult:
        yield Vertical(id="pool-cards")
        with Horizontal(classes="buttons"):
            yield Button("+ Add tier", id="add-tier", compact=True)
            yield Button("+ Add remote tier", id="add-remote-tier", compact=True)

    def redraw(self, state: DaemonState) -> None:
        box = self.query_one("#pool-cards", Vertical)
        pools = fastest_first(state.pools.values())
        cards = {c.pool.path: c for c in box.query(PoolCard)}
        if [p.path for p in pools] != list(cards):
            box.remove_children()
            cards = {p.path: PoolCard(p) for p in pools}
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
            card.draw(pool, job)

    def selected(self) -> PoolInfo | None:
        """The focused card's pool (or the only pool there is)."""
        focused = self.screen.focused
        if focused is not None:
            for node in focused.ancestors_with_self:
                if isinstance(node, PoolCard):
                    return node.pool
        cards = list(self.query(PoolCard))
        return cards[0].pool if len(cards) == 1 else None

    def action_pool(self, what: str) -> None:
        pool = self.selected()
        if pool is None:
            self.app.notify("Select a pool card first (Tab or click).", severity="warning")
            return
        self.app.pool_action(what, pool.name)

    def action_add(self) -> None:
        self.app.add_pool()

    def action_add_remote(self) -> None:
        self.app.add_remote_pool()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "add-tier":
            self.app.add_pool()
        elif event.button.id == "add-remote-tier":
            self.app.add_remote_pool()

    def focus_first(self) -> None:
        cards = list(self.query(PoolCard))
        if cards:
            cards[0].focus()
