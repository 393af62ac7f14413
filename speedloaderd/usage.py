"""How much each catalog model is used, as the backend shows it: when it was last seen in use
(``LastUsed``) and how many times it was loaded (``LoadCount``). The tiering that follows
ranks models by it. No D-Bus here: the daemon feeds it one look at a time and publishes what
changed.

What counts, at each look of the backend (speedloaderd/backends/watch.py: every 15 s, and at
once when the holders of a model's files change), for each catalog model the server lists:

- **a load**: listed as ``loaded`` now and not at the previous look (absent, or still
  ``loading``). llama.cpp's router and single-model server report ``loading`` first, then
  ``loaded`` (``server_model_status`` in the vendored ``tools/server/server-models.h``; see
  backends/llamacpp.py): that is one load, counted when it is loaded, and a load that fails
  (loading, then gone) is not counted. A load is a use.
- **a request** (Ollama): ``expires_at`` later than at the previous look. Read in
  ollama/ollama at fb3076099687 (v0.33.0-rc2) ``server/sched.go``: a request that finishes
  sets ``expiresAt = time.Now().Add(sessionDuration)`` (``processCompleted``, when the
  runner's refCount drops to 0); a request that starts only stops the timer
  (``useLoadedRunner``), and ``loadedModels`` reports a runner still loading (expiresAt
  zero) as now + sessionDuration. ``docs/api.md``: ``keep_alive`` "controls how long the
  model will stay loaded into memory following the request (default: 5m)". So a later
  ``expires_at`` means a request ended (or a load runs) since the previous look, and an idle
  loaded model's stays put: an idle model is not a use, however long its keep_alive.
- **being loaded**, on a server that reports nothing per request (llama.cpp, vLLM: no
  expiry, no last-use time on their APIs): a model listed (loaded or loading) counts as in
  use at each look.

Limits, honestly:

- Only looks are seen: a model loaded and unloaded between two looks is missed, and one
  unloaded and loaded again between two is one load. The time recorded is the look's (at
  most 15 s after the use), never the server's.
- Ollama: a request still running is seen when it ends; one made with a keep_alive shorter
  than the last (``expires_at`` moves back) is not seen; an unload sets it back too, and is
  not a use.
- A look that could not list (server down, slow, garbled) tells nothing: a model listed
  before and after it is the same load, even if the server restarted and reloaded it.
- huggingface has no server: nothing is counted (file holders are not use: a backup
  reading a file would count).
- Across a restart of the daemon: what the last look saw is kept (``loaded``, the expiry),
  so a model loaded while the daemon was down counts once at the first look; a crash loses
  what was seen since the last write (at most ``WRITE_EVERY``).

Kept in ``<stateDir>/usage.json``, written through roots.Root (atomic, never following a
link), at most once per ``WRITE_EVERY`` and at shutdown; models gone from the catalog are
dropped on write. A file that is unreadable, too big, of another shape or a symlink is not
used: the daemon starts with no usage, says why in one log line, and the next write
replaces it (a symlink is replaced, its target is never opened).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Container, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from .roots import Root

log = logging.getLogger(__name__)

FILE = "usage.json"
_TMP = ".usage.json.tmp"
VERSION = 1
MAX_MODELS = 100_000
"""Models remembered at most (the catalogs tested reach 100,000): past it, the one used
longest ago (and not loaded now) is forgotten first."""
LIMIT = 64 << 20
"""Largest file read: an entry is ~80 bytes plus its name, so 100,000 models with names of
a few hundred characters fit; anything larger is not ours."""
WRITE_EVERY = 60.0
"""Seconds between writes. A look is every 15 s; a loaded llama.cpp model changes at every
one, so writing each would be 4 fsyncs a minute for telemetry: a crash loses at most a
minute of it instead."""
MAX_U32 = (1 << 32) - 1  # LoadCount is a D-Bus "u"
MAX_U64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class Seen:
    """What one look says of one catalog model the server lists."""

    loaded: bool
    """Loaded (False: the server is still loading it)."""
    expires_at: int | None = None
    """Ollama's keep-alive deadline (µs since the epoch); None where the server has none."""


@dataclass(slots=True)
class ModelUsage:
    last_used: int = 0
    """µs since the epoch of the last look that saw it in use; 0: never."""
    load_count: int = 0
    loaded: bool = False
    """The previous look saw it loaded (a next look that does is not a new load)."""
    expires_at: int | None = None
    """The previous look's ``expires_at`` (None: not listed, or no expiry reported)."""


_Name = Annotated[str, StringConstraints(min_length=1, max_length=4096)]


