"""Small modal dialogs: confirm, pick a pool, pin, and the base of the forms (the forms
themselves live with what they ask for: screens/pool_forms.py). Each returns its answer
through ``dismiss`` (None when the user backs out with Escape or Cancel)."""

from __future__ import annotations

from typing import Any, TypeVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, OptionList, Select
from textual.widgets.option_list import Option

from speedloader_client.records import Pool

from .. import fmt

T = TypeVar("T")


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, question: str):
        super().__init__(classes="dialog-screen")
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            # Questions quote the daemon's names: shown as they are, not read as markup.
            yield Label(self.question, classes="dialog-question", markup=False)
            with Horizontal(classes="buttons"):
                yield Button("Yes (y)", id="yes", variant="error", compact=True)
                yield Button("No (n)", id="no", compact=True)

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class PickPoolScreen(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "back", "Cancel")]

    def __init__(self, question: str, pools: list[Pool]):
        super().__init__(classes="dialog-screen")
        self.question = question
        self.pools = pools

    def compose(self) -> ComposeResult:
        options = []
        for p in self.pools:
            line = Text(f"{p.name:<14}", style="bold")
            if p.mounted:
                line.append(f"{fmt.size(p.free_bytes):>10} free of {fmt.size(p.size_bytes):<10}")
            else:
                line.append((p.state or "unknown").ljust(30), style="dim")
            line.append(f" speed {p.speed}", style="cyan")
            options.append(Option(line, id=p.name))
        with Vertical(classes="dialog"):
            yield Label(self.question, classes="dialog-question", markup=False)
            yield OptionList(*options, id="pool-choice")
            yield Label("Enter to choose, Escape to cancel", classes="dim")

    def on_mount(self) -> None:
        choice = self.query_one("#pool-choice", OptionList)
        choice.highlighted = 0
        choice.focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    def action_back(self) -> None:
        self.dismiss(None)


class FormError(ValueError):
    """A value a form cannot send: shown under the form, next to nothing sent."""

    def __init__(self, key: str, sentence: str):
        super().__init__(sentence)
        self.key = key
        self.sentence = sentence


class FormScreen(ModalScreen[T | None]):
    """Ask for a few text values; Enter in the last field (or OK) answers.

    The first field has the focus when the form opens. ``parse`` turns the values into
    the answer, or raises FormError: then the form stays open with the values as typed,
    says what is wrong under the fields and puts the cursor in the field at fault; nothing
    is answered, so nothing reaches the daemon.
    """

    BINDINGS = [Binding("escape", "back", "Cancel")]

    def __init__(self, title: str, fields: list[tuple[str, str, str]]):
        """``fields``: (key, label, initial value)."""
        super().__init__(classes="dialog-screen")
        self.title_text = title
        self.fields = fields

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.title_text, classes="dialog-question", markup=False)
            with Grid(classes="dialog-form"):
                for key, label, value in self.fields:
                    yield Label(label)
                    yield Input(value=value, id=f"f-{key}")
            yield Label("", id="form-error", classes="form-error", markup=False)
            with Horizontal(classes="buttons"):
                yield Button("OK", id="ok", variant="primary", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def on_mount(self) -> None:
        self.query_one("#form-error", Label).display = False
        self.query(Input).first().focus()

    def values(self) -> dict[str, str]:
        return {k: self.query_one(f"#f-{k}", Input).value.strip() for k, _, _ in self.fields}

    def parse(self, values: dict[str, str]) -> T:
        """The answer the form gives for ``values``; FormError if one cannot be sent."""
        raise NotImplementedError

    def submit(self) -> None:
        try:
            answer = self.parse(self.values())
        except FormError as err:
            error = self.query_one("#form-error", Label)
            error.update(err.sentence)
            error.display = True
            self.query_one(f"#f-{err.key}", Input).focus()
            return
        self.dismiss(answer)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        inputs = list(self.query(Input))
        i = inputs.index(event.input)
        if i + 1 < len(inputs):
            inputs[i + 1].focus()
        else:
            self.submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "ok":
            self.submit()
        else:
            self.dismiss(None)

    def action_back(self) -> None:
        self.dismiss(None)


class PinScreen(ModalScreen[tuple[str, str] | None]):
    """Pin a model to a pool: choose both."""

    BINDINGS = [Binding("escape", "back", "Cancel")]

    def __init__(self, models: list[str], pools: list[str]):
        super().__init__(classes="dialog-screen")
        self.models = models
        self.pools = pools

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Pin a model to a tier", classes="dialog-question")
            with Grid(classes="dialog-form"):
                yield Label("Model")
                yield Select(
                    [(Text(m), m) for m in self.models],
                    id="pin-model-choice",
                    prompt="choose a model",
                )
                yield Label("Pool")
                yield Select(
                    [(Text(p), p) for p in self.pools],
                    id="pin-pool-choice",
                    prompt="choose a pool",
                )
            with Horizontal(classes="buttons"):
                yield Button("Pin", id="ok", variant="primary", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def on_mount(self) -> None:
        self.query_one("#pin-model-choice", Select).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id != "ok":
            self.dismiss(None)
            return
        model: Any = self.query_one("#pin-model-choice", Select).value
        pool: Any = self.query_one("#pin-pool-choice", Select).value
        if model is Select.NULL or pool is Select.NULL:
            self.app.notify("Choose a model and a pool.", severity="warning")
            return
        self.dismiss((str(model), str(pool)))

    def action_back(self) -> None:
        self.dismiss(None)
