"""One call per remote-pool operation, from the configuration: what the engine calls.

Each call reads this machine's identity (hostname, NVMe host NQN), validates the pool's
``remoteTiers.hosts.<name>`` entry into a spec, opens SSH to the remote host (host key
checked) and runs the plan on both hosts. Blocking: run it in a worker thread; pass
``on_step`` to follow the named steps (a Job's progress).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..config import RemoteHostConfig
from ..errors import Failed
from .nvmeof import RemotePoolSpec, connect_plan, disconnect_plan, grow_plan, spec_from_config
from .plan import Plan, Runner, StepHook, execute, execute_teardown
from .runners import KNOWN_HOSTS, LocalRunner, SshRunner
from .values import check_nqn, check_pool_name, parse_ssh_target

HOSTNQN_FILE = "/etc/nvme/hostnqn"


def local_identity(runner: Runner) -> tuple[str, str]:
    """(client name, host NQN) of the machine ``runner`` runs on."""
    hostname = (runner.read_text("/proc/sys/kernel/hostname") or "").strip().split(".")[0]
    nqn = runner.read_text(HOSTNQN_FILE)
    if nqn is None:
        raise Failed(
            f"{runner.name}: {HOSTNQN_FILE} does not exist; create this host's NQN with "
            f"`nvme gen-hostnqn > {HOSTNQN_FILE}` (package nvme-cli)"
        )
    return check_pool_name(hostname), check_nqn(nqn.strip())


class RemotePoolLink:
    """The runners and spec of one remote pool; use as a context manager (closes SSH)."""

    def __init__(
        self,
        name: str,
        cfg: RemoteHostConfig,
        ssh_key_path: Path | None,
        *,
        local: Runner | None = None,
        known_hosts: Sequence[Path] = KNOWN_HOSTS,
    ):
        self.local = local or LocalRunner()
        client, host_nqn = local_identity(self.local)
        self.spec: RemotePoolSpec = spec_from_config(name, cfg, client=client, host_nqn=host_nqn)
        self.remote = SshRunner(parse_ssh_target(cfg.ssh), ssh_key_path, known_hosts)

    def close(self) -> None:
        self.remote.close()

    def __enter__(self) -> RemotePoolLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def runners(self) -> dict[str, Runner]:
        return {"remote": self.remote, "local": self.local}

    def run(self, plan: Plan, on_step: StepHook | None = None) -> dict[str, str]:
        return execute(plan, self.runners, on_step)

    def connect(self, on_step: StepHook | None = None) -> dict[str, str]:
        """Export RAM there, mount it here; on failure everything done so far is undone."""
        return self.run(connect_plan(self.spec), on_step)

    def disconnect(self) -> None:
        """Unmount, disconnect, tear down the export; harmless if (partly) done already.

        The caller demotes the pool's models first: this unmounts whatever is there.
        """
        execute_teardown(disconnect_plan(self.spec), self.runners)

    def grow(self, new_size: int, on_step: StepHook | None = None) -> None:
        self.run(grow_plan(self.spec, new_size), on_step)
