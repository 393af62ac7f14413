"""Before a demote deletes a pool copy: have whoever maps it let go, or say who does not.

tmpfs frees a deleted file's pages only when the last mapping and open fd of it go
(holders.py): a demote that only unlinks frees nothing while llama.cpp or an Ollama runner
maps the copy, yet would report the RAM as freed. So a demote first looks at who holds the
copies it is about to delete (one /proc scan for those files, ~24 ms). Nobody: delete.
Somebody, and the backend lists the model as loaded: ask it to unload (a named job step,
``unloading NAME from ollama``), which returns once the server no longer lists it. Then look
again, and whatever still holds a copy — a server that said it unloaded and did not, a
process with no API, a server that cannot unload (llama.cpp in single-model mode), a server
that is down or too slow to answer — meets ``backend.demotePolicy``:

- ``wait`` (default): look every POLL s until ``demoteTimeout`` s have passed since the
  demote began (the unload's own confirmation counts against it), the job's step naming the
  holder; still held then: Busy naming it, and nothing is deleted.
- ``refuse``: Busy naming pid and command, nothing deleted. After an unload the server
  confirmed, its process gets GRACE s to drop the pages first (a runner exits after
  answering).
- ``force``: delete now. tmpfs keeps the pages while they are held: the pool's HeldBytes and
  UsedBytes go on counting them, and the job's message names who holds how much.

A model the server loaded from the cold files (before its promote) maps no pool copy: it is
not unloaded, since that frees no pool RAM and costs its next request a reload (2.7 GiB
read again from cold storage). What the server answers is never taken for the truth about
RAM: only /proc says a copy is let go. Nothing here opens a file under a root.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from . import holders
from .backends import Backend, Outcome, Timing, backend_for
from .backends.http import HttpProblem
from .config import BackendConfig, DemotePolicy
from .errors import Busy, Cancelled
from .holders import FileKey, Process
from .jobs import Job, first_of
from .sizes import format_size

log = logging.getLogger(__name__)

POLL = 0.5  # s between two looks at the holders while waiting: a scan is ~24 ms
GRACE = 5.0  # s a confirmed unload's process gets to drop the pages (refuse, force)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Copy:
    """A pool copy the demote is about to delete."""

    key: FileKey
    pool: str
    rel: str
    size: int


def held(copies: Iterable[Copy]) -> dict[Copy, frozenset[Process]]:
    """Who maps or has open each copy now (only those held), from one scan of /proc.
    Blocking: run it in a thread."""
    by_key = {c.key: c for c in copies}
    if not by_key:
        return {}
    found = holders.scan(by_key, {dev for dev, _ in by_key}, ())
    return {by_key[k]: who for k, who in found.holders.items() if k in by_key}


def describe(who: Mapping[Copy, frozenset[Process]]) -> str:
    """'llama-server (pid 812)' or 'llama-server (pid 812) and 2 other processes'."""
    procs = sorted({p for ps in who.values() for p in ps})
    if not procs:
        return "nobody"
    first = f"{procs[0].command} (pid {procs[0].pid})"
    if len(procs) == 1:
        return first
    rest = len(procs) - 1
    return f"{first} and {rest} other process{'es' if rest > 1 else ''}"


def held_bytes(who: Mapping[Copy, frozenset[Process]]) -> int:
    return sum(c.size for c in who)


async def or_cancel(job: Job, work: Awaitable[T], doing: str) -> T:
    """``work``, unless the job is cancelled first (then Cancelled, nothing deleted)."""
    done = await first_of(job, work)
    if done is None:
        raise Cancelled(f"demote of {job.model} cancelled while {doing}; nothing was deleted")
    return done.result()


def server_names(
    loaded: Iterable[tuple[str, tuple[str, ...]]],
    model: str,
    models_of_path: Callable[[str], list[str]],
) -> list[str]:
    """The server's names for ``model``: its own name, or a file it says it loaded."""
    return [
        name
        for name, paths in loaded
        if name == model or any(model in models_of_path(p) for p in paths)
    ]


