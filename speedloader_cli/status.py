"""slctl status, health and rescan: looking at the daemon's state."""

from __future__ import annotations

import sys
import time

import click

from speedloader_client import fmt
from speedloader_client.client import Client
from speedloader_client.records import COLD

from .common import (
    CONTEXT,
    JSON,
    job_reasons,
    job_rows,
    model_rows,
    pool_rows,
    run,
)
from .errors import Exit
from .output import print_json, table
from .state import Snapshot, snapshot

STATUS_PROBLEMS = 20
"""Problems on cold storage that ``slctl status`` prints; Health lists every one."""


@click.command(context_settings=CONTEXT)
@JSON
def status(as_json: bool) -> None:
    """Show the backend, pools with their usage, models (hot, cold, last used), and jobs.

    \b
    Examples:
      slctl status
      slctl status --json | jq '.models[] | select(.tier != "cold") | .name'
    """
    snap = run(snapshot)
    if as_json:
        print_json(snap.to_json())
        return
    m = snap.manager
    if not m.config_valid:
        click.echo(f"error: speedloaderd has no valid configuration: {m.config_error}")
        click.echo("fix it with `slctl config set KEY VALUE` or edit the file and restart")
        return
    url = m.backend_api_url
    click.echo(
        f"backend: {m.backend}{f' at {url}' if url else ''}\n"
        f"models dir: {m.models_dir}   cold storage: {m.cold_storage}   "
        f"placement: {m.strategy}"
    )
    if m.cold_storage_state == "unavailable":
        click.echo(
            f"cold storage unavailable: {m.cold_storage_problem}; hot models are served "
            "from RAM, nothing is pruned, and the daemon looks again every few seconds"
        )
    click.echo()
    click.echo(table(["POOL", "KIND", "STATE", "USAGE", "SPEED", "PATH"], pool_rows(snap)))
    for p in snap.pools:
        if p.problem:
            click.echo(f"pool {p.name} is {p.state}: {p.problem}")
        if p.held_bytes:
            click.echo(f"pool {p.name}: {fmt.held(p.held_bytes)} (in its usage until released)")
    click.echo()
    hot = [v for v in snap.models if v.tier != COLD or v.state != COLD]
    cold = [v for v in snap.models if v not in hot]
    headers = ["MODEL", "FORMAT", "SIZE", "TIER", "PINNED", "STATE", "LAST USED"]
    rows = model_rows(Snapshot(snap.manager, [], hot + cold, []))
    now = time.time()
    for row, v in zip(rows, hot + cold, strict=True):
        row.append(fmt.last_used(v.last_used, v.load_count, now))
    click.echo(table(headers, rows) if rows else "no models found on cold storage")
    used = [(v.name, fmt.model_use(v.loaded, v.holders, m.backend)) for v in hot + cold]
    for name, use in used:
        if use:
            click.echo(f"model {name}: {use}")
    problems = [f"model {v.name}: {'; '.join(v.problems)}" for v in snap.models if v.problems]
    problems += m.scan_problems
    if problems:
        click.echo()
        for line in problems[:STATUS_PROBLEMS]:
            click.echo(line)
        if len(problems) > STATUS_PROBLEMS:
            more = len(problems) - STATUS_PROBLEMS
            click.echo(f"... and {more} more problem(s); `slctl health` lists them all")
    if snap.running_jobs:
        click.echo()
        click.echo(
            table(
                ["JOB", "OPERATION", "MODEL", "POOL", "DONE", "BYTES", "STATE"],
                job_rows(snap.running_jobs),
            )
        )
        for line in job_reasons(snap.running_jobs):
            click.echo(line)


@click.command(context_settings=CONTEXT)
@click.option("--repair", is_flag=True, help="Fix what can be fixed (links, orphans).")
@click.option("--verify", is_flag=True, help="Also check every hot copy against its digest.")
@JSON
def health(repair: bool, verify: bool, as_json: bool) -> None:
    """Check pools, links, orphans and cold storage; exit 1 if something is wrong.

    \b
    Examples:
      slctl health
      slctl health --repair
    """

    async def body(client: Client) -> tuple[bool, list]:
        return await client.manager("Health", "bb", repair, verify)

    ok, findings = run(body)
    if as_json:
        keys = ["check", "status", "subject", "message", "repaired"]
        print_json({"ok": ok, "findings": [dict(zip(keys, f, strict=True)) for f in findings]})
    else:
        problems = [f for f in findings if f[1] != "ok"]
        if problems:
            rows = [
                [c, s, subj or "-", msg + (" (repaired)" if rep else "")]
                for c, s, subj, msg, rep in problems
            ]
            click.echo(table(["CHECK", "STATUS", "SUBJECT", "PROBLEM"], rows))
        click.echo("healthy" if ok else "unhealthy")
    if not ok:
        sys.exit(Exit.FAILED)


@click.command(context_settings=CONTEXT)
def rescan() -> None:
    """Look for new, changed or removed models on cold storage."""

    async def body(client: Client) -> int:
        return await client.manager("Rescan")

    click.echo(f"{run(body)} models on cold storage")
