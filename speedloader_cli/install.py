"""slctl install / uninstall: put the daemon's system files in place, or take them away.

What goes where (below ``--root``, default ``/``):

    etc/systemd/system/speedloaderd.service                      the unit (Type=dbus)
    usr/share/dbus-1/system.d/org.speedloader.Speedloader1.conf  who may own and call
    usr/share/dbus-1/system-services/org.speedloader.Speedloader1.service   activation
    usr/share/polkit-1/actions/org.speedloader.policy            one action per change
    usr/share/polkit-1/rules.d/50-speedloader.rules              the group's member actions
    usr/lib/tmpfiles.d/speedloader.conf                          the state directory
    usr/lib/modules-load.d/speedloader.conf                      NVMe-oF driver at boot
    usr/share/bash-completion/completions/slctl                  completion
    etc/speedloader/config.json                                  a first config (kept if present)

Uninstall removes the same files (the config and group only with ``--purge``) and never
touches the models dir, the pools' contents or cold storage.

Every file below the root is reached through directory file descriptors opened with
``O_NOFOLLOW`` (see ``Tree``): a symbolic link, or a file where a directory belongs, that
the installer did not make is refused by name, so a link planted in a staging tree can never
turn a write (or an unlink) by root into one outside it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import click

from speedloaderd.roots import write_atomically
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
    # The unit has no CAP_SYS_MODULE: the module the NVMe-oF plan modprobes is loaded at boot.
    SystemFile("usr/lib/modules-load.d/speedloader.conf", "systemd/speedloader.modules-load.conf"),
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


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# The files groupadd/groupdel --prefix read or replace below <root>/etc (shadow-utils'
# commonio: the file, its backup "-", its new copy "+", its lock), plus .pwd.lock.
_GROUP_FILES = [
    f"etc/{name}{suffix}"
    for name in ("group", "gshadow", "passwd", "shadow")
    for suffix in ("", "-", "+", ".lock")
] + ["etc/login.defs", "etc/.pwd.lock"]


class Tree:
    """The directory tree below the install root, touched only through directory fds.

    Each component of a destination is opened relative to its parent's fd with
    ``O_NOFOLLOW | O_DIRECTORY``; files are created under a random temporary name with
    ``O_EXCL | O_NOFOLLOW`` and renamed into place relative to the same fd. The kernel
    refuses to follow a link at any step, so a link swapped in after a check is refused
    just the same. Only the root itself is reached by path: the admin named it.
    """

    def __init__(self, root: Path):
        self.root = root
        try:
            root.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(root, _DIR_FLAGS)
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.ENOTDIR, errno.EEXIST):
                self._refuse("")
            raise CliError(f"cannot open {root}: {err.strerror}", Exit.FAILED) from None

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Tree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _refuse(self, rel: str, dir_fd: int | None = None, name: str = "") -> NoReturn:
        """One sentence naming the component that is not what the installer expects."""
        shown = self.root / rel if rel else self.root
        what = "not a regular file or directory"
        try:
            st = os.stat(name or self.root, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                what = f"a symbolic link (to {os.readlink(name or self.root, dir_fd=dir_fd)})"
            elif stat.S_ISDIR(st.st_mode):
                what = "a directory where a file belongs"
            elif stat.S_ISREG(st.st_mode):
                what = "a file where a directory belongs"
        except OSError:
            pass
        raise CliError(
            f"refusing to install through {shown}: it is {what}, which slctl did not make; "
            "remove it (or pick another --root) and run again",
            Exit.FAILED,
        )

    def _kind(self, dir_fd: int, name: str) -> int | None:
        """The file type at ``name`` in ``dir_fd`` (links not followed), None if absent."""
        try:
            return stat.S_IFMT(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return None

    def open_dir(self, rel_dir: str, create: bool) -> int | None:
        """A new fd for ``rel_dir`` (made, 0755, where missing if ``create``); None if it
        is missing and not ``create``. Refuses a link or non-directory on the way."""
        fd = os.dup(self.fd)
        done: list[str] = []
        try:
            for part in rel_dir.split("/") if rel_dir else []:
                done.append(part)
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        return None
                    # FileExistsError: made meanwhile; opened, and so checked, just below.
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=fd)
                    try:
                        child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                    except OSError:
                        self._refuse("/".join(done), fd, part)
                except OSError as err:
                    if err.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    self._refuse("/".join(done), fd, part)
                os.close(fd)
                fd = child
            result, fd = fd, -1
            return result
        finally:
            if fd >= 0:
                os.close(fd)

    def check(self, rel: str) -> bool:
        """Whether ``rel`` exists as a regular file; refuses a link or other type anywhere
        on its way. Creates nothing: run over every destination before the first write."""
        parent, _, name = rel.rpartition("/")
        dfd = self.open_dir(parent, create=False)
        if dfd is None:
            return False
        try:
            kind = self._kind(dfd, name)
            if kind not in (None, stat.S_IFREG):
                self._refuse(rel, dfd, name)
            return kind is not None
        finally:
            os.close(dfd)

    def write(self, rel: str, text: str, mode: int = 0o644) -> None:
        """Atomically put ``text`` at ``rel``: temp file made with O_EXCL|O_NOFOLLOW, fsync,
        rename, fsync of the directory, all relative to the parent's fd."""
        parent, _, name = rel.rpartition("/")
        dfd = self.open_dir(parent, create=True)
        assert dfd is not None
        try:
            if self._kind(dfd, name) not in (None, stat.S_IFREG):
                self._refuse(rel, dfd, name)
            tmp = f".{name}.slctl-{secrets.token_hex(6)}"
            write_atomically(dfd, name, text.encode(), tmp, mode=mode, owner=None)
        finally:
            os.close(dfd)

    def read_text(self, rel: str) -> str | None:
        """The text of the regular file ``rel``, None if absent; never through a link."""
        if not self.check(rel):
            return None
        parent, _, name = rel.rpartition("/")
        dfd = self.open_dir(parent, create=False)
        assert dfd is not None
        try:
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            fd = os.open(name, flags, dir_fd=dfd)
        except OSError:
            self._refuse(rel, dfd, name)
        finally:
            os.close(dfd)
        with os.fdopen(fd) as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # swapped since check()
                raise CliError(f"{self.root / rel} changed while slctl read it", Exit.FAILED)
            return f.read()

    def remove(self, rel: str) -> bool:
        """Unlink the regular file ``rel`` relative to its parent's fd; False if absent."""
        if not self.check(rel):
            return False
        parent, _, name = rel.rpartition("/")
        dfd = self.open_dir(parent, create=False)
        assert dfd is not None
        try:
            os.unlink(name, dir_fd=dfd)
        finally:
            os.close(dfd)
        return True

    def check_for_groupadd(self) -> None:
        """groupadd/groupdel --prefix replace files under <root>/etc by path, which we do
        not control: refuse links there, and an etc/ that someone else could change while
        they run (owned by another user, or writable by group or others)."""
        for rel in _GROUP_FILES:
            self.check(rel)
        dfd = self.open_dir("etc", create=False)
        if dfd is None:
            return
        try:
            st = os.fstat(dfd)
        finally:
            os.close(dfd)
        if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise CliError(
                f"refusing to run groupadd on {self.root / 'etc'}: it is writable by users "
                "other than the one running slctl, who could swap its files for links "
                "meanwhile; fix its owner and mode (chmod go-w) and run again",
                Exit.FAILED,
            )


