"""slctl: control speedloaderd, the daemon that keeps hot LLM models in RAM pools.

Every command talks to the daemon over the D-Bus system bus; slctl itself never mounts,
copies or writes model files. What you may change is decided by polkit: members of the
``speedloader`` group may do everything, anyone may look.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import traceback
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click

from speedloaderd import __version__

from .client import Client, ClientError, pool_path
from .errors import NO_SUCH_OBJECT, CliError, Exit, explain
from .output import bar, format_size, print_json, table
from .progress import Followed, follow_all
from .state import Snapshot, job_id, snapshot

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


def _complete(kind: str) -> Callable[..., list[click.shell_completion.CompletionItem]]:
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


MODEL = click.argument("model", shell_complete=_complete("model"))
MODELS = click.argument("models", nargs=-1, required=True, shell_complete=_complete("model"))
POOL_ARG = click.argument("name", shell_complete=_complete("pool"))
NO_WAIT = click.option("--no-wait", is_flag=True, help="Print the job id and return at once.")
JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON (a stable contract).")


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="slctl")
def cli() -> None:
    """Control speedloaderd: keep your hottest LLM models in RAM.

    Models live on read-only cold storage; promoting one copies it into a RAM pool and
    repoints the links in the models dir your inference server reads, demoting points
    them back. Pools are local tmpfs mounts or remote RAM over NVMe-oF.

    \b
    Examples:
      slctl status                     what is hot, what is cold, what is running
      slctl promote llama3:8b          copy a model into the fastest pool with room
      slctl demote llama3:8b           back to cold storage, freeing the RAM
      slctl pin llama3:70b local       always keep that model in pool 'local'
      slctl pool resize local 64G      grow or shrink a tmpfs pool live

    Exit codes: 0 done, 1 failed, 2 bad usage or argument, 3 daemon not reachable,
    4 not authorized.
    """


# --- status ------------------------------------------------------------------------------


def _pool_rows(snap: Snapshot) -> list[list[str]]:
    rows = []
    for p in snap.pools:
        frac = p.used / p.size if p.size else 0.0
        usage = f"{bar(frac, 16)} {format_size(p.used)}/{format_size(p.size)} {frac:4.0%}"
        rows.append([p.name, p.kind, p.state, usage, str(p.speed), p.mount])
    return rows


def _model_rows(snap: Snapshot) -> list[list[str]]:
    return [
        [m.name, m.format, format_size(m.size), m.tier, m.pinned or "-", m.state]
        for m in snap.models
    ]


def _job_rows(jobs) -> list[list[str]]:
    return [
        [
            str(j.id),
            j.operation,
            j.model or "-",
            j.pool or "-",
            f"{j.progress:4.0%}",
            f"{format_size(j.done)}/{format_size(j.total)}",
            j.state,
        ]
        for j in jobs
    ]


@cli.command(context_settings=CONTEXT)
@JSON
def status(as_json: bool) -> None:
    """Show the backend, pools with their usage, hot and cold models, and running jobs.

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
    if not m.get("ConfigValid", True):
        click.echo(f"error: speedloaderd has no valid configuration: {m.get('ConfigError')}")
        click.echo("fix it with `slctl config set KEY VALUE` or edit the file and restart")
        return
    url = m.get("BackendApiUrl")
    click.echo(
        f"backend: {m.get('Backend')}{f' at {url}' if url else ''}\n"
        f"models dir: {m.get('ModelsDir')}   cold storage: {m.get('ColdStorage')}   "
        f"placement: {m.get('Strategy')}"
    )
    click.echo()
    click.echo(table(["POOL", "KIND", "STATE", "USAGE", "SPEED", "PATH"], _pool_rows(snap)))
    click.echo()
    hot = [m for m in snap.models if m.tier != "cold" or m.state != "cold"]
    cold = [m for m in snap.models if m not in hot]
    headers = ["MODEL", "FORMAT", "SIZE", "TIER", "PINNED", "STATE"]
    rows = _model_rows(Snapshot(snap.manager, [], hot + cold, []))
    click.echo(table(headers, rows) if rows else "no models found on cold storage")
    if snap.running_jobs:
        click.echo()
        click.echo(
            table(
                ["JOB", "OPERATION", "MODEL", "POOL", "DONE", "BYTES", "STATE"],
                _job_rows(snap.running_jobs),
            )
        )


# --- promote, demote, pin ----------------------------------------------------------------


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


