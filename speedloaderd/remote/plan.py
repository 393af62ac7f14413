"""Plans: named steps, each with its undo, run on named hosts; rollback on failure.

A plan is data. Printing it shows exactly the argv lists that would run; tests compare those
lists, and the executor runs them through a Runner (local subprocess or SSH). Commands are
argv tuples of validated strings; a ``Ref`` stands for a value an earlier step printed
(the loop device ``losetup --show`` chose, the block device that appeared after
``nvme connect``). Undos never use a Ref, so a disconnect long after the connect (another
daemon process, another boot) can still run them: ``teardown()`` is the undos, reversed.

Blocking code: the daemon runs plans in a worker thread.
"""

from __future__ import annotations

import logging
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from ..errors import Failed
from .command import Runner
from .sysfs import controllers_of, find_namespace_device
from .uevents import wait_for

log = logging.getLogger(__name__)

Host = Literal["remote", "local"]


@dataclass(frozen=True)
class Ref:
    """A value captured from an earlier step's output, filled in at run time."""

    name: str


@dataclass(frozen=True)
class Secret:
    """A value that must never be seen: shown as ``<name>``, passed to a command on stdin
    only (argv is world-readable in /proc/<pid>/cmdline), never in a message or a log."""

    name: str
    value: str = field(repr=False)

    def __str__(self) -> str:
        return f"<{self.name}>"


Arg = str | Ref | Secret


class StepFailed(Failed):
    """One action failed; the message names the host, the step and the command."""


def _resolve(args: Sequence[Arg], ctx: Mapping[str, str]) -> tuple[str, ...]:
    out = []
    for a in args:
        if isinstance(a, Secret):
            out.append(a.value)
        elif isinstance(a, Ref):
            if a.name not in ctx:
                raise StepFailed(f"internal: no value captured for {{{a.name}}}")
            out.append(ctx[a.name])
        else:
            out.append(a)
    return tuple(out)


def _show_one(a: Arg) -> str:
    if isinstance(a, Ref):
        return "{" + a.name + "}"
    if isinstance(a, Secret):
        return str(a)
    return shlex.quote(a)


def _show(args: Sequence[Arg]) -> str:
    return " ".join(_show_one(a) for a in args)


@dataclass(frozen=True)
class Command:
    """Run argv; optional stdin (how configfs attributes are written: ``tee <attr>``)."""

    argv: tuple[Arg, ...]
    stdin: Arg | None = None

    def __post_init__(self) -> None:
        if any(isinstance(a, Secret) for a in self.argv):
            raise ValueError(f"a secret on the command line of {self.argv[0]!r}; use stdin")

    def show(self) -> str:
        s = _show(self.argv)
        if self.stdin is not None:
            s += " <<< " + _show([self.stdin])
        return s

    def execute(self, runner: Runner, ctx: Mapping[str, str], step: str) -> str:
        argv = _resolve(self.argv, ctx)
        stdin = None if self.stdin is None else _resolve([self.stdin], ctx)[0]
        r = runner.run(argv, stdin)
        if r.returncode != 0:
            why = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
            raise StepFailed(f"{runner.name}: {step}: `{shlex.join(argv)}` failed: {why}")
        return r.stdout.strip()


def cmd(*argv: Arg) -> Command:
    """``cmd("mkdir", "-p", path)``: a Command from its argv."""
    return Command(tuple(argv))


def write(path: str, value: Arg) -> Command:
    """Write a configfs attribute without a shell: ``tee path`` with the value on stdin."""
    return Command(("tee", path), stdin=value)


@dataclass(frozen=True)
class DetachLoop:
    """Detach every loop device backed by ``backing`` (none is fine): ask losetup, then -d."""

    backing: str

    def show(self) -> str:
        q = _show(self.query())
        return f"{q} | losetup --detach <each>"

    def query(self) -> tuple[str, ...]:
        return (
            "losetup",
            "--list",
            "--noheadings",
            "--output",
            "NAME",
            "--associated",
            self.backing,
        )

    def execute(self, runner: Runner, ctx: Mapping[str, str], step: str) -> str:
        devices = Command(self.query()).execute(runner, ctx, step).split()
        for dev in devices:
            if not dev.startswith("/dev/loop"):
                raise StepFailed(f"{runner.name}: {step}: losetup printed {dev!r}")
            Command(("losetup", "--detach", dev)).execute(runner, ctx, step)
        return " ".join(devices)


