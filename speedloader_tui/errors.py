"""The one place that turns a failed call into what a person reads: a title and the
daemon's own sentence, with a hint where the name alone says what to do."""

from __future__ import annotations

from dataclasses import dataclass

from speedloader_cli.client import ClientError
from speedloader_cli.errors import ADMIN_ACTION

_TITLES = {
    "NotAuthorized": "Not authorized",
    "AuthenticationRequired": "Authentication required",
    "NoSuchModel": "No such model",
    "NoSpace": "No space",
    "Busy": "Busy",
    "InvalidArgument": "Invalid argument",
    "Cancelled": "Cancelled",
    "Failed": "Failed",
}

_HINTS = {
    "NotAuthorized": "ask an administrator to add you to the 'speedloader' group",
    "AuthenticationRequired": "this dashboard cannot ask for a password; run it as a user "
    "that polkit allows (the 'speedloader' group)",
    "NoSpace": "demote something, resize the pool or pick another pool",
}
# The group does not help with the admin-only action: say who can.
_ADMIN_HINT = "an administrator must make this change (as root, e.g. with slctl)"


@dataclass(frozen=True)
class Explanation:
    title: str
    sentence: str
    severity: str = "error"

    def __str__(self) -> str:
        return f"{self.title}: {self.sentence}"


def explain(err: BaseException, doing: str = "") -> Explanation:
    """One sentence for any failure of a call to the daemon."""
    prefix = f"{doing}: " if doing else ""
    if isinstance(err, ClientError):
        if err.unreachable:
            return Explanation(
                "Daemon unreachable",
                f"{prefix}speedloaderd is not running or not on this bus ({err.message})",
            )
        title = _TITLES.get(err.name, err.name.rsplit(".", 1)[-1])
        hint = _HINTS.get(err.name)
        if err.name in ("NotAuthorized", "AuthenticationRequired") and ADMIN_ACTION in err.message:
            hint = _ADMIN_HINT
        text = f"{prefix}{err.message}" + (f" — {hint}" if hint else "")
        severity = "warning" if err.name in ("Busy", "Cancelled") else "error"
        return Explanation(title, text, severity)
    # Anything else is a bug in the dashboard: say so instead of hiding it.
    return Explanation("Internal error", f"{prefix}{type(err).__name__}: {err}")
