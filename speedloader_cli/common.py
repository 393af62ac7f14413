"""What every slctl command shares: the daemon connection, name completion, options
and the table rows for pools, models and jobs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import click

from speedloader_client import fmt
from speedloader_client.client import Client, ClientError
from speedloader_client.records import Job

from .errors import explain
from .output import bar, format_size
from .state import Snapshot, snapshot

T = TypeVar("T")
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def run(body: Callable[[Client], Awaitable[T]]) -> T:
    """Connect, run ``body``, and turn any daemon or bus failure into a CliError."""

    async def main() -> T:
        try:
            async with await Client.connect() as client:
                return await body(client)
        except ClientError as err:
            raise explain(err) from None

    return asyncio.run(main())


# --- completion of model and pool names, asked of the daemon -----------------------------


def complete(kind: str) -> Callable[..., list[click.shell_completion.CompletionItem]]:
    def complete(ctx: click.Context, param: click.Parameter, incomplete: str):
        async def names(client: Client) -> list[str]:
            snap = await asyncio.wait_for(snapshot(client), 2)
            items = snap.models if kind == "model" else snap.pools
            return [i.name for i in items]

        try:
            found = run(names)
        except Exception:  # completion must never print an error into the shell
            return []
        return [click.shell_completion.CompletionItem(n) for n in found if n.startswith(incomplete)]

    return complete


MODEL = click.argument("model", shell_complete=complete("model"))
MODELS = click.argument("models", nargs=-1, required=True, shell_complete=complete("model"))
POOL_ARG = click.argument("name", shell_complete=complete("pool"))
NO_WAIT = click.option("--no-wait", is_flag=True, help="Print the job id and return at once.")
JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON (a stable contract).")


def pool_rows(snap: Snapshot) -> list[list[str]]:
    rows = []
    for p in snap.pools:
        frac = p.used_bytes / p.size_bytes if p.size_bytes else 0.0
        usage = (
            f"{bar(frac, 16)} {format_size(p.used_bytes)}/{format_size(p.size_bytes)} {frac:4.0%}"
        )
        rows.append([p.name, p.kind, p.state, usage, str(p.speed), p.mount])
    return rows


def model_rows(snap: Snapshot) -> list[list[str]]:
    return [
        [m.name, m.format, format_size(m.size_bytes), m.tier, m.pinned_pool or "-", m.state]
        for m in snap.models
    ]


def job_reasons(jobs: list[Job]) -> list[str]:
    """One line per job the daemon started itself (automatic tiering), saying why:
    ``job 12: promote a:1 → local (auto: used 4x in 1 h)``; none for a caller's job."""
    lines = []
    for j in jobs:
        said = fmt.job_reason(j.operation, j.model, j.pool, j.reason)
        if said:
            lines.append(f"job {j.id}: {said}")
    return lines


def job_rows(jobs: list[Job]) -> list[list[str]]:
    return [
        [
            str(j.id),
            j.operation,
            j.model or "-",
            j.pool or "-",
            f"{j.progress:4.0%}",
            f"{format_size(j.bytes_done)}/{format_size(j.bytes_total)}",
            j.state,
        ]
        for j in jobs
    ]
