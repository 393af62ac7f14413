"""The daemon's domain side: which engine runs, under which config, and how a new config is
adopted. The bus layer (bus/server.py) is a view over it, as firewalld's server is over its
core: it exports what this holds and calls it, and decides nothing.

A config that changes only what a running engine can adopt (``LIVE_KEYS``) is handed to it.
Any other change rebuilds: a new engine is started for the new config (refused while models
are in RAM or jobs run), and only once it has started is the config saved and the new
engine put in charge; if either fails, what the new engine mounted is unmounted, the file is
untouched and the running engine goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Container
from pathlib import Path
from typing import Any

from .autotiering import AutoTiering, TieringCollector
from .backends.base import LoadedModel
from .backends.watch import BackendWatch
from .config import BackendConfig, Config, dump_config, remote_pool_path, save_config
from .engine import Engine
from .errors import Busy, Failed, SpeedloaderError
from .events import EventKind, Listener
from .holders import FileIndex, HolderWatch, Process
from .metrics import Metrics
from .metrics_export import MetricsExport
from .privilege import admin_changes
from .roots import check_trusted_dir
from .usage import Seen, Snapshot, Usage, micros

log = logging.getLogger(__name__)

# Config keys a running engine can adopt without rebuilding its pools and models dir.
# (remoteTiers defines pools: changing it rebuilds them; connected remote pools are adopted.)
# The backend keys are read afresh at each use (the backend watch's next look, the next
# demote or promote): nothing is rebuilt for them.
_BACKEND_LIVE = ("apiUrl", "demotePolicy", "demoteTimeout", "reloadAfterPromote")
# storage.copyStreams bounds the copies started from now on (streams.py); a new bound is
# adopted at once, copies running beyond a lower one finish.
_STORAGE_LIVE = ("copyStreams",)
# Sections of which some keys are live: a change of only those is reported key by key.
_LIVE_PARTS = {"backend": _BACKEND_LIVE, "storage": _STORAGE_LIVE}
# metrics: the exposition restarts on its own (metrics_export.py); no engine state depends on it.
# autoTiering: the policy's settings are replaced, its history kept (autotiering.py).
LIVE_KEYS = {
    "autoTiering",
    "modelPlacement",
    "sshKeyPath",
    "metrics",
    *(f"{part}.{k}" for part, keys in _LIVE_PARTS.items() for k in keys),
}


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> set[str]:
    """Top-level keys whose values differ between two dump_config() outputs; a backend (or
    storage) that differs only in keys read at each use (its apiUrl, demote policy...; the
    storage's copyStreams) is reported as ``backend.<key>`` (``storage.<key>``) for each.
    Extension keys (``_``, ``x-``) are left out: nothing reads them."""
    changed = {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}
    changed -= {k for k in changed if k.startswith(("_", "x-"))}
    for part, live in _LIVE_PARTS.items():
        if part not in changed:
            continue
        a, b = old.get(part) or {}, new.get(part) or {}
        both = isinstance(a, dict) and isinstance(b, dict)
        if both and {k: v for k, v in a.items() if k not in live} == {
            k: v for k, v in b.items() if k not in live
        }:
            keys = {f"{part}.{k}" for k in live if a.get(k) != b.get(k)}
            changed = (changed - {part}) | keys
    return changed


def start_failure(err: BaseException) -> str:
    """One sentence for why an engine could not start (a bug says so)."""
    if isinstance(err, SpeedloaderError):
        return str(err)
    if isinstance(err, OSError):
        where = f" ({err.filename})" if err.filename else ""
        return f"{err.strerror or err}{where}"
    return f"internal error while starting: {err!r}"


def check_config_paths(config: Config) -> None:
    """Refuse (UnsafePath, naming the component) a config whose models dir, state dir or
    local pool paths someone other than root could change: the daemon writes there as root.
    Paths that do not exist yet pass if their deepest existing directory does (they are made
    at start). Cold storage is only read, through roots.Root, and may be anyone's."""
    check_trusted_dir(config.models_dir, "modelsDir", allow_missing=True)
    check_trusted_dir(config.state_dir, "stateDir", allow_missing=True)
    for pc in config.local_pools():
        check_trusted_dir(pc.path, f"pool {pc.name!r} path", allow_missing=True)
    for name in config.remote_tiers.hosts:
        path = remote_pool_path(config, name)
        check_trusted_dir(path, f"pool {name!r} path", allow_missing=True)


class Daemon:
    """The running engine (None while no config is usable) and the config it runs.

    ``listeners`` hear every event of whichever engine is in charge, and ``EventKind.CONFIG``
    when a new engine takes over (everything may have changed)."""

    def __init__(self, config: Config | None, config_path: Path | None, config_error: str = ""):
        self.config_path = config_path
        self.engine: Engine | None = None
        self.config_error = config_error
        # A config that loaded but whose engine could not start: shown by GetConfig so it
        # can be fixed and sent back.
        self.unstarted_config: Config | None = None
        self.reconfiguring = False  # a structural set_config is starting a new engine
        # Prometheus metrics (metrics.py): they hear every event first, and are served as the
        # config's ``metrics`` key says (metrics_export.py), off by default.
        self.metrics = Metrics(self)
        self.metrics_export = MetricsExport(self.metrics.render)
        # Automatic tiering (autotiering.py): hears every event after the metrics.
        self.tiering = AutoTiering(self)
        self.metrics.register(TieringCollector(self.tiering))
        self.listeners: list[Listener] = [self.metrics.on_event, self.tiering.on_event]
        if config is not None:
            self.engine = self._attach(Engine(config, config_path))
        self.backend_watch = BackendWatch(
            self._backend_config, lambda: self._emit(EventKind.BACKEND, "")
        )
        # Who holds each model's files, and the RAM deleted copies keep (speedloaderd.holders);
        # a change of holders may be a load or unload: the backend is asked again at once.
        self.holder_watch = HolderWatch(self._file_index, self._holders_changed)
        self.backend_watch.on_loaded = self._loaded_changed
        self.loaded_names: set[str] = set()  # loaded_models() as last computed
        # Last use and load count per model (speedloaderd.usage), fed by every backend look,
        # kept under the running engine's stateDir (None until an engine has started).
        self.usage: Usage | None = None
        self._usage_write: asyncio.Task[None] | None = None
        self.backend_watch.on_look = self._looked

    def _job_ended(self, name: str) -> bool:
        job = self.engine.jobs.get(int(name)) if self.engine and name.isdigit() else None
        return job is not None and job.finished

    def _file_index(self) -> FileIndex | None:
        return self.engine.file_index() if self.engine is not None else None

    def _holders_changed(self, models: set[str], pools: set[str]) -> None:
        if models and self.backend_watch.loaded:
            self._loaded_changed()  # the files a server names may be other copies now
        for name in sorted(models):
            self._emit(EventKind.MODEL, name)
        for name in sorted(pools):
            self._emit(EventKind.POOL, name)
        if models:
            self.backend_watch.poke()

    def _loaded_changed(self) -> None:
        now = self.loaded_models()
        changed, self.loaded_names = now ^ self.loaded_names, now
        for name in sorted(changed):
            self._emit(EventKind.MODEL, name)

    def loaded_models(self) -> set[str]:
        """The catalog's models the backend says it has loaded: by the server's name for
        it, or by a file it names (the models dir link, the cold file or the pool copy)."""
        return set(self._listed_by_model())

    def _listed_by_model(self) -> dict[str, list[LoadedModel]]:
        """What the server lists, by the catalog models it names (see loaded_models)."""
        engine = self.engine
        out: dict[str, list[LoadedModel]] = defaultdict(list)
        if engine is None:
            return out
        for lm in self.backend_watch.loaded:
            names = {lm.name} if lm.name in engine.catalog.models else set()
            for path in lm.paths:
                names.update(engine.models_of_path(path))
            for name in names:
                out[name].append(lm)
        return out

    def usage_of(self, model: str) -> tuple[int, int]:
        """(LastUsed µs since the epoch, 0: never; LoadCount) of ``model``."""
        return self.usage.of(model) if self.usage is not None else (0, 0)

    def _looked(self) -> None:
        """After every backend look: count what it saw (one Model change per model whose
        usage changed, none for the others), and write the usage if it is due."""
        usage, engine = self.usage, self.engine
        if usage is not None and engine is not None and self.backend_watch.listed:
            seen = {}
            for name, listed in self._listed_by_model().items():
                expiries = [micros(lm.expires_at) for lm in listed if lm.expires_at is not None]
                known = [e for e in expiries if e is not None]
                seen[name] = Seen(
                    loaded=any(lm.status == "loaded" for lm in listed),
                    expires_at=max(known) if known else None,
                )
            loads = {name: usage.of(name)[1] for name in seen}
            for name in sorted(usage.observe(seen, time.time_ns() // 1000)):
                if usage.of(name)[1] > loads.get(name, 0):  # a load: a use, for tiering
                    model = engine.catalog.models.get(name)
                    self.tiering.loaded(name, model.size if model is not None else 0)
                self._emit(EventKind.MODEL, name)
        now = time.monotonic()
        if usage is not None and self._usage_write is None and usage.due(now):
            snapshot = usage.snapshot(self._catalog())
            self._usage_write = asyncio.get_running_loop().create_task(
                self._write_usage(usage, snapshot, now)
            )

    def _catalog(self) -> Container[str] | None:
        """The catalog's names, when it is believed (models gone from it are dropped from
        the usage); None while cold storage is unavailable (then nothing is dropped)."""
        engine = self.engine
        if engine is None or engine.cold_problem:
            return None
        return engine.catalog.models

    async def _write_usage(self, usage: Usage, snapshot: Snapshot, now: float) -> None:
        try:
            await asyncio.to_thread(usage.write, snapshot, now)
        finally:
            self._usage_write = None

    async def _flush_usage(self, catalog: Container[str] | None) -> None:
        """Write what is not written yet (at shutdown, before another stateDir is used)."""
        if self._usage_write is not None:
            with contextlib.suppress(Exception):
                await self._usage_write
        usage = self.usage
        if usage is not None and usage.dirty:
            await self._write_usage(usage, usage.snapshot(catalog), time.monotonic())

    async def _follow_state_dir(self) -> None:
        """Keep the usage in the running engine's stateDir (read once that engine started:
        the dir is checked and made by then)."""
        want = self.engine.config.state_dir if self.engine is not None else None
        if self.usage is not None and self.usage.state_dir == want:
            return
        if self.usage is not None:
            await self._flush_usage(None)  # the catalog it was kept for is gone
        self.usage = Usage(want) if want is not None else None
        if self.usage is not None:
            await asyncio.to_thread(self.usage.load)

    def holders_of(self, model: str) -> tuple[Process, ...]:
        return tuple(self.holder_watch.held.models.get(model, ()))

    def held_bytes(self, pool: str) -> int:
        return self.holder_watch.held.pools.get(pool, 0)

    def _backend_config(self) -> BackendConfig | None:
        config = self.shown_config()
        return config.backend if config is not None else None

    def _attach(self, engine: Engine) -> Engine:
        engine.listeners.append(self._emit)
        self.tiering.attach(engine)
        return engine

    def emit_tiering(self) -> None:
        """Automatic tiering's state on the Manager changed."""
        self._emit(EventKind.TIERING, "")

    def emit_model(self, name: str) -> None:
        """A model's bus properties changed outside the engine (its uses)."""
        self._emit(EventKind.MODEL, name)

    def _emit(self, kind: EventKind, name: str) -> None:
        if kind in (
            EventKind.CATALOG,
            EventKind.POOL_ADDED,
            EventKind.POOL_REMOVED,
            EventKind.CONFIG,
        ) or (kind is EventKind.JOB and self._job_ended(name)):
            # A job that ended (a demote deleted a copy), a rescan: the holders look again.
            self.holder_watch.poke()
        for listener in list(self.listeners):
            try:
                listener(kind, name)
            except Exception:
                log.exception("daemon listener failed")

    async def start(self) -> None:
        """Start the engine. If it cannot start, stay without one: the reason is in
        ``config_error`` and a set_config (or a fixed file and a restart) brings one up.
        The backend is asked once before (so the bus starts with its state), then every 15 s."""
        await self.backend_watch.check()
        self.backend_watch.start()
        try:
            await self._start_engine()
            await self._follow_state_dir()
            self._looked()  # the first look, counted against what the last run saw
        finally:
            # After the engine's start: its first look indexes the started engine's files.
            self.holder_watch.start()
            await self.tiering.start()
            config = self.shown_config()
            if config is not None:
                await self._apply_metrics(config)

    async def _start_engine(self) -> None:
        engine = self.engine
        if engine is None:
            return
        try:
            await engine.start()
            self._loaded_changed()
        except Exception as err:
            if not isinstance(err, (SpeedloaderError, OSError)):
                log.exception("engine start failed")
            self.engine, self.config_error = None, start_failure(err)
            self.unstarted_config = engine.config
            undone = await asyncio.to_thread(engine.abandon_start)
            log.error(
                "configuration not usable: %s (pools unmounted again: %s)",
                self.config_error,
                ", ".join(undone) or "none",
            )

    async def _apply_metrics(self, config: Config) -> None:
        await self.metrics_export.apply(config.metrics)
        self.metrics.exporting(
            config.metrics.listen is not None or bool(config.metrics.textfile_dir)
        )

    async def shutdown(self) -> None:
        await self.metrics_export.stop()
        await self.tiering.stop()
        await self.backend_watch.stop()
        await self.holder_watch.stop()
        await self._flush_usage(self._catalog())
        if self.engine is not None:
            await self.engine.shutdown()

    def require_engine(self) -> Engine:
        if self.reconfiguring:
            raise Busy("a new configuration is being applied; try again when it is done")
        if self.engine is None:
            raise Failed(
                f"speedloaderd has no valid configuration ({self.config_error}); "
                "fix it with SetConfig (slctl config set) or edit the file and restart"
            )
        return self.engine

    def shown_config(self) -> Config | None:
        """The config GetConfig shows: the running one, or the one that could not start."""
        return self.engine.config if self.engine is not None else self.unstarted_config

    def admin_changes(self, new: Config) -> list[str]:
        """The keys ``new`` changes that need an admin (any, with no running config)."""
        old = dump_config(self.engine.config) if self.engine is not None else {}
        return admin_changes(old, dump_config(new))

    async def set_config(self, new: Config) -> None:
        """Adopt a validated config, all or nothing (see the module's docstring)."""
        if self.reconfiguring:
            raise Busy("another configuration change is being applied; try again when it is done")
        engine = self.engine
        if engine is not None:
            changed = changed_keys(dump_config(engine.config), dump_config(new))
            if not changed - LIVE_KEYS:
                await engine.set_config(new)
                await self._apply_metrics(new)
                return
            busy = [j for j in engine.jobs.values() if not j.finished]
            held = await asyncio.to_thread(engine.models_in_ram)
            if busy or held:
                what = []
                if held:
                    names = ", ".join(sorted(held)[:3]) + (", ..." if len(held) > 3 else "")
                    what.append(f"demote the {len(held)} model(s) in RAM ({names})")
                if busy:
                    what.append(f"wait for the {len(busy)} running job(s)")
                raise Busy(
                    f"changing {', '.join(sorted(changed))} rebuilds the pools and models dir; "
                    f"{' and '.join(what)} first"
                )
        self.reconfiguring = True
        try:
            replacement = await self._start_replacement(new, engine)
        finally:
            self.reconfiguring = False
        self._attach(replacement)
        if engine is not None:
            engine.listeners.clear()
            engine.close()
        self.engine, self.config_error, self.unstarted_config = replacement, "", None
        log.info("configuration replaced; engine restarted")
        await self._follow_state_dir()
        await self.tiering.follow()
        self._emit(EventKind.CONFIG, "")
        await self._apply_metrics(new)

    async def _start_replacement(self, new: Config, old: Engine | None) -> Engine:
        """Start an engine for ``new`` and save ``new``; on any failure undo both."""
        # Paths checked before anything is made: a config the engine refuses (a remote
        # pool's bad path, a models dir a member owns) creates nothing.
        await asyncio.to_thread(check_config_paths, new)
        replacement = Engine(new, self.config_path)
        try:
            await replacement.start()
            if self.config_path is not None:
                await asyncio.to_thread(save_config, new, self.config_path)
        except BaseException as err:
            keep = set(old.pool_roots.values()) if old is not None else set()
            undone = await asyncio.to_thread(replacement.abandon_start, keep)
            if old is not None:
                try:
                    await old.reassert()
                except Exception:
                    log.exception("the running engine could not take its paths back")
            log.error(
                "new configuration refused: %s (pools unmounted again: %s)",
                start_failure(err),
                ", ".join(undone) or "none",
            )
            if isinstance(err, SpeedloaderError):
                raise
            if isinstance(err, Exception):
                raise Failed(
                    f"the new configuration could not be started ({start_failure(err)}); "
                    "the running configuration was kept"
                ) from err
            raise
        return replacement
