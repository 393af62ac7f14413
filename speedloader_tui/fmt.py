"""How numbers read on screen: sizes, rates, times left, bars."""

from __future__ import annotations

from rich.text import Text

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")

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


def size(n: int | float) -> str:
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            if unit == "B":
                return f"{int(value)} B"
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def rate(bytes_per_s: float) -> str:
    return f"{size(bytes_per_s)}/s" if bytes_per_s > 0 else "—"


def duration(seconds: float) -> str:
    if seconds < 0:
        return "—"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


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