@dataclass(frozen=True)
class WaitForNamespace:
    """Wait until the namespace of subsystem ``nqn`` has a block device; print /dev/<name>.

    Reads /sys/class/nvme/*/subsysnqn (there may be no udevd, so no /dev/disk/by-*).
    """

    nqn: str
    timeout: float = 60.0
    min_bytes: int = 1  # after a grow: wait until the new capacity shows
    interval: float = 0.2

    def show(self) -> str:
        if self.min_bytes > 1:
            return f"wait until the block device of {self.nqn} has {self.min_bytes} bytes"
        return f"wait for the block device of {self.nqn} (/sys/class/nvme/*/subsysnqn)"

    def execute(self, runner: Runner, ctx: Mapping[str, str], step: str) -> str:
        def check() -> str | None:
            return find_namespace_device(runner, self.nqn, self.min_bytes)

        if getattr(runner, "uevents", False):  # this machine: woken by kernel uevents
            dev = wait_for(check, self.timeout)
        else:  # another machine (over SSH): poll its sysfs
            dev = check()
            deadline = time.monotonic() + self.timeout
            while dev is None and time.monotonic() < deadline:
                time.sleep(self.interval)
                dev = check()
        if dev is None:
            what = "appeared" if self.min_bytes <= 1 else f"reached {self.min_bytes} bytes"
            raise StepFailed(
                f"{runner.name}: {step}: no block device for {self.nqn} {what} "
                f"within {self.timeout:.0f} s"
            )
        return dev


@dataclass(frozen=True)
class Disconnect:
    """``nvme disconnect --nqn`` if a controller of ``nqn`` exists (nvme-cli fails otherwise)."""

    nqn: str

    def argv(self) -> tuple[str, ...]:
        return ("nvme", "disconnect", "--nqn", self.nqn)

    def show(self) -> str:
        return f"{_show(self.argv())}  (if /sys/class/nvme/*/subsysnqn lists it)"

    def execute(self, runner: Runner, ctx: Mapping[str, str], step: str) -> str:
        if not controllers_of(runner, self.nqn):
            return ""
        return Command(self.argv()).execute(runner, ctx, step)


@dataclass(frozen=True)
class ControllerAttr:
    """Write a sysfs attribute of every controller of ``nqn`` (there is at least one)."""

    nqn: str
    attr: str
    value: str

    def show(self) -> str:
        return f"tee /sys/class/nvme/<each controller of {self.nqn}>/{self.attr} <<< {self.value}"

    def execute(self, runner: Runner, ctx: Mapping[str, str], step: str) -> str:
        ctrls = controllers_of(runner, self.nqn)
        if not ctrls:
            raise StepFailed(f"{runner.name}: {step}: no controller of {self.nqn}")
        for c in ctrls:
            write(f"/sys/class/nvme/{c}/{self.attr}", self.value).execute(runner, ctx, step)
        return " ".join(ctrls)


@dataclass(frozen=True)
class RemoveIfUnused:
    """``rmdir`` a configfs item other pools may still use: EBUSY/ENOTEMPTY is success.

    configfs refuses to remove a host entry that a subsystem links to (EBUSY) and a port
    with subsystems linked into it (ENOTEMPTY), so "in use" needs no bookkeeping here.
    """

    path: str

    def show(self) -> str:
        return f"rmdir {shlex.quote(self.path)}  (kept while another pool uses it)"

    def execute(self, runner: Runner, ctx: Mapping[str, str], step: str) -> str:
        r = runner.run(("rmdir", self.path))
        err = r.stderr.lower()
        if r.returncode == 0 or "busy" in err or "not empty" in err:
            return ""
        why = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        raise StepFailed(f"{runner.name}: {step}: `rmdir {shlex.quote(self.path)}` failed: {why}")


@dataclass(frozen=True)
class CheckSerial:
    """Every controller of ``nqn`` reports ``serial``: the one our export was given over SSH.

    Without it, whatever answers at the fabric address would be formatted and mounted.
    """

    nqn: str
    serial: str

    def show(self) -> str:
        return f"check /sys/class/nvme/<each controller of {self.nqn}>/serial is {self.serial}"

    def execute(self, runner: Runner, ctx: Mapping[str, str], step: str) -> str:
        for c in controllers_of(runner, self.nqn):
            got = (runner.read_text(f"/sys/class/nvme/{c}/serial") or "").strip()
            if got != self.serial:
                raise StepFailed(
                    f"{runner.name}: {step}: the controller that answered for {self.nqn} "
                    f"reports serial {got!r}, not the {self.serial!r} our export was given: "
                    "something other than that host answers at its fabric address; refusing "
                    "to format or mount it"
                )
        return self.serial


