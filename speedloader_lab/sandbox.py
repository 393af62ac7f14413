"""A private system bus with a real polkitd and speedloaderd on it, leaving the host alone.

The demo, the integration tests and the bus benchmark all need the same three processes:
a ``dbus-daemon`` enforcing a system-bus policy (the stock shape plus the project's own
``dbus/*.conf``), ``polkitd`` reading the project's own ``.policy`` and ``.rules`` (bind
mounted over its compiled-in directories inside a private mount namespace, so the host's
polkit is untouched), and the daemon. Everything lives below one world-traversable
directory that ``Sandbox.close()`` removes.

Must run as root (polkitd's private mount namespace, the daemon's mounts).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

REPO = Path(__file__).resolve().parent.parent
POLKIT_NAME = "org.freedesktop.PolicyKit1"
SPEEDLOADER_NAME = "org.speedloader.Speedloader1"
STOCK_POLKIT_BUS_CONF = Path("/usr/share/dbus-1/system.d/org.freedesktop.PolicyKit1.conf")
POLKITD_CANDIDATES = ("/usr/lib/polkit-1/polkitd", "/usr/libexec/polkitd", "/usr/lib/polkitd")
# polkitd's compiled-in directories, each replaced by a test directory in its namespace.
POLKIT_ACTIONS = "/usr/share/polkit-1/actions"
POLKIT_RULES = ("/etc/polkit-1/rules.d", "/usr/share/polkit-1/rules.d")

_BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <auth>EXTERNAL</auth>
  <listen>unix:path={socket}</listen>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"
          send_member="UpdateActivationEnvironment"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
{includes}
  <limit name="max_replies_per_connection">50000</limit>
{limits}
</busconfig>
"""


class SandboxError(RuntimeError):
    pass


def find_polkitd() -> str | None:
    return next((p for p in POLKITD_CANDIDATES if os.access(p, os.X_OK)), None)


async def wait_for_name(address: str, name: str, timeout: float, proc: subprocess.Popen) -> None:
    """Wait until ``name`` has an owner on the bus: NameOwnerChanged, not polling. Fails
    early, with the process's exit status, if ``proc`` dies first."""
    bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
    try:
        owned = asyncio.get_running_loop().create_future()

        def on_message(msg: Message) -> None:
            if (
                msg.member == "NameOwnerChanged"
                and msg.body[0] == name
                and msg.body[2]
                and not owned.done()
            ):
                owned.set_result(None)

        bus.add_message_handler(on_message)
        await bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="AddMatch",
                signature="s",
                body=[f"type='signal',member='NameOwnerChanged',arg0='{name}'"],
            )
        )
        reply = await bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="NameHasOwner",
                signature="s",
                body=[name],
            )
        )
        if reply.message_type is MessageType.METHOD_RETURN and reply.body[0]:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not owned.done():
            if proc.poll() is not None:
                prog = os.fsdecode(proc.args[0]) if isinstance(proc.args, list) else "a process"
                raise SandboxError(f"{prog} exited with {proc.returncode} before owning {name}")
            if loop.time() > deadline:
                raise SandboxError(f"{name} did not appear on the bus within {timeout:.0f} s")
            # Wake up now and then only to notice a dead process; the signal ends the wait.
            await asyncio.wait({owned}, timeout=0.2)
    finally:
        bus.disconnect()