def _run(argv: list[str]) -> None:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise CliError(f"`{' '.join(argv)}` failed: {(r.stderr or r.stdout).strip()}", Exit.FAILED)


def _group_exists(tree: Tree) -> bool:
    text = tree.read_text("etc/group")
    return text is not None and any(line.split(":", 1)[0] == GROUP for line in text.splitlines())


def _completion_script() -> str:
    """Bash completion for the whole of slctl: the command tree is the one running (the
    root of click's context), so this module needs no import of main.py, which imports it."""
    from click.shell_completion import get_completion_class

    cli = click.get_current_context().find_root().command
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
    # Absolute but not resolved: a --root that is itself a link is refused by Tree.
    root = Path(os.path.abspath(root))
    if root == Path("/") and os.geteuid() != 0:
        raise CliError(
            f"run as root: slctl {what} changes files in /etc and /usr", Exit.NOT_AUTHORIZED
        )
    return root


def _first_config(
    cold: str | None, backend: str | None, models_dir: str | None, pool_size: str | None, yes: bool
) -> str:
    """The first config.json, from the options or the answers, validated as the daemon would."""
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
    return json.dumps(data, indent=2) + "\n"


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
    with Tree(root) as tree:
        # Every destination is checked before the first write, so a refused tree is left
        # exactly as it was; the writes themselves refuse links again (a later swap).
        for f in FILES:
            tree.check(f.dest)
        config_kept = tree.check(CONFIG)
        has_group_file = tree.check("etc/group")
        group_exists = has_group_file and _group_exists(tree)
        if has_group_file and not group_exists:
            tree.check_for_groupadd()
        config_text = (
            None if config_kept else _first_config(cold, backend, models_dir, pool_size, yes)
        )

        for f in FILES:
            text = _completion_script() if not f.source else (src / f.source).read_text()
            if f.executable_placeholder:
                text = text.replace(DEFAULT_EXEC, str(daemon))
            tree.write(f.dest, text)
            click.echo(f"wrote /{f.dest}")
        if config_text is None:
            click.echo(f"kept /{CONFIG} (already there)")
        else:
            tree.write(CONFIG, config_text)
            click.echo(f"wrote /{CONFIG}")

        if group_exists:
            click.echo(f"group {GROUP} exists")
        elif has_group_file:
            tree.check_for_groupadd()  # again, just before: it is cheap
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
    with Tree(root) as tree:
        for dest in targets:  # all checked first: a refused tree loses nothing
            tree.check(dest)
        for dest in targets:
            if tree.remove(dest):
                click.echo(f"removed /{dest}")
        if purge and _group_exists(tree):
            tree.check_for_groupadd()
            _run(["groupdel", GROUP] + ([] if root == Path("/") else ["--prefix", str(root)]))
            click.echo(f"removed group {GROUP}")
    if systemd_running(root):
        subprocess.run(["systemctl", "daemon-reload"], capture_output=True)
