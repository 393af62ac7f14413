"""Human size strings ("200G", "512M", "1.5T") <-> bytes, binary units like tmpfs uses."""

from __future__ import annotations

import re
from fractions import Fraction

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
# The largest size anything here can hold: D-Bus "t" and statvfs are 64-bit; 8 EiB is
# far beyond any RAM pool, and a bound keeps "9"*400 from becoming an internal error.
MAX_SIZE = (1 << 63) - 1
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(value: str | int) -> int:
    """Parse a size. Plain integers are bytes. Raises ValueError naming the bad value."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} is negative; a size must be 0 or more bytes")
        if value > MAX_SIZE:
            raise ValueError(f"{value} is too large; a size is at most 8 EiB")
        return value
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a size")
    m = _SIZE_RE.match(value)
    if not m:
        raise ValueError(
            f"{value!r} is not a size; use a number with an optional unit K, M, G, T or P "
            "(binary: 1G = 1024 MiB), e.g. 512M or 1.5T"
        )
    number, unit = m.groups()
    if len(number) > 32:  # more digits than any 64-bit size has: refuse before arithmetic
        raise ValueError(f"{_shown(value)} is too large; a size is at most 8 EiB")
    # Exact arithmetic: "1.1T" is the bytes it says, not what a float rounds it to.
    result = Fraction(number) * _UNITS[unit.upper()]
    if result.denominator != 1 and not unit:
        # A bare number is bytes, and a fraction of a byte is most likely a missing unit
        # ("resize fast 1.5" meaning 1.5G): refuse it rather than guess or truncate.
        raise ValueError(
            f"{value!r} is not a whole number of bytes; add a unit, e.g. {number}G or {number}M"
        )
    if result > MAX_SIZE:
        raise ValueError(f"{_shown(value)} is too large; a size is at most 8 EiB")
    return int(result)  # a fraction of a byte below a unit (1.0001K) rounds down


def _shown(value: str) -> str:
    """The value for an error message, cut short: a message is one readable sentence."""
    return repr(value) if len(value) <= 40 else repr(value[:20] + "..." + value[-4:])


def format_size(n: int) -> str:
    """Bytes to a short human string, e.g. 1.5G. Exact multiples print without a fraction."""
    for unit in ("P", "T", "G", "M", "K"):
        mult = _UNITS[unit]
        if n >= mult:
            value = n / mult
            if n % mult == 0:
                return f"{n // mult}{unit}"
            return f"{value:.1f}{unit}"
    return f"{n}B"


def format_size_exact(n: int) -> str:
    """Bytes to the largest unit that represents them exactly (for writing config back)."""
    for unit in ("P", "T", "G", "M", "K"):
        if n and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)
