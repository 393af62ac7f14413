"""How slctl prints: aligned tables, usage bars and JSON (sizes, rates and times left as
speedloader_client.fmt writes them, the same as the dashboard)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import click

from speedloader_client.fmt import eta, rate
from speedloader_client.fmt import size as format_size

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


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces; headers bold on a terminal."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        line = "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        lines.append(click.style(line, bold=True) if n == 0 and use_color() else line)
    return "\n".join(lines)