Action = (
    Command | DetachLoop | WaitForNamespace | Disconnect | RemoveIfUnused | ControllerAttr
    | CheckSerial
)  # fmt: skip


@dataclass(frozen=True)
class Step:
    name: str
    host: Host
    do: Action
    undo: Action | None = None
    # Run ``undo`` only if this exits 0 (e.g. ``test -d``): teardown is idempotent, so a
    # disconnect after a half-finished connect or a second disconnect does no harm.
    undo_if: Command | None = None
    capture: str | None = None  # keep do's stdout under this name for later Refs
    # Run ``do`` only if this exits 0; a step skipped this way is not undone.
    only_if: Command | None = None


@dataclass(frozen=True)
class Plan:
    title: str
    steps: tuple[Step, ...]

    def show(self) -> list[str]:
        """One line per step: ``host: name: command``."""
        return [f"{s.host}: {s.name}: {s.do.show()}" for s in self.steps]

    def teardown(self, title: str | None = None) -> Plan:
        """The undos of every step, last step first, each guarded by its ``undo_if``."""
        steps = []
        for s in reversed(self.steps):
            if s.undo is None:
                continue
            if isinstance(s.undo, Command) and any(isinstance(a, Ref) for a in s.undo.argv):
                raise ValueError(f"undo of {s.name!r} uses a captured value")
            steps.append(Step(name=f"undo {s.name}", host=s.host, do=s.undo, only_if=s.undo_if))
        return Plan(title or f"tear down: {self.title}", tuple(steps))


@dataclass
class PlanFailed(Failed):
    """A step failed; the completed steps were undone (``rollback_errors`` lists what was not)."""

    plan: Plan
    step: Step
    error: Exception
    rollback_errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        msg = f"{self.plan.title}: {self.error}"
        if self.rollback_errors:
            msg += "; undoing the earlier steps also failed: " + "; ".join(self.rollback_errors)
        else:
            msg += "; the earlier steps were undone"
        Failed.__init__(self, msg)

    def __str__(self) -> str:
        return str(self.args[0])


class TeardownIncomplete(Failed):
    """Some teardown steps failed; the others ran. The message lists each failure."""


StepHook = Callable[[int, int, Step], None]


def _run_step(step: Step, runners: Mapping[str, Runner], ctx: dict[str, str]) -> bool:
    """Run one step; False if its ``only_if`` guard said to skip it."""
    runner = runners[step.host]
    if step.only_if is not None:
        r = runner.run(_resolve(step.only_if.argv, ctx))
        if r.returncode != 0:
            log.debug("%s: skipping %s", runner.name, step.name)
            return False
    out = step.do.execute(runner, ctx, step.name)
    if step.capture:
        ctx[step.capture] = out
    return True


def execute(
    plan: Plan, runners: Mapping[str, Runner], on_step: StepHook | None = None
) -> dict[str, str]:
    """Run every step in order; on a failure undo the completed ones in reverse and raise.

    Returns the captured values (e.g. {"loopdev": "/dev/loop0", "blockdev": "/dev/nvme0n1"}).
    ``on_step(i, n, step)`` is called before each step (for a Job's progress).
    """
    ctx: dict[str, str] = {}
    done: list[Step] = []
    n = len(plan.steps)
    for i, step in enumerate(plan.steps):
        if on_step:
            on_step(i, n, step)
        try:
            ran = _run_step(step, runners, ctx)
        except Exception as err:  # noqa: BLE001 - any failure means: roll back, then report
            rollback = Plan(plan.title, tuple(done)).teardown()
            errors = _run_all(rollback, runners, ctx)
            raise PlanFailed(plan, step, err, errors) from err
        if ran:
            done.append(step)
    return ctx


def _run_all(plan: Plan, runners: Mapping[str, Runner], ctx: dict[str, str]) -> list[str]:
    errors = []
    for step in plan.steps:
        try:
            _run_step(step, runners, ctx)
        except Exception as err:  # noqa: BLE001 - keep going: undo as much as possible
            errors.append(str(err))
    return errors


def execute_teardown(plan: Plan, runners: Mapping[str, Runner]) -> None:
    """Run every step even if some fail (each is guarded, so repeating is harmless)."""
    errors = _run_all(plan, runners, {})
    if errors:
        raise TeardownIncomplete(f"{plan.title}: " + "; ".join(errors))
