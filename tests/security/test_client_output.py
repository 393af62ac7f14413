"""Issue 9, finding 10b: a string the daemon hands out (a configured ``apiUrl``, a path,
an error message) never reaches the terminal of whoever runs slctl or the dashboard as
escape sequences, nor as Rich markup in the dashboard.

The value is put where a group member can put it (the daemon's configuration) and read
by another user (an admin running ``slctl status``). Model and pool names cannot carry
such characters: the daemon validates them (speedloaderd/paths.py), so the test uses
the free-text fields.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from dbus_fast import Message, MessageType, Variant
from textual.widgets._toast import Toast

from speedloader_client.client import JOB, MANAGER, MODEL, PROPERTIES, ROOT, printable, unwrap
from speedloader_tui.app import SpeedloaderApp
from speedloader_tui.widgets.models import ModelTable
from speedloader_tui.widgets.settings import SettingsPane, merged_config
from speedloaderd.errors import InvalidArgument
from speedloaderd.paths import check_model_name, check_pool_name

from ..buslab import ADMIN, GUEST, as_user

SLCTL = str(Path(sys.executable).with_name("slctl"))
EVIL_URL = "http://x\x1b]0;pwned\x07\x1b[2J\r\x9b31m[bold red]loud[/bold red]"
# Bytes a terminal acts on: ESC, BEL, CR, and the C1 CSI in UTF-8 (U+009B) and raw.
TERMINAL_BYTES = (b"\x1b", b"\x07", b"\r", b"\xc2\x9b", b"\x9b")


@pytest.fixture
def evil_daemon(daemon_factory):
    """A daemon whose configuration has an apiUrl full of terminal controls."""
    dl = daemon_factory()
    path = dl.lab.config_path
    data = json.loads(path.read_text())
    data.setdefault("backend", {})["apiUrl"] = EVIL_URL
    path.write_text(json.dumps(data))
    dl.start()
    return dl


def slctl(dl, user: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        as_user(user, [SLCTL, *args], dl.address), capture_output=True, timeout=120
    )


def assert_inert(r: subprocess.CompletedProcess[bytes]) -> None:
    for stream, out in (("stdout", r.stdout), ("stderr", r.stderr)):
        found = [b for b in TERMINAL_BYTES if b in out]
        assert not found, f"{stream} carries {found}: {out!r}"


def test_the_daemon_really_hands_out_the_controls(evil_daemon):
    """Control for the tests below: the value arrives on the bus as it was configured."""

    async def read() -> str:
        async with await evil_daemon.client() as c:
            reply = await c.bus.call(
                Message(
                    destination="org.speedloader.Speedloader1",
                    path=ROOT,
                    interface=PROPERTIES,
                    member="Get",
                    signature="ss",
                    body=[MANAGER, "BackendApiUrl"],
                )
            )
            return reply.body[0].value

    assert asyncio.run(read()) == EVIL_URL


@pytest.mark.parametrize("user", [ADMIN, GUEST])
def test_slctl_status_shows_the_url_escaped(evil_daemon, user):
    r = slctl(evil_daemon, user, "status")
    assert r.returncode == 0, r.stderr
    assert_inert(r)
    shown = printable(EVIL_URL)
    assert f"at {shown}".encode() in r.stdout, r.stdout
    assert b"\\x1b]0;pwned\\x07\\x1b[2J\\x0d\\x9b31m" in r.stdout


def test_slctl_status_json_keeps_the_data_escaped(evil_daemon):
    r = slctl(evil_daemon, ADMIN, "status", "--json")
    assert r.returncode == 0, r.stderr
    assert_inert(r)
    # What a script reads back is the printable form: `jq -r` cannot replay the escapes.
    assert json.loads(r.stdout)["backend"]["apiUrl"] == printable(EVIL_URL)


def test_slctl_config_get_and_show(evil_daemon):
    got = slctl(evil_daemon, ADMIN, "config", "get", "backend.apiUrl")
    assert got.returncode == 0, got.stderr
    assert_inert(got)
    assert got.stdout.decode().rstrip("\n") == printable(EVIL_URL)
    # The configuration document keeps the value exactly, in JSON's own escapes.
    shown = slctl(evil_daemon, ADMIN, "config", "show")
    assert shown.returncode == 0, shown.stderr
    assert_inert(shown)
    assert json.loads(shown.stdout)["backend"]["apiUrl"] == EVIL_URL


def test_slctl_config_set_of_another_key_sends_the_url_back_unchanged(evil_daemon):
    """Made printable for the eye only: an edit round-trips the configuration as it is."""
    r = slctl(evil_daemon, ADMIN, "config", "set", "modelPlacement.defaultStrategy", "fill-first")
    assert r.returncode == 0, r.stderr
    assert json.loads(evil_daemon.state()["config"])["backend"]["apiUrl"] == EVIL_URL


def test_error_messages_are_printed_escaped(evil_daemon):
    """Every error sentence goes through ClientError, which makes it printable. The
    daemon quotes bad values with repr() today (a guard that it stays so); the bus
    address below is quoted as it is by the client's own sentence, so it shows the
    funnel at work."""
    r = slctl(evil_daemon, ADMIN, "config", "set", "storage.path", "relative\x1b[2J\x07")
    assert r.returncode == 2
    assert_inert(r)
    assert r.stderr.startswith(b"error: ") and r.stderr.count(b"\n") == 1, r.stderr

    address = "unix:path=/nonexistent/bus\x1b]0;pwned\x07\x1b[2J"
    r = subprocess.run(as_user(ADMIN, [SLCTL, "status"], address), capture_output=True, timeout=60)
    assert r.returncode == 2, r.stderr  # not an address: one sentence, no traceback
    assert_inert(r)
    assert b"is not a D-Bus address" in r.stderr, r.stderr
    assert b"/nonexistent/bus\\x1b]0;pwned\\x07\\x1b[2J" in r.stderr, r.stderr
    assert r.stderr.count(b"\n") == 1, r.stderr


# --- the dashboard: the state layer gets printable strings, widgets show no markup -------


def signal(path: str, interface: str, member: str, signature: str, body: list) -> Message:
    return Message(
        message_type=MessageType.SIGNAL,
        path=path,
        interface=interface,
        member=member,
        signature=signature,
        body=body,
    )


def test_unwrap_makes_every_string_printable():
    body = [
        MODEL,
        {"Name": Variant("s", "a\x1bb"), "Problems": Variant("as", ["\x9bx", "ok"])},
        ["\r"],
    ]
    assert unwrap(body) == [MODEL, {"Name": "a\\x1bb", "Problems": ["\\x9bx", "ok"]}, ["\\x0d"]]
    assert printable("tab\there\u202eltr\u200b") == "tab\\x09here\\u202eltr\\u200b"
    assert printable("plain: é 日本 [b]") == "plain: é 日本 [b]"


def test_dashboard_shows_daemon_strings_escaped_and_without_markup():
    job = "/org/speedloader/Speedloader1/jobs/7"
    model = "/org/speedloader/Speedloader1/models/tiny_3a1b"
    evil_msg = "copied \x1b[2J[bold red]done[/bold red]\x07"

    async def run() -> tuple[list[str], list[tuple[str, str]], str, str, list[str]]:
        app = SpeedloaderApp(connect=False)
        async with app.run_test(size=(160, 50), notifications=True) as pilot:
            app.state.online = True
            link = app.link
            link._on_signal(
                signal(
                    ROOT,
                    "org.freedesktop.DBus.ObjectManager",
                    "InterfacesAdded",
                    "oa{sa{sv}}",
                    [
                        model,
                        {
                            MODEL: {
                                "Name": Variant("s", "tiny:1b"),
                                "Format": Variant("s", "[bold red]gguf\x1b[5m"),
                                "SizeBytes": Variant("t", 1),
                                "Tier": Variant("s", "cold"),
                                "PinnedPool": Variant("s", ""),
                                "State": Variant("s", "cold"),
                            }
                        },
                    ],
                )
            )
            link._on_signal(
                signal(
                    ROOT,
                    PROPERTIES,
                    "PropertiesChanged",
                    "sa{sv}as",
                    [
                        MANAGER,
                        {
                            "ConfigValid": Variant("b", False),
                            "ConfigError": Variant("s", "[reverse]bad\x1b]0;t\x07"),
                        },
                        [],
                    ],
                )
            )
            app._my_jobs.add(job)  # as if this dashboard had started it
            link._on_signal(signal(job, JOB, "Completed", "bs", [True, evil_msg]))
            # Drawn: the notification, the cold table's row, the first-run banner.
            await app.wait_until(
                lambda: (
                    bool(app._notifications)
                    and bool(app.query_one("#cold", ModelTable).keys)
                    and app.query_one("#first-run").display
                ),
                30,
            )
            await pilot.pause()
            toasts = [str(t.render()) for t in app.screen.query(Toast)]
            settings = app.query_one(SettingsPane)
            lines = [strip.text for strip in app.screen._compositor.render_strips()]
            banner = str(app.query_one("#first-run-text").render())
            status = str(settings.query_one("#settings-status").render())
            notes = [(n.title, n.message) for n in app._notifications]
            return lines, notes, banner, status, toasts

    lines, notes, banner, status, toasts = asyncio.run(run())
    screen = "\n".join(lines)
    assert "\x1b" not in screen and "\x07" not in screen
    assert "[bold red]gguf\\x1b[5m" in screen, screen  # the cold table: literal, escaped
    assert "[reverse]bad\\x1b]0;t\\x07" in banner, banner
    assert "[reverse]bad\\x1b]0;t\\x07" in status, status
    assert [message for _, message in notes] == [printable(evil_msg)], notes
    # The toast shows the job's message as written, markup and all.
    assert [t.split("\n", 1)[1] for t in toasts] == [printable(evil_msg)], toasts


def test_dashboard_settings_send_an_unchanged_value_back_as_it_was():
    """The form shows the apiUrl printable; saving another field must not write that
    shown form over the configured value (nor drop it)."""
    base = {"backend": {"type": "ollama", "apiUrl": EVIL_URL}, "modelsDir": "/m"}
    form = {"api-url": printable(EVIL_URL), "models-dir": "/other", "backend": "ollama"}
    assert merged_config(base, form) == {
        "backend": {"type": "ollama", "apiUrl": EVIL_URL},
        "modelsDir": "/other",
    }


@pytest.mark.parametrize("name", ["tiny\x1b[2J:1b", "tiny\x9b:1b", "tiny\r:1b", "[bold]x"])
def test_model_and_pool_names_cannot_carry_controls_or_markup(name):
    """Why the tests above use free-text fields: the daemon refuses such names (and the
    catalog skips such models on cold storage, speedloaderd/catalog/result.py)."""
    with pytest.raises(InvalidArgument):
        check_model_name(name)
    with pytest.raises(InvalidArgument):
        check_pool_name(name.replace(":", "-"))
