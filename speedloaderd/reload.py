"""After a promote: a server that loaded the model from cold storage keeps reading it there.

A promote repoints the models dir links, but a process that mapped the cold file before
keeps that mapping: llama.cpp and Ollama's runners page in from cold storage (NFS, disk)
until they load the model again. With ``backend.reloadAfterPromote`` (or ``slctl promote
--reload``) the promote ends by asking the server to unload the model and load it again,
so it maps the pool copy — only when:

- a process maps (or holds open) one of the model's cold files (one /proc scan for those
  files): nobody does, nothing to reload;
- the backend lists the model as loaded, and can unload and load it;
- it is idle: the server says no request is using the model (llama.cpp ``/slots``, vLLM
  ``/metrics``), or defers an unload until its requests end by itself (Ollama). A server
  that is busy, or cannot say, is left alone, and the job's message says so.

Whatever happens is one clause of the promote's message; the promote itself has succeeded
by then and never fails because of it. After the load, /proc says whether the pool copy is
what is mapped now: the server's word is not taken for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from .backends import Backend, Timing, backend_for
from .backends.http import HttpProblem
from .config import BackendConfig
from .freeing import Copy, describe, held, or_cancel, server_names
from .jobs import Job

log = logging.getLogger(__name__)

# An unload deferred by the server until a long answer ends is not waited for longer than
# this: the promote's job would stay running for it. The next load reads the pool anyway.
CONFIRM_FOR = 15.0


async def reload_from_pool(
    job: Job,
    model: str,
    cold: list[Copy],
    pool: list[Copy],
    config: BackendConfig,
    models_of_path: Callable[[str], list[str]],
    asked: bool,
) -> str:
    """Have the server load ``model`` again from ``pool`` if it maps ``cold``; returns the
    clause for the job's message ("" when there was nothing to do and nobody asked)."""
    readers = await asyncio.to_thread(held, cold)
    if not readers:
        return f"nothing had {model} loaded from cold storage: not reloaded" if asked else ""
    backend = backend_for(config, Timing(confirm_for=CONFIRM_FOR))
    left = f"{describe(readers)} keeps reading it from cold storage until it loads it again"
    try:
        listing = await or_cancel(job, backend.loaded(), f"asking {backend.kind}")
    except HttpProblem as problem:
        return f"not reloaded ({backend.kind} at {backend.url}: {problem.reason}); {left}"
    names = server_names(((m.name, m.paths) for m in listing), model, models_of_path)
    if not names:
        return f"not reloaded: {backend.kind} does not list {model} as loaded; {left}"
    caps = await backend.capabilities()
    if not (caps.can_unload and caps.can_preload):
        return f"not reloaded: {backend.kind} at {backend.url} {caps.why_not}; {left}"
    for name in names:
        why_not = await _idle(backend, name)
        if why_not:
            return f"not reloaded: {why_not}; {left} (`slctl promote --reload {model}` later)"
    for name in names:
        job.step = f"reloading {name} in {backend.kind}"
        job.notify()
        log.info("promote of %s: asking %s to reload %s from the pool", model, backend.kind, name)
        out = await or_cancel(job, backend.unload(name), job.step)
        if not out.ok:
            job.step = ""
            return f"not reloaded: {out.reason}; its next load reads the pool"
        out = await or_cancel(job, backend.preload(name), job.step)
        if not out.ok:
            job.step = ""
            return (
                f"unloaded from {backend.kind} but not loaded again ({out.reason}); "
                "its next request loads it from the pool"
            )
    job.step = ""
    now = await asyncio.to_thread(held, pool)
    still = await asyncio.to_thread(held, cold)
    if now and not still:
        return f"{backend.kind} reloaded it from the pool ({describe(now)} maps it)"
    if still:
        return f"{backend.kind} reloaded it, but {describe(still)} still maps the cold files"
    return f"{backend.kind} reloaded it, and nothing maps the pool copy (it may read, not map)"


async def _idle(backend: Backend, name: str) -> str:
    """ "" when ``name`` may be unloaded now, else why not."""
    busy = await backend.busy(name)
    if busy:
        return f"{backend.kind} is answering a request with {name}"
    if busy is None and not backend.unload_waits_for_requests:
        return f"{backend.kind} does not say whether {name} is answering a request"
    return ""
