"""Wait for jobs the way a person watches them: a live line per job, driven by the Job's
signals (never polling), and Ctrl-C offering to cancel or to detach."""

from __future__ import annotations

import asyncio
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

import click

from .client import Client, ClientError, JobResult
from .errors import CliError, Exit, explain
from .output import bar, eta, format_size, rate
from .state import job_id


@dataclass
class Followed:
    path: str
    label: str
    result: JobResult | None = None


class Line:
    """One status line on stderr, redrawn in place on a terminal; silent otherwise."""

    def __init__(self) -> None:
        self.live = sys.stderr.isatty()
        self.width = 0

    def show(self, text: str) -> None:
        if not self.live:
            return
        cols = shutil.get_terminal_size().columns
        text = text[: max(cols - 1, 20)]
        sys.stderr.write("\r" + text.ljust(self.width))
        sys.stderr.flush()
        self.width = len(text)

    def clear(self) -> None:
        if self.live and self.width:
            sys.stderr.write("\r" + " " * self.width + "\r")
            sys.stderr.flush()
            self.width = 0


def describe(label: str, p: dict[str, Any]) -> str:
    total, done = p.get("BytesTotal", 0), p.get("BytesDone", 0)
    frac = p.get("Progress", done / total if total else 0.0)
    if not total:  # a pool job: named steps (ssh, nvmet, nvme connect, mkfs...), no bytes
        step = p.get("Step") or "starting"
        return f"{label}  {bar(frac)} {frac * 100:5.1f}%  {step}"
    end = p.get("ExpectedEndTime", 0)
    left = end / 1e6 - time.time() if end else None
    return (
        f"{label}  {bar(frac)} {frac * 100:5.1f}%  "
        f"{format_size(done)}/{format_size(total)}  {rate(p.get('Rate', 0.0))}  ETA {eta(left)}"
    )


async def _ask(question: str) -> str:
    if not sys.stdin.isatty():
        return "d"
    try:
        answer = await asyncio.to_thread(click.prompt, question, default="d", show_default=True)
    except (click.Abort, EOFError):
        return "d"
    return answer.strip().lower()[:1]


async def follow_all(client: Client, jobs: list[Followed]) -> list[Followed]:
    """Follow every job to its end; Ctrl-C asks whether to cancel them or detach."""
    line = Line()
    latest: dict[str, str] = {}
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    loop.add_signal_handler(signal.SIGINT, interrupted.set)

    def updater(job: Followed):
        def on_update(props: dict[str, Any]) -> None:
            latest[job.path] = describe(job.label, props)
            line.show("   ".join(latest.values()) if len(latest) > 1 else latest[job.path])

        return on_update

    async def one(job: Followed) -> None:
        job.result = await client.follow_job(job.path, on_update=updater(job))
        latest.pop(job.path, None)
        line.clear()
        ok = job.result.success
        click.echo(job.result.message if ok else f"error: {job.result.message}", err=not ok)

    try:
        tasks = [asyncio.ensure_future(one(j)) for j in jobs]
        waiter = asyncio.ensure_future(interrupted.wait())
        pending = set(tasks)
        while pending:
            done, _ = await asyncio.wait(pending | {waiter}, return_when=asyncio.FIRST_COMPLETED)
            pending -= done
            for t in done & set(tasks):
                err = t.exception()
                if err is not None:
                    raise explain(err) if isinstance(err, ClientError) else err
            if waiter in done and pending:
                await _interrupt(
                    client, [j for j, t in zip(jobs, tasks, strict=True) if t in pending], line
                )
                interrupted.clear()
                waiter = asyncio.ensure_future(interrupted.wait())
        waiter.cancel()
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        line.clear()
    return jobs


async def _interrupt(client: Client, running: list[Followed], line: Line) -> None:
    line.clear()
    ids = ", ".join(str(job_id(j.path)) for j in running)
    answer = await _ask(f"\ninterrupted: [c]ancel job {ids} or [d]etach and let it run?")
    if answer == "c":
        for j in running:
            try:
                await client.cancel(j.path)
            except ClientError as err:
                click.echo(f"error: job {job_id(j.path)}: {explain(err)}", err=True)
        return  # the jobs end as cancelled; their Completed signals end the wait
    raise CliError(
        f"detached from job {ids}; it keeps running: `slctl jobs watch` follows it, "
        f"`slctl jobs cancel {job_id(running[0].path)}` stops it",
        Exit.INTERRUPTED,
        prefix="",
    )