@cli.command(context_settings=CONTEXT)
@MODELS
@click.option(
    "--pool",
    "-p",
    default="",
    shell_complete=_complete("pool"),
    help="Pool to use (default: placement decides; a pin always wins).",
)
@NO_WAIT
def promote(models: tuple[str, ...], pool: str, no_wait: bool) -> None:
    """Copy MODELS into a RAM pool and point the models dir at the copy.

    Waits with a progress bar; Ctrl-C offers to cancel or to let it run on. A model
    already hot is left as is.

    \b
    Examples:
      slctl promote llama3:8b
      slctl promote qwen2:7b mistral:7b --pool fast
      slctl promote llama3:70b --no-wait      # prints the job id
    """
    _start_and_follow(lambda c, m: c.promote(m, pool), models, "promote", no_wait)


@cli.command(context_settings=CONTEXT)
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


@cli.command(context_settings=CONTEXT)
@MODEL
@click.argument("pool", shell_complete=_complete("pool"))
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


@cli.command(context_settings=CONTEXT)
@MODEL
def unpin(model: str) -> None:
    """Remove MODEL's pin; placement decides again. Nothing is moved."""

    async def body(client: Client) -> None:
        await client.unpin(model)
        click.echo(f"unpinned {model}")

    run(body)


# --- pools -------------------------------------------------------------------------------


@cli.group(context_settings=CONTEXT)
def pool() -> None:
    """List and manage RAM pools (tmpfs here, or remote RAM over NVMe-oF).

    \b
    Examples:
      slctl pool list
      slctl pool add fast --path /mnt/speedloader/fast --size 32G --speed 200
      slctl pool resize fast 48G
      slctl pool disconnect fast      # demotes what it holds first
    """


@pool.command("list", context_settings=CONTEXT)
@JSON
def pool_list(as_json: bool) -> None:
    """List pools: state, usage, speed rating and mount path."""
    snap = run(snapshot)
    if as_json:
        print_json([p.to_json() | {"freeBytes": p.free} for p in snap.pools])
        return
    rows = _pool_rows(snap)
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
@click.option("--path", required=True, help="Mount point (an absolute path, created if needed).")
@click.option("--size", required=True, help="Size, e.g. 32G or 512M.")
@click.option(
    "--speed",
    default=100,
    show_default=True,
    type=click.IntRange(0, 10000),
    help="Speed rating: fastest-fit placement prefers higher.",
)
def pool_add(name: str, path: str, size: str, speed: int) -> None:
    """Add a tmpfs pool NAME, mount it and save it in the configuration.

    \b
    Example:
      slctl pool add fast --path /mnt/speedloader/fast --size 32G --speed 200
    """

    async def body(client: Client) -> None:
        await client.manager("AddPool", "sssu", name, path, size, speed)
        click.echo(f"added pool {name} ({size} at {path})")

    run(body)


@pool.command("remove", context_settings=CONTEXT)
@POOL_ARG
def pool_remove(name: str) -> None:
    """Remove pool NAME from the configuration (disconnect it first)."""

    async def body(client: Client) -> None:
        await client.manager("RemovePool", "s", name)
        click.echo(f"removed pool {name}")

    run(body)


# --- jobs ----------------------------------------------------------------------------------


@cli.group(context_settings=CONTEXT, invoke_without_command=True)
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
        print_json([j.to_json() | {"message": j.message} for j in snap.jobs])
        return
    rows = _job_rows(snap.jobs)
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
        client.add_listener(
            lambda m: (
                m.member == "InterfacesAdded" and JOB in m.body[1] and started.put_nowait(m.body[0])
            )
        )
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


# --- config --------------------------------------------------------------------------------


@cli.group(context_settings=CONTEXT)
def config() -> None:
    """Show, read, change and validate the configuration.

    Changes go through the daemon, which validates them and keeps the running
    configuration if the new one is refused. Keys use the file's camelCase names, dotted:

    \b
    Examples:
      slctl config get modelPlacement.defaultStrategy
      slctl config set modelPlacement.defaultStrategy fill-first
      slctl config set pools.0.size 48G
      slctl config validate /etc/speedloader/config.json
    """


def _get_config() -> dict[str, Any]:
    async def body(client: Client) -> str:
        return await client.manager("GetConfig")

    return json.loads(run(body))


def _walk(data: Any, key: str, create: bool = False) -> tuple[Any, str | int]:
    """The container holding dotted ``key`` and the last part of it."""
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise CliError(f"{key!r} is not a key; use dotted names like ramdisk.size", Exit.USAGE)
    node = data
    for i, part in enumerate(parts[:-1]):
        node = _step(node, part, key, create, parts[i + 1])
    last = parts[-1]
    return node, int(last) if isinstance(node, list) and last.isdigit() else last


def _step(node: Any, part: str, key: str, create: bool, following: str) -> Any:
    if isinstance(node, list) and part.isdigit() and int(part) < len(node):
        return node[int(part)]
    if isinstance(node, dict):
        if part not in node and create:
            node[part] = [] if following.isdigit() else {}
        if part in node:
            return node[part]
    raise CliError(f"the configuration has no key {key!r}", Exit.USAGE)


