"""slctl pool ... and slctl init: the RAM pools' lifecycle."""

from __future__ import annotations

from typing import Any

import click

from speedloader_client.client import POOL, Client, ClientError, pool_path
from speedloader_client.records import DEFAULT_SPEED, Pool, job_id

from .common import (
    CONTEXT,
    JSON,
    NO_WAIT,
    POOL_ARG,
    pool_rows,
    run,
)
from .errors import NO_SUCH_OBJECT, CliError, Exit, explain
from .output import print_json, table
from .progress import Followed, follow_all
from .state import snapshot


@click.group(context_settings=CONTEXT)
def pool() -> None:
    """List and manage RAM pools (tmpfs here, or remote RAM over NVMe-oF).

    \b
    Examples:
      slctl pool list
      slctl pool add fast --size 32G --speed 200     # at <poolsRoot>/fast
      slctl pool resize fast 48G
      slctl pool disconnect fast      # demotes what it holds first
    """


@pool.command("list", context_settings=CONTEXT)
@JSON
def pool_list(as_json: bool) -> None:
    """List pools: state, usage, speed rating and mount path."""
    snap = run(snapshot)
    if as_json:
        print_json(
            [
                p.to_json() | {"freeBytes": p.free_bytes, "problem": p.problem or None}
                for p in snap.pools
            ]
        )
        return
    rows = pool_rows(snap)
    click.echo(
        table(["POOL", "KIND", "STATE", "USAGE", "SPEED", "PATH"], rows)
        if rows
        else "no pools configured"
    )


def _pool_job(
    name: str, member: str, signature: str, args: list[Any], label: str, no_wait: bool
) -> None:
    async def body(client: Client) -> None:
        await client.subscribe()
        try:
            job = await client.pool_call(pool_path(name), member, signature, *args)
        except ClientError as err:
            raise _no_such_pool(err, name) from None
        if no_wait:
            click.echo(job_id(job))
            return
        [followed] = await follow_all(client, [Followed(job, label)])
        if followed.result is not None and not followed.result.success:
            raise CliError(f"{label} failed", Exit.FAILED, prefix="")

    run(body)


def _no_such_pool(err: ClientError, name: str) -> CliError:
    if err.name in NO_SUCH_OBJECT:
        return CliError(f"no pool named {name!r}; `slctl pool list` lists the pools", Exit.USAGE)
    return explain(err)


@pool.command("connect", context_settings=CONTEXT)
@POOL_ARG
@NO_WAIT
def pool_connect(name: str, no_wait: bool) -> None:
    """Mount (or, for a remote pool, connect) pool NAME."""
    _pool_job(name, "Connect", "", [], f"connect {name}", no_wait)


@pool.command("disconnect", context_settings=CONTEXT)
@POOL_ARG
@NO_WAIT
def pool_disconnect(name: str, no_wait: bool) -> None:
    """Demote every model on pool NAME, then unmount (or disconnect) it."""
    _pool_job(name, "Disconnect", "", [], f"disconnect {name}", no_wait)


@pool.command("resize", context_settings=CONTEXT)
@POOL_ARG
@click.argument("size")
@NO_WAIT
def pool_resize(name: str, size: str, no_wait: bool) -> None:
    """Resize pool NAME to SIZE (e.g. 64G, 1.5T) while it stays in use.

    Shrinking below what the pool holds is refused.
    """
    _pool_job(name, "Resize", "s", [size], f"resize {name} to {size}", no_wait)


@pool.command("add", context_settings=CONTEXT)
@click.argument("name")
@click.option(
    "--path",
    help="Mount point. tmpfs: only <poolsRoot>/NAME, the default; remote: default "
    "/run/speedloader/pools/NAME.",
)
@click.option("--size", required=True, help="Size, e.g. 32G or 512M.")
@click.option(
    "--speed",
    default=None,
    type=click.IntRange(0, 10000),
    help=f"Speed rating: fastest-fit placement prefers higher (default {DEFAULT_SPEED} local).",
)
@click.option("--remote", metavar="USER@HOST[:PORT]", help="Add remote RAM on this host instead.")
@click.option("--address", help="Remote: the fabric address to connect to (IP).")
@click.option(
    "--transport",
    type=click.Choice(["rdma", "tcp"]),
    default="rdma",
    show_default=True,
    help="Remote: NVMe-oF transport.",
)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=4420,
    show_default=True,
    help="Remote: NVMe-oF port.",
)
def pool_add(
    name: str,
    path: str | None,
    size: str,
    speed: int | None,
    remote: str | None,
    address: str | None,
    transport: str,
    port: int,
) -> None:
    """Add pool NAME: a tmpfs pool here (mounted at once), or with --remote, RAM on
    another host exported over NVMe-oF (connect it with `slctl pool connect NAME`).

    Both are saved in the configuration. A remote host's SSH key must already be in
    /etc/speedloader/known_hosts (see the README).

    \b
    Examples:
      slctl pool add fast --size 32G --speed 200
      slctl pool add gpu2 --remote root@gpu2 --address 10.0.1.2 --size 512G
      slctl pool connect gpu2
    """
    if remote is None:
        # No --path: the daemon puts it at <poolsRoot>/NAME, the only place it may go.
        async def add_tmpfs(client: Client) -> None:
            pool = await client.manager(
                "AddPool", "sssu", name, path or "", size, DEFAULT_SPEED if speed is None else speed
            )
            where = path or Pool.from_props(pool, await client.get_all(pool, POOL)).mount
            click.echo(f"added pool {name} ({size} at {where})")

        run(add_tmpfs)
        return
    if address is None:
        raise CliError("a remote pool needs --address (the fabric IP to connect to)", Exit.USAGE)
    entry: dict[str, Any] = {
        "ssh": remote,
        "rdmaIp": address,
        "ramdiskSize": size,
        "transport": transport,
        "port": port,
    }
    if path is not None:
        entry["path"] = path
    if speed is not None:
        entry["speed"] = speed

    async def add_remote(client: Client) -> None:
        await client.add_remote_pool(name, entry)
        click.echo(
            f"added remote pool {name} ({size} on {remote}); connect it with "
            f"`slctl pool connect {name}`"
        )

    run(add_remote)


@pool.command("remove", context_settings=CONTEXT)
@POOL_ARG
def pool_remove(name: str) -> None:
    """Remove pool NAME from the configuration (disconnect it first)."""

    async def body(client: Client) -> None:
        await client.manager("RemovePool", "s", name)
        click.echo(f"removed pool {name}")

    run(body)


@click.command(context_settings=CONTEXT)
def init() -> None:
    """Mount every configured RAM pool that is not mounted yet."""

    async def body(client: Client) -> None:
        await client.subscribe()
        snap = await snapshot(client)
        todo = [p for p in snap.pools if p.state != "mounted"]
        if not todo:
            click.echo(f"all {len(snap.pools)} pools are mounted")
            return
        jobs = [
            Followed(await client.pool_call(p.path, "Connect"), f"connect {p.name}") for p in todo
        ]
        await follow_all(client, jobs)
        if any(j.result is not None and not j.result.success for j in jobs):
            raise CliError("some pools could not be mounted", Exit.FAILED, prefix="")

    run(body)
