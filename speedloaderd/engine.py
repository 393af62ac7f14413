"""The engine: promote, demote, pin, rescan and recovery, with no D-Bus in sight.

A promote reads as a straight line: validate -> placement -> journal -> copy (worker
thread, verified, renamed into place) -> swap symlinks -> collect garbage -> forget the
journal entry. Only the metadata steps hold the engine lock; copies run concurrently.

The engine orchestrates; the pieces have their own modules: the room promised to running
promotes (ledger.py), the pools (pool_registry.py), their connect, disconnect and resize
jobs (pool_jobs.py), the remote pools' watch (remote_watch.py), the config's edits
(config.py) and whether a new config is adopted live or rebuilds the engine (daemon.py).

Where a model lives is read from the models dir symlinks, never stored elsewhere, so the
state after any crash is whatever the links say, repaired by the journal.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import stat
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from . import freeing, health, holders, placement
from .catalog import availability, scan
from .catalog.types import FileRole, Model, ModelFile, ScanResult
from .config import (
    Config,
    DemotePolicy,
    PoolConfig,
    save_config,
    with_pin,
    with_pool,
    without_pin,
    without_pool,
)
from .copies import Copies
from .errors import Busy, Cancelled, Failed, NoSpace, NoSuchModel
from .events import EventKind, Listener
from .health import HealthReport
from .hostmem import MemInfo, read_meminfo
from .jobs import Job, run_job
from .journal import Entry, Journal
from .ledger import SpaceLedger
from .modelsdir import ModelsDir, Where
from .paths import check_model_name
from .pool_jobs import PoolJobs
from .pool_registry import PoolRegistry
from .pools import PoolState
from .promoted import Promoted
from .reload import reload_from_pool
from .remote_watch import RemoteWatch
from .roots import Root, ensure_trusted_dir, is_partial
from .sizes import format_size
from .tiers import COLD, ModelState
from .transfer import Progress, ProgressMeter
from .verified import Verified

log = logging.getLogger(__name__)

# Names the pool layer may create that are not model files.
_POOL_SKIP = {"lost+found"}
# Seconds between two probes of the remote pools (sysfs and /proc/mounts: cheap).
REMOTE_WATCH_INTERVAL = 3.0
# Seconds between two looks at cold storage while it is unavailable (a stat, a statvfs and
# one entry of the root listed: cheap even on NFS).
COLD_RETRY_INTERVAL = 5.0
# Seconds between two statvfs of the mounted pools that hold anything: RAM a demote freed
# stays used while a process maps the deleted copy, and is freed when that process exits,
# which no job of ours sees. One statvfs per pool: nothing else is read.
USAGE_WATCH_INTERVAL = 5.0


@dataclass(frozen=True, slots=True)
class ModelStatus:
    name: str
    format: str
    size: int
    tier: str  # COLD or a pool name
    pinned_pool: str  # "" when not pinned
    state: ModelState
    problems: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PoolStatus:
    name: str
    kind: str
    state: str
    path: str
    size: int
    used: int
    free: int
    speed: int
    problem: str = ""  # why the pool is degraded, in one sentence; "" when it is not


class Engine:
    def __init__(self, config: Config, config_path: Path | None = None):
        self.config = config
        self.config_path = config_path
        self.pools = PoolRegistry(config)
        self.pool_roots = self.pools.roots  # each pool's directory, by name
        self.catalog = ScanResult()
        self.users: dict[str, list[str]] = {}  # data rel -> names of models using it
        self.models_dir = ModelsDir(config.models_dir, config.storage.path, self.pool_roots)
        self.journal = Journal(config.journal_dir)
        self.promoted = Promoted(config.state_dir)  # the models that hold RAM
        self.jobs: dict[int, Job] = {}
        self.listeners: list[Listener] = []
        self._active: dict[str, Job] = {}  # model name -> its running job
        self.lock = asyncio.Lock()
        self.meminfo: Callable[[], MemInfo] = read_meminfo  # Health's look at host RAM
        self.ledger = SpaceLedger()  # room promised to promotes, copies under way
        # Blobs a copy verified, with their cold file's stamp: not hashed again (verified.py).
        self.verified = Verified(config.state_dir)
        # A copy preallocates its whole file when it starts: the pool's usage is published
        # then (the bus batches it), not at the usage watch's next look (measured before: a
        # 3 GiB promote of 12.6 s showed Pool.UsedBytes move only 5.04 s in).
        self.copies = Copies(
            self.models_dir,
            self.ledger,
            self._collect,
            lambda pool: self.emit(EventKind.POOL, pool),
            self.verified,
            lambda: self.config.storage.copy_streams,  # live: read at each admission
        )
        self._mounted_by_start: set[str] = set()  # pools this engine's start mounted
        self._rr_cursor = -1
        self.recovery_actions: list[str] = []
        self.pool_jobs = PoolJobs(self)  # connect, disconnect, resize
        self.remote_watch = RemoteWatch(self, self.pool_jobs)
        self.watch_interval = REMOTE_WATCH_INTERVAL
        self._watch: asyncio.Task[None] | None = None
        # Why cold storage is unavailable ("" when it is there): while it is, the catalog,
        # the links and the pool copies are kept as they are, and a retry task looks again.
        self.cold_problem = ""
        self.cold_retry_interval = COLD_RETRY_INTERVAL
        self._cold_retry: asyncio.Task[None] | None = None
        self.usage_interval = USAGE_WATCH_INTERVAL
        self._usage_watch: asyncio.Task[None] | None = None
        self._used_seen: dict[str, int] = {}  # pool -> UsedBytes last read (and published)
        # Called (blocking, in the unmounting thread) with a pool's path before it is
        # unmounted: the open watch lets go of its mount first (opens.py: a queued event
        # holds the mount, and umount would say it is busy).
        self.before_unmount: list[Callable[[Path], None]] = []
        # Automatic tiering, when on: before a promote copies, evict what must go to make
        # room (autotiering.py); None: a promote that does not fit fails NoSpace.
        self.make_room: Callable[[Job, Model], Awaitable[None]] | None = None

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Mount pools, scan cold storage, recover from any crash, sync the models dir;
        then watch the remote pools."""
        await asyncio.to_thread(self._start_blocking)
        self._watch_cold_storage()
        self._usage_watch = asyncio.get_running_loop().create_task(
            self._watch_usage(), name="pool-usage-watch"
        )
        if self.pools.remote():
            self._watch = asyncio.get_running_loop().create_task(
                self.remote_watch.run(self.watch_interval), name="remote-pool-watch"
            )

    def stop_watching(self) -> None:
        """Stop the remote pool watch (at shutdown, or when a new engine takes over)."""
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._cold_retry is not None:
            self._cold_retry.cancel()
            self._cold_retry = None
        if self._usage_watch is not None:
            self._usage_watch.cancel()
            self._usage_watch = None

    def close(self) -> None:
        """This engine is done (stopped, or replaced): no more watching, no new copies.
        Copy threads still blocked are not waited for."""
        self.stop_watching()
        self.copies.close()

    def abandon_start(self, keep: Iterable[Path] = ()) -> list[str]:
        """Undo what a failed or unwanted start did that matters: unmount the pools it
        mounted (they hold nothing yet), except those at a path in ``keep`` (another engine
        uses them). Blocking. Returns the pools unmounted."""
        self.close()
        keep = set(keep)
        undone = []
        for name in sorted(self._mounted_by_start):
            pool = self.pools[name]
            if pool.path in keep:
                continue
            try:
                self.unmounting(pool.path)
                pool.unmount()
                undone.append(name)
            except Exception as err:  # report, and go on with the others
                log.error("could not unmount pool %s after a failed start: %s", name, err)
        self._mounted_by_start.clear()
        return undone

    def unmounting(self, path: Path) -> None:
        """Tell the before_unmount hooks (blocking) that the pool at ``path`` goes now."""
        for hook in list(self.before_unmount):
            try:
                hook(path)
            except Exception:
                log.exception("before-unmount hook failed")

    async def reassert(self) -> None:
        """After another engine's failed start touched shared paths (a pool remounted to
        its size, links synced to its catalog), make them this engine's again."""
        async with self.lock:
            await asyncio.to_thread(self._reassert_blocking)

    def _reassert_blocking(self) -> None:
        self.models_dir.ensure()
        for pool in self.pools.tmpfs():
            if pool.state() is PoolState.MOUNTED:
                pool.mount()  # adopts our mount, remounting it to our size if it differs
        self.models_dir.sync(self.catalog, self.pools.mounted())

    def _start_blocking(self) -> None:
        ensure_trusted_dir(self.config.state_dir, "stateDir")
        self.journal.open()
        self.verified.load()
        self.models_dir.ensure()
        for pool in self.pools.values():
            try:
                was_mounted = pool.state() is not PoolState.UNMOUNTED
                pool.startup()  # tmpfs: mount or adopt; remote: adopt if still connected
                if not was_mounted and pool.state() is not PoolState.UNMOUNTED:
                    self._mounted_by_start.add(pool.name)
            except Exception as err:  # one bad pool must not keep the others down
                log.error("pool %s not mounted: %s", pool.name, err)
        found = self._scan(adopt=False)
        if found is not None:
            self._adopt(found[0])
        self.recovery_actions = self.recover()
        if found is not None:
            self._remember_cold(found[1])

    def _scan(self, adopt: bool) -> tuple[ScanResult, availability.ColdLook] | None:
        """A new catalog, not yet adopted; None when cold storage is unavailable (then
        ``cold_problem`` says why and nothing may be pruned). ``adopt``: a person asked."""
        cold = self.config.storage.path
        seen = availability.look(cold)
        last = availability.load_record(Root(self.config.state_dir, "state dir"))
        expected = last.models if last is not None else 0
        if not isinstance(seen, str) and seen.empty and not expected:
            # No record (first start since it was kept): links into cold storage are the
            # evidence that models were there.
            expected = sum(1 for e in self.models_dir.walk() if e.is_link)
        why = availability.judge(seen, last, expected, adopt=adopt)
        problem = f"cold storage {cold} {why}" if why else ""
        if problem and problem != self.cold_problem:  # once per change, not every retry
            log.warning("%s; keeping the catalog, the links and the RAM copies", problem)
        self.cold_problem = problem
        if problem:
            return None
        assert not isinstance(seen, str)
        return scan(cold, self.config.backend.type.value), seen

    def _adopt(self, catalog: ScanResult) -> None:
        users: dict[str, list[str]] = defaultdict(list)
        for model in catalog.models.values():
            for rel in {f.rel for f in model.data_files}:
                users[rel].append(model.name)
        self.catalog, self.users = catalog, dict(users)
        bad = sum(1 for m in catalog.models.values() if not m.ok)
        log.info(
            "catalog: %d models on %s (%d with problems, %d scan problems)",
            len(catalog.models),
            self.config.storage.path,
            bad,
            len(catalog.problems),
        )

    def _remember_cold(self, seen: availability.ColdLook) -> None:
        """Record the filesystem and model count of a scan that was believed and synced."""
        record = availability.ColdRecord(seen.dev, seen.fsid, len(self.catalog.models))
        state = Root(self.config.state_dir, "state dir")
        if availability.load_record(state) != record:
            availability.save_record(state, record)

    def recover(self) -> list[str]:
        """Finish or roll back what a crash interrupted; then make links and pools agree.

        Promote entries roll forward when every file reached its final name in the pool
        (final names are only given to complete, verified copies), else roll back. Demote
        entries always roll forward: pointing at cold storage is always valid."""
        actions = [f"removed half-written link {r}" for r in self.models_dir.remove_temp_links()]
        mounted = self.pools.mounted()
        self.promoted.load(lambda: [n for n in self.catalog.models if self._hot(n, mounted)])
        for entry in self.journal.pending():
            actions.append(self._replay(entry, mounted))
            self.journal.remove(entry.id)
        if self.cold_problem:  # no sync, no gc: links and RAM copies wait for cold storage
            actions.append(f"kept the models dir and pools as they are: {self.cold_problem}")
        else:
            report = self.models_dir.sync(self.catalog, mounted)
            self._forget_cold(self.promoted.names, mounted)
            actions += [f"repointed {rel} to cold storage" for rel in report.repointed_to_cold]
            actions += [f"removed stale entry {rel}" for rel in report.removed]
            for name in mounted:
                actions += [f"removed {p} from pool {name}" for p in self.gc_pool(name)]
        for a in actions:
            log.info("recovery: %s", a)
        return actions

    def _replay(self, entry: Entry, mounted: set[str]) -> str:
        if entry.op == "promote" and entry.pool in mounted:
            tree = self.models_dir.pool(entry.pool)
            sizes = self._sizes(entry.rels)
            complete = all(
                (st := tree.lstat(rel)) is not None
                and stat.S_ISREG(st.st_mode)
                and st.st_size == sizes.get(rel, -1)
                for rel in entry.rels
            )
            if complete:
                for rel in entry.rels:
                    self.models_dir.point_pool(rel, entry.pool)
                self.promoted.add(entry.model)
                return f"finished interrupted promote of {entry.model} to {entry.pool}"
            return f"rolled back interrupted promote of {entry.model}"
        if entry.op == "demote":
            for rel in entry.rels:
                self.models_dir.point_cold(rel)
            self.promoted.discard([entry.model])
            return f"finished interrupted demote of {entry.model}"
        return f"dropped interrupted {entry.op} of {entry.model}"

    def _sizes(self, rels: Iterable[str]) -> dict[str, int]:
        out = {}
        for rel in rels:
            for name in self.users.get(rel, ()):
                for f in self.catalog.models[name].data_files:
                    if f.rel == rel:
                        out[rel] = f.size
        return out

    # --- reading state -----------------------------------------------------------------

    def model(self, name: str) -> Model:
        check_model_name(name)
        try:
            return self.catalog.models[name]
        except KeyError:
            raise NoSuchModel(
                f"no model named {name!r} on cold storage {self.config.storage.path}; "
                "run a rescan if it was just added"
            ) from None

    def _where(self, model: Model) -> dict[str, Where]:
        return {f.rel: self.models_dir.where(f.rel) for f in model.data_files}

    def _is_hot(self, where: dict[str, Where], mounted: set[str]) -> bool:
        return bool(where) and all(w.in_pool(mounted) for w in where.values())

    def _hot(self, name: str, mounted: set[str]) -> bool:
        model = self.catalog.models.get(name)
        return model is not None and self._is_hot(self._where(model), mounted)

    def _forget_cold(self, names: Iterable[str], mounted: set[str]) -> None:
        """Drop from the promoted set those of ``names`` no longer hot (or gone): a pool
        disconnect, a lost pool or a rescan ended their promote."""
        self.promoted.discard([n for n in list(names) if not self._hot(n, mounted)])

    def model_status(self, name: str, mounted: set[str] | None = None) -> ModelStatus:
        model = self.model(name)
        mounted = self.pools.mounted() if mounted is None else mounted
        where = self._where(model)
        sizes = {f.rel: f.size for f in model.data_files}
        tier, state = COLD, ModelState.COLD
        if not all(w.valid(mounted) for w in where.values()):
            state = ModelState.DEGRADED
        elif self._is_hot(where, mounted):
            by_pool: Counter[str] = Counter()
            for rel, w in where.items():
                by_pool[w.tier or ""] += sizes[rel]
            tier, state = by_pool.most_common(1)[0][0], ModelState.HOT
        if not model.ok:
            state = ModelState.DEGRADED
        job = self._active.get(name)
        if job is not None:
            state = ModelState.PROMOTING if job.operation == "promote" else ModelState.DEMOTING
        return ModelStatus(
            name=model.name,
            format=model.format.value,
            size=model.size,
            tier=tier,
            pinned_pool=self.config.model_placement.pinned.get(name, ""),
            state=state,
            problems=model.problems,
        )

    def model_statuses(self) -> list[ModelStatus]:
        mounted = self.pools.mounted()
        return [self.model_status(n, mounted) for n in self.catalog.models]

    def models_in_ram(self) -> list[str]:
        """Models with any file served from a mounted pool, hot or partly so (a degraded
        model whose links point at cold storage or at a missing pool holds no RAM)."""
        mounted = self.pools.mounted()
        return [
            model.name
            for model in self.catalog.models.values()
            if any(w.in_pool(mounted) for w in self._where(model).values())
        ]

    def file_index(self) -> holders.FileIndex:
        """The files whose holders the bus shows: every model's cold files (the scan's
        device and inode), its pool copies (an fstat each, through the pool's root) and each
        mounted pool's device. Pools given up as lost are left out: I/O there may hang.
        100,000 models take about 20 MB here: one small tuple of names per file."""
        mounted = set()
        for name in self.pools.mounted():
            pool = self.pools.get(name)
            if pool is not None and not pool.problem:
                mounted.add(name)
        pool_devices: dict[int, str] = {}
        for name in sorted(mounted):
            st = self.models_dir.pool(name).stat_dir("")
            if st is not None:
                pool_devices[st.st_dev] = name
        files: dict[holders.FileKey, tuple[str, ...]] = {}
        for model in self.catalog.models.values():
            for f in model.data_files:
                keys = []
                if f.ident is not None:
                    keys.append((f.ident.dev, f.ident.ino))
                where = self.models_dir.where(f.rel)
                if where.tier is not None and where.tier in mounted:
                    st = self.models_dir.pool(where.tier).stat_file(f.rel)
                    if st is not None:
                        keys.append((st.st_dev, st.st_ino))
                for key in keys:
                    if model.name not in files.get(key, ()):
                        files[key] = (*files.get(key, ()), model.name)
        return holders.FileIndex(files, pool_devices)

    def models_of_path(self, path: str) -> list[str]:
        """The models using the file a server names by ``path``: the models dir link, the
        cold file or a pool copy (compared as text: the server's word, nothing is opened)."""
        roots = [self.config.models_dir, self.config.storage.path, *self.pool_roots.values()]
        for root in roots:
            prefix = str(root).rstrip("/") + "/"
            if path.startswith(prefix):
                return list(self.users.get(path[len(prefix) :], ()))
        return []

    def pool_status(self, name: str) -> PoolStatus:
        pool = self.pools.lookup(name)
        state = pool.state()
        size, used, free = pool.size, 0, 0
        if state is PoolState.MOUNTED:
            usage = pool.usage()
            size, used, free = usage.size, usage.used, usage.free
            self._used_seen[name] = used  # what the bus publishes; the usage watch diffs it
        return PoolStatus(
            name=pool.name,
            kind=pool.kind,
            state=state.value,
            path=str(pool.path),
            size=size,
            used=used,
            free=free,
            speed=pool.speed,
            problem=pool.problem if state is PoolState.DEGRADED else "",
        )

    def pool_statuses(self) -> list[PoolStatus]:
        return [self.pool_status(n) for n in self.pools]

    # --- events ------------------------------------------------------------------------

    def emit(self, kind: EventKind, name: str) -> None:
        for listener in list(self.listeners):
            try:
                listener(kind, name)
            except Exception:
                log.exception("engine listener failed")

    def _emit_models(self, rels: Iterable[str], also: Iterable[str] = ()) -> None:
        names = set(also)
        for rel in rels:
            names.update(self.users.get(rel, ()))
        for name in sorted(names):
            self.emit(EventKind.MODEL, name)

    def start_job(self, job: Job, body: Callable[[Job], Awaitable[str]]) -> Job:
        self.jobs[job.id] = job
        if job.model is not None:
            self._active[job.model] = job

        def done(j: Job) -> None:
            if j.finished:
                if j.model is not None and self._active.get(j.model) is j:
                    del self._active[j.model]
                    self.emit(EventKind.MODEL, j.model)
                level = logging.INFO if j.state.value == "succeeded" else logging.WARNING
                log.log(level, "job %d %s %s: %s", j.id, j.operation, j.state.value, j.message)
            self.emit(EventKind.JOB, str(j.id))

        job.listeners.append(done)
        if job.reason:
            log.info("job %d %s %s started: %s", job.id, job.operation, job.model, job.reason)
        run_job(job, body)
        self.emit(EventKind.JOB, str(job.id))
        if job.model is not None:
            self.emit(EventKind.MODEL, job.model)
        return job

    async def shutdown(self, timeout: float = 20.0) -> None:
        """Cancel what can be cancelled and wait for every job to end, so a stop leaves no
        partial copy and no journal entry behind (a stop is not a crash). A copy blocked
        in a read that never returns is abandoned after copies.COPY_CANCEL_GRACE; its
        partial file is removed by recovery at the next start."""
        self.stop_watching()
        running = [j for j in self.jobs.values() if not j.finished]
        for job in running:
            job.cancel()  # a job past its point of no return finishes instead
        if running:
            log.info("stopping: waiting for %d job(s) to end", len(running))
            done, pending = await asyncio.wait(
                [asyncio.ensure_future(j._done.wait()) for j in running], timeout=timeout
            )
            for task in pending:
                task.cancel()
            if pending:
                log.warning(
                    "%d job(s) did not end in %.0f s; recovery finishes them", len(pending), timeout
                )
        if self.copies.abandoned:
            log.warning(
                "stopping with %d copy thread(s) still blocked reading cold storage; "
                "recovery removes their partial files at the next start",
                len(self.copies.abandoned),
            )
        self.close()

    def _progress(self, job: Job, p: Progress) -> None:
        if job.finished:  # a report queued by the copy thread, arriving after the end
            return
        job.bytes_done, job.rate, job.eta = p.done, p.rate, p.eta
        job.notify()

    # --- promote -----------------------------------------------------------------------

    def promote(
        self,
        name: str,
        pool: str | None = None,
        started_by_uid: int = 0,
        reload: bool = False,
        reason: str = "",
    ) -> Job:
        """Start copying ``name`` into a RAM pool; returns its Job at once. ``reload``: then
        have the backend load it again from the pool if it had it loaded from cold storage
        (also done when backend.reloadAfterPromote is set). ``reason``: why the daemon
        started it itself (automatic tiering), logged and on the Job.

        A second request for a model already being promoted joins the running Job."""
        model = self.model(name)
        if pool:
            self.pools.lookup(pool)
        if not model.ok:
            raise Failed(f"model {name!r} cannot be promoted: {model.problems[0]}")
        active = self._active.get(name)
        if active is not None:
            if active.operation == "promote" and (not pool or active.pool in (None, pool)):
                return active
            raise Busy(
                f"model {name!r} is busy with {active.operation} (job {active.id}); "
                "wait for it or cancel it"
            )
        job = Job(
            "promote",
            model=name,
            pool=pool or None,
            started_by_uid=started_by_uid,
            reload=reload,
            reason=reason,
        )
        return self.start_job(job, self._promote)

    def _choose_pool(self, model: Model, requested: str | None, mounted: set[str]) -> str:
        candidates = []
        for name, pool in self.pools.items():
            online = name in mounted
            # Room already promised to promotes still copying into this pool is not free.
            free = self.ledger.free(pool) if online else 0
            tree = self.models_dir.pool(name)
            need = sum(
                f.size
                for f in _unique(model.data_files)
                if tree.lstat(f.rel) is None and (name, f.rel) not in self.ledger.copies
            )
            candidates.append(
                placement.Candidate(
                    name=name, speed=pool.speed, free=free, need=need, online=online
                )
            )
        decision = placement.place(
            candidates,
            placement.Strategy(self.config.model_placement.default_strategy.value),
            pinned=self.config.model_placement.pinned.get(model.name),
            requested=requested,
            rr_cursor=self._rr_cursor,
        )
        self._rr_cursor = decision.rr_cursor
        return decision.pool

    def fits(self, model: Model, requested: str | None) -> bool:
        """Whether placement finds a pool with room for ``model`` now (blocking; chooses
        nothing: the round-robin cursor is left as it was)."""
        cursor = self._rr_cursor
        try:
            self._choose_pool(model, requested, self.pools.mounted())
            return True
        except NoSpace:
            return False
        finally:
            self._rr_cursor = cursor

    def bytes_to_copy(self, model: Model, pool: str) -> int:
        """Bytes a promote of ``model`` into ``pool`` would copy (blobs already there are
        not copied again). Blocking: an lstat per file."""
        tree = self.models_dir.pool(pool)
        return sum(f.size for f in _unique(model.data_files) if tree.lstat(f.rel) is None)

    def active_models(self) -> set[str]:
        """Models with a job running (promote or demote)."""
        return set(self._active)

    async def _promote(self, job: Job) -> str:
        if self.make_room is not None:  # automatic tiering, when on: evict what must go
            assert job.model is not None
            await self.make_room(job, self.model(job.model))
        message = await self._copy_in(job)
        backend = self.config.backend
        if job.reload or backend.reload_after_promote:
            assert job.model is not None
            model = self.model(job.model)
            async with self.lock:
                cold, copies = await asyncio.to_thread(self._cold_and_pool_files, model)
            clause = await reload_from_pool(
                job, model.name, cold, copies, backend, self.models_of_path, job.reload
            )
            if clause:
                message += f"; {clause}"
        return message

    def _cold_and_pool_files(self, model: Model) -> tuple[list[freeing.Copy], list[freeing.Copy]]:
        """A model's cold files (by the scan's device and inode) and its pool copies (an
        fstat each through the pool's root), for who maps which."""
        cold = [
            freeing.Copy((f.ident.dev, f.ident.ino), COLD, f.rel, f.size)
            for f in model.data_files
            if f.ident is not None
        ]
        mounted = self.pools.mounted()
        where = self._where(model)
        copies = []
        for f in model.data_files:
            pool = where[f.rel].tier
            if pool is None or pool == COLD or pool not in mounted:
                continue
            st = self.models_dir.pool(pool).stat_file(f.rel)
            if st is not None:
                copies.append(freeing.Copy((st.st_dev, st.st_ino), pool, f.rel, f.size))
        return cold, copies

    async def _copy_in(self, job: Job) -> str:
        assert job.model is not None
        model = self.model(job.model)
        files = _unique(model.data_files)
        rels = tuple(f.rel for f in files)
        async with self.lock:
            mounted = await asyncio.to_thread(self.pools.mounted)
            where = self._where(model)
            pinned = self.config.model_placement.pinned.get(model.name)
            wanted = job.pool or pinned
            if self._is_hot(where, mounted) and (
                wanted is None or all(w.tier == wanted for w in where.values())
            ):
                tier = next(iter(where.values())).tier
                job.pool = job.pool or tier
                # Hot through another model's blobs until now; from now on it holds them.
                await asyncio.to_thread(self.promoted.add, model.name)
                return f"{model.name} is already hot in pool {tier}"
            target = await asyncio.to_thread(self._choose_pool, model, job.pool, mounted)
            job.pool = target
            moving = await asyncio.to_thread(self._copies_elsewhere, model, target)
            tree = self.models_dir.pool(target)
            to_copy = [f for f in files if tree.lstat(f.rel) is None]
            if moving and self.config.backend.demote_policy is DemotePolicy.REFUSE:
                # The move deletes the copy in the old pool once the links point at the new
                # one: under refuse that is refused while anybody maps it, as a demote is.
                still = await asyncio.to_thread(freeing.held, moving)
                if still:
                    raise Busy(
                        f"{freeing.describe(still)} maps {model.name}'s RAM copy in pool "
                        f"{still_pool(still)} ({format_size(freeing.held_bytes(still))}); "
                        "moving it would delete that copy and free nothing: stop it, or "
                        "set backend.demotePolicy to wait or force; nothing was copied"
                    )
            entry = Entry(
                f"promote-{job.id}-{secrets.token_hex(3)}", "promote", model.name, target, rels
            )
            # The journal first: if it cannot be written (state dir full or read-only), the
            # promote fails having reserved nothing, so placement still sees the room.
            await asyncio.to_thread(self.journal.write, entry)
            job.bytes_total = sum(f.size for f in to_copy)
            self.ledger.reserve(job.id, target, rels, job.bytes_total)
        loop = asyncio.get_running_loop()

        def report(p: Progress) -> None:  # in a copy thread
            loop.call_soon_threadsafe(self._progress, job, p)

        meter = ProgressMeter(job.bytes_total, report)
        started = time.monotonic()
        ok = False
        try:
            trusted = await self._copy_files(target, to_copy, meter, job)
            meter.finish()
            async with self.lock:
                if not await asyncio.to_thread(self.pools[target].takes_links):
                    raise Failed(f"pool {target!r} went away during the promote of {model.name}")
                job.cancelable = False  # past this point the swap is quick and must finish
                await asyncio.to_thread(self._swap_to_pool, rels, target)
                ok = True
                # Before the journal entry goes: a crash here replays the promote, adding it.
                await asyncio.to_thread(self.promoted.add, model.name)
        finally:
            async with self.lock:  # placement reads the ledger under this lock
                self.ledger.unreserve(job.id)
                if not ok:
                    await asyncio.to_thread(self._gc_rels, target, rels)
                await asyncio.to_thread(self.journal.remove, entry.id)
            self._emit_models(rels)
            self.emit(EventKind.POOL, target)
        secs = time.monotonic() - started
        again = ""
        if trusted:
            blobs = "blob" if trusted == 1 else "blobs"
            again = f"; {trusted} {blobs} verified before and unchanged, not hashed again"
        held = ""
        if moving:
            # The old pool's copies are gone from the links and deleted; tmpfs keeps their
            # pages while a process maps them (the server loaded it from there): say so, as
            # a demote does, and the pool's HeldBytes counts them until it lets go.
            still = await asyncio.to_thread(self._held_deleted, moving)
            if still:
                held = (
                    f"; {format_size(freeing.held_bytes(still))} stays in use in pool "
                    f"{still_pool(still)} while {freeing.describe(still)} maps the old copy "
                    "(it reads the new one once it loads the model again)"
                )
        return (
            f"promoted {model.name} to pool {target}: "
            f"{format_size(job.bytes_total)} copied in {secs:.1f}s{again}{held}"
        )

    def _held_deleted(
        self, copies: list[freeing.Copy]
    ) -> dict[freeing.Copy, frozenset[holders.Process]]:
        """Of ``copies``, those deleted (no longer in their pool) that a process still holds:
        a blob another model keeps in the old pool was not deleted (blocking)."""
        out = {}
        for copy, procs in freeing.held(copies).items():
            tree = self.models_dir.pool(copy.pool)
            if tree.lstat(copy.rel) is None:
                out[copy] = procs
        return out

    def _copies_elsewhere(self, model: Model, target: str) -> list[freeing.Copy]:
        """The model's copies in pools other than ``target``: a promote there moves it, and
        the swap deletes these (blocking: an fstat each)."""
        return [c for c in self._cold_and_pool_files(model)[1] if c.pool != target]

    async def _copy_files(
        self, pool: str, files: list[ModelFile], meter: ProgressMeter, job: Job
    ) -> int:
        """Copy a promote's files side by side, each as soon as its source filesystem has a
        stream free (copies.py, streams.py); returns how many blobs were trusted without a
        new hash. The first failure stops the others as a cancel would (at their next chunk,
        or abandoned after the cancel grace) and is what the job reports; this returns only
        once every copy has ended, so the caller's clean-up sees no copy still running."""
        tasks = [asyncio.ensure_future(self.copies.copy(pool, f, meter, job)) for f in files]
        if not tasks:
            return 0
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        except asyncio.CancelledError:  # the job's task itself: stop the copies, then go
            job.cancel_event.set()
            job.cancel_requested.set()
            raise
        failed = [e for t in done if (e := t.exception()) is not None]
        if pending:
            # One file failed: every partial copy of the promote goes, so the others need
            # not run on. The job's own cancel flags are what the copies watch.
            job.cancel_event.set()
            job.cancel_requested.set()
            await asyncio.wait(pending)
        errors = [e for t in tasks if (e := t.exception()) is not None]
        if errors:
            # The cause: a failure seen first, before the Cancelled it gave its siblings
            # (a user's cancel is a Cancelled everywhere).
            first = [e for e in failed if not isinstance(e, Cancelled)] or failed or errors
            raise first[0]
        return sum(1 for t in tasks if (r := t.result()) is not None and r.trusted)

    def clear_stale_reservations(self) -> list[str]:
        """Drop reservations no running promote owns (a bug's leak must not hold a pool's
        room until restart). Under the engine lock; returns what was dropped."""
        running = {j.id for j in self.jobs.values() if j.operation == "promote" and not j.finished}
        return self.ledger.clear_stale(running)

    async def _collect(self, pool: str, rel: str) -> None:
        async with self.lock:
            if pool in await asyncio.to_thread(self.pools.mounted):
                await asyncio.to_thread(self._gc_rels, pool, [rel])
        self.emit(EventKind.POOL, pool)

    def _swap_to_pool(self, rels: Iterable[str], pool: str) -> None:
        old_pools = set()
        for rel in rels:
            w = self.models_dir.where(rel)
            if w.tier == pool and w.exists:
                continue
            if w.tier not in (None, COLD):
                old_pools.add(w.tier)
            self.models_dir.point_pool(rel, pool)
        for old in old_pools:
            self._gc_rels(old, rels)

    # --- demote ------------------------------------------------------------------------

    def demote(self, name: str, started_by_uid: int = 0, reason: str = "") -> Job:
        """Repoint ``name`` to cold storage and free its RAM; returns its Job at once.
        ``reason``: why the daemon started it itself (automatic tiering's eviction)."""
        self.model(name)
        if self.cold_problem:  # the links would point at files that are not there
            raise Failed(
                f"{self.cold_problem}; {name} keeps its RAM copy until cold storage is back"
            )
        active = self._active.get(name)
        if active is not None:
            if active.operation == "demote":
                return active
            raise Busy(
                f"model {name!r} is being promoted (job {active.id}); "
                "cancel that job first or wait for it"
            )
        return self.start_job(
            Job("demote", model=name, started_by_uid=started_by_uid, reason=reason), self._demote
        )

    async def _demote(self, job: Job) -> str:
        assert job.model is not None
        model = self.model(job.model)
        # Whoever maps a copy about to be deleted is asked to let go first (freeing.py):
        # outside the engine lock, since that may take demoteTimeout seconds.
        async with self.lock:  # a look at the links and the users: quick, but consistent
            copies = await asyncio.to_thread(self._copies_to_free, model)
        let_go = await freeing.let_go(
            job, model.name, copies, self.config.backend, self.models_of_path
        )
        async with self.lock:
            was_hot = await asyncio.to_thread(self._hot, model.name, self.pools.mounted())
            released, kept_for, also_cold = await asyncio.to_thread(self._release, model, None, job)
        self._emit_models(released, [model.name])
        for pool in self.pools:  # usage changed in whichever pools held the copies
            self.emit(EventKind.POOL, pool)
        if not released and not was_hot:
            return f"{model.name} is already cold; nothing freed"
        if not released:
            held = ", ".join(sorted(kept_for))
            return (
                f"{model.name}: nothing freed; shared blobs stay in RAM for {held} "
                f"(promoted), so {model.name} stays hot until that is demoted too"
            )
        # RAM is freed only if nobody holds the deleted copy: looked at again, after the
        # delete, so a holder that came while the lock was taken is not reported as freed.
        gone = set(released)
        still = await asyncio.to_thread(freeing.held, [c for c in copies if c.rel in gone])
        held_bytes = freeing.held_bytes(still)
        msg = f"demoted {model.name}: {format_size(job.bytes_total - held_bytes)} freed"
        if let_go.unloaded:  # the server's word, believed only where /proc agrees
            verb = "says it unloaded it" if still else "unloaded it first"
            msg += f" ({let_go.unloaded} {verb})"
        if still:
            msg += (
                f"; {format_size(held_bytes)} stays in use in the pool while "
                f"{freeing.describe(still)} maps the deleted copy"
            )
        if also_cold:
            verb = "is" if len(also_cold) == 1 else "are"
            msg += f"; {', '.join(sorted(also_cold))} shared those blobs and {verb} now cold too"
        if kept_for:
            msg += f"; shared blobs stay in RAM for {', '.join(sorted(kept_for))}"
        return msg

    def _copies_to_free(self, model: Model) -> list[freeing.Copy]:
        """The pool copies a demote of ``model`` would delete now (a plan: _release decides
        again under the lock), each fstat'ed through its pool's root for (dev, ino)."""
        release, _ = self._plan_release(model, None)
        sizes = {f.rel: f.size for f in model.data_files}
        where = self._where(model)
        mounted = self.pools.mounted()
        out = []
        for rel in release:
            pool = where[rel].tier
            if pool is None or pool == COLD or pool not in mounted:
                continue
            st = self.models_dir.pool(pool).stat_file(rel)
            if st is not None:
                out.append(freeing.Copy((st.st_dev, st.st_ino), pool, rel, sizes.get(rel, 0)))
        return out

    def _plan_release(self, model: Model, only_pool: str | None) -> tuple[list[str], set[str]]:
        """Which of a model's pool copies a release would delete (those in ``only_pool``, if
        given): the ones no other model holds. A holder is a model that was promoted (see
        promoted.py) and is hot; one hot only through another's blobs holds nothing.
        Returns (rels to release, holders that keep blobs)."""
        mounted = self.pools.mounted()
        where = self._where(model)
        demoting = self._demoting()
        release: list[str] = []
        kept_for: set[str] = set()
        for rel, w in where.items():
            if w.tier == COLD or (only_pool is not None and w.tier != only_pool):
                continue
            holders = [
                other
                for other in self.users.get(rel, ())
                if other != model.name
                and other not in demoting
                and other in self.promoted
                and self._hot(other, mounted)
            ]
            if holders and only_pool is None:
                kept_for.update(holders)
            else:
                release.append(rel)
        return release, kept_for

    def _release(
        self, model: Model, only_pool: str | None, job: Job | None
    ) -> tuple[list[str], set[str], set[str]]:
        """Point a model's links back to cold (those in ``only_pool``, if given) and delete
        the pool copies no other model holds (_plan_release). Returns (rels released,
        holders that kept blobs, other models made cold by it). Journaled; runs under the
        engine lock."""
        mounted = self.pools.mounted()
        where = self._where(model)
        sizes = {f.rel: f.size for f in model.data_files}
        release, kept_for = self._plan_release(model, only_pool)
        if not release:
            if only_pool is None:  # asked to demote: it no longer holds anything
                self.promoted.discard([model.name])
            return [], kept_for, set()
        sharing = {other for rel in release for other in self.users.get(rel, ())} - {model.name}
        hot_before = {other for other in sharing if self._hot(other, mounted)}
        pools = {where[rel].tier for rel in release} - {None, COLD}
        entry = Entry(f"demote-{secrets.token_hex(4)}", "demote", model.name, None, tuple(release))
        self.journal.write(entry)
        if job is not None:
            job.bytes_total = sum(sizes[r] for r in release)
        for rel in release:
            self.models_dir.point_cold(rel)
        for pool in pools:
            if pool in mounted:
                self._gc_rels(pool, release)
        # Before the journal entry goes: a crash here replays the demote, forgetting it.
        self._forget_cold([model.name, *hot_before], mounted)
        self.journal.remove(entry.id)
        if job is not None:
            job.bytes_done = job.bytes_total
        return release, kept_for, {o for o in hot_before if not self._hot(o, mounted)}

    def jobs_running(self) -> bool:
        """Is a promote or demote running? (Health leaves their temporary names alone.)"""
        return bool(self._active) or any(
            j.operation == "promote" and not j.finished for j in list(self.jobs.values())
        )

    def _demoting(self) -> set[str]:
        return {n for n, j in self._active.items() if j.operation == "demote"}

    # --- garbage collection ------------------------------------------------------------

    def _gc_rels(self, pool: str, rels: Iterable[str]) -> list[str]:
        """Delete pool copies of ``rels`` that no link points to and no promote reserved."""
        root = self.pool_roots[pool]
        tree = self.models_dir.pool(pool)
        removed = []
        for rel in rels:
            if self.ledger.holds(pool, rel):
                continue
            if self.models_dir.where(rel).target == str(root / rel):
                continue
            if tree.unlink(rel):
                removed.append(rel)
                tree.prune(rel.rpartition("/")[0])
        return removed

    def gc_pool(self, pool: str) -> list[str]:
        """Delete everything in a pool that no link points to: partial copies left by a
        crash, and complete copies whose promote was rolled back."""
        tree = self.models_dir.pool(pool)
        removed = []
        for e in tree.walk():
            if e.rel.split("/", 1)[0] in _POOL_SKIP:
                continue
            if is_partial(e.rel.rpartition("/")[2]):
                if self.ledger.copying_into(pool):
                    continue  # a copy is running; its temp file is not an orphan
                tree.unlink(e.rel)
                removed.append(e.rel)
            elif self._gc_rels(pool, [e.rel]):
                removed.append(e.rel)
        tree.prune_empty(keep=_POOL_SKIP)
        return removed

    # --- pins --------------------------------------------------------------------------

    async def pin(self, name: str, pool: str, started_by_uid: int = 0) -> Job | None:
        """Pin a model to a pool. If it is hot elsewhere, start moving it (returns that Job)."""
        self.model(name)
        self.pools.lookup(pool)
        await self.set_config(with_pin(self.config, name, pool))
        status = self.model_status(name)
        if status.state is ModelState.HOT and status.tier != pool:
            return self.promote(name, pool, started_by_uid)
        return None

    async def unpin(self, name: str) -> None:
        check_model_name(name)
        await self.set_config(without_pin(self.config, name))

    async def set_config(self, new: Config) -> None:
        """Adopt a validated config for placement and pins; save it if we have a file."""
        if self.config_path is not None:
            await asyncio.to_thread(save_config, new, self.config_path)
        old_pins, self.config = self.config.model_placement.pinned, new
        self.copies.streams.limit_changed()  # storage.copyStreams may have grown
        for pool in self.pools.remote():
            pool.ssh_key_path = new.ssh_key_path
        self.emit(EventKind.CONFIG, "")
        new_pins = new.model_placement.pinned
        for name in sorted(set(old_pins) | set(new_pins)):
            if old_pins.get(name) != new_pins.get(name) and name in self.catalog.models:
                self.emit(EventKind.MODEL, name)

    # --- pools -------------------------------------------------------------------------

    def connect_pool(self, name: str, started_by_uid: int = 0) -> Job:
        return self.pool_jobs.connect(name, started_by_uid)

    def disconnect_pool(self, name: str, started_by_uid: int = 0) -> Job:
        return self.pool_jobs.disconnect(name, started_by_uid)

    def resize_pool(self, name: str, size: int, started_by_uid: int = 0) -> Job:
        return self.pool_jobs.resize(name, size, started_by_uid)

    def evacuate(self, pool: str) -> tuple[list[str], int]:
        """Point every link into ``pool`` back at cold storage. Returns the models touched
        (their state may change) and how many of them were wholly hot there: a cold model
        that merely shares a blob with a hot one is touched, not moved."""
        affected = []
        for model in self.catalog.models.values():
            tiers = [w.tier for w in self._where(model).values()]
            if pool in tiers:  # looked at before any release: releases repoint shared links
                affected.append((model, all(t == pool for t in tiers)))
        for model, _ in affected:
            self._release(model, pool, None)
        return [m.name for m, _ in affected], sum(hot for _, hot in affected)

    async def let_go_of_pool(self, job: Job, pool: str) -> None:
        """Before a disconnect: whoever maps a model's copy in ``pool`` is asked to let go, per
        model as its demote would ask (the backend unloads it, then demotePolicy); Busy when
        one does not, nothing changed."""
        async with self.lock:  # a consistent look at the links
            by_model = await asyncio.to_thread(self._copies_in, pool)
        for name, copies in sorted(by_model.items()):
            await freeing.let_go(job, name, copies, self.config.backend, self.models_of_path)

    def _copies_in(self, pool: str) -> dict[str, list[freeing.Copy]]:
        """Each model's copies in ``pool`` (blocking: a readlink and an fstat per file)."""
        out = {}
        for model in self.catalog.models.values():
            its = [c for c in self._cold_and_pool_files(model)[1] if c.pool == pool]
            if its:
                out[model.name] = its
        return out

    async def add_pool(self, pc: PoolConfig) -> None:
        old = self.config
        await self.set_config(with_pool(old, pc))
        pool = self.pools.add_tmpfs(pc)
        try:
            await asyncio.to_thread(pool.mount)  # an added pool is ready to use
        except Exception:
            self.pools.remove(pc.name)
            await self.set_config(old)
            raise
        self.emit(EventKind.POOL_ADDED, pc.name)

    async def remove_pool(self, name: str) -> None:
        pool = self.pools.lookup(name)
        if pool.state() is PoolState.MOUNTED:
            raise Busy(f"pool {name!r} is connected; disconnect it first")
        await self.set_config(without_pool(self.config, name))
        self.pools.remove(name)
        self.emit(EventKind.POOL_REMOVED, name)

    # --- pool usage watch --------------------------------------------------------------

    async def _watch_usage(self) -> None:
        while True:
            await asyncio.sleep(self.usage_interval)
            try:
                for name in await asyncio.to_thread(self._usage_changes):
                    self.emit(EventKind.POOL, name)
            except Exception:  # the watch must outlive any one bad statvfs
                log.exception("pool usage watch failed")

    def _usage_changes(self) -> list[str]:
        """Mounted pools whose used bytes changed since the last look (a statvfs each; a
        pool given up as lost is not asked: I/O to it may hang)."""
        changed = []
        for name in sorted(self.pools.mounted()):
            pool = self.pools.get(name)
            if pool is None or pool.problem:
                continue
            try:
                used = pool.usage().used
            except Failed:  # unmounted meanwhile: its next state change is reported anyway
                continue
            if name in self._used_seen and used != self._used_seen[name]:
                changed.append(name)
            self._used_seen[name] = used
        return changed

    # --- health ------------------------------------------------------------------------

    async def health(self, repair: bool = False, verify_digests: bool = False) -> HealthReport:
        """Check (and with ``repair``, fix) what the engine holds. Only a repair takes the
        engine lock: a look walks 50,000 models in seconds, and every promote and demote
        waiting behind it (four concurrent looks made a 0.1 s promote take 6 s) is not
        worth a report that reads state a running job may change the next instant anyway."""
        if verify_digests:
            # Every hot blob is hashed now; from now on none is trusted without a new hash
            # (a cold file changed in a way its stamp does not show: the admin's call).
            dropped = await asyncio.to_thread(self.verified.clear)
            log.info("health --verify: %d verified-blob records dropped", dropped)
        if not repair:
            return await asyncio.to_thread(health.check, self, False, verify_digests)
        async with self.lock:
            report = await asyncio.to_thread(health.check, self, repair, verify_digests)
        if repair and any(f.repaired for f in report.findings):
            self.emit(EventKind.CATALOG, "")
        return report

    # --- rescan ------------------------------------------------------------------------

    async def rescan(self, adopt: bool = True) -> int:
        """Scan cold storage again and sync the models dir to it. ``adopt`` (a person asked)
        may take cold storage on another filesystem than the recorded one.

        Raises Failed, changing nothing the bus shows, when cold storage is unavailable or
        the models dir cannot be synced; the previous catalog then stays."""
        try:
            async with self.lock:
                await asyncio.to_thread(self._rescan_blocking, adopt)
        finally:
            self.emit(EventKind.CATALOG, "")  # the cold storage state may have changed either way
            self._watch_cold_storage()
        return len(self.catalog.models)

    def _rescan_blocking(self, adopt: bool) -> None:
        found = self._scan(adopt)
        if found is None:
            raise Failed(
                f"{self.cold_problem}; the catalog, the links and the RAM copies are kept "
                "until it is back"
            )
        catalog, seen = found
        try:
            self.models_dir.sync(catalog, self.pools.mounted())
        except OSError as err:  # e.g. the models dir is full: the old catalog stays
            raise Failed(
                f"rescan could not update the models dir {self.config.models_dir} "
                f"({err.strerror}); the previous catalog stays"
            ) from None
        # Adopted only once the models dir reflects it: the engine, the links and the bus
        # never disagree after a failed rescan.
        self._adopt(catalog)
        self._remember_cold(seen)

    # --- cold storage retry ------------------------------------------------------------

    def _watch_cold_storage(self) -> None:
        """While cold storage is unavailable, look again every few seconds (started on the
        event loop; ends by itself once cold storage is back)."""
        if self.cold_problem and (self._cold_retry is None or self._cold_retry.done()):
            self._cold_retry = asyncio.get_running_loop().create_task(
                self._retry_cold_storage(), name="cold-storage-retry"
            )

    async def _retry_cold_storage(self) -> None:
        while self.cold_problem:
            await asyncio.sleep(self.cold_retry_interval)
            before = self.cold_problem
            try:
                seen = await asyncio.to_thread(availability.look, self.config.storage.path)
                if isinstance(seen, str) or seen.empty:
                    continue  # not back yet: not even worth the rescan's reasoning
                async with self.lock:
                    await asyncio.to_thread(self._rescan_blocking, False)
                log.info("cold storage %s is back; catalog rescanned", self.config.storage.path)
            except Failed:
                pass  # still unavailable (or the models dir refused): try again later
            except Exception:  # the retry must outlive any one bad look
                log.exception("cold storage retry failed")
            if self.cold_problem != before:
                self.emit(EventKind.CATALOG, "")


def still_pool(who: dict[freeing.Copy, frozenset[holders.Process]]) -> str:
    """The pool (or pools, joined) of the held copies, for a message."""
    return ", ".join(sorted({c.pool for c in who}))


def _unique(files: Iterable[ModelFile]) -> list[ModelFile]:
    seen: dict[str, ModelFile] = {}
    for f in files:
        if f.role is FileRole.DATA:
            seen.setdefault(f.rel, f)
    return list(seen.values())
