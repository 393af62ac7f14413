"""The Settings tab: placement strategy, pins, SSH key, backend, paths. Saved through the
daemon's SetConfig, which validates; the daemon's answer is shown as it is."""

from __future__ import annotations

import json
from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, DataTable, Input, Label, Select, Static

from speedloader_client.client import printable

from ..messages import Pin, ReloadConfig, SaveConfig, Unpin
from ..screens.dialogs import PinScreen
from ..state import DaemonState

STRATEGIES = ("fastest-fit", "fill-first", "round-robin")
BACKENDS = ("ollama", "llamacpp", "vllm", "huggingface")

# field id -> (label, path of keys in the config JSON)
TEXT_FIELDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "api-url": ("Backend API URL", ("backend", "apiUrl")),
    "ssh-key": ("SSH key path (remote tiers)", ("sshKeyPath",)),
    "models-dir": ("Models dir (what the backend reads)", ("modelsDir",)),
    "cold": ("Cold storage (read-only master copies)", ("storage", "path")),
    "state-dir": ("State dir (journal; default /var/lib/speedloader)", ("stateDir",)),
}
SELECT_FIELDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "strategy": ("Placement strategy", ("modelPlacement", "defaultStrategy")),
    "backend": ("Backend", ("backend", "type")),
}


def _get(data: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for k in keys:
        if not isinstance(data, dict) or k not in data:
            return None
        data = data[k]
    return data


def _set(data: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    for k in keys[:-1]:
        data = data.setdefault(k, {})
    data[keys[-1]] = value


def _drop(data: dict[str, Any], keys: tuple[str, ...]) -> None:
    for k in keys[:-1]:
        data = data.get(k, {})
    data.pop(keys[-1], None)


def merged_config(base: dict[str, Any], form: dict[str, str]) -> dict[str, Any]:
    """``base`` (the daemon's config) with the form's changed fields; keys the form does
    not know (pools, remote tiers, pins, extension keys) are kept as they are."""
    out = json.loads(json.dumps(base))
    fields = {**TEXT_FIELDS, **SELECT_FIELDS}
    for fid, value in form.items():
        keys = fields[fid][1]
        old = _get(base, keys)
        if value == ("" if old is None else printable(str(old))):
            continue  # unchanged as shown (a value is shown printable, see fill)
        if value == "":
            _drop(out, keys)
        else:
            _set(out, keys, value)
    return out


class SettingsPane(VerticalScroll):
    BINDINGS = [
        Binding("ctrl+s", "save", "Save settings"),
        Binding("u", "unpin", "Unpin", show=False),
    ]

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        self.state = DaemonState()  # the app's, from the first redraw on
        self.base: dict[str, Any] = {}

    def compose(self) -> ComposeResult:
        yield Static(id="settings-status")
        with Grid(id="settings-form"):
            for fid, (label, _) in SELECT_FIELDS.items():
                yield Label(label)
                options = STRATEGIES if fid == "strategy" else BACKENDS
                yield Select(
                    [(o, o) for o in options], id=f"cfg-{fid}", allow_blank=True, prompt="(not set)"
                )
            for fid, (label, _) in TEXT_FIELDS.items():
                yield Label(label)
                yield Input(id=f"cfg-{fid}")
        with Horizontal(classes="buttons"):
            yield Button("Save (ctrl+s)", id="save-settings", variant="primary", compact=True)
            yield Button("Revert", id="revert-settings", compact=True)
        yield Label(
            "Pinned models (a pinned model goes to its pool or fails, never elsewhere)",
            classes="section-title",
        )
        with Vertical(id="pins-box"):
            yield DataTable(id="pins", cursor_type="row", zebra_stripes=True)
            with Horizontal(classes="buttons"):
                yield Button("Unpin selected (u)", id="unpin", compact=True)
                yield Button("+ Pin model to tier", id="pin-model", variant="primary", compact=True)

    def on_mount(self) -> None:
        pins = self.query_one("#pins", DataTable)
        pins.add_column("Model", key="model")
        pins.add_column("Pool", key="pool")
        self.pin_keys: list[str] = []

    # --- drawing -------------------------------------------------------------------------

    def redraw(self, state: DaemonState) -> None:
        self.state = state
        pins = state.pins()
        table = self.query_one("#pins", DataTable)
        keys = [m for m, _ in pins]
        if keys != self.pin_keys or any(str(table.get_cell(m, "pool")) != p for m, p in pins):
            table.clear()
            for model, pool in pins:
                table.add_row(Text(model), Text(pool), key=model)
            self.pin_keys = keys
        status = self.query_one("#settings-status", Static)
        m = state.manager
        if not state.online:
            status.update("speedloaderd is not reachable; settings cannot be read or saved now.")
        # The daemon's words go in as Text: literal, never read as markup.
        elif not m.config_valid:
            status.update(
                Text.assemble(
                    ("First run:", "bold"),
                    " speedloaderd has no valid configuration (",
                    (m.config_error, "italic"),
                    "). Fill in at least the models dir, cold storage and backend, then Save.",
                )
            )
        else:
            status.update(
                Text.assemble(
                    "strategy ",
                    (m.strategy, "bold"),
                    " · backend ",
                    (m.backend, "bold"),
                    f" · daemon {m.version}",
                )
            )

    def fill(self, config: dict[str, Any]) -> None:
        """Show the daemon's config (after load, save, or Revert)."""
        self.base = config
        for fid, (_, keys) in SELECT_FIELDS.items():
            value = _get(config, keys)
            select = self.query_one(f"#cfg-{fid}", Select)
            if value is None and fid == "strategy" and config:
                value = "fastest-fit"  # the daemon's default
            select.value = value if value is not None else Select.NULL
        for fid, (_, keys) in TEXT_FIELDS.items():
            value = _get(config, keys)
            # Shown printable: the config's strings are not (they are sent back as they are).
            shown = "" if value is None else printable(str(value))
            self.query_one(f"#cfg-{fid}", Input).value = shown
        if config and _get(config, SELECT_FIELDS["strategy"][1]) is None:
            # Shown as the default; saving it unchanged must not write it into the file.
            _set(self.base, SELECT_FIELDS["strategy"][1], "fastest-fit")
            self._implicit_strategy = True
        else:
            self._implicit_strategy = False

    def form(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for fid in SELECT_FIELDS:
            value = self.query_one(f"#cfg-{fid}", Select).value
            out[fid] = "" if value is Select.NULL else str(value)
        for fid in TEXT_FIELDS:
            out[fid] = self.query_one(f"#cfg-{fid}", Input).value.strip()
        return out

    def new_config(self) -> dict[str, Any]:
        new = merged_config(self.base, self.form())
        if (
            getattr(self, "_implicit_strategy", False)
            and _get(new, SELECT_FIELDS["strategy"][1]) == "fastest-fit"
        ):
            _drop(new, SELECT_FIELDS["strategy"][1])
            if new.get("modelPlacement") == {}:
                new.pop("modelPlacement")
        return new

    # --- actions -------------------------------------------------------------------------

    def action_save(self) -> None:
        self.post_message(SaveConfig(self.new_config()))

    def action_unpin(self) -> None:
        table = self.query_one("#pins", DataTable)
        if not self.pin_keys or not 0 <= table.cursor_row < len(self.pin_keys):
            self.notify("Select a pinned model first.", severity="warning")
            return
        self.post_message(Unpin(self.pin_keys[table.cursor_row]))

    def pin_dialog(self) -> None:
        models = sorted(m.name for m in self.state.models.values())

        def chosen(answer: tuple[str, str] | None) -> None:
            if answer:
                self.post_message(Pin(*answer))

        self.app.push_screen(PinScreen(models, self.state.pool_names()), chosen)

    @on(Button.Pressed, "#save-settings")
    def _save_pressed(self) -> None:
        self.action_save()

    @on(Button.Pressed, "#revert-settings")
    def _revert_pressed(self) -> None:
        self.post_message(ReloadConfig())

    @on(Button.Pressed, "#unpin")
    def _unpin_pressed(self) -> None:
        self.action_unpin()

    @on(Button.Pressed, "#pin-model")
    def _pin_pressed(self) -> None:
        self.pin_dialog()

    def focus_first(self) -> None:
        self.query_one("#cfg-strategy", Select).focus()
