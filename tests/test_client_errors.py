"""One table of error titles and hints for slctl and the dashboard (speedloader_client.errors):
each refusal the daemon sends reads as one sentence with at most one piece of advice, the
right one. The refusals are the daemon's own (speedloaderd.bus.auth.Polkit against a stand-in
polkitd), so a change of its wording cannot leave these tests behind."""

from __future__ import annotations

import asyncio
import re
from types import SimpleNamespace

import pytest
from dbus_fast import Message, MessageType

from speedloader_cli.errors import Exit
from speedloader_cli.errors import explain as cli_explain
from speedloader_client import errors
from speedloader_client.client import ClientError
from speedloader_tui.errors import explain as tui_explain
from speedloaderd.bus.auth import Polkit, remember_caller
from speedloaderd.bus.names import ACTION_ADMINISTER, ACTION_PROMOTE
from speedloaderd.errors import SpeedloaderError

GROUP = "'speedloader' group"


class Polkitd:
    """Answers CheckAuthorization as polkitd would: (authorized, challenge, details); or
    is not there at all (``down``)."""

    def __init__(self, authorized: bool = False, challenge: bool = False, down: bool = False):
        self.answer, self.down = (authorized, challenge, {}), down

    async def call(self, msg: Message) -> SimpleNamespace:
        if self.down:
            raise OSError("connection refused")
        return SimpleNamespace(message_type=MessageType.METHOD_RETURN, body=[self.answer])


def refusal(polkitd: Polkitd, action: str = ACTION_PROMOTE, what: str = "") -> ClientError:
    """What a client receives when the daemon's polkit check says no."""

    async def check() -> ClientError:
        remember_caller(Message(path="/", member="Promote", sender=":1.9"))  # the caller
        try:
            await Polkit(polkitd).check(action, what)  # type: ignore[arg-type]
        except SpeedloaderError as err:
            return ClientError(err.dbus_name, str(err))
        raise AssertionError("polkit said yes")

    return asyncio.run(check())


def test_a_member_refusal_says_join_the_group_once():
    err = refusal(Polkitd())
    tui = tui_explain(err, "promote tiny:1b")
    assert tui.title == "Not authorized"
    assert tui.sentence.count(GROUP) == 1, tui.sentence
    assert str(cli_explain(err)).count(GROUP) == 1
    # A sentence that does not say it gets the advice from the table.
    bare = ClientError("NotAuthorized", "not authorized for org.speedloader.promote")
    assert tui_explain(bare).sentence.count(GROUP) == 1


def test_polkit_down_says_start_polkit_not_ask_an_administrator():
    err = refusal(Polkitd(down=True))
    assert errors.POLKIT_DOWN in err.message  # the marker the table keys on
    for said in (tui_explain(err).sentence, str(cli_explain(err))):
        assert "systemctl start polkit" in said, said
        assert "administrator" not in said and "group" not in said, said
    assert cli_explain(err).code == Exit.NOT_AUTHORIZED


def test_an_admin_refusal_says_who_can():
    err = refusal(Polkitd(), ACTION_ADMINISTER, "adding a pool needs an administrator")
    assert "run slctl as root" in str(cli_explain(err)) and "group" not in str(cli_explain(err))
    tui = tui_explain(err).sentence
    assert "administrator must make this change" in tui and "group" not in tui


def test_authentication_required_is_not_told_twice_to_join_the_group():
    err = refusal(Polkitd(challenge=True))
    assert err.name == "AuthenticationRequired"
    tui = tui_explain(err)
    assert tui.title == "Authentication required"
    assert tui.sentence.count(GROUP) == 1 and "cannot ask for a password" in tui.sentence
    assert str(cli_explain(err)).count(GROUP) == 1


def test_no_such_pool_has_a_title_and_slctl_a_hint():
    err = ClientError("NoSuchPool", "no pool named 'nowhere'")
    assert tui_explain(err).title == "No such pool"
    assert tui_explain(err).sentence == "no pool named 'nowhere'"  # the dashboard lists them
    cli = cli_explain(err)
    assert cli.code == Exit.USAGE and str(cli).endswith("; `slctl pool list` lists the pools")


def _names(cls: type) -> set[str]:
    return {cls.dbus_name} | {n for sub in cls.__subclasses__() for n in _names(sub)}


def test_every_error_the_daemon_names_has_a_title():
    import speedloaderd.bus.auth  # noqa: F401  (NotAuthorized, AuthenticationRequired)

    for name in _names(SpeedloaderError):
        title = errors.title(name)
        # One word stays as it is (Busy); NoSuchPool reads "No such pool", not its name.
        assert title == name if re.fullmatch("[A-Z][a-z]+", name) else " " in title, name
    assert errors.title("org.freedesktop.DBus.Error.NoReply") == "NoReply"


@pytest.mark.parametrize("name", sorted(errors.ERRORS))
def test_a_hint_the_sentence_already_gives_is_not_repeated(name):
    hint = errors.hint(name, "")
    if hint:
        assert errors.hint(name, f"something failed; {hint}") == ""
