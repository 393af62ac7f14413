"""slctl jobs: list, cancel and watch the daemon's jobs."""

from __future__ import annotations

import asyncio

import click
from dbus_fast import Message

from .client import Client, ClientError
from .common import (
    CONTEXT,
    JSON,
    job_rows,
    run,
)
from .errors import CliError, Exit, explain
from .output import print_json, table
from .progress import Followed, follow_all
from .state import job_id, snapshot


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


@jobs.command("cancel", context_settings=CONTEXT)
@click.argument("job", type=int)
def jobs_cancel(job: int) -> None:
    """Cancel running job JOB (its id from `slctl jobs`); it leaves no trace."""
    from .client import job_path

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
    from .client import JOB

    async def body(client: Client) -> None:
        await client.subscribe()
        started: asyncio.Queue[str] = asyncio.Queue()

        def on_message(m: Message) -> None:
            if m.member == "InterfacesAdded" and JOB in m.body[1]:
                started.put_nowait(m.body[0])

        client.add_listener(on_message)
        snap = await snapshot(client)
        following: dict[str, asyncio.Task] = {}

        def watch(path: str, label: str) -> None:
            if path not in following:
                click.echo(f"job {job_id(path)}: {label}")
                following[path] = asyncio.ensure_future(follow_all(client, [Followed(path, label)]))

        for j in snap.running_jobs:
            watch(j.path, f"{j.operation} {j.model or j.pool}")
        while True:
            if until_idle and all(t.done() for t in following.values()) and started.empty():
                return
            try:
                path = await asyncio.wait_for(started.get(), 0.5 if until_idle else None)
            except TimeoutError:
                continue
            props = await client.get_all(path, JOB)
            watch(path, f"{props['Operation']} {props.get('Model') or props.get('Pool')}")

    try:
        run(body)
    except KeyboardInterrupt:
        raise CliError("stopped watching; jobs keep running", Exit.OK, prefix="") from None
