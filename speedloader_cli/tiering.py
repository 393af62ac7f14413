"""slctl tiering status|plan|on|off: what automatic tiering sees, would do, and turning it on.

Everything here is read from the daemon (the Manager's Tiering* properties, the models'
UseCount, Value and Why, Manager.TieringPlan, GetConfig's ``autoTiering``) or sent to it
(SetConfig); the policy itself is the daemon's (speedloaderd/autotiering.py).
"""

from __future__ import annotations

import json
import time
from typing import Any

import click

from speedloader_client import fmt
from speedloader_client.client import MANAGER, ROOT, Client
from speedloader_client.records import Manager, Model

from .common import CONTEXT, JSON, run
from .output import print_json, table
from .state import Snapshot, snapshot

SETTINGS_ORDER = (
    "enabled",
    "policy",
    "highWatermark",
    "lowWatermark",
    "minResidency",
    "halfLife",
    "admitAccesses",
    "coalesce",
    "interval",
)


@click.group(context_settings=CONTEXT)
def tiering() -> None:
    """Automatic tiering: keep the models used most in RAM, by itself.

    While on, the daemon counts the uses of every model (a process opening its files, seen
    by the kernel; a load the backend reports), promotes a model used again and again when
    it is worth more than what it would displace, and evicts (demotes) the least valuable
    when a pool passes its high watermark. Pinned models, models the backend has loaded,
    models a process holds open and models with a job running are never evicted. Every
    move is an ordinary job with its reason (`slctl jobs`). It is off unless turned on;
    turning it on or off changes autoTiering.enabled in the configuration file, which
    needs an administrator.

    \b
    Examples:
      slctl tiering status             on or off, the policy, what it knows of each model
      slctl tiering plan               what it would do now (a dry run: nothing moves)
      sudo slctl tiering on            turn it on (autoTiering.enabled = true)
      sudo slctl tiering off           turn it off; nothing moves by itself any more
      slctl config set autoTiering.highWatermark 0.9    tune one setting
    """


# --- status ------------------------------------------------------------------------------


def settings_of(config: dict[str, Any]) -> dict[str, Any]:
    """``autoTiering`` from GetConfig, every key present: the daemon's defaults for the ones
    the file leaves out (GetConfig gives only what was set)."""
    from speedloaderd.config import AutoTieringConfig  # pydantic: only for this command

    defaults = AutoTieringConfig().model_dump(mode="json", by_alias=True)
    given = config.get("autoTiering")
    merged = {**defaults, **(given if isinstance(given, dict) else {})}
    return {k: merged[k] for k in SETTINGS_ORDER if k in merged} | {
        k: v for k, v in merged.items() if k not in SETTINGS_ORDER
    }


def known_models(snap: Snapshot) -> list[Model]:
    """The models tiering knows of: used at least once, or in a pool; most valuable first."""
    known = [m for m in snap.models if m.use_count > 0 or m.hot]
    return sorted(known, key=lambda m: (-m.value, m.name))


# A model in ``slctl tiering status --json``: these keys of ``slctl status --json``'s model
# (records.Model.to_json, the one spelling of them).
MODEL_KEYS = ("name", "tier", "state", "pinnedPool", "sizeBytes", "useCount", "value",
              "lastUsed", "why")  # fmt: skip


def status_json(snap: Snapshot, settings: dict[str, Any]) -> dict[str, Any]:
    """``slctl tiering status --json``: a contract with scripts (add keys, never rename or
    remove one; tests/test_cli.py pins them)."""
    m = snap.manager
    return {
        "enabled": m.tiering == "on",
        "paused": m.tiering_paused or None,
        "watch": {"state": m.tiering_watch, "reason": m.tiering_watch_reason or None},
        "settings": settings,
        "nextEviction": m.tiering_next_eviction or None,
        "models": [
            {k: j[k] for k in MODEL_KEYS} for j in (v.to_json() for v in known_models(snap))
        ],
    }


def _seconds(s: float) -> str:
    """A duration as a setting reads: ``45 s``, ``10 min``, ``12 h``."""
    for unit, size in (("h", 3600), ("min", 60)):
        if s >= 2 * size and s % size == 0:
            return f"{int(s // size)} {unit}"
    return f"{s:g} s"


def _policy_line(s: dict[str, Any]) -> str:
    def pct(key: str) -> str:
        value = s.get(key)
        return f"{value * 100:g} %" if isinstance(value, (int, float)) else "?"

    def dur(key: str) -> str:
        value = s.get(key)
        return _seconds(float(value)) if isinstance(value, (int, float)) else "?"

    return (
        f"policy {s.get('policy')}: high watermark {pct('highWatermark')}, low watermark "
        f"{pct('lowWatermark')}, minimum residency {dur('minResidency')}, half-life "
        f"{dur('halfLife')}\n"
        f"uses: promote after {s.get('admitAccesses')}; opens within {dur('coalesce')} are "
        f"one use; a plan every {dur('interval')}"
    )


