"""The one place where a failure becomes one sentence and an exit code.

Exit codes (a contract for scripts): 0 done, 1 failed, 2 bad usage or bad argument,
3 the daemon is not reachable, 4 not authorized. Every message starts with ``error:`` and
says what to do; a traceback is never shown (``SLCTL_DEBUG=1`` shows it, for bug reports).
"""

from __future__ import annotations

import enum

from speedloader_client.client import ClientError
from speedloader_client.errors import hint as hint_for


class Exit(enum.IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    UNREACHABLE = 3
    NOT_AUTHORIZED = 4
    INTERRUPTED = 130  # Ctrl-C, as shells report it


class CliError(Exception):
    """A failure already explained: ``str(self)`` is the sentence, ``code`` the exit code."""

    def __init__(self, message: str, code: Exit = Exit.FAILED, prefix: str = "error: "):
        super().__init__(message)
        self.code = code
        self.prefix = prefix


_BY_NAME = {
    "NotAuthorized": Exit.NOT_AUTHORIZED,
    "AuthenticationRequired": Exit.NOT_AUTHORIZED,
    "InvalidArgument": Exit.USAGE,
    "NoSuchModel": Exit.USAGE,
    "NoSuchPool": Exit.USAGE,
    "org.freedesktop.DBus.Error.InvalidArgs": Exit.USAGE,
    "org.freedesktop.DBus.Error.BadAddress": Exit.USAGE,
}

# dbus-fast answers a call on a path nobody exported with UnknownMethod, others UnknownObject.
NO_SUCH_OBJECT = {
    "org.freedesktop.DBus.Error.UnknownObject",
    "org.freedesktop.DBus.Error.UnknownMethod",
}


def explain(err: ClientError, subject: str = "") -> CliError:
    """Turn a daemon or bus error into the sentence a person acts on."""
    if err.unreachable:
        return CliError(
            "speedloaderd is not running or not reachable on the system bus "
            f"({err.message.rstrip('.')}); start it with `systemctl start speedloaderd`",
            Exit.UNREACHABLE,
        )
    if err.name == "org.freedesktop.DBus.Error.AccessDenied":
        return CliError(
            f"the system bus refused the call ({err.message}); is the D-Bus policy "
            "org.speedloader.Speedloader1.conf installed? (`slctl install`)",
            Exit.NOT_AUTHORIZED,
        )
    if err.name in NO_SUCH_OBJECT and subject:
        return CliError(f"{subject} does not exist", Exit.USAGE)
    message = err.message.rstrip()
    hint = hint_for(err.name, message)  # the hints are speedloader_client.errors'
    if hint:
        message = f"{message}; {hint}"
    return CliError(message, _BY_NAME.get(err.name, Exit.FAILED))
