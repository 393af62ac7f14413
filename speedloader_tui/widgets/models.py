"""The Models tab: the pools' usage at a glance, then HOT (in RAM) and COLD (storage only)
side by side; filter as you type, sort by any column."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Input, Label, Static

from speedloader_client.client import fastest_first
from speedloader_client.records import Job, Model, Pool

from .. import fmt
from ..messages import CancelJob, Demote, Pin, Promote, Unpin
from ..screens.dialogs import PickPoolScreen
from ..state import DaemonState
from .pool_usage import pool_jobs, transfers_text

SORTS: dict[str, Callable[[Model], Any]] = {
    "name": lambda m: m.name,
    "size": lambda m: (-m.size_bytes, m.name),
    "state": lambda m: (m.state, m.name),
    "tier": lambda m: (m.tier, m.name),
    "format": lambda m: (m.format, m.name),
    "pin": lambda m: (m.pinned_pool == "", m.pinned_pool, m.name),
    "uses": lambda m: (-m.use_count, m.name),  # most used first
}
SORT_ORDER = list(SORTS)

# A hot model's pin is in its Why ("pinned to local"): no Pinned column here, so that the
# Why fits beside the COLD column (which is narrower: 3fr to 2fr, speedloader.tcss).
HOT_COLUMNS = (
    ("name", "Model"),
    ("size", "Size"),
    ("tier", "Pool"),
    ("state", "State"),
    ("uses", "Uses"),
    ("why", "Why"),  # why it is hot: "pinned to local", "in use (loaded)", "auto: used 4x in 1 h"
)
COLD_COLUMNS = (
    ("name", "Model"),
    ("size", "Size"),
    ("format", "Format"),
    ("pin", "Pinned"),
    ("state", "State"),
)


def model_cells(m: Model, columns: Sequence[tuple[str, str]]) -> list[Any]:
    cells: dict[str, Any] = {
        "name": Text(m.name, style="bold" if m.hot else ""),
        "size": Text(fmt.size(m.size_bytes), justify="right"),
        # Text, not str: a str cell would be read as markup, and these are the daemon's.
        "tier": Text(m.tier),
        "format": Text(m.format),
        "pin": Text(m.pinned_pool or ""),
        "state": _state_cell(m),
        # Uses automatic tiering has seen; blank for none (most models, when it is off).
        "uses": Text(str(m.use_count) if m.use_count else "", justify="right"),
        "why": Text(m.why, style="cyan"),
    }
    return [cells[key] for key, _ in columns]


def _state_cell(m: Model) -> Text:
    """The state, or its first problem; then who uses the model (the backend, holders)."""
    if m.problems:
        cell = Text(f"{m.state}: {m.problems[0]}", style="bold red")
    else:
        cell = fmt.state(m.state)
    use = fmt.model_use(m.loaded, m.holders, "")
    if use:
        cell.append(f"  {use}", style="cyan")
    return cell


def pool_line(
    p: Pool, width: int, show_path: Callable[[str], str], jobs: list[Job] | None = None
) -> Text:
    line = Text()
    line.append(f"{p.name:<12.12}", style="bold")
    if p.mounted:
        line.append_text(fmt.bar(p.fraction, width, fmt.usage_style(p.fraction)))
        line.append(f" {p.fraction * 100:3.0f}%  ")
        line.append(f"{fmt.size(p.used_bytes)} / {fmt.size(p.size_bytes)}")
        line.append_text(transfers_text(jobs or []))
    else:
        line.append("·" * width, style="dim")
        line.append(f"   —   {fmt.size(p.size_bytes)} when mounted", style="dim")
    line.append(f"  speed {p.speed}", style="cyan")
    line.append("  ")
    line.append_text(fmt.state(p.state or "unknown"))
    line.append(f"  {show_path(p.mount)}", style="dim")
    return line


def tiering_line(state: DaemonState) -> Text:
    """Automatic tiering under the pools: on or off (paused, and why), and the model the
    next eviction would take, as the Manager says (TieringNextEviction)."""
    m = state.manager
    line = Text("automatic tiering ", style="dim")
    style = "dim" if m.tiering != "on" else "yellow" if m.tiering_paused else "bold green"
    line.append(fmt.tiering(m.tiering, m.tiering_paused), style=style)
    if m.tiering == "on":
        line.append("  next eviction: ", style="dim")
        line.append(m.tiering_next_eviction or "none")  # the daemon's words: literal
    return line


class ModelTable(DataTable):
    """One of the two columns. Rows are keyed by the model's object path."""

    def __init__(self, columns: Sequence[tuple[str, str]], **kw: Any):
        super().__init__(cursor_type="row", zebra_stripes=True, **kw)
        self.spec = columns
        self.keys: list[str] = []
        self.cells: dict[str, list[Any]] = {}

    def on_mount(self) -> None:
        for key, label in self.spec:
            self.add_column(label, key=key)

    @property
    def selected_key(self) -> str | None:
        if not self.keys or self.cursor_row < 0 or self.cursor_row >= len(self.keys):
            return None
        return self.keys[self.cursor_row]

    def show(self, models: list[Model]) -> None:
        """Make the rows say ``models`` in this order, touching only what changed."""
        keys = [m.path for m in models]
        rows = {m.path: model_cells(m, self.spec) for m in models}
        if keys == self.keys:
            for key in keys:
                old, new = self.cells.get(key) or [""] * len(rows[key]), rows[key]
                for (col, _), was, value in zip(self.spec, old, new, strict=True):
                    if str(was) != str(value):  # only changes; wider ones need a layout
                        self.update_cell(
                            key, col, value, update_width=len(str(value)) > len(str(was))
                        )
            self.cells = rows
            return
        selected = self.selected_key
        self.clear()
        for key in keys:
            self.add_row(*rows[key], key=key)
        self.keys, self.cells = keys, rows
        if selected in rows:
            self.move_cursor(row=keys.index(selected), animate=False)


