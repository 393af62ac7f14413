"""How slctl prints: aligned tables, usage bars, sizes, rates and JSON."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import click

from speedloaderd.sizes import format_size

__all__ = ["bar", "eta", "format_size", "print_json", "rate", "table", "use_color"]


def use_color() -> bool:
    return sys.stdout.isatty()


def print_json(value: Any) -> None:
    # ensure_ascii: every control character (and all non-ASCII) is written as a \u escape,
    # so no string in the output can act on a terminal.
    click.echo(json.dumps(value, indent=2, sort_keys=False, ensure_ascii=True))


def bar(fraction: float, width: int = 20) -> str:
    fraction = min(max(fraction, 0.0), 1.0)
    filled = int(round(fraction * width))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def rate(bytes_per_s: float) -> str:
    return f"{format_size(int(bytes_per_s))}/s" if bytes_per_s > 0 else "-"


def eta(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces; headers bold on a terminal."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        line = "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        lines.append(click.style(line, bold=True) if n == 0 and use_color() else line)
    return "\n".join(lines)