async def _unload(
    job: Job, backend: Backend, model: str, models_of_path: Callable[[str], list[str]]
) -> tuple[bool, str]:
    """Ask the server to unload ``model`` if it lists it: (whether it confirmed the unload,
    what it said: "" when it did not list the model)."""
    try:
        listing = await or_cancel(job, backend.loaded(), f"asking {backend.kind}")
    except HttpProblem as problem:
        return False, f"{backend.kind} at {backend.url}: {problem.reason}"
    names = server_names(((m.name, m.paths) for m in listing), model, models_of_path)
    said, confirmed = [], bool(names)
    for name in names:
        job.step = f"unloading {name} from {backend.kind}"
        job.notify()
        log.info(
            "demote of %s: asking %s at %s to unload %s", model, backend.kind, backend.url, name
        )
        outcome: Outcome = await or_cancel(job, backend.unload(name), job.step)
        confirmed = confirmed and outcome.ok
        said.append(outcome.reason)
    return confirmed, "; ".join(said)


@dataclass(frozen=True, slots=True)
class LetGo:
    unloaded: str = ""
    """The server that unloaded the model first ("ollama"), for the job's message; "" when
    none was asked or it did not confirm."""


async def let_go(
    job: Job,
    model: str,
    copies: list[Copy],
    config: BackendConfig,
    models_of_path: Callable[[str], list[str]],
) -> LetGo:
    """Free ``copies`` of their holders as ``config`` says. Returns when none is held, or
    ``force`` lets the demote delete them anyway (who holds them is looked at again after
    the delete). Raises Busy (wait timed out, refuse) or Cancelled, having deleted nothing."""
    started = time.monotonic()
    who = await asyncio.to_thread(held, copies)
    if not who:
        return LetGo()
    policy, timeout = config.demote_policy, float(config.demote_timeout)
    # The unload's confirmation (polling the server's listing) is bounded by the demote's
    # own timeout: a stuck server costs the demote demoteTimeout, not 30 s more.
    timing = Timing(confirm_for=max(min(Timing().confirm_for, timeout), 1.0))
    backend = backend_for(config, timing)
    confirmed, said = await _unload(job, backend, model, models_of_path)
    who = await asyncio.to_thread(held, copies)
    if policy is not DemotePolicy.WAIT and who and confirmed:
        who = await _wait(job, model, copies, time.monotonic() + GRACE)
    if policy is DemotePolicy.WAIT and who:
        who = await _wait(job, model, copies, started + timeout)
    job.step = ""
    unloaded = LetGo(backend.kind if confirmed else "")
    if not who:
        return unloaded
    why = f" ({said})" if said else ""
    if policy is DemotePolicy.FORCE:
        log.warning(
            "demote of %s: deleting its pool copies while %s holds %s of them "
            "(backend.demotePolicy force)%s",
            model,
            describe(who),
            format_size(held_bytes(who)),
            why,
        )
        return unloaded
    if policy is DemotePolicy.WAIT:
        when = f"after {timeout:g} s"
        fix = "stop it, or raise backend.demoteTimeout, or set backend.demotePolicy to force"
    else:
        when = "now"
        fix = "stop it, or set backend.demotePolicy to wait or force"
    raise Busy(
        f"{describe(who)} still maps {model}'s RAM copy ({format_size(held_bytes(who))}) "
        f"{when}{why}; nothing was deleted: {fix}"
    )


async def _wait(
    job: Job, model: str, copies: list[Copy], deadline: float
) -> dict[Copy, frozenset[Process]]:
    """Look at the holders every POLL s until none is left or ``deadline``; the job's step
    names who holds the copy, and for how long it has been waited for."""
    began = time.monotonic()
    while True:
        who = await asyncio.to_thread(held, copies)
        now = time.monotonic()
        if not who or now >= deadline:
            return who
        job.step = (
            f"waiting for {describe(who)} to let go of {model} "
            f"({now - began:.0f} s; gives up in {deadline - now:.0f} s)"
        )
        job.notify()
        await or_cancel(
            job, asyncio.sleep(min(POLL, deadline - now)), f"waiting for {describe(who)}"
        )