class Sandbox:
    """One private system bus + polkitd (+ daemons started with ``start_daemon``)."""

    def __init__(
        self,
        *,
        policy: Iterable[Path] = (),
        actions: Iterable[Path] = (),
        rules: Iterable[Path] = (),
        polkit: bool = True,
        base: Path | None = None,
        limits: dict[str, int] | None = None,
    ):
        if os.geteuid() != 0:
            raise SandboxError("the sandbox must run as root (private mount namespace, mounts)")
        self.root = Path(tempfile.mkdtemp(prefix="sl-sandbox-", dir=base or "/tmp"))
        self.root.chmod(0o755)  # clients of other users must reach the socket
        self.socket = self.root / "system_bus_socket"
        self.address = f"unix:path={self.socket}"
        self.policy = [Path(p) for p in policy] or sorted((REPO / "dbus").glob("*.conf"))
        self.actions = [Path(p) for p in actions] or sorted((REPO / "polkit").glob("*.policy"))
        self.rules = [Path(p) for p in rules] or sorted((REPO / "polkit").glob("*.rules"))
        self.want_polkit = polkit
        # dbus-daemon <limit>s, e.g. {"max_message_size": 1 << 20} for a tight bus.
        self.limits = dict(limits or {})
        self.bus_proc: subprocess.Popen | None = None
        self.polkit_proc: subprocess.Popen | None = None
        self.daemons: list[subprocess.Popen] = []
        self.log_dir = self.root / "logs"
        self.log_dir.mkdir()

    # --- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Sandbox:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self._start_bus()
        if self.want_polkit:
            self._start_polkit()

    def close(self) -> None:
        for proc in [*self.daemons, self.polkit_proc, self.bus_proc]:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.address}

    def _start_bus(self) -> None:
        policy_dir = self.root / "system.d"
        policy_dir.mkdir()
        includes = []
        if self.want_polkit and STOCK_POLKIT_BUS_CONF.exists():
            includes.append(STOCK_POLKIT_BUS_CONF)
        for p in self.policy:
            dest = policy_dir / p.name
            shutil.copyfile(p, dest)
            includes.append(dest)
        conf = self.root / "bus.conf"
        conf.write_text(
            _BUS_CONF.format(
                socket=self.socket,
                includes="\n".join(f"  <include>{p}</include>" for p in includes),
                limits="\n".join(
                    f'  <limit name="{k}">{int(v)}</limit>' for k, v in self.limits.items()
                ),
            )
        )
        self.bus_proc = subprocess.Popen(
            [
                "dbus-daemon",
                f"--config-file={conf}",
                "--nofork",
                "--nopidfile",
                "--print-address=1",
            ],
            stdout=subprocess.PIPE,
            stderr=open(self.log_dir / "dbus-daemon.log", "wb"),  # noqa: SIM115
            text=True,
        )
        assert self.bus_proc.stdout is not None
        line = self.bus_proc.stdout.readline()
        if not line.startswith("unix:"):
            self.bus_proc.wait()
            raise SandboxError(
                f"dbus-daemon refused the policy (exit {self.bus_proc.returncode}): "
                + (self.log_dir / "dbus-daemon.log").read_text().strip()
            )

    def _start_polkit(self) -> None:
        polkitd = find_polkitd()
        if polkitd is None:
            raise SandboxError("polkitd is not installed (Debian package polkitd)")
        actions = self.root / "polkit-actions"
        rules = self.root / "polkit-rules"
        empty = self.root / "polkit-empty"
        for d in (actions, rules, empty):
            d.mkdir()
        for src in self.actions:
            shutil.copyfile(src, actions / src.name)
        for src in self.rules:
            shutil.copyfile(src, rules / src.name)
        script = (
            'mount --bind "$1" '
            + POLKIT_ACTIONS
            + ' && mount --bind "$2" '
            + POLKIT_RULES[0]
            + ' && mount --bind "$3" '
            + POLKIT_RULES[1]
            + ' && exec "$4" --no-debug'
        )
        self.polkit_proc = subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                script,
                "sh",
                str(actions),
                str(rules),
                str(empty),
                polkitd,
            ],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=open(self.log_dir / "polkitd.log", "wb"),  # noqa: SIM115
        )
        self.wait_for_name(POLKIT_NAME, self.polkit_proc, timeout=30)

    def wait_for_name(self, name: str, proc: subprocess.Popen, timeout: float = 30) -> None:
        asyncio.run(wait_for_name(self.address, name, timeout, proc))

    # --- speedloaderd ------------------------------------------------------------------------

    def start_daemon(
        self,
        config: Path,
        *,
        python: str = sys.executable,
        extra_args: Sequence[str] = (),
        log_name: str = "speedloaderd.log",
        timeout: float = 60,
    ) -> subprocess.Popen:
        """Start speedloaderd on this bus and wait until it owns its name."""
        proc = subprocess.Popen(
            [python, "-m", "speedloaderd", "--config", str(config), *extra_args],
            env={**self.env, "PYTHONPATH": str(REPO)},
            stdout=subprocess.DEVNULL,
            stderr=open(self.log_dir / log_name, "ab"),  # noqa: SIM115
            cwd=REPO,
        )
        self.daemons.append(proc)
        try:
            self.wait_for_name(SPEEDLOADER_NAME, proc, timeout)
        except SandboxError as err:
            raise SandboxError(f"{err}\n--- daemon log ---\n{self.daemon_log(log_name)}") from None
        return proc

    def daemon_log(self, log_name: str = "speedloaderd.log") -> str:
        path = self.log_dir / log_name
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_daemon(self, proc: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
        if proc.poll() is None:
            proc.send_signal(sig)
        rc = proc.wait(timeout=30)
        if proc in self.daemons:
            self.daemons.remove(proc)
        return rc
