"""Domain errors. Each maps to one D-Bus error name and carries one sentence a person can act on.

The bus layer translates these by class; nothing else should reach a caller.
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


class VerificationFailed(Failed):
    """A copy's content did not match the digest its name promises."""


class ConfigError(InvalidArgument):
    """The configuration does not validate; the message names the key and the value."""