class _Entry(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    last_used: int = Field(alias="lastUsed", ge=0, le=MAX_U64)
    load_count: int = Field(alias="loadCount", ge=0, le=MAX_U32)
    loaded: bool = False
    expires_at: int | None = Field(default=None, alias="expiresAt", ge=0, le=MAX_U64)


class _File(BaseModel):
    model_config = ConfigDict(extra="ignore")
    version: Literal[1]
    models: dict[_Name, _Entry] = Field(max_length=MAX_MODELS)


Snapshot = list[tuple[str, int, int, bool, int | None]]
"""(name, last used, load count, loaded, expires at) of each model, as ``write`` takes it."""


class Usage:
    """The usage of every model seen in use, and its file under the state dir."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.tree = Root(state_dir, "state dir")
        self.models: dict[str, ModelUsage] = {}
        self.dirty = False  # something changed since the last write
        self.last_write = float("-inf")  # time.monotonic() of the last write

    def of(self, name: str) -> tuple[int, int]:
        """(LastUsed, LoadCount) of ``name``; (0, 0) for a model never seen in use."""
        u = self.models.get(name)
        return (u.last_used, u.load_count) if u is not None else (0, 0)

    def observe(self, seen: Mapping[str, Seen], now: int) -> set[str]:
        """One look that listed the server's models: ``seen`` names every catalog model it
        lists, ``now`` is the look's time (µs since the epoch). Returns the models whose
        LastUsed or LoadCount changed (the only ones to publish)."""
        changed = set()
        for name, s in seen.items():
            u = self.models.get(name)
            if u is None:
                self._make_room()
                u = self.models[name] = ModelUsage()
            before = (u.last_used, u.load_count, u.loaded, u.expires_at)
            used = s.expires_at is None  # no per-request signal: listed is in use
            if s.loaded and not u.loaded:
                u.load_count = min(u.load_count + 1, MAX_U32)
                used = True
            if s.expires_at is not None and (u.expires_at is None or s.expires_at > u.expires_at):
                used = True
            if used:
                u.last_used = max(u.last_used, min(now, MAX_U64))
            u.loaded, u.expires_at = s.loaded, s.expires_at
            after = (u.last_used, u.load_count, u.loaded, u.expires_at)
            if after != before:
                self.dirty = True
                if after[:2] != before[:2]:
                    changed.add(name)
        for name, u in self.models.items():
            if name not in seen and (u.loaded or u.expires_at is not None):
                u.loaded, u.expires_at = False, None  # gone: the next listing is a new load
                self.dirty = True
        return changed

    def _make_room(self) -> None:
        if len(self.models) < MAX_MODELS:
            return
        idle = [(u.last_used, n) for n, u in self.models.items() if not u.loaded]
        if idle:
            del self.models[min(idle)[1]]

    # --- the file ---------------------------------------------------------------------

    def load(self) -> None:
        """Read the file; without a usable one, start with no usage (one log line says why)
        and mark it to be replaced at the next write."""
        self.models = {}
        why = self._read()
        if why:
            log.warning(
                "%s %s; starting with no usage (it is replaced at the next write)",
                self.tree.abs(FILE),
                why,
            )
            self.dirty = True

    def _read(self) -> str:
        """Fill ``models`` from the file; "" when it is absent or read, else why not."""
        raw, why = self.tree.read_state(FILE, LIMIT)
        if raw is None:
            return why
        try:
            data = _File.model_validate_json(raw)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "the file"
            return f"is not a usage file ({where}: {first['msg']})"
        except RecursionError:
            return "is not a usage file (nested too deep)"
        self.models = {
            name: ModelUsage(e.last_used, e.load_count, e.loaded, e.expires_at)
            for name, e in data.models.items()
        }
        return ""

    def snapshot(self, catalog: Container[str] | None) -> Snapshot:
        """What to write, copied (cheap: the encoding is left to ``write``, in a thread);
        models not in ``catalog`` are dropped first (None: the catalog is not believed now,
        cold storage being unavailable: nothing is dropped)."""
        if catalog is not None:
            for name in [n for n in self.models if n not in catalog]:
                del self.models[name]
        self.dirty = False
        return [
            (n, u.last_used, u.load_count, u.loaded, u.expires_at) for n, u in self.models.items()
        ]

    def due(self, now: float) -> bool:
        """Whether to write now (``now``: time.monotonic())."""
        return self.dirty and now - self.last_write >= WRITE_EVERY

    def write(self, snapshot: Snapshot, now: float) -> None:
        """Replace the file with ``snapshot`` (blocking: run it in a thread; 100,000 models
        encode in ~0.25 s here, too long for the event loop). A full or read-only state dir
        does not stop the daemon: the usage stays in memory and the next write tries again."""
        self.last_write = now
        models = {
            name: {"lastUsed": last, "loadCount": count, "loaded": loaded, "expiresAt": expires}
            for name, last, count, loaded, expires in sorted(snapshot)
        }
        content = json.dumps({"version": VERSION, "models": models}, separators=(",", ":"))
        try:
            self.tree.replace_state(FILE, content.encode(), _TMP)
        except OSError as err:
            self.dirty = True
            why = err.strerror or str(err)
            log.warning("cannot save %s: %s; kept in memory", self.tree.abs(FILE), why)


def micros(t: datetime) -> int | None:
    """``t`` as µs since the epoch (0 for anything before it); None if it has no such
    value (a naive time out of the local clock's range)."""
    try:
        return max(0, min(int(t.timestamp() * 1_000_000), MAX_U64))
    except (OverflowError, OSError, ValueError):
        return None