@tiering.command("status", context_settings=CONTEXT)
@JSON
def tiering_status(as_json: bool) -> None:
    """Show whether automatic tiering is on, what it watches, its settings, the next
    eviction, and the models it knows (used, or in RAM), most valuable first.

    VALUE is the model's worth to the policy: its uses per hour, decayed with the
    half-life. WHY says why it is where it is ("pinned to local", "in use (loaded)",
    "auto: used 14x in 1 h").

    \b
    Examples:
      slctl tiering status
      slctl tiering status --json | jq '.models[] | select(.tier != "cold") | .why'
    """

    async def body(client: Client) -> tuple[Snapshot, dict[str, Any]]:
        return await snapshot(client), await client.get_config()

    snap, config = run(body)
    settings = settings_of(config)
    if as_json:
        print_json(status_json(snap, settings))
        return
    m = snap.manager
    click.echo(f"automatic tiering: {fmt.tiering(m.tiering, m.tiering_paused)}")
    watch = m.tiering_watch + (f" ({m.tiering_watch_reason})" if m.tiering_watch_reason else "")
    click.echo(f"file opens: {watch}")
    click.echo(_policy_line(settings))
    click.echo(f"next eviction: {m.tiering_next_eviction or 'none (nothing may go now)'}")
    click.echo()
    now = time.time()
    rows = [
        [
            v.name,
            v.tier,
            str(v.use_count),
            f"{v.value:.2f}/h",
            fmt.ago(now - v.last_used / 1_000_000) if v.last_used else fmt.UNKNOWN,
            v.why or fmt.UNKNOWN,
        ]
        for v in known_models(snap)
    ]
    click.echo(
        table(["MODEL", "TIER", "USES", "VALUE", "LAST USED", "WHY"], rows)
        if rows
        else "no model used yet, none in RAM"
    )


async def _manager(client: Client) -> Manager:
    return Manager.from_props(ROOT, await client.get_all(ROOT, MANAGER))


# --- plan --------------------------------------------------------------------------------


@tiering.command("plan", context_settings=CONTEXT)
@JSON
def tiering_plan(as_json: bool) -> None:
    """Show what automatic tiering would do now, in order (a dry run: nothing moves), also
    while it is off.

    \b
    Examples:
      slctl tiering plan
      slctl tiering plan --json | jq -r '.actions[] | select(.action == "evict") | .model'
    """

    async def body(client: Client) -> tuple[str, list[list[str]]]:
        manager = await _manager(client)
        return manager.tiering, await client.manager("TieringPlan")

    state, plan = run(body)
    if as_json:
        keys = ("action", "model", "pool", "reason")
        print_json(
            {
                "enabled": state == "on",
                "actions": [dict(zip(keys, a, strict=True)) for a in plan],
            }
        )
        return
    for action in plan:
        click.echo(fmt.plan_action(*action))
    if not plan:
        click.echo("nothing to do")
    if state != "on":
        click.echo("(tiering is off: nothing will move)")


# --- on / off ----------------------------------------------------------------------------


def _switch(enabled: bool) -> None:
    word = "on" if enabled else "off"

    async def body(client: Client) -> tuple[bool, str, str]:
        data = await client.get_config()
        section = data.get("autoTiering")
        if not isinstance(section, dict):
            section = data["autoTiering"] = {}
        was = bool(section.get("enabled", False))
        if was != enabled:
            section["enabled"] = enabled  # every other key as it is
            await client.manager("SetConfig", "s", json.dumps(data))
        manager = await _manager(client)  # what the daemon made of it
        return was, manager.tiering, manager.tiering_paused

    was, state, paused = run(body)
    if was == enabled:
        click.echo(f"automatic tiering is already {word}; nothing changed")
        return
    click.echo(f"autoTiering.enabled: {json.dumps(was)} -> {json.dumps(enabled)}")
    click.echo(f"automatic tiering: {fmt.tiering(state, paused)}")
    if enabled:
        click.echo("`slctl tiering plan` shows what it would do now")


@tiering.command("on", context_settings=CONTEXT)
def tiering_on() -> None:
    """Turn automatic tiering on (autoTiering.enabled = true; an administrator's change).

    The other autoTiering settings stay as they are (defaults where unset).

    \b
    Examples:
      sudo slctl tiering on
    """
    _switch(True)


@tiering.command("off", context_settings=CONTEXT)
def tiering_off() -> None:
    """Turn automatic tiering off (autoTiering.enabled = false; an administrator's change).

    What is in RAM stays there; nothing is promoted or evicted by itself any more.

    \b
    Examples:
      sudo slctl tiering off
    """
    _switch(False)
