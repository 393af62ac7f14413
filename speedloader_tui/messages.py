"""What a pane asks the daemon to do: one Message per request, posted by the widget where
the key was pressed and handled by the app, which makes the call and reports how it went.

A request is final: whatever the person had to choose or confirm (a pool, "yes", a size)
was asked by the pane before it posted. Messages bubble up the DOM to the app, so a pane
knows no more of the app than these classes (Textual's own widgets talk to their parents
the same way, e.g. ``Button.Pressed``).
"""

from __future__ import annotations

from typing import Any

from textual.message import Message

# --- models ------------------------------------------------------------------------------


class Promote(Message):
    """Copy ``model`` into RAM: into ``pool``, or where placement puts it if empty."""

    def __init__(self, model: str, pool: str = "") -> None:
        super().__init__()
        self.model = model
        self.pool = pool


class Demote(Message):
    """Serve ``model`` from cold storage again; its pool copy goes."""

    def __init__(self, model: str) -> None:
        super().__init__()
        self.model = model


class Pin(Message):
    """``model`` goes to ``pool`` or nowhere (moved there now if it is hot elsewhere)."""

    def __init__(self, model: str, pool: str) -> None:
        super().__init__()
        self.model = model
        self.pool = pool


class Unpin(Message):
    def __init__(self, model: str) -> None:
        super().__init__()
        self.model = model


class CancelJob(Message):
    """Cancel the job at ``path`` (a running, cancelable transfer)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path


# --- pools -------------------------------------------------------------------------------


class ConnectPool(Message):
    def __init__(self, pool: str) -> None:
        super().__init__()
        self.pool = pool


class DisconnectPool(Message):
    """Disconnect ``pool`` (its models are demoted first: the pane has asked)."""

    def __init__(self, pool: str) -> None:
        super().__init__()
        self.pool = pool


class ResizePool(Message):
    """Resize ``pool`` to ``size``, a size string the form has already parsed."""

    def __init__(self, pool: str, size: str) -> None:
        super().__init__()
        self.pool = pool
        self.size = size


class RemovePool(Message):
    def __init__(self, pool: str) -> None:
        super().__init__()
        self.pool = pool


class AddPool(Message):
    """Add a tmpfs pool. ``path`` empty: the daemon's <poolsRoot>/name."""

    def __init__(self, name: str, path: str, size: str, speed: int) -> None:
        super().__init__()
        self.name = name
        self.path = path
        self.size = size
        self.speed = speed


class AddRemotePool(Message):
    """Add a remoteTiers host: ``entry`` is its config entry, as `slctl pool add --remote`
    writes it."""

    def __init__(self, name: str, entry: dict[str, Any]) -> None:
        super().__init__()
        self.name = name
        self.entry = entry


# --- health and settings -----------------------------------------------------------------


class CheckHealth(Message):
    """Ask the daemon for a health report (``repair``: fix what it can, after a yes)."""

    def __init__(self, repair: bool, verify: bool) -> None:
        super().__init__()
        self.repair = repair
        self.verify = verify


class SaveConfig(Message):
    """Hand ``config`` to the daemon's SetConfig, which validates it whole."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = config


class ReloadConfig(Message):
    """Read the daemon's configuration again (Revert)."""
