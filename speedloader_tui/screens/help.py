"""The help screen: every key, by where it works."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Markdown

HELP = """\
# speedloader-tui

A live view of **speedloaderd**: what is hot (in a RAM pool), what is cold (on storage
only), the pools, the transfers. Everything updates by the daemon's signals; nothing is
polled. Actions go to the daemon, which asks polkit whether you may.

## Everywhere

| key | does |
|---|---|
| `1`–`5` | Models, Tiers, Transfers, Settings, Health |
| `?` / `F1` | this help |
| `q` / `ctrl+q` | quit |
| `Tab` / `shift+Tab` | move between parts of a tab |

## Models

| key | does |
|---|---|
| `/` | filter as you type (Enter: back to the list) |
| `o` | next sort column (or click a column header) |
| `p` | promote the selected model (placement picks the pool) |
| `P` | promote to a pool you pick |
| `d` | demote (links back to cold storage, pool copy deleted) |
| `c` | cancel the selected model's running transfer |
| `i` / `u` | pin to a pool you pick / unpin |

Under the pools: whether automatic tiering is on and which model its next eviction
would take. In HOT, *Uses* counts the uses automatic tiering saw and *Why* says why a
model is in RAM ("pinned to local", "in use (loaded)", "auto: used 4x in 1 h").

## Tiers (select a card with Tab or a click)

| key | does |
|---|---|
| `n` | connect the pool (mount it) |
| `x` | disconnect (its models are demoted first) |
| `z` | resize |
| `Delete` | remove the pool from the configuration (disconnected pools only) |
| `a` | add a tier (a tmpfs pool here) |
| `A` | add a remote tier (RAM on another host over NVMe-oF) |

## Transfers

`c` cancels the selected running transfer.

## Settings

`ctrl+s` saves through the daemon, which validates the whole configuration first;
`u` unpins the selected pinned model.

## Health

`h` asks for a report, `r` repairs (after confirming), `v` toggles verifying digests.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark,f1", "close", "Close help")]

    def __init__(self) -> None:
        super().__init__(classes="dialog-screen")

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-box", classes="dialog"):
            yield Markdown(HELP)
        yield Footer()

    def action_close(self) -> None:
        self.dismiss(None)
