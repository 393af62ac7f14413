"""The one place in the dashboard that turns a failed call into what a person reads: a
title and the daemon's own sentence, with a hint where the sentence does not say what to
do. The titles and hints are slctl's too: speedloader_client.errors."""

from __future__ import annotations

from dataclasses import dataclass

from speedloader_client import errors
from speedloader_client.client import ClientError


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
        hint = errors.hint(err.name, err.message, dashboard=True)
        text = f"{prefix}{err.message}" + (f" — {hint}" if hint else "")
        severity = "warning" if err.name in errors.WARNINGS else "error"
        return Explanation(errors.title(err.name), text, severity)
    # Anything else is a bug in the dashboard: say so instead of hiding it.
    return Explanation("Internal error", f"{prefix}{type(err).__name__}: {err}")
