"""Domain errors. Each maps to one D-Bus error name and carries one sentence a person can act on.

The bus layer translates these by class; nothing else should reach a caller. A job that
fails keeps its error's full name (``error_name``), so an asynchronous NoSpace says NoSpace.
"""

from __future__ import annotations


class SpeedloaderError(Exception):
    """Base class: the message is the whole story, written for an admin."""

    dbus_name = "Failed"


class InvalidArgument(SpeedloaderError, ValueError):
    """Also a ValueError so that pydantic validators reporting it name the offending key."""

    dbus_name = "InvalidArgument"


class NoSuchModel(SpeedloaderError):
    dbus_name = "NoSuchModel"


class NoSuchPool(SpeedloaderError):
    dbus_name = "NoSuchPool"


class NoSpace(SpeedloaderError):
    dbus_name = "NoSpace"


class Busy(SpeedloaderError):
    dbus_name = "Busy"


class Cancelled(SpeedloaderError):
    dbus_name = "Cancelled"


class Failed(SpeedloaderError):
    dbus_name = "Failed"


class NotAuthorized(SpeedloaderError):
    """polkit said no (or could not be asked: the daemon never fails open)."""

    dbus_name = "NotAuthorized"


class AuthenticationRequired(SpeedloaderError):
    """polkit would say yes after a password, and no agent answered to ask for it."""

    dbus_name = "AuthenticationRequired"


class VerificationFailed(Failed):
    """A copy's content did not match the digest its name promises."""


class ConfigError(InvalidArgument):
    """The configuration does not validate; the message names the key and the value."""


ERROR_PREFIX = "org.speedloader.Speedloader1.Error."


def error_name(err: BaseException) -> str:
    """The full D-Bus error name for ``err``: its class's name, or Failed for anything that
    is not ours (a bug: the caller is told "internal error", the traceback goes to the log)."""
    name = err.dbus_name if isinstance(err, SpeedloaderError) else Failed.dbus_name
    return ERROR_PREFIX + name
