"""How the dashboard draws: state words in colour, bars. Sizes, rates and times left read
as slctl writes them (speedloader_client.fmt), so the two never disagree."""

from __future__ import annotations

from rich.text import Text

from speedloader_client.fmt import UNKNOWN, eta, held, job_reason, model_use, rate, size, tiering

__all__ = [
    "STATE_STYLES",
    "UNKNOWN",
    "bar",
    "eta",
    "held",
    "job_reason",
    "model_use",
    "rate",
    "size",
    "state",
    "tiering",
    "usage_style",
]

STATE_STYLES = {
    "hot": "bold green",
    "cold": "dim",
    "promoting": "bold yellow",
    "demoting": "yellow",
    "degraded": "bold red",
    "mounted": "green",
    "unmounted": "dim",
    "running": "bold yellow",
    "succeeded": "green",
    "failed": "bold red",
    "cancelled": "yellow",
}


def state(text: str) -> Text:
    return Text(text, style=STATE_STYLES.get(text, ""))


def bar(fraction: float, width: int, style: str = "green") -> Text:
    """A bar of ``width`` cells, filled to ``fraction`` in eighths."""
    fraction = max(0.0, min(1.0, fraction))
    eighths = int(round(fraction * width * 8))
    full, part = divmod(eighths, 8)
    partial = " ▏▎▍▌▋▊▉"[part] if part and full < width else ""
    filled = "█" * full + partial
    out = Text(filled, style=style)
    out.append("·" * (width - len(filled)), style="dim")
    return out


def usage_style(fraction: float) -> str:
    if fraction >= 0.9:
        return "red"
    if fraction >= 0.7:
        return "yellow"
    return "green"
