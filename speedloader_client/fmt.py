"""How numbers and states read, the same in slctl and the dashboard: sizes as ``24.0M``,
rates as ``24.0M/s``, times left as ``m:ss``, ``-`` for what is not known yet, and a
pool's state by the daemon's own word (``mounted``, as in the README)."""

from __future__ import annotations

from typing import Any

from speedloaderd.sizes import format_size

UNKNOWN = "-"


def size(n: int | float) -> str:
    """Bytes, short: ``24.0M``, ``2G`` (exact multiples without a fraction), ``512B``."""
    return format_size(int(n))


def rate(bytes_per_s: float) -> str:
    return f"{size(bytes_per_s)}/s" if bytes_per_s > 0 else UNKNOWN


def eta(seconds: float | None) -> str:
    """Time left: ``m:ss``, or ``h:mm:ss`` from an hour on."""
    if seconds is None or seconds < 0:
        return UNKNOWN
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def model_use(loaded: bool, holders: list[list[Any]], backend: str) -> str:
    """Who uses a model, for slctl status and the dashboard: ``loaded in llama-server (pid
    812)`` (the backend says loaded; its process, where one holds the files), ``held by
    python3 (pid 900)`` for every other holder; "" when nobody does. Commands come escaped
    from the daemon (any process names itself) and are escaped again here."""
    from speedloader_client.client import printable

    who = [f"{printable(str(cmd))} (pid {int(pid)})" for pid, cmd in holders]
    parts = []
    if loaded:
        parts.append(f"loaded in {who.pop(0) if who else printable(backend) or 'the backend'}")
    if who:
        parts.append("held by " + ", ".join(who))
    return "; ".join(parts)


def held(held_bytes: int) -> str:
    """A pool's RAM kept by deleted copies: ``2.7G held by deleted copies``; "" for none."""
    return f"{format_size(held_bytes)} held by deleted copies" if held_bytes else ""


def ago(seconds: float) -> str:
    """How long ago, as a person says it: ``just now`` (under a minute: the daemon looks
    every 15 s, seconds would be noise), ``4 min ago``, ``3 h ago``, ``2 days ago``."""
    if seconds < 60:
        return "just now"
    if seconds < 3600:
        return f"{int(seconds // 60)} min ago"
    if seconds < 2 * 86400:
        return f"{int(seconds // 3600)} h ago"
    return f"{int(seconds // 86400)} days ago"


def last_used(last_used_us: int, load_count: int, now: float) -> str:
    """A model's usage for slctl status: ``4 min ago, 2 loads``; ``-`` for a model the
    backend was never seen using. ``now``: time.time()."""
    if not last_used_us and not load_count:
        return UNKNOWN
    when = ago(now - last_used_us / 1_000_000) if last_used_us else "never"
    return f"{when}, {load_count} load{'' if load_count == 1 else 's'}"


def tiering(state: str, paused: str) -> str:
    """Automatic tiering as the Manager says it: ``on``, ``on, paused: <why>``, ``off``."""
    if state != "on":
        return "off"
    return f"on, paused: {paused}" if paused else "on"


def job_reason(operation: str, model: str, pool: str, reason: str) -> str:
    """A job the daemon started itself, and why: ``promote a:1 → local (auto: used 4x in
    1 h)``, ``demote a:1 from local (made room for c:1 ...)``; "" for a caller's job (it
    has no reason)."""
    if not reason:
        return ""
    what = f"{operation} {model}".strip()
    if pool:
        what += f" → {pool}" if operation == "promote" else f" from {pool}"
    return f"{what} ({reason})"


def plan_action(action: str, model: str, pool: str, reason: str) -> str:
    """One action of Manager.TieringPlan: ``promote a:1 to local: used 2x in 1 h``, ``evict
    b:1 from local: ...`` (an eviction's pool is the one it leaves)."""
    if action == "evict":
        return f"evict {model} from {pool}: {reason}"
    return f"{action} {model} to {pool}: {reason}"
