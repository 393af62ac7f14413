"""What a failed call says to a person, the same in slctl and the dashboard: one table of
titles and hints by the daemon's error name (stratis-cli keeps its explanations in one
module too). slctl prints ``error: <sentence>; <hint>``, the dashboard a notification titled
``<title>`` saying ``<sentence> — <hint>``.

The daemon's sentence often says what to do already (a refusal says who can grant it):
a hint is added only where the sentence does not say it, so nothing is said twice.
"""

from __future__ import annotations

from dataclasses import dataclass

# A refusal of the admin-only polkit action names it: joining the group would not help.
ADMIN_ACTION = "org.speedloader.administer"
# What the daemon says when polkitd does not answer (speedloaderd/bus/auth.py): no group
# and no administrator's grant helps until polkit runs again.
POLKIT_DOWN = "polkit is unavailable"
GROUP = "'speedloader' group"


@dataclass(frozen=True)
class Entry:
    title: str  # the dashboard's notification title
    hint: str = ""  # what to do, where the daemon's sentence does not say it
    # Where the dashboard must say it otherwise (it cannot ask for a password, and it shows
    # the models and pools itself); None: the same as slctl.
    dashboard_hint: str | None = None


ERRORS: dict[str, Entry] = {
    "NotAuthorized": Entry("Not authorized", f"ask an administrator to add you to the {GROUP}"),
    "AuthenticationRequired": Entry(
        "Authentication required",
        f"run it as root or as a member of the {GROUP}",
        dashboard_hint="this dashboard cannot ask for a password",
    ),
    "NoSuchModel": Entry("No such model", "`slctl status` lists the models", dashboard_hint=""),
    "NoSuchPool": Entry("No such pool", "`slctl pool list` lists the pools", dashboard_hint=""),
    "NoSpace": Entry("No space", "demote something, resize the pool or pick another pool"),
    "Busy": Entry("Busy"),
    "InvalidArgument": Entry("Invalid argument"),
    "Cancelled": Entry("Cancelled"),
    "VerificationFailed": Entry("Verification failed"),
    "Failed": Entry("Failed"),
}

ADMIN_HINT = (
    "this change needs an administrator (it names a path, a host, a key or remote RAM, "
    "or is another user's job): run slctl as root"
)
ADMIN_DASHBOARD_HINT = "an administrator must make this change (as root, e.g. with slctl)"
POLKIT_HINT = "polkit is not answering: start it (`systemctl start polkit`) and try again"

# The dashboard warns (yellow) about these; every other failure is an error (red).
WARNINGS = {"Busy", "Cancelled"}


def title(name: str) -> str:
    """The title of error ``name`` (short for speedloader's own, else the D-Bus name):
    from the table, else the last part of the name."""
    entry = ERRORS.get(name)
    return entry.title if entry else name.rsplit(".", 1)[-1]


def hint(name: str, message: str, dashboard: bool = False) -> str:
    """What to do about error ``name`` saying ``message``; "" when the message says it."""
    if name in ("NotAuthorized", "AuthenticationRequired"):
        if ADMIN_ACTION in message:
            return ADMIN_DASHBOARD_HINT if dashboard else ADMIN_HINT
        if POLKIT_DOWN in message:
            return POLKIT_HINT
    entry = ERRORS.get(name)
    if entry is None:
        return ""
    text = entry.dashboard_hint if dashboard and entry.dashboard_hint is not None else entry.hint
    if not text or text in message or (GROUP in text and GROUP in message):
        return ""  # the daemon said it (its refusals name the group where it helps)
    return text
