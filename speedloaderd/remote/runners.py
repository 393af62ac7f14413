"""Runners: where a plan's argv lists run. Locally (subprocess) or on a remote host (SSH).

The SSH runner verifies host keys against known_hosts and refuses unknown or changed keys
(paramiko's RejectPolicy, with a message that names the host and the key's fingerprint).

To trust a remote host, check its key fingerprint on that host's console
(``ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub``), then add its key to
``/etc/speedloader/known_hosts`` (or root's ``~/.ssh/known_hosts``), e.g.::

    ssh-keyscan -p 22 -t ed25519 gpu-ram-2 >> /etc/speedloader/known_hosts
    ssh-keygen -lf /etc/speedloader/known_hosts     # compare with the console's fingerprint

An entry for a non-default port is written ``[host]:port``, as OpenSSH does.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path

import paramiko

from ..errors import Failed
from .command import Completed
from .values import SshTarget

KNOWN_HOSTS = (
    Path("/etc/speedloader/known_hosts"),
    Path("/etc/ssh/ssh_known_hosts"),
    Path("~/.ssh/known_hosts"),
)
COMMAND_TIMEOUT = 600.0  # mkfs of a large pool over a slow fabric takes minutes


class HostKeyError(Failed):
    """The remote host's key is unknown or differs from known_hosts: we refuse to talk."""


class RemoteUnreachable(Failed):
    """SSH to the remote host failed (network, auth): one sentence saying which and why."""


def fingerprint(key: paramiko.PKey) -> str:
    """``SHA256:<base64>``, the form ``ssh-keygen -l`` prints."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def known_hosts_name(target: SshTarget) -> str:
    host = target.host
    return host if target.port == 22 else f"[{host}]:{target.port}"


class _Refuse(paramiko.MissingHostKeyPolicy):
    """RejectPolicy, with a message an admin can act on."""

    def __init__(self, files: Sequence[Path]):
        self.files = files

    def missing_host_key(self, client, hostname, key):  # noqa: ANN001 - paramiko's signature
        raise HostKeyError(
            f"the SSH host key of {hostname} is unknown ({key.get_name()} {fingerprint(key)}); "
            f"if that fingerprint is the one the host shows on its console, add the key to "
            f"{self.files[0]} (e.g. with ssh-keyscan) and try again"
        )


class LocalRunner:
    """Runs commands on this machine."""

    name = "local"
    uevents = True  # waits for devices here can use this kernel's uevents (pyudev)

    def __init__(self, timeout: float = COMMAND_TIMEOUT):
        self.timeout = timeout

    def run(self, argv: Sequence[str], stdin: str | None = None) -> Completed:
        try:
            r = subprocess.run(
                list(argv),
                input=stdin,
                capture_output=True,
                text=True,
                timeout=self.timeout,
                check=False,
            )
        except FileNotFoundError:
            return Completed(127, "", f"{argv[0]}: command not found")
        return Completed(r.returncode, r.stdout, r.stderr)

    def read_text(self, path: str) -> str | None:
        try:
            return Path(path).read_text()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def listdir(self, path: str) -> list[str]:
        try:
            return os.listdir(path)
        except (FileNotFoundError, NotADirectoryError):
            return []


class SshRunner:
    """Runs commands on a remote host over SSH (paramiko): ``shlex.join(argv)``, never text."""

    def __init__(
        self,
        target: SshTarget,
        key_path: Path | None,
        known_hosts: Sequence[Path] = KNOWN_HOSTS,
        timeout: float = COMMAND_TIMEOUT,
        connect_timeout: float = 15.0,
    ):
        self.target = target
        self.name = str(target)
        self.timeout = timeout
        files = [Path(os.path.expanduser(p)) for p in known_hosts]
        self._client = paramiko.SSHClient()
        for f in files:
            if f.is_file():
                self._client.load_host_keys(str(f))  # keys are checked, never saved
        self._client.set_missing_host_key_policy(_Refuse(files))
        try:
            self._client.connect(
                target.host,
                port=target.port,
                username=target.user,
                key_filename=str(key_path) if key_path else None,
                look_for_keys=key_path is None,
                allow_agent=False,
                timeout=connect_timeout,
                banner_timeout=connect_timeout,
                auth_timeout=connect_timeout,
            )
        except HostKeyError:
            self._client.close()
            raise
        except paramiko.BadHostKeyException as err:
            self._client.close()
            raise HostKeyError(
                f"the SSH host key of {known_hosts_name(target)} CHANGED: it is now "
                f"{err.key.get_name()} {fingerprint(err.key)}, known_hosts says "
                f"{err.expected_key.get_name()} {fingerprint(err.expected_key)}; refusing to "
                "connect. If the host was reinstalled, verify the new fingerprint on its "
                "console and replace its known_hosts line"
            ) from None
        except paramiko.AuthenticationException as err:
            self._client.close()
            raise RemoteUnreachable(
                f"{self.name}: SSH authentication failed ({err}); check sshKeyPath and the "
                "remote authorized_keys"
            ) from None
        except (OSError, paramiko.SSHException) as err:
            self._client.close()
            raise RemoteUnreachable(f"{self.name}: cannot connect over SSH: {err}") from None
        self._sftp: paramiko.SFTPClient | None = None

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
        self._client.close()

    def __enter__(self) -> SshRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, argv: Sequence[str], stdin: str | None = None) -> Completed:
        command = shlex.join(argv)
        try:
            chan_in, chan_out, chan_err = self._client.exec_command(command, timeout=self.timeout)
            if stdin is not None:
                chan_in.write(stdin)
            chan_in.channel.shutdown_write()
            out = chan_out.read().decode(errors="replace")
            err = chan_err.read().decode(errors="replace")
            rc = chan_out.channel.recv_exit_status()
        except (OSError, paramiko.SSHException) as e:
            raise RemoteUnreachable(f"{self.name}: lost the SSH connection: {e}") from None
        return Completed(rc, out, err)

    def _sftp_client(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            self._sftp = self._client.open_sftp()
        return self._sftp

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a file on the remote host over SFTP (no shell involved)."""
        with self._sftp_client().open(path, "wb") as f:
            f.set_pipelined(True)
            f.write(data)

    def read_text(self, path: str) -> str | None:
        try:
            with self._sftp_client().open(path, "r") as f:
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return None

    def listdir(self, path: str) -> list[str]:
        try:
            return self._sftp_client().listdir(path)
        except FileNotFoundError:
            return []