class ModelsPane(Vertical):
    BINDINGS = [
        Binding("p", "promote", "Promote"),
        Binding("P", "promote_to", "Promote to…"),
        Binding("d", "demote", "Demote"),
        Binding("c", "cancel", "Cancel"),
        Binding("i", "pin", "Pin"),
        Binding("u", "unpin", "Unpin"),
        Binding("slash", "filter", "Filter"),
        Binding("o", "sort", "Sort"),
    ]

    def __init__(self, show_path: Callable[[str], str] | None = None, **kw: Any):
        """``show_path`` rewrites paths for display (tests mask temp dirs)."""
        super().__init__(**kw)
        self.state = DaemonState()  # the app's, from the first redraw on
        self.show_path: Callable[[str], str] = show_path or (lambda p: p)
        self.sort_key = "name"
        self.filter_text = ""
        self.last_table = "hot"
        self._shown: dict[str, str] = {}

    def compose(self) -> ComposeResult:
        yield Static(id="pool-strip")
        with Horizontal(id="model-tools"):
            yield Input(
                placeholder="filter models (type to filter, Enter to go to the list)",
                id="model-filter",
            )
            yield Static(id="sort-label")
        with Horizontal(id="model-columns"):
            with Vertical(id="hot-column"):
                yield Label("", id="hot-title", classes="column-title")
                yield ModelTable(HOT_COLUMNS, id="hot")
            with Vertical(id="cold-column"):
                yield Label("", id="cold-title", classes="column-title")
                yield ModelTable(COLD_COLUMNS, id="cold")

    def on_mount(self) -> None:
        self._show_sort()

    # --- drawing -------------------------------------------------------------------------

    def redraw(self, state: DaemonState) -> None:
        self.state = state
        self.redraw_pools(state)
        needle = self.filter_text.lower()
        shown = [m for m in state.models.values() if needle in m.name.lower()]
        key = SORTS[self.sort_key]
        shown.sort(key=key)
        hot = [m for m in shown if m.hot]
        cold = [m for m in shown if not m.hot]
        self.query_one("#hot", ModelTable).show(hot)
        self.query_one("#cold", ModelTable).show(cold)
        hot_total = sum(m.size_bytes for m in hot)
        self._set("#hot-title", f"HOT — in RAM: {len(hot)} model(s), {fmt.size(hot_total)}")
        self._set(
            "#cold-title",
            f"COLD — storage only: {len(cold)} model(s)"
            + (f" (filter: {len(shown)}/{len(state.models)})" if needle else ""),
        )

    def redraw_pools(self, state: DaemonState) -> None:
        """The pool strip: also at the transfers' pace, as it shows the copies under way."""
        pools = fastest_first(state.pools.values())
        if pools:
            lines = [pool_line(p, 24, self.show_path, pool_jobs(state, p)) for p in pools]
        else:
            lines = [Text("no RAM pools configured", style="dim")]
        # Tiering as the daemon says it; not while it is away or has no configuration
        # (then there is no tiering to speak of, and the banner says why).
        if state.online and state.manager.config_valid:
            lines.append(tiering_line(state))
        self._set("#pool-strip", Text("\n").join(lines))

    def _set(self, selector: str, content: Text | str) -> None:
        """Update a Static only when its content changed (an update costs a layout)."""
        key = str(content) if isinstance(content, str) else content.markup
        if self._shown.get(selector) != key:
            self._shown[selector] = key
            self.query_one(selector, Static).update(content)

    def _show_sort(self) -> None:
        self.query_one("#sort-label", Static).update(f"sort: {self.sort_key} (o)")

    # --- selection -----------------------------------------------------------------------

    def on_descendant_focus(self, event: Any) -> None:
        if isinstance(event.widget, ModelTable):
            self.last_table = event.widget.id or "hot"

    def selected(self) -> Model | None:
        key = self.query_one(f"#{self.last_table}", ModelTable).selected_key
        return self.state.models.get(key) if key is not None else None

    def focus_models(self) -> None:
        table = self.query_one(f"#{self.last_table}", ModelTable)
        if not table.keys:
            other = "cold" if self.last_table == "hot" else "hot"
            table = self.query_one(f"#{other}", ModelTable)
        table.focus()

    def select_model(self, name: str) -> bool:
        """Put the cursor on ``name`` (in whichever column it is); True if found."""
        model = self.state.model_by_name(name)
        if model is None:
            return False
        table = self.query_one("#hot" if model.hot else "#cold", ModelTable)
        if model.path not in table.keys:
            return False
        table.move_cursor(row=table.keys.index(model.path), animate=False)
        table.focus()
        self.last_table = table.id or "hot"
        return True

    def _need_model(self) -> Model | None:
        model = self.selected()
        if model is None:
            self.notify(
                "Select a model first (arrow keys, or click a row).",
                title="No model selected",
                severity="warning",
            )
        return model

    # --- events --------------------------------------------------------------------------

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "model-filter":
            self.filter_text = event.value
            self.redraw(self.state)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "model-filter":
            self.focus_models()

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        key = str(event.column_key.value)
        if key in SORTS:
            self.sort_key = key
            self._show_sort()
            self.redraw(self.state)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        # Only the table in use: a redraw of the other one (its rows changed by a signal)
        # highlights a row too, and must not make the next key act on that table's model.
        if isinstance(event.data_table, ModelTable) and event.data_table.has_focus:
            self.last_table = event.data_table.id or "hot"

    # --- actions -------------------------------------------------------------------------

    def action_filter(self) -> None:
        self.query_one("#model-filter", Input).focus()

    def action_sort(self) -> None:
        i = SORT_ORDER.index(self.sort_key)
        self.sort_key = SORT_ORDER[(i + 1) % len(SORT_ORDER)]
        self._show_sort()
        self.redraw(self.state)

    def action_promote(self) -> None:
        if (model := self._need_model()) is not None:
            self.post_message(Promote(model.name))

    def action_promote_to(self) -> None:
        if (model := self._need_model()) is not None:
            name = model.name
            self._pick_pool(
                f"Promote {name} to which pool?",
                lambda pool: self.post_message(Promote(name, pool)),
            )

    def action_demote(self) -> None:
        if (model := self._need_model()) is not None:
            self.post_message(Demote(model.name))

    def action_cancel(self) -> None:
        if (model := self._need_model()) is not None:
            job = self.state.running_job_for(model.name)
            if job is None:
                self.notify(
                    f"No transfer of {model.name} is running.", severity="warning", markup=False
                )
            else:
                self.post_message(CancelJob(job.path))

    def action_pin(self) -> None:
        if (model := self._need_model()) is not None:
            name = model.name
            self._pick_pool(
                f"Pin {name} to which pool?", lambda pool: self.post_message(Pin(name, pool))
            )

    def action_unpin(self) -> None:
        if (model := self._need_model()) is not None:
            self.post_message(Unpin(model.name))

    def _pick_pool(self, question: str, then: Callable[[str], object]) -> None:
        pools = fastest_first(self.state.pools.values())
        if not pools:
            self.notify("There is no pool to choose.", severity="warning")
            return

        def picked(pool: str | None) -> None:
            if pool:
                then(pool)

        self.app.push_screen(PickPoolScreen(question, pools), picked)
