"""slctl install / uninstall: put the daemon's system files in place, or take them away.

What goes where (below ``--root``, default ``/``):

    etc/systemd/system/speedloaderd.service                      the unit (Type=dbus)
    usr/share/dbus-1/system.d/org.speedloader.Speedloader1.conf  who may own and call
    usr/share/dbus-1/system-services/org.speedloader.Speedloader1.service   activation
    usr/share/polkit-1/actions/org.speedloader.policy            one action per change
    usr/share/polkit-1/rules.d/50-speedloader.rules              the group may do all
    usr/lib/tmpfiles.d/speedloader.conf                          the state directory
    usr/share/bash-completion/completions/slctl                  completion
    etc/speedloader/config.json                                  a first config (kept if present)

Uninstall removes the same files (the config and group only with ``--purge``) and never
touches the models dir, the pools' contents or cold storage.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from speedloaderd.sizes import format_size_exact, parse_size

from .errors import CliError, Exit

DEFAULT_EXEC = "/usr/local/bin/speedloaderd"
GROUP = "speedloader"
OLLAMA_DEFAULT = Path("/usr/share/ollama/.ollama/models")


def data_dir() -> Path:
    """Where dbus/, polkit/ and systemd/ are: the checkout, or the installed share dir."""
    for base in (
        Path(__file__).resolve().parent.parent,
        Path(sys.prefix) / "share" / "speedloader",
    ):
        if (base / "dbus").is_dir() and (base / "polkit").is_dir():
            return base
    raise CliError("cannot find speedloader's dbus/, polkit/ and systemd/ files", Exit.FAILED)


def daemon_path() -> Path:
    found = shutil.which("speedloaderd") or str(Path(sys.executable).with_name("speedloaderd"))
    if not Path(found).exists():
        raise CliError(
            "cannot find the speedloaderd program; is speedloader installed?", Exit.FAILED
        )
    return Path(found)


@dataclass(frozen=True)
class SystemFile:
    dest: str
    source: str  # relative to data_dir(); "" = generated
    executable_placeholder: bool = False


FILES = [
    SystemFile("etc/systemd/system/speedloaderd.service", "systemd/speedloaderd.service", True),
    SystemFile(
        "usr/share/dbus-1/system.d/org.speedloader.Speedloader1.conf",
        "dbus/org.speedloader.Speedloader1.conf",
    ),
    SystemFile(
        "usr/share/dbus-1/system-services/org.speedloader.Speedloader1.service",
        "dbus/org.speedloader.Speedloader1.service",
        True,
    ),
    SystemFile(
        "usr/share/polkit-1/actions/org.speedloader.policy", "polkit/org.speedloader.policy"
    ),
    SystemFile("usr/share/polkit-1/rules.d/50-speedloader.rules", "polkit/50-speedloader.rules"),
    SystemFile("usr/lib/tmpfiles.d/speedloader.conf", "systemd/speedloader.tmpfiles.conf"),
    SystemFile("usr/share/bash-completion/completions/slctl", ""),
]
CONFIG = "etc/speedloader/config.json"


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def default_pool_size() -> str:
    """Half of the RAM available now, in whole GiB (at least 1G): room for the models
    while the inference server keeps the rest."""
    gib = max(mem_available() // 2 // (1 << 30), 1)
    return f"{gib}G"


def systemd_running(root: Path) -> bool:
    return root == Path("/") and Path("/run/systemd/system").is_dir()


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.slctl-tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)


def _run(argv: list[str]) -> None:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise CliError(f"`{' '.join(argv)}` failed: {(r.stderr or r.stdout).strip()}", Exit.FAILED)


def _group_exists(root: Path) -> bool:
    group_file = root / "etc" / "group"
    if not group_file.exists():
        return False
    return any(line.split(":", 1)[0] == GROUP for line in group_file.read_text().splitlines())


def _completion_script() -> str:
    from click.shell_completion import get_completion_class

    from .main import cli

    cls = get_completion_class("bash")
    assert cls is not None
    return cls(cli, {}, "slctl", "_SLCTL_COMPLETE").source() + "\n"


def _ask(text: str, default: str, yes: bool) -> str:
    if yes:
        return default
    return click.prompt(text, default=default)


def _root_option(verb: str):
    return click.option(
        "--root",
        type=click.Path(file_okay=False, path_type=Path),
        default=Path("/"),
        show_default=True,
        help=f"{verb} below this directory instead of /.",
    )


def _require_root_for(root: Path, what: str) -> Path:
    root = root.resolve()
    if root == Path("/") and os.geteuid() != 0:
        raise CliError(
            f"run as root: slctl {what} changes files in /etc and /usr", Exit.NOT_AUTHORIZED
        )
    return root


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@_root_option("Install")
@click.option("--yes", "-y", is_flag=True, help="Take every default without asking.")
@click.option("--cold", help="Cold storage path (where the models are; never written).")
@click.option(
    "--backend",
    type=click.Choice(["ollama", "llamacpp", "vllm", "huggingface"]),
    help="Inference server whose layout the models dir follows.",
)
@click.option("--models-dir", help="The models dir your inference server reads.")
@click.option("--pool-size", help="Size of the local RAM pool, e.g. 64G.")
def install(
    root: Path,
    yes: bool,
    cold: str | None,
    backend: str | None,
    models_dir: str | None,
    pool_size: str | None,
) -> None:
    """Install the service: systemd unit, D-Bus policy and activation, polkit policy and
    rules, tmpfiles entry, the 'speedloader' group and a first configuration.

    Asks for the cold storage path, backend, models dir and pool size (Enter takes the
    default); --yes takes all defaults. When systemd runs, the service is enabled and
    started.

    \b
    Examples:
      slctl install
      slctl install --yes --cold /mnt/nfs/ollama --pool-size 200G
      slctl install --root /tmp/stage --yes      # stage the files, touch nothing else
    """
    root = _require_root_for(root, "install")
    if not yes and not sys.stdin.isatty():
        raise CliError("no terminal to ask on: pass --yes (and --cold, --pool-size...)", Exit.USAGE)
    src = data_dir()
    daemon = daemon_path()
    for f in FILES:
        text = _completion_script() if not f.source else (src / f.source).read_text()
        if f.executable_placeholder:
            text = text.replace(DEFAULT_EXEC, str(daemon))
        _write(root / f.dest, text)
        click.echo(f"wrote /{f.dest}")

    config_file = root / CONFIG
    if config_file.exists():
        click.echo(f"kept /{CONFIG} (already there)")
    else:
        default_cold = str(OLLAMA_DEFAULT) if OLLAMA_DEFAULT.is_dir() else "/srv/models"
        cold = cold or _ask(
            "Cold storage path (models are read here, never written)", default_cold, yes
        )
        backend = backend or _ask("Backend (ollama, llamacpp, vllm, huggingface)", "ollama", yes)
        models_dir = models_dir or _ask(
            "Models dir (point your inference server here)", "/var/lib/speedloader/models", yes
        )
        pool_size = pool_size or _ask("Local RAM pool size", default_pool_size(), yes)
        try:
            size = format_size_exact(parse_size(pool_size))
        except ValueError as err:
            raise CliError(f"pool size: {err}", Exit.USAGE) from None
        data = {
            "modelsDir": models_dir,
            "storage": {"path": cold, "type": "local"},
            "backend": {"type": backend},
            "ramdisk": {"path": "/mnt/speedloader/local", "size": size},
            "modelPlacement": {"defaultStrategy": "fastest-fit", "pinned": {}},
        }
        from speedloaderd.config import parse_config

        try:
            parse_config(data, "the new configuration")
        except ValueError as err:
            raise CliError(str(err), Exit.USAGE) from None
        _write(config_file, json.dumps(data, indent=2) + "\n")
        click.echo(f"wrote /{CONFIG}")

    if _group_exists(root):
        click.echo(f"group {GROUP} exists")
    elif (root / "etc" / "group").exists():
        argv = ["groupadd", "--system", GROUP] + (
            [] if root == Path("/") else ["--prefix", str(root)]
        )
        _run(argv)
        click.echo(f"created group {GROUP}: add users with `usermod -aG {GROUP} USER`")
    else:
        click.echo(f"skipped group {GROUP}: {root}/etc/group does not exist")

    if systemd_running(root):
        _run(["systemctl", "daemon-reload"])
        _run(["systemd-tmpfiles", "--create", "/usr/lib/tmpfiles.d/speedloader.conf"])
        _run(["systemctl", "enable", "--now", "speedloaderd.service"])
        click.echo("enabled and started speedloaderd.service")
    else:
        click.echo("systemd is not running here: start the daemon with `speedloaderd`")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@_root_option("Uninstall")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--purge", is_flag=True, help="Also remove the configuration and the group.")
def uninstall(root: Path, yes: bool, purge: bool) -> None:
    """Remove what `slctl install` put in place. Models, pools' contents and cold storage
    are never touched; the configuration and group stay unless --purge.

    \b
    Example:
      slctl uninstall --yes
    """
    root = _require_root_for(root, "uninstall")
    if not yes:
        if not sys.stdin.isatty():
            raise CliError("no terminal to ask on: pass --yes", Exit.USAGE)
        click.confirm("Remove the speedloader service files?", abort=True)
    if systemd_running(root):
        subprocess.run(
            ["systemctl", "disable", "--now", "speedloaderd.service"], capture_output=True
        )
    targets = [f.dest for f in FILES] + ([CONFIG] if purge else [])
    for dest in targets:
        path = root / dest
        if path.exists():
            path.unlink()
            click.echo(f"removed /{dest}")
    if purge and _group_exists(root):
        _run(["groupdel", GROUP] + ([] if root == Path("/") else ["--prefix", str(root)]))
        click.echo(f"removed group {GROUP}")
    if systemd_running(root):
        subprocess.run(["systemctl", "daemon-reload"], capture_output=True)
