"""The Health tab: the daemon's own check of links, pools and copies; repair on request."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Checkbox, DataTable, Static

from ..messages import CheckHealth
from ..screens.dialogs import ConfirmScreen

STATUS_STYLES = {"ok": "green", "warning": "yellow", "error": "bold red", "fixed": "cyan"}


class HealthPane(Vertical):
    BINDINGS = [
        Binding("h", "check", "Check"),
        Binding("r", "repair", "Repair"),
        Binding("v", "toggle_verify", "Verify digests"),
    ]

    def __init__(self, show_path: Callable[[str], str] | None = None, **kw: Any):
        """``show_path`` rewrites paths for display (tests mask temp dirs)."""
        super().__init__(**kw)
        self.show_path: Callable[[str], str] = show_path or (lambda p: p)

    def compose(self) -> ComposeResult:
        with Horizontal(id="health-tools"):
            yield Button("Check (h)", id="health-check", variant="primary", compact=True)
            yield Button("Repair… (r)", id="health-repair", variant="warning", compact=True)
            yield Checkbox("verify digests (reads every hot byte) (v)", id="verify", compact=True)
        yield Static("No report yet: press h to ask the daemon for one.", id="health-summary")
        yield DataTable(id="findings", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        table = self.query_one("#findings", DataTable)
        for key, label in (
            ("status", "Status"),
            ("check", "Check"),
            ("subject", "Subject"),
            ("message", "Finding"),
            ("repaired", "Repaired"),
        ):
            table.add_column(label, key=key)

    @property
    def verify(self) -> bool:
        return self.query_one("#verify", Checkbox).value

    def show_report(self, ok: bool, findings: list[list[Any]], repaired: bool) -> None:
        table = self.query_one("#findings", DataTable)
        table.clear()
        problems = 0
        for check, status, subject, message, fixed in findings:
            if status != "ok":
                problems += 1
            table.add_row(
                Text(status, style=STATUS_STYLES.get(status, "")),
                # Text, not str: a str cell would be read as markup, and these are the daemon's.
                Text(check),
                Text(self.show_path(subject)),
                Text(self.show_path(message)),
                "yes" if fixed else "",
            )
        verdict = Text()
        if ok:
            verdict.append("Healthy", style="bold green")
        else:
            verdict.append("Problems found", style="bold red")
        verdict.append(f": {len(findings)} finding(s), {problems} not ok")
        if repaired:
            verdict.append(" · repair was run", style="cyan")
        if not ok and not repaired:
            verdict.append(" · press r to repair", style="yellow")
        self.query_one("#health-summary", Static).update(verdict)

    def check(self, repair: bool) -> None:
        """Ask for a report (the app shows it here with ``show_report``)."""
        self.query_one("#health-summary", Static).update("Repairing…" if repair else "Checking…")
        self.post_message(CheckHealth(repair=repair, verify=self.verify))

    def action_check(self) -> None:
        self.check(repair=False)

    def action_repair(self) -> None:
        self.app.push_screen(
            ConfirmScreen(
                "Repair: repoint broken links to cold storage and remove orphaned copies?"
            ),
            lambda yes: self.check(repair=True) if yes else None,
        )

    def action_toggle_verify(self) -> None:
        box = self.query_one("#verify", Checkbox)
        box.value = not box.value

    @on(Button.Pressed, "#health-check")
    def _check_pressed(self) -> None:
        self.action_check()

    @on(Button.Pressed, "#health-repair")
    def _repair_pressed(self) -> None:
        self.action_repair()

    def focus_first(self) -> None:
        self.query_one("#health-check", Button).focus()
