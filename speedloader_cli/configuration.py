"""slctl config ...: read and change the daemon's configuration through the daemon."""

from __future__ import annotations

import json
from typing import Any

import click

from speedloader_client.client import MANAGER, ROOT, Client, printable
from speedloader_client.records import Manager

from .common import (
    CONTEXT,
    run,
)
from .errors import CliError, Exit
from .output import print_json


@click.group(context_settings=CONTEXT)
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
    """The daemon's configuration as it is (strings not yet printable: it may be sent back)."""

    async def body(client: Client) -> dict[str, Any]:
        return await client.get_config()

    return run(body)


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
    print_json(_get_config())  # JSON escapes every control character (ensure_ascii)


@config.command("get", context_settings=CONTEXT)
@click.argument("key")
def config_get(key: str) -> None:
    """Print the value of KEY (dotted, e.g. ramdisk.size)."""
    node, last = _walk(_get_config(), key)
    try:
        value = node[last]
    except (KeyError, IndexError, TypeError):
        raise CliError(f"the configuration has no key {key!r}", Exit.USAGE) from None
    # A string as it reads, made printable (it comes from the daemon); anything else as
    # JSON, which escapes every control character.
    click.echo(printable(value) if isinstance(value, str) else json.dumps(value))


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
        manager = Manager.from_props(ROOT, await client.get_all(ROOT, MANAGER))
        return manager.config_path

    path = run(body)
    if not path:
        raise CliError("the daemon runs without a configuration file", Exit.FAILED)
    return path


@config.command("path", context_settings=CONTEXT)
def config_path() -> None:
    """Print the path of the configuration file the daemon uses."""
    click.echo(_config_path())
