"""slctl promote, demote, pin and unpin: moving models between cold storage and pools."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import click

from speedloader_client.client import Client, ClientError
from speedloader_client.records import job_id

from .common import (
    CONTEXT,
    MODEL,
    MODELS,
    NO_WAIT,
    complete,
    run,
)
from .errors import CliError, Exit, explain
from .progress import Followed, follow_all


def _start_and_follow(
    start: Callable[[Client, str], Awaitable[str]],
    items: tuple[str, ...],
    verb: str,
    no_wait: bool,
) -> None:
    async def body(client: Client) -> list[Followed]:
        await client.subscribe()  # before the calls, so no signal of theirs is missed
        jobs = []
        for item in items:
            try:
                jobs.append(Followed(await start(client, item), f"{verb} {item}"))
            except ClientError as err:
                raise explain(err, f"{item!r}") from None
        if no_wait:
            for j in jobs:
                click.echo(job_id(j.path))
            return jobs
        return await follow_all(client, jobs)

    jobs = run(body)
    failed = [j for j in jobs if j.result is not None and not j.result.success]
    if failed:
        raise CliError(f"{len(failed)} of {len(jobs)} {verb} jobs failed", Exit.FAILED, prefix="")


@click.command(context_settings=CONTEXT)
@MODELS
@click.option(
    "--pool",
    "-p",
    default="",
    shell_complete=complete("pool"),
    help="Pool to use (default: placement decides; a pin always wins).",
)
@click.option(
    "--reload",
    is_flag=True,
    help="Then have the backend load the model again, from the pool, if it had it loaded "
    "from cold storage and is idle (backend.reloadAfterPromote does it always).",
)
@NO_WAIT
def promote(models: tuple[str, ...], pool: str, reload: bool, no_wait: bool) -> None:
    """Copy MODELS into a RAM pool and point the models dir at the copy.

    Waits with a progress bar; Ctrl-C offers to cancel or to let it run on. A model
    already hot is left as is (with --reload, only the reload is done).

    A server that loaded a model before its promote keeps reading the cold files until
    it loads it again: --reload unloads and loads it through the backend's API when it is
    idle; a busy one is left alone and the job's message says so.

    \b
    Examples:
      slctl promote llama3:8b
      slctl promote qwen2:7b mistral:7b --pool fast
      slctl promote llama3:8b --reload        # served from RAM from its next request
      slctl promote llama3:70b --no-wait      # prints the job id
    """
    _start_and_follow(lambda c, m: c.promote(m, pool, reload), models, "promote", no_wait)


@click.command(context_settings=CONTEXT)
@MODELS
@NO_WAIT
def demote(models: tuple[str, ...], no_wait: bool) -> None:
    """Point MODELS back at cold storage and free their RAM.

    Blobs still used by another hot model stay in the pool.

    \b
    Example:
      slctl demote llama3:8b qwen2:7b
    """
    _start_and_follow(lambda c, m: c.demote(m), models, "demote", no_wait)


@click.command(context_settings=CONTEXT)
@MODEL
@click.argument("pool", shell_complete=complete("pool"))
def pin(model: str, pool: str) -> None:
    """Pin MODEL to POOL: it is only ever promoted there (or fails, saying why).

    A model already hot in another pool is moved.

    \b
    Example:
      slctl pin llama3:70b local
    """

    async def body(client: Client) -> None:
        await client.subscribe()
        job = await client.pin(model, pool)
        if job and job != "/":
            await follow_all(client, [Followed(job, f"move {model} to {pool}")])
        click.echo(f"pinned {model} to pool {pool}")

    run(body)


@click.command(context_settings=CONTEXT)
@MODEL
def unpin(model: str) -> None:
    """Remove MODEL's pin; placement decides again. Nothing is moved."""

    async def body(client: Client) -> None:
        await client.unpin(model)
        click.echo(f"unpinned {model}")

    run(body)
