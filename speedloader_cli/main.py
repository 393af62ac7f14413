"""slctl: control speedloaderd, the daemon that keeps hot LLM models in RAM pools.

Every command talks to the daemon over the D-Bus system bus; slctl itself never mounts,
copies or writes model files. What you may change is decided by polkit: members of the
``speedloader`` group move models and operate the configured pools, only an admin changes
anything that names a path, a host, a key or a size of remote RAM, and anyone may look.
"""

from __future__ import annotations

import os
import sys
import traceback

import click

from speedloader_client.client import printable
from speedloaderd import __version__

from . import configuration, install, jobs, models, pools, status, tiering
from .common import CONTEXT
from .errors import CliError, Exit


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
      slctl tiering status             what automatic tiering keeps in RAM, and why

    Exit codes: 0 done, 1 failed, 2 bad usage or argument, 3 daemon not reachable,
    4 not authorized.
    """


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


for command in (
    status.status,
    status.health,
    status.rescan,
    models.promote,
    models.demote,
    models.pin,
    models.unpin,
    pools.pool,
    pools.init,
    jobs.jobs,
    configuration.config,
    tiering.tiering,
    install.install,
    install.uninstall,
):
    cli.add_command(command)


def main(argv: list[str] | None = None) -> int:
    """Run slctl; return the exit code. Errors are one line on stderr, never a traceback."""
    try:
        cli.main(args=argv, prog_name="slctl", standalone_mode=False)
    except CliError as err:
        if str(err):
            # Printable again here: a sentence may quote a file or value, not only the bus.
            click.echo(f"{err.prefix}{printable(str(err))}", err=True)
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
            f"error: internal error in slctl: {type(err).__name__}: {printable(str(err))} "
            "(SLCTL_DEBUG=1 shows details; please report it)",
            err=True,
        )
        return int(Exit.FAILED)
    return 0


def entry() -> None:
    sys.exit(main())
