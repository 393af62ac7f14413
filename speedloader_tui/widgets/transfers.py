"""The Transfers tab: every job the daemon still holds, running ones first, with a live
progress bar, rate, time left and Cancel."""

from __future__ import annotations

import time
from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, DataTable, Static

from speedloader_client.records import Job

from .. import fmt
from ..messages import CancelJob
from ..state import DaemonState

BAR_WIDTH = 24
COLUMNS = (
    ("job", "Job"),
    ("what", "Operation"),
    ("progress", "Progress"),
    ("bytes", "Done"),
    ("rate", "Rate"),
    ("eta", "Left"),
    ("state", "State"),
    ("message", "Message"),
)


def job_cells(job: Job, now: float) -> list[Any]:
    what = job.operation
    if job.model:
        what += f" {job.model}"
    if job.pool:
        what += f" → {job.pool}" if job.operation == "promote" else f" ({job.pool})"
    fraction = job.progress if job.bytes_total or not job.running else 0.0
    if job.state == "succeeded":
        fraction = 1.0
    progress = fmt.bar(fraction, BAR_WIDTH, "yellow" if job.running else "green")
    progress.append(f" {fraction * 100:3.0f}%")
    done = (
        f"{fmt.size(job.bytes_done)}/{fmt.size(job.bytes_total)}"
        if job.bytes_total
        else fmt.UNKNOWN
    )
    if job.running:
        rate = fmt.rate(job.rate)
        eta = fmt.eta(job.expected_end_time / 1e6 - now) if job.expected_end_time else fmt.UNKNOWN
    else:  # a finished job's last rate and ETA are history, not news
        rate, eta = "", ""
    if job.running and job.step:
        message = Text(f"step: {job.step}", style="yellow")
    else:
        message = Text(job.message, style="dim")
    if job.reason:  # started by automatic tiering: why, before what it said
        message = Text.assemble((job.reason, "cyan"), "  " if message else "", message)
    return [
        Text(f"#{job.id}", style="dim"),
        Text(what),  # the daemon's names: literal, never markup
        progress,
        done,
        rate,
        eta,
        fmt.state(job.state),
        message,
    ]


class TransfersPane(Vertical):
    BINDINGS = [Binding("c", "cancel", "Cancel transfer")]

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        self.state = DaemonState()  # the app's, from the first redraw on

    def compose(self) -> ComposeResult:
        with Horizontal(id="transfer-tools"):
            yield Static(id="transfer-summary")
            yield Button("Cancel selected (c)", id="cancel-job", variant="error", compact=True)
        yield DataTable(id="jobs", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        table = self.query_one("#jobs", DataTable)
        for key, label in COLUMNS:
            table.add_column(label, key=key)
        self.keys: list[str] = []
        self.cells: dict[str, list[str]] = {}

    def redraw(self, state: DaemonState) -> None:
        self.state = state
        now = time.time()
        jobs = sorted(state.jobs.values(), key=lambda j: (not j.running, -j.id))
        table = self.query_one("#jobs", DataTable)
        rows = {j.path: job_cells(j, now) for j in jobs}
        keys = [j.path for j in jobs]
        if keys == self.keys:
            for key in keys:
                new = [str(c) for c in rows[key]]
                old = self.cells.get(key, [""] * len(new))
                for (col, _), value, was, shown in zip(COLUMNS, rows[key], old, new, strict=True):
                    if was != shown:  # only changes; a wider cell also needs a layout pass
                        table.update_cell(key, col, value, update_width=len(shown) > len(was))
                self.cells[key] = new
        else:
            selected = self.selected_path()
            table.clear()
            for key in keys:
                table.add_row(*rows[key], key=key)
            self.keys = keys
            self.cells = {k: [str(c) for c in v] for k, v in rows.items()}
            if selected in keys:
                table.move_cursor(row=keys.index(selected), animate=False)
        running = [j for j in jobs if j.running]
        summary = Text(f"{len(running)} running", style="bold yellow" if running else "dim")
        if running:
            total_rate = sum(j.rate for j in running)
            summary.append(f" at {fmt.rate(total_rate)}")
        summary.append(
            f", {len(jobs) - len(running)} finished (kept by the daemon for a while)", style="dim"
        )
        self.query_one("#transfer-summary", Static).update(summary)

    def selected_path(self) -> str | None:
        table = self.query_one("#jobs", DataTable)
        if not self.keys or not 0 <= table.cursor_row < len(self.keys):
            return None
        return self.keys[table.cursor_row]

    def action_cancel(self) -> None:
        path = self.selected_path()
        job = self.state.jobs.get(path) if path else None
        if job is None or not job.running:
            self.notify("Select a running transfer first.", severity="warning")
        elif not job.cancelable:
            self.notify(
                f"Job #{job.id} ({job.operation}) cannot be cancelled now.",
                severity="warning",
                markup=False,
            )
        else:
            self.post_message(CancelJob(job.path))

    @on(Button.Pressed, "#cancel-job")
    def _cancel_pressed(self) -> None:
        self.action_cancel()

    def focus_first(self) -> None:
        self.query_one("#jobs", DataTable).focus()
