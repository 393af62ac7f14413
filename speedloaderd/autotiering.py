"""Automatic tiering, the daemon's side: uses in, plans out, each action a normal Job.

The policy (speedloaderd/tiering/) is pure: it is told of uses and asked for a plan. This
module is what it is told and what is done with the plan:

- **Uses**: the kernel's file opens of model files (opens.py: fanotify mount marks on the
  pools and on cold storage when it is a mount of its own, inode marks on the cold model
  files otherwise), attributed to models through the engine's file index; and the loads the
  backend reports (usage.py's load count, through Daemon._looked). The daemon's own opens
  (its copies, scans, hashing) are never events (opens.py ignores its pid).
- **Plans**: every ``autoTiering.interval`` seconds, and ``SOON`` seconds after uses were
  seen, while ``autoTiering.enabled``. Each action of the plan is a promote or demote Job
  with its ``reason``, started one after the other (an eviction ends before the promote it
  makes room for starts); a failed or refused action ends the pass, the next plan is made
  from what is then true. Nothing moves while tiering is off, while cold storage is
  unavailable, or while a new configuration is being applied.
- **What is never evicted** (``Model.protected`` for the policy): pinned models (a pin is
  also a promote into its pool), models the backend lists as loaded, models whose files a
  process maps or holds open (holders.py), models with a job running, degraded models.
  Each is looked at again right before its eviction starts.
- **A manual promote that needs room** (Engine.make_room): when placement finds no pool
  with room and tiering is on, the least valuable evictable models of the target pool are
  demoted first (steps on the promote's Job), as the policy's ``make_room`` says.
- **Residency**: the time each automatic or manual promote ended, for the minimum
  residency, kept in the state file with the history (a model in RAM whose time is unknown,
  e.g. promoted by a daemon without tiering's state, counts as resident long enough: the
  policy's rule).
- **State**: the policy's history in ``<stateDir>/tiering.json`` (through roots.Root, as
  usage.json), written at most every ``WRITE_EVERY`` seconds and at shutdown; an unusable
  file is logged and replaced (the policy then starts without memory).

Counters for metrics (metrics.py scrapes ``counters``): a use of a model (a process opening
its files) is a hit of the pool it was opened from when every file it opened was a pool
copy, else a miss; its bytes are the model's size (an open is counted as one read of the
whole model: fanotify sees opens, not reads).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .catalog.types import Model as CatalogModel
from .config import AutoTieringConfig
from .errors import Cancelled, NoSpace, SpeedloaderError
from .events import EventKind
from .holders import FileIndex, Process
from .jobs import Job
from .opens import ColdFile, Open, OpenWatch, own_mount
from .roots import Root
from .sizes import format_size
from .tiering import Access, Evict, Model, Policy, PoolRoom, Promote, StateError
from .tiering.policy import Action
from .tiers import COLD, ModelState
from .watching import woken

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger(__name__)

STATE_FILE = "tiering.json"
_TMP = ".tiering.json.tmp"
WRITE_EVERY = 60.0
"""Seconds between two writes of the history (a crash loses at most this much of it)."""
SOON = 2.0
"""Seconds from the first use seen to the plan it causes: a loader opens every shard of a
model in its first second (the opens window is 1 s), so one plan sees the whole load."""
STATE_LIMIT = 64 << 20


class Daemon(Protocol):
    """What tiering reads of speedloaderd.daemon.Daemon (which owns it)."""

    @property
    def engine(self) -> Engine | None: ...

    @property
    def reconfiguring(self) -> bool: ...

    @property
    def loaded_names(self) -> set[str]: ...

    def holders_of(self, model: str) -> tuple[Process, ...]: ...

    def emit_model(self, name: str) -> None: ...

    def emit_tiering(self) -> None: ...


@dataclass
class Counters:
    """What tiering has seen and done since the daemon started (Prometheus counters)."""

    hits: Counter[str] = field(default_factory=Counter)  # uses served from a pool, by pool
    hit_bytes: Counter[str] = field(default_factory=Counter)
    misses: int = 0  # uses served (wholly or partly) from cold storage
    miss_bytes: int = 0
    promotions: Counter[str] = field(default_factory=Counter)  # automatic, by pool
    copied_bytes: Counter[str] = field(default_factory=Counter)
    evictions: Counter[str] = field(default_factory=Counter)  # automatic, by pool
    thrash: Counter[str] = field(default_factory=Counter)
    """Models evicted within minResidency of their promote, or promoted again within
    minResidency of their eviction (bench/tiering.py's definition)."""
    failures: int = 0  # automatic actions that failed or were refused


@dataclass(frozen=True)
class _Index:
    """The engine's file index, as the opens are attributed with it."""

    files: FileIndex
    sizes: dict[str, int]  # model -> its size, for the bytes counters


class AutoTiering:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.config = AutoTieringConfig()
        self.policy = Policy(self.config.settings())
        self.watch = OpenWatch((), self._on_opens)
        self.counters = Counters()
        self.state_dir: Path | None = None
        self._tree: Root | None = None
        self._evicted_at: dict[str, float] = {}  # model -> when tiering evicted it
        self._auto: dict[int, tuple[str, str]] = {}  # automatic job id -> (op, pool)
        self._index: _Index | None = None
        self._wake = asyncio.Event()
        self._soon: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._remark: asyncio.Task[None] | None = None
        self._remark_again = False
        self._said_watched = ""
        self._stopping = False
        self._dirty = False
        self._last_write = float("-inf")
        self.current: Job | None = None  # the automatic job running now
        self.last_plan: list[Action] = []
        self.paused = ""  # why tiering is on but does nothing now ("" when it acts)
        self.next_evict = ""  # "model from pool (why)": what an eviction would take next

    # --- lifecycle ---------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    @property
    def resident_since(self) -> dict[str, float]:
        """Model -> when its promote ended (kept in tiering.json with the history)."""
        return self.policy.history.resident

    def attach(self, engine: Engine) -> None:
        """Hook into an engine that is (or is about to be) in charge."""
        engine.before_unmount.append(self._letting_go)
        engine.make_room = self._make_room

    async def start(self) -> None:
        """After the engine started: read the history, watch the opens, plan."""
        await self.follow()
        loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.watch.start, loop)
        self.reindex()
        self._task = loop.create_task(self._run(), name="auto-tiering")

    async def follow(self) -> None:
        """Adopt the running engine's config and state dir (at start, after a rebuild)."""
        engine = self.daemon.engine
        if engine is None:
            return
        self.configure(engine.config.auto_tiering)
        want = engine.config.state_dir
        if self.state_dir != want:
            if self.state_dir is not None:
                await self._write()
            self.state_dir, self._tree = want, Root(want, "state dir")
            await asyncio.to_thread(self._load)
        self.reindex()

    def configure(self, config: AutoTieringConfig) -> None:
        """A new autoTiering config: the history is kept, the settings replaced."""
        was = self.config
        self.config = config
        if config.settings() != self.policy.settings:
            history = self.policy.history
            self.policy = Policy(config.settings())
            self.policy.history.models = history.models  # same shape: settings only rank it
            self.policy.history.resident = history.resident
        if config.enabled != was.enabled:
            log.info("automatic tiering turned %s", "on" if config.enabled else "off")
            self.daemon.emit_tiering()
        self.wake()

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._soon is not None:
            self._soon.cancel()
        for task in (self._task, self._remark):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        await asyncio.to_thread(self.watch.stop)
        await self._write()

    def wake(self) -> None:
        self._wake.set()

    # --- uses --------------------------------------------------------------------------

    def _on_opens(self, batch: list[Open]) -> None:
        """A window of opens (on the event loop): one use per model per process."""
        index = self._index
        if index is None:
            return
        by_model: dict[str, dict[int, set[str | None]]] = {}
        pools = index.files.pool_devices
        for o in batch:
            for name in index.files.models.get(o.key, ()):
                by_model.setdefault(name, {}).setdefault(o.pid, set()).add(pools.get(o.dev))
        last = max((o.last for o in batch), default=time.time())
        for name, pids in sorted(by_model.items()):
            size = index.sizes.get(name, 0)
            for where in pids.values():
                if None not in where and len(where) == 1:
                    pool = next(iter(where))
                    assert pool is not None
                    self.counters.hits[pool] += 1
                    self.counters.hit_bytes[pool] += size
                else:
                    self.counters.misses += 1
                    self.counters.miss_bytes += size
            self._record(name, size, last, "open")

    def loaded(self, name: str, size: int) -> None:
        """The backend says it loaded ``name`` (usage.py counted a load)."""
        self._record(name, size, time.time(), "load")

    def _record(self, name: str, size: int, when: float, source: str) -> None:
        before = self.use_count(name)
        try:
            self.policy.record(Access(name, size, when, source))
        except ValueError:  # a name the history cannot keep: nothing to rank
            return
        self._dirty = True
        if self.use_count(name) != before:
            self.daemon.emit_model(name)
        if self.enabled and self._soon is None and not self._stopping:
            self._soon = asyncio.get_running_loop().call_later(SOON, self._soon_due)

    def _soon_due(self) -> None:
        self._soon = None
        self._wake.set()

    # --- what the bus shows of a model ---------------------------------------------------

    def use_count(self, name: str) -> int:
        uses = self.policy.history.models.get(name)
        return uses.count if uses is not None else 0

    def value(self, name: str) -> float:
        return self.policy.value(name, time.time())

    def why(self, name: str, tier: str, pinned: str) -> str:
        """Why a model is where it is, for a person: "pinned to fast", "in use (loaded)",
        "auto: used 14x in 1 h"; for a cold model, its uses; "" when nothing is known."""
        now = time.time()
        if pinned:
            return f"pinned to {pinned}"
        if tier != COLD:
            protected = self._protection(name)
            if protected:
                return f"in use ({protected})"
        uses = self.policy.history.models.get(name)
        if uses is None or uses.count == 0:
            return "" if tier == COLD else "not used since tiering began"
        said = self.policy.why(name, now)
        return f"auto: {said}" if tier != COLD and self.enabled else said

    # --- plans -------------------------------------------------------------------------

    def plan(self) -> list[Action]:
        """What tiering would do now (a dry run; ``slctl tiering plan``)."""
        engine = self.daemon.engine
        if engine is None:
            return []
        models, pools = self._inputs(engine)
        return self.policy.plan(models, pools, time.time())

    def _next_eviction(self, models: list[Model], now: float) -> str:
        """The model the next eviction would take ("model from pool (why)"), or ""."""
        ok = self.policy.evictable(models, now)
        if not ok:
            return ""
        m = ok[0]
        return f"{m.name} from {m.pool} ({self.policy.why(m.name, now)})"

    async def _run(self) -> None:
        while not self._stopping:
            await woken(self._wake, self.config.interval)
            self._wake.clear()
            if self._stopping:
                return
            try:
                if self._dirty and time.monotonic() - self._last_write >= WRITE_EVERY:
                    await self._write()
                await self._pass()
            except Exception:  # the loop must outlive any one bad plan
                log.exception("automatic tiering pass failed")

    def _why_paused(self, engine: Engine | None) -> str:
        if engine is None:
            return "speedloaderd has no valid configuration"
        if self.daemon.reconfiguring:
            return "a new configuration is being applied"
        if engine.cold_problem:
            return engine.cold_problem
        return ""

    async def _pass(self) -> None:
        """Look (whether on or off: the Manager shows the next eviction), and while on,
        plan and act."""
        engine = self.daemon.engine
        shown = (self.paused, self.next_evict)
        self.paused = self._why_paused(engine)
        if engine is not None and not self.paused:
            models, pools = await asyncio.to_thread(self._inputs, engine)
            now = time.time()
            self.next_evict = self._next_eviction(models, now)
        if (self.paused, self.next_evict) != shown:
            self.daemon.emit_tiering()
        if self.paused or engine is None or not self.enabled:
            return
        actions = self.policy.plan(models, pools, now)
        self.last_plan = actions
        if actions:
            sizes = {m.name: m.size for m in models}
            log.info("automatic tiering plan: %s", "; ".join(describe_plan(actions, sizes)))
        for action in actions:
            if self._stopping or not self.enabled or self.daemon.engine is not engine:
                return
            if not await self._act(engine, action):
                return

    async def _act(self, engine: Engine, action: Action) -> bool:
        """Start one action as a Job and wait for its end; False: stop this pass."""
        try:
            if isinstance(action, Evict):
                protected = await asyncio.to_thread(self._protection, action.model)
                if protected:
                    log.info("not evicting %s: it is %s now", action.model, protected)
                    return False
                pool = engine.model_status(action.model).tier
                job = engine.demote(action.model, reason=action.reason)
                self._auto[job.id] = ("evict", pool)
            else:
                assert isinstance(action, Promote)
                job = engine.promote(action.model, action.pool, reason=action.reason)
                self._auto[job.id] = ("promote", action.pool)
        except SpeedloaderError as err:
            self.counters.failures += 1
            log.warning("automatic tiering could not start %s: %s", _what(action), err)
            return False
        self.current = job
        try:
            await job.wait()
        except SpeedloaderError as err:
            self.counters.failures += 1
            log.warning("automatic %s failed: %s", _what(action), err)
            return False
        finally:
            self.current = None
        return True

    def _inputs(self, engine: Engine) -> tuple[list[Model], list[PoolRoom]]:
        """The policy's view of the models it may move and of the pools (blocking: link
        reads and a statvfs per pool)."""
        settings = self.policy.settings
        pins = engine.config.model_placement.pinned
        mounted = engine.pools.mounted()
        pools = []
        for name in sorted(mounted):
            pool = engine.pools.get(name)
            if pool is None or pool.problem:
                continue
            usage = pool.usage()
            used = usage.used + engine.ledger.inflight_bytes(name)
            pools.append(
                PoolRoom(
                    name,
                    usage.size,
                    used,
                    settings.high_watermark,
                    settings.low_watermark,
                    pool.speed,
                )
            )
        names = set(self.policy.history.models) | set(engine.promoted.names) | set(pins)
        held = set(engine.promoted.names)
        models = []
        for name in sorted(names):
            cat = engine.catalog.models.get(name)
            if cat is None:
                continue
            st = engine.model_status(name, mounted)
            in_pool = st.tier if st.tier != COLD else None
            protected = self._protection(name, st.state)
            if st.state is ModelState.DEGRADED or not cat.ok:
                protected = protected or "degraded"
            size = self._own_bytes(engine, cat, held) if in_pool else cat.size
            models.append(
                Model(
                    name,
                    size,
                    pool=in_pool,
                    pinned_pool=pins.get(name),
                    protected=protected,
                    resident_since=self.resident_since.get(name),
                )
            )
        return models, pools

    def _protection(self, name: str, state: ModelState | None = None) -> str:
        """Why ``name`` must not be evicted now ("" if it may be)."""
        daemon = self.daemon
        if name in daemon.loaded_names:
            return "loaded"
        holders = daemon.holders_of(name)
        if holders:
            return f"held by {holders[0].command} (pid {holders[0].pid})"
        engine = daemon.engine
        if engine is not None and name in engine.active_models():
            return "busy"
        if state in (ModelState.PROMOTING, ModelState.DEMOTING):
            return "busy"
        return ""

    @staticmethod
    def _own_bytes(engine: Engine, model: CatalogModel, held: set[str]) -> int:
        """Bytes an eviction of ``model`` frees: its files no other model in RAM uses
        (Ollama models share blobs; a shared blob stays for the other)."""
        seen: dict[str, int] = {}
        for f in model.data_files:
            others = [u for u in engine.users.get(f.rel, ()) if u != model.name and u in held]
            if not others:
                seen[f.rel] = f.size
        return sum(seen.values())

    # --- a manual promote that needs room ------------------------------------------------

    async def _make_room(self, job: Job, model: CatalogModel) -> None:
        """Engine.make_room: evict for ``job`` (a promote) what the policy says, when
        tiering is on and placement finds no pool with room (else nothing)."""
        engine = self.daemon.engine
        if not self.enabled or engine is None or job.id in self._auto:
            return  # an automatic promote's room was made by its plan
        found = await asyncio.to_thread(self._short, engine, model, job.pool)
        if found is None:
            return
        room, need = found
        models, _ = await asyncio.to_thread(self._inputs, engine)
        evictions = self.policy.make_room(models, room, need, time.time())
        if not evictions:
            return  # nothing to evict, or not enough: the copy says NoSpace as before
        for ev in evictions:
            job.step = f"making room in {room.name}: demoting {ev.model}"
            job.notify()
            demote = engine.demote(
                ev.model, reason=f"made room in {room.name} for {model.name} (job {job.id})"
            )
            self._auto[demote.id] = ("evict", room.name)
            ended = asyncio.ensure_future(demote._done.wait())
            cancel = asyncio.ensure_future(job.cancel_requested.wait())
            try:
                await asyncio.wait({ended, cancel}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ended.cancel()
                cancel.cancel()
            if job.cancel_requested.is_set():
                raise Cancelled(f"promote of {model.name} cancelled while making room")
            if demote.error is not None:
                raise NoSpace(
                    f"no room for {model.name} in pool {room.name}: making room failed "
                    f"(demote of {ev.model}: {demote.error})"
                )
        job.step = ""
        job.notify()

    def _short(
        self, engine: Engine, model: CatalogModel, requested: str | None
    ) -> tuple[PoolRoom, int] | None:
        """The pool a promote of ``model`` goes to and the bytes it needs there, when
        placement finds no room; None when it does (or no pool could ever take it)."""
        if engine.fits(model, requested):
            return None
        _, pools = self._inputs(engine)
        pinned = engine.config.model_placement.pinned.get(model.name)
        wanted = requested or pinned
        order = sorted(pools, key=lambda p: (-p.speed, p.name))
        for room in order:
            if wanted and room.name != wanted:
                continue
            need = engine.bytes_to_copy(model, room.name)
            if need <= room.capacity * room.high:
                return room, need
        return None

    # --- files watched -------------------------------------------------------------------

    def on_event(self, kind: EventKind, name: str) -> None:
        """A daemon listener: the files to watch and the index follow the engine."""
        if kind in (EventKind.CATALOG, EventKind.POOL_ADDED, EventKind.POOL_REMOVED):
            self.reindex()
        elif kind is EventKind.CONFIG:
            engine = self.daemon.engine
            if engine is not None:
                self.configure(engine.config.auto_tiering)
            self.reindex()
        elif kind is EventKind.JOB and name.isdigit():
            self._job_event(int(name))

    def _job_event(self, job_id: int) -> None:
        engine = self.daemon.engine
        job = engine.jobs.get(job_id) if engine is not None else None
        if job is None or not job.finished:
            return
        now = time.time()
        auto = self._auto.pop(job_id, None)
        ok = job.error is None
        model = job.model
        if job.operation == "promote" and ok and model is not None:
            resident = self.resident_since
            resident[model] = now
            if len(resident) > self.policy.history.max_tracked:  # kept as the state allows
                del resident[min(resident, key=resident.__getitem__)]
            self._dirty = True
            if auto is not None:
                pool = job.pool or auto[1]
                self.counters.promotions[pool] += 1
                self.counters.copied_bytes[pool] += job.bytes_total
                if now - self._evicted_at.get(model, float("-inf")) < self._window:
                    self.counters.thrash[pool] += 1
        elif job.operation == "demote" and ok and model is not None:
            since = self.resident_since.pop(model, None)
            with contextlib.suppress(ValueError):
                self.policy.evicted(model, now)
            self._dirty = True
            if auto is not None:
                pool = auto[1]
                self.counters.evictions[pool] += 1
                self._evicted_at[model] = now
                if since is not None and now - since < self._window:
                    self.counters.thrash[pool] += 1
        if job.operation in ("promote", "demote") or job.operation.startswith("pool-"):
            self.reindex()  # pool copies came or went: their inodes, the pools' mounts

    @property
    def _window(self) -> float:
        return self.policy.settings.min_residency

    def reindex(self) -> None:
        """Look again (in a thread) at which files to watch and whose they are."""
        if self._stopping:
            return
        if self._remark is not None and not self._remark.done():
            self._remark_again = True
            return
        self._remark = asyncio.get_running_loop().create_task(self._reindex())

    async def _reindex(self) -> None:
        while True:
            self._remark_again = False
            engine = self.daemon.engine
            try:
                await asyncio.to_thread(self._mark, engine)
            except Exception:
                log.exception("watching the model files' opens failed")
            if not self._remark_again or self._stopping:
                return

    def _mark(self, engine: Engine | None) -> None:
        """Blocking: the engine's file index, and the marks that follow from it."""
        if engine is None:
            self._index = None
            self.watch.set_marks((), ())
            return
        index = engine.file_index()
        sizes = {name: m.size for name, m in engine.catalog.models.items()}
        self._index = _Index(index, sizes)
        mounts = [engine.pool_roots[name] for name in index.pool_devices.values()]
        cold = engine.config.storage.path
        files: list[ColdFile] = []
        if engine.cold_problem:
            pass  # nothing there to mark; the retry's CATALOG event marks again
        elif own_mount(cold):
            mounts.append(cold)
        else:
            root = engine.models_dir.cold
            files = [
                ColdFile(root, f.rel, f.ident)
                for m in engine.catalog.models.values()
                for f in m.data_files
                if f.ident is not None
            ]
        marked = self.watch.set_marks(mounts, files)
        if marked is not None:
            self._say_watched(*marked)

    def _say_watched(self, mounts: int, files: int) -> None:
        """One log line each time what is watched changes, once those marks are in place:
        opens before it are not seen (the marks are placed in a thread after the daemon is
        on the bus), so a sysadmin reading why a use was missed, and the tests, can tell
        from when it counts."""
        said = f"watching the opens of model files: {mounts} mount(s), {files} cold storage file(s)"
        if said != self._said_watched:
            self._said_watched = said
            log.info("%s", said)

    def _letting_go(self, path: Path) -> None:
        """Engine.before_unmount (blocking): stop watching the pool's mount first."""
        if self.watch.state != "watching":
            return
        engine = self.daemon.engine
        keep = []
        if engine is not None and self._index is not None:
            for name in self._index.files.pool_devices.values():
                p = engine.pool_roots[name]
                if p != path:
                    keep.append(p)
            cold = engine.config.storage.path
            if not engine.cold_problem and own_mount(cold):
                keep.append(cold)
        self.watch.set_mounts(keep)

    # --- state -------------------------------------------------------------------------

    def _load(self) -> None:
        tree = self._tree
        assert tree is not None
        raw, why = tree.read_state(STATE_FILE, STATE_LIMIT)
        if raw is not None:
            try:
                history = Policy.from_json(raw, self.policy.settings).history
                self.policy.history.models = history.models
                self.policy.history.resident = history.resident
                return
            except StateError as err:
                why = str(err)
        if why:
            log.warning(
                "%s %s; tiering starts without its history (replaced at the next write)",
                tree.abs(STATE_FILE),
                why,
            )
            self._dirty = True

    async def _write(self) -> None:
        tree = self._tree
        if tree is None or not self._dirty:
            return
        self._dirty = False
        self._last_write = time.monotonic()
        content = self.policy.to_json().encode()
        try:
            await asyncio.to_thread(tree.replace_state, STATE_FILE, content, _TMP)
        except OSError as err:
            self._dirty = True
            log.warning(
                "cannot save %s: %s; kept in memory", tree.abs(STATE_FILE), err.strerror or err
            )

    # --- for slctl tiering status ----------------------------------------------------------

    def watch_state(self) -> tuple[str, str]:
        """("watching" | "unavailable" | "off", why)."""
        return self.watch.state, self.watch.reason


def _what(action: Action) -> str:
    if isinstance(action, Evict):
        return f"eviction of {action.model} ({action.reason})"
    return f"promote of {action.model} to {action.pool} ({action.reason})"


def describe_plan(actions: Iterable[Action], sizes: dict[str, int]) -> list[str]:
    """One line per action, for the log and slctl."""
    out = []
    for a in actions:
        size = format_size(sizes.get(a.model, 0))
        if isinstance(a, Evict):
            out.append(f"evict {a.model} ({size}): {a.reason}")
        else:
            out.append(f"promote {a.model} ({size}) to {a.pool}: {a.reason}")
    return out


class TieringCollector(Collector):
    """Automatic tiering's own series (Metrics.register), read at scrape time. Pools are
    labels (a few); models never are (a catalog of 100,000 models makes no series here)."""

    def __init__(self, tiering: AutoTiering) -> None:
        self.tiering = tiering

    def collect(self) -> Iterable[Metric]:
        t = self.tiering
        c = t.counters
        yield GaugeMetricFamily(
            "speedloader_tier_enabled",
            "1 while automatic tiering is on (autoTiering.enabled), else 0.",
            value=1 if t.enabled else 0,
        )
        yield GaugeMetricFamily(
            "speedloader_tier_opens_watched",
            "1 while the kernel's opens of model files are seen (fanotify), else 0.",
            value=1 if t.watch.state == "watching" else 0,
        )
        by_pool = (
            ("speedloader_tier_hits", "Uses of a model (a process opening its files) served "
             "wholly from a pool.", c.hits),
            ("speedloader_tier_hit_bytes", "Bytes of the models used from a pool (a use "
             "counts the whole model: opens are seen, not reads).", c.hit_bytes),
            ("speedloader_tier_promotions", "Automatic promotes that ended successfully.",
             c.promotions),
            ("speedloader_tier_copied_bytes", "Bytes automatic promotes copied into pools.",
             c.copied_bytes),
            ("speedloader_tier_evictions", "Automatic evictions (demotes) that ended "
             "successfully, by the pool they left.", c.evictions),
            ("speedloader_tier_thrash", "Models evicted within autoTiering.minResidency of "
             "their promote, or promoted again within it of their eviction.", c.thrash),
        )  # fmt: skip
        for name, doc, counts in by_pool:
            family = CounterMetricFamily(name, doc, labels=("pool",))
            for pool, n in sorted(counts.items()):
                family.add_metric((pool,), n)
            yield family
        yield CounterMetricFamily(
            "speedloader_tier_misses",
            "Uses of a model served (wholly or partly) from cold storage.",
            value=c.misses,
        )
        yield CounterMetricFamily(
            "speedloader_tier_miss_bytes",
            "Bytes of the models used from cold storage (a use counts the whole model).",
            value=c.miss_bytes,
        )
        yield CounterMetricFamily(
            "speedloader_tier_failures",
            "Automatic actions that could not start or failed (the log says why).",
            value=c.failures,
        )
        yield CounterMetricFamily(
            "speedloader_tier_open_events",
            "File open events of model files read from the kernel.",
            value=t.watch.events,
        )
        yield CounterMetricFamily(
            "speedloader_tier_open_overflows",
            "Times the kernel's queue of open events overflowed (opens were not seen).",
            value=t.watch.overflows,
        )
