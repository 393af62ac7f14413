"""slctl jobs: list, cancel and watch the daemon's jobs."""

from __future__ import annotations

import asyncio

import click
from dbus_fast import Message

from speedloader_client import fmt
from speedloader_client.client import JOB, Client, ClientError, job_path
from speedloader_client.records import Job, job_id

from .common import (
    CONTEXT,
    JSON,
    job_reasons,
    job_rows,
    run,
)
from .errors import CliError, Exit, explain
from .output import print_json, table
from .progress import Followed, follow_all
from .state import snapshot


@click.group(context_settings=CONTEXT, invoke_without_command=True)
@JSON
@click.pass_context
def jobs(ctx: click.Context, as_json: bool) -> None:
    """List running and recently finished jobs (promote, demote, pool changes).

    \b
    Examples:
      slctl jobs
      slctl jobs watch
      slctl jobs cancel 12
    """
    if ctx.invoked_subcommand is not None:
        return
    snap = run(snapshot)
    if as_json:
        print_json(
            [
                j.to_json() | {"message": j.message, "startedByUid": j.started_by_uid}
                for j in snap.jobs
            ]
        )
        return
    rows = job_rows(snap.jobs)
    click.echo(
        table(["JOB", "OPERATION", "MODEL", "POOL", "DONE", "BYTES", "STATE"], rows)
        if rows
        else "no jobs"
    )
    for line in job_reasons(snap.jobs):
        click.echo(line)


@jobs.command("cancel", context_settings=CONTEXT)
@click.argument("job", type=int)
def jobs_cancel(job: int) -> None:
    """Cancel running job JOB (its id from `slctl jobs`); it leaves no trace."""

    async def body(client: Client) -> None:
        try:
            await client.cancel(job_path(job))
        except ClientError as err:
            raise explain(err, f"job {job}") from None
        click.echo(f"cancelling job {job}")

    run(body)


@jobs.command("watch", context_settings=CONTEXT)
@click.option("--until-idle", is_flag=True, help="Return once no job is running.")
def jobs_watch(until_idle: bool) -> None:
    """Follow every running job, and new ones as they start, until Ctrl-C."""

    async def body(client: Client) -> None:
        await client.subscribe()
        started: asyncio.Queue[str] = asyncio.Queue()

        def on_signal(m: Message) -> None:
            if m.member == "InterfacesAdded" and JOB in m.body[1]:
                started.put_nowait(m.body[0])

        client.add_listener(on_signal)
        snap = await snapshot(client)
        following: dict[str, asyncio.Task] = {}

        def watch(path: str, label: str) -> None:
            if path not in following:
                click.echo(f"job {job_id(path)}: {label}")
                following[path] = asyncio.ensure_future(follow_all(client, [Followed(path, label)]))

        def label(j: Job) -> str:  # an automatic job says why it runs
            return fmt.job_reason(j.operation, j.model, j.pool, j.reason) or (
                f"{j.operation} {j.model or j.pool}"
            )

        for j in snap.running_jobs:
            watch(j.path, label(j))
        while True:
            if until_idle and all(t.done() for t in following.values()) and started.empty():
                return
            try:
                path = await asyncio.wait_for(started.get(), 0.5 if until_idle else None)
            except TimeoutError:
                continue
            j = Job.from_props(path, await client.get_all(path, JOB))
            watch(path, label(j))

    try:
        run(body)
    except KeyboardInterrupt:
        raise CliError("stopped watching; jobs keep running", Exit.OK, prefix="") from None