@config.command("show", context_settings=CONTEXT)
def config_show() -> None:
    """Print the running configuration as JSON."""
    print_json(_get_config())


@config.command("get", context_settings=CONTEXT)
@click.argument("key")
def config_get(key: str) -> None:
    """Print the value of KEY (dotted, e.g. ramdisk.size)."""
    node, last = _walk(_get_config(), key)
    try:
        value = node[last]
    except (KeyError, IndexError, TypeError):
        raise CliError(f"the configuration has no key {key!r}", Exit.USAGE) from None
    click.echo(value if isinstance(value, str) else json.dumps(value))


@config.command("set", context_settings=CONTEXT)
@click.argument("key")
@click.argument("value")
def config_set(key: str, value: str) -> None:
    """Set KEY to VALUE (JSON if it parses, else a string) through the daemon."""
    data = _get_config()
    node, last = _walk(data, key, create=True)
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    try:
        node[last] = parsed
    except (IndexError, TypeError):
        raise CliError(f"the configuration has no key {key!r}", Exit.USAGE) from None

    async def body(client: Client) -> None:
        await client.manager("SetConfig", "s", json.dumps(data))

    run(body)
    click.echo(f"{key} = {json.dumps(parsed) if not isinstance(parsed, str) else parsed}")


@config.command("validate", context_settings=CONTEXT)
@click.argument("file", required=False, type=click.Path(dir_okay=False))
def config_validate(file: str | None) -> None:
    """Check FILE (default: the daemon's configuration file) without applying it."""
    from speedloaderd.config import parse_config

    if file is None:
        file = _config_path()
    try:
        with open(file, encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise CliError(f"cannot read {file}: {err.strerror}", Exit.USAGE) from None
    try:
        parse_config(json.loads(text), file)
    except ValueError as err:
        raise CliError(f"{file}: {err}", Exit.FAILED) from None
    click.echo(f"{file}: valid")


def _config_path() -> str:
    async def body(client: Client) -> str:
        return (
            await client.get_all(
                "/org/speedloader/Speedloader1", "org.speedloader.Speedloader1.Manager"
            )
        ).get("ConfigPath", "")

    path = run(body)
    if not path:
        raise CliError("the daemon runs without a configuration file", Exit.FAILED)
    return path


@config.command("path", context_settings=CONTEXT)
def config_path() -> None:
    """Print the path of the configuration file the daemon uses."""
    click.echo(_config_path())


# --- health, rescan, init ------------------------------------------------------------------


@cli.command(context_settings=CONTEXT)
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


@cli.command(context_settings=CONTEXT)
def rescan() -> None:
    """Look for new, changed or removed models on cold storage."""

    async def body(client: Client) -> int:
        return await client.manager("Rescan")

    click.echo(f"{run(body)} models on cold storage")


@cli.command(context_settings=CONTEXT)
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


# --- shell completion ------------------------------------------------------------------------


@cli.command(context_settings=CONTEXT)
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script for SHELL (model and pool names included).

    \b
    Examples:
      slctl completion bash > /etc/bash_completion.d/slctl
      slctl completion zsh > "${fpath[1]}/_slctl"
      slctl completion fish > ~/.config/fish/completions/slctl.fish
    """
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None
    click.echo(cls(cli, {}, "slctl", "_SLCTL_COMPLETE").source())


def _register_install() -> None:
    from .install import install, uninstall

    cli.add_command(install)
    cli.add_command(uninstall)


_register_install()


def main(argv: list[str] | None = None) -> int:
    """Run slctl; return the exit code. Errors are one line on stderr, never a traceback."""
    try:
        cli.main(args=argv, prog_name="slctl", standalone_mode=False)
    except CliError as err:
        if str(err):
            click.echo(f"{err.prefix}{err}", err=True)
        return int(err.code)
    except click.UsageError as err:
        err.show()
        return int(Exit.USAGE)
    except click.ClickException as err:
        err.show()
        return int(Exit.USAGE if isinstance(err, click.BadParameter) else Exit.FAILED)
    except click.Abort:
        click.echo("aborted", err=True)
        return int(Exit.INTERRUPTED)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return int(Exit.INTERRUPTED)
    except SystemExit as err:
        return int(err.code or 0) if not isinstance(err.code, str) else 1
    except BrokenPipeError:
        return 0
    except Exception as err:
        if os.environ.get("SLCTL_DEBUG"):
            traceback.print_exc()
        click.echo(
            f"error: internal error in slctl: {type(err).__name__}: {err} "
            "(SLCTL_DEBUG=1 shows details; please report it)",
            err=True,
        )
        return int(Exit.FAILED)
    return 0


def entry() -> None:
    sys.exit(main())
