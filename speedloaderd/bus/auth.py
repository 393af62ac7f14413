"""Who is calling, and may they? polkit decides; errors leave as one named D-Bus error.

Every exported method is wrapped by ``exported``: it translates engine errors into
``org.speedloader.Speedloader1.Error.*`` with the engine's sentence, and logs (but never
sends) the traceback of anything unexpected. Mutating methods also name a polkit action,
checked with the caller's system-bus-name before the method body runs.
"""

from __future__ import annotations

import contextvars
import functools
import logging
from collections.abc import Callable
from typing import Any

from dbus_fast import DBusError, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from ..errors import AuthenticationRequired, NotAuthorized, SpeedloaderError, error_name
from .names import ACTION_ADMINISTER

log = logging.getLogger(__name__)

# The method call being dispatched. Set by a message handler that runs before dispatch;
# asyncio tasks created for coroutine methods copy it at creation, so it stays right.
current_call: contextvars.ContextVar[Message | None] = contextvars.ContextVar(
    "current_call", default=None
)

_ALLOW_USER_INTERACTION = 1


def remember_caller(msg: Message) -> bool:
    if msg.message_type is MessageType.METHOD_CALL:
        current_call.set(msg)
    return False  # never handled here: dispatch goes on


def caller() -> str:
    msg = current_call.get()
    if msg is None or not msg.sender:
        raise NotAuthorized("cannot tell who is calling")
    return msg.sender


async def caller_uid(bus: MessageBus | None) -> int:
    """The caller's uid, from the bus daemon itself (it saw the peer's credentials); a
    caller we cannot identify is refused, never taken for root."""
    sender = caller()
    if bus is None:  # not connected (a call cannot arrive then; refuse all the same)
        raise NotAuthorized("cannot tell who is calling")
    msg = Message(
        destination="org.freedesktop.DBus",
        path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus",
        member="GetConnectionUnixUser",
        signature="s",
        body=[sender],
    )
    try:
        reply = await bus.call(msg)
    except Exception as err:  # connection trouble: refuse, and say why in the log
        log.error("cannot ask the bus for the uid of %s: %s", sender, err)
        raise NotAuthorized("cannot tell who is calling") from None
    if reply is None or reply.message_type is MessageType.ERROR:
        log.warning("cannot tell the uid of %s: %s", sender, reply and reply.body)
        raise NotAuthorized("cannot tell who is calling")
    return int(reply.body[0])


class Polkit:
    """Asks polkitd. Absent or failing polkitd means no: we never fail open."""

    def __init__(self, bus: MessageBus):
        self.bus = bus

    async def check(self, action: str, what: str = "") -> None:
        """Raise unless the caller may do ``action``. For the admin action, ``what`` is the
        refusal's reason clause, e.g. "adding a pool needs an administrator (it names a
        path)": group membership does not help there, so the usual advice would mislead."""
        sender = caller()
        subject = ("system-bus-name", {"name": Variant("s", sender)})
        msg = Message(
            destination="org.freedesktop.PolicyKit1",
            path="/org/freedesktop/PolicyKit1/Authority",
            interface="org.freedesktop.PolicyKit1.Authority",
            member="CheckAuthorization",
            signature="(sa{sv})sa{ss}us",
            body=[subject, action, {}, _ALLOW_USER_INTERACTION, ""],
        )
        try:
            reply = await self.bus.call(msg)
        except Exception as err:  # connection trouble: deny, and say why in the log
            log.error("polkit check for %s failed: %s; denying", action, err)
            raise NotAuthorized(f"not authorized for {action}: polkit is unavailable") from None
        if reply.message_type is MessageType.ERROR:
            log.warning(
                "polkit refused to answer for %s: %s %s", action, reply.error_name, reply.body
            )
            raise NotAuthorized(f"not authorized for {action}: polkit is unavailable")
        is_authorized, is_challenge, _details = reply.body[0]
        if is_authorized:
            return
        if is_challenge:
            raise AuthenticationRequired(
                f"{action} requires authentication, and no polkit agent answered; "
                "run the command as root or join the 'speedloader' group"
            )
        if action == ACTION_ADMINISTER:
            raise NotAuthorized(
                f"not authorized for {action}: {what or 'this needs an administrator'}"
            )
        raise NotAuthorized(
            f"not authorized for {action}; ask an admin to add you to the 'speedloader' group"
        )


def to_dbus_error(err: BaseException) -> DBusError:
    if isinstance(err, DBusError):
        return err
    if isinstance(err, SpeedloaderError):
        return DBusError(error_name(err), str(err))
    log.error("internal error", exc_info=err)
    return DBusError(error_name(err), f"internal error: {type(err).__name__}: {err}")


def exported(action: str | None = None, what: str = "") -> Callable:
    """Wrap an async interface method: polkit check first (if ``action``), one error name.

    Methods whose action depends on their arguments pass no ``action`` and check inside,
    before they change anything (SetConfig, Pool.Resize, Job.Cancel)."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        async def method(self: Any, *args: Any) -> Any:
            try:
                if action is None:
                    return await fn(self, *args)
                await self.server.polkit.check(action, what)
                try:
                    return await fn(self, *args)
                finally:
                    # The reply must not overtake the change it made: a client that reads a
                    # property after Pin returns sees the pin, and after a failed Rescan the
                    # cold-storage state that failure set.
                    await self.server.settle()
            except Exception as err:
                raise to_dbus_error(err) from None

        return method

    return wrap
