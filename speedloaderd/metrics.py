"""What speedloaderd measures for Prometheus, read from the daemon at scrape time.

One custom collector (``SpeedloaderCollector``), as the Prometheus docs advise for an
exporter whose state lives elsewhere (https://prometheus.io/docs/instrumenting/
writing_exporters/#collectors): each scrape reads the pools, the hot models, the backend
and cold storage as they are now, instead of mirroring them into gauges that could go
stale. What only a job's end tells (how many promotes, how long they took, the bytes they
copied, why one failed) is counted by ``JobTally``, fed by the daemon's ``EventKind.JOB``
events, and kept across engine rebuilds (a counter that resets only with the process).

Names follow https://prometheus.io/docs/practices/naming/: the ``speedloader_`` prefix,
base units (bytes, seconds), ``_total`` on counters, no ratio made a percentage, and a
label set that can be summed (pool sizes by ``pool``; failures by ``operation`` and
``error``, whose values come from a closed set: the job operations and the D-Bus error
names of speedloaderd/errors.py).

Cardinality is bounded: only hot models get a series of their own (at most
``MAX_MODEL_SERIES``, the largest first); every model, hot or cold, is counted in
``speedloader_models{state}``. A catalog of 100,000 cold models makes five series.

Where the tiering policy's numbers go (hits, misses, evictions, thrash): it registers its
own collector with :meth:`Metrics.register` (see there), reading its own state; nothing
here invents it.

No D-Bus here: the daemon (daemon.py) owns a Metrics and hands it its events; the
exposition (metrics_export.py) serves what :meth:`Metrics.render` returns.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from . import __version__
from .backends.base import Status
from .errors import ERROR_PREFIX, VerificationFailed
from .events import EventKind
from .jobs import Job, JobState
from .pools import PoolState
from .tiers import ModelState

if TYPE_CHECKING:
    from .backends.watch import BackendWatch
    from .engine import Engine, ModelStatus

log = logging.getLogger(__name__)


class Daemon(Protocol):
    """What the collector reads of speedloaderd.daemon.Daemon (which owns the Metrics:
    named here, not imported, so the two modules do not import each other)."""

    @property
    def engine(self) -> Engine | None: ...

    @property
    def backend_watch(self) -> BackendWatch: ...

    @property
    def loaded_names(self) -> set[str]: ...

    def held_bytes(self, pool: str) -> int: ...


# Hot models with a series of their own. A pool's RAM bounds the hot set already (a few
# dozen models of GiBs); the cap is for a pool of many tiny models: 1,000 series of
# ``speedloader_model_resident_bytes`` stay well inside what one Prometheus target is
# expected to carry, and the rest are counted, not dropped silently.
MAX_MODEL_SERIES = 1000

# Promote durations: a model of 100 MB at the ~1 GB/s a tmpfs pool takes from a warm disk
# is 0.1 s; 70 GiB from NFS at 100 MB/s is ~12 minutes. Buckets cover both ends.
PROMOTE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

# Operations always exported for jobs_running, so the series exist before the first job.
_OPERATIONS = ("promote", "demote")


def _short_error(name: str) -> str:
    """``org.speedloader.Speedloader1.Error.NoSpace`` -> ``NoSpace`` (a closed set)."""
    return name.removeprefix(ERROR_PREFIX) or "Failed"


class JobTally:
    """Counters fed by job ends. Written on the event loop, read by a scrape's thread."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._started: dict[int, float] = {}  # running jobs first seen -> when
        self.promotions = 0
        self.demotions = 0
        self.failures: Counter[tuple[str, str]] = Counter()  # (operation, error) -> count
        self.copied_bytes = 0
        self.verify_failures = 0
        self.buckets = [0] * (len(PROMOTE_BUCKETS) + 1)  # per bucket, the last +Inf only
        self.duration_count = 0
        self.duration_sum = 0.0

    def seen(self, job: Job) -> None:
        """A JOB event: remember when a job was first seen; count it once when it ends (a
        job already ended when first seen was started before the metrics: not counted)."""
        if not job.finished:
            self._started.setdefault(job.id, self._clock())
            return
        started = self._started.pop(job.id, None)
        if started is None:
            return
        with self._lock:
            self._count(job, self._clock() - started)

    def _count(self, job: Job, seconds: float) -> None:
        if job.operation == "promote":
            self.copied_bytes += job.bytes_done  # a failed copy's bytes were moved too
        if job.state is JobState.SUCCEEDED:
            if job.operation == "promote":
                self.promotions += 1
                if job.bytes_total > 0:  # "already hot" copied nothing: not a duration
                    # The first bound >= seconds; past the last one, the +Inf slot.
                    self.buckets[bisect.bisect_left(PROMOTE_BUCKETS, seconds)] += 1
                    self.duration_count += 1
                    self.duration_sum += seconds
            elif job.operation == "demote":
                self.demotions += 1
            return
        self.failures[(job.operation, _short_error(job.error_name))] += 1
        if isinstance(job.error, VerificationFailed):
            self.verify_failures += 1

    def families(self) -> Iterator[Metric]:
        with self._lock:
            yield CounterMetricFamily(
                "speedloader_promotions",
                "Promotes that ended successfully (a model copied into a pool, or already hot).",
                value=self.promotions,
            )
            yield CounterMetricFamily(
                "speedloader_demotions",
                "Demotes that ended successfully.",
                value=self.demotions,
            )
            failures = CounterMetricFamily(
                "speedloader_job_failures",
                "Jobs that failed or were cancelled, by operation and D-Bus error name.",
                labels=("operation", "error"),
            )
            for (operation, error), n in sorted(self.failures.items()):
                failures.add_metric((operation, error), n)
            yield failures
            yield CounterMetricFamily(
                "speedloader_copied_bytes",
                "Bytes promotes copied from cold storage into pools (failed ones included).",
                value=self.copied_bytes,
            )
            yield CounterMetricFamily(
                "speedloader_verify_failures",
                "Pool copies whose content did not match the digest their name promises.",
                value=self.verify_failures,
            )
            cumulative, running = [], 0
            for bound, n in zip(PROMOTE_BUCKETS, self.buckets, strict=False):
                running += n
                cumulative.append((repr(bound), running))
            cumulative.append(("+Inf", self.duration_count))
            yield HistogramMetricFamily(
                "speedloader_promote_duration_seconds",
                "Wall time of successful promotes that copied anything.",
                buckets=cumulative,
                sum_value=self.duration_sum,
            )


@dataclass(frozen=True, slots=True)
class _Seen:
    state: ModelState
    tier: str
    size: int


# Seconds a scrape waits for a census of the whole catalog under way (after a start or a
# rescan) before it answers without the model families: measured here, 20,000 cold models
# take 4.3 s to read (a readlink per file), so 100,000 take ~20 s, past Prometheus' default
# 10 s scrape_timeout. A changed model alone is read in well under a millisecond.
CENSUS_WAIT = 5.0


class ModelCensus:
    """Every model's state, tier and size as last read. After a start, a rescan or a new
    config the whole catalog is read again, in a thread of its own (``warm``) when the
    metrics are exported; after that only the models whose events said they changed, so a
    scrape of a 100,000-model catalog reads the links of the few that moved, not all.

    Two locks: ``_marks`` is only ever held for a few set operations (the event loop takes
    it in ``changed``), ``_reading`` for a read of the catalog (one at a time)."""

    def __init__(self) -> None:
        self._marks = threading.Lock()
        self._reading = threading.Lock()
        self._models: dict[str, _Seen] | None = None  # None: never read
        self._dirty: set[str] = set()
        self._all_dirty = True
        self._engine: Engine | None = None
        self._warmer: threading.Thread | None = None

    def changed(self, kind: EventKind, name: str) -> bool:
        """An engine event (on the event loop): mark what to read again. True if the whole
        catalog must be read again."""
        with self._marks:
            if kind is EventKind.MODEL:
                if not self._all_dirty:  # (all is read anyway: no set of 100,000 names)
                    self._dirty.add(name)
            elif kind in (
                EventKind.CATALOG,
                EventKind.CONFIG,
                EventKind.POOL_ADDED,
                EventKind.POOL_REMOVED,
            ):
                self._all_dirty, self._dirty = True, set()
            return self._all_dirty

    def refresh(self, engine: Engine | None, wait: float = -1) -> dict[str, _Seen] | None:
        """The census, brought up to date (in a scrape's thread, as the bus reads it). If
        another read is under way, wait ``wait`` seconds (-1: as long as it takes) for it,
        then give the last census (None if there never was one)."""
        if not self._reading.acquire(timeout=wait):
            return self._models
        try:
            with self._marks:
                if engine is not self._engine:
                    self._engine, self._all_dirty = engine, True
                whole, dirty = self._all_dirty, self._dirty
                self._all_dirty, self._dirty = False, set()
            if engine is None:
                self._models = {}
            elif whole or self._models is None:
                try:
                    self._models = {st.name: _seen(st) for st in engine.model_statuses()}
                except BaseException:
                    with self._marks:
                        self._all_dirty = True
                    raise
            elif dirty:
                models = dict(self._models)
                mounted = engine.pools.mounted()
                for name in dirty:
                    if name in engine.catalog.models:
                        models[name] = _seen(engine.model_status(name, mounted))
                    else:
                        models.pop(name, None)
                self._models = models
            return self._models
        finally:
            self._reading.release()

    def warm(self, engine: Engine | None) -> None:
        """Read the whole catalog now, in a thread, so the next scrape need not."""
        if self._warmer is not None and self._warmer.is_alive():
            return  # it reads again when it is done if more changed meanwhile

        def run() -> None:
            try:
                while True:
                    self.refresh(engine)
                    with self._marks:
                        if not self._all_dirty:
                            return
            except Exception:
                log.exception("reading the catalog for the metrics failed")

        self._warmer = threading.Thread(target=run, name="sl-metrics-census", daemon=True)
        self._warmer.start()


def _seen(st: ModelStatus) -> _Seen:
    return _Seen(st.state, st.tier, st.size)


class SpeedloaderCollector(Collector):
    """Reads the daemon at each scrape (see the module's docstring)."""

    def __init__(self, daemon: Daemon, tally: JobTally, census: ModelCensus):
        self.daemon = daemon
        self.tally = tally
        self.census = census

    def collect(self) -> Iterable[Metric]:
        daemon = self.daemon
        yield from self._families(daemon, daemon.engine)
        yield from self.tally.families()

    def _families(self, daemon: Daemon, engine: Engine | None) -> Iterator[Metric]:
        build = GaugeMetricFamily(
            "speedloader_build_info",
            "Always 1; labelled with the running speedloaderd's version.",
            labels=["version"],
        )
        build.add_metric([__version__], 1)
        yield build
        yield GaugeMetricFamily(
            "speedloader_config_valid",
            "1 while the daemon runs a valid configuration; 0 while it waits for one.",
            value=1 if engine is not None else 0,
        )
        state = daemon.backend_watch.state
        yield GaugeMetricFamily(
            "speedloader_backend_up",
            "1 if the inference server answered its API at the last look, else 0.",
            value=1 if state.status is Status.UP else 0,
        )
        yield GaugeMetricFamily(
            "speedloader_backend_loaded_models",
            "Models of the catalog the inference server says it has loaded.",
            value=len(daemon.loaded_names),
        )
        if engine is None:
            return
        yield GaugeMetricFamily(
            "speedloader_cold_storage_available",
            "1 if cold storage is there and readable, else 0 (models then stay as they are).",
            value=0 if engine.cold_problem else 1,
        )
        yield from self._pools(daemon, engine)
        yield from self._models(engine)
        running = Counter({op: 0 for op in _OPERATIONS})
        for job in list(engine.jobs.values()):
            if not job.finished:
                running[job.operation] += 1
        jobs = GaugeMetricFamily(
            "speedloader_jobs_running", "Jobs running now, by operation.", labels=["operation"]
        )
        for op, n in sorted(running.items()):
            jobs.add_metric([op], n)
        yield jobs

    def _pools(self, daemon: Daemon, engine: Engine) -> Iterator[Metric]:
        size = GaugeMetricFamily(
            "speedloader_pool_size_bytes", "A pool's capacity.", labels=["pool"]
        )
        used = GaugeMetricFamily(
            "speedloader_pool_used_bytes", "Bytes in use in a pool.", labels=["pool"]
        )
        free = GaugeMetricFamily(
            "speedloader_pool_free_bytes", "Bytes free in a pool.", labels=["pool"]
        )
        held = GaugeMetricFamily(
            "speedloader_pool_held_bytes",
            "Bytes of deleted copies a process still maps in a pool (freed when it lets go).",
            labels=["pool"],
        )
        states = GaugeMetricFamily(
            "speedloader_pool_state",
            "1 for the state a pool is in (mounted, unmounted, degraded), 0 for the others.",
            labels=["pool", "kind", "state"],
        )
        for st in engine.pool_statuses():
            size.add_metric([st.name], st.size)
            used.add_metric([st.name], st.used)
            free.add_metric([st.name], st.free)
            held.add_metric([st.name], daemon.held_bytes(st.name))
            for s in PoolState:
                states.add_metric([st.name, st.kind, s.value], 1 if st.state == s.value else 0)
        yield from (size, used, free, held, states)

    def _models(self, engine: Engine) -> Iterator[Metric]:
        models = self.census.refresh(engine, CENSUS_WAIT)
        if models is None:  # the first read of a big catalog is under way: nothing yet
            return
        by_state = Counter({s: 0 for s in ModelState})
        hot: list[tuple[int, str, str]] = []
        for name, seen in models.items():
            by_state[seen.state] += 1
            if seen.state is ModelState.HOT:
                hot.append((seen.size, name, seen.tier))
        counts = GaugeMetricFamily(
            "speedloader_models", "Models of the catalog, by state.", labels=["state"]
        )
        for s in ModelState:
            counts.add_metric([s.value], by_state[s])
        yield counts
        hot.sort(key=lambda h: (-h[0], h[1]))
        resident = GaugeMetricFamily(
            "speedloader_model_resident_bytes",
            "Size of a hot model, by the pool that serves it (hot models only; cold ones "
            f"are counted in speedloader_models; at most {MAX_MODEL_SERIES}, largest first).",
            labels=["model", "pool"],
        )
        for size, name, pool in hot[:MAX_MODEL_SERIES]:
            resident.add_metric([name, pool], size)
        yield resident
        yield GaugeMetricFamily(
            "speedloader_model_series_omitted",
            f"Hot models beyond the {MAX_MODEL_SERIES} given a series of their own.",
            value=max(len(hot) - MAX_MODEL_SERIES, 0),
        )


class Metrics:
    """The daemon's metrics: the registry the exposition renders, fed by the daemon."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.tally = JobTally()
        self.census = ModelCensus()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SpeedloaderCollector(daemon, self.tally, self.census))
        # The daemon's own CPU, memory and open fds (process_*: the client library's
        # standard names, read from /proc/self at scrape time).
        ProcessCollector(registry=self.registry)
        self._render_lock = threading.Lock()
        # Set while the metrics are served or written: the census is then read ahead.
        self.exported = False

    def exporting(self, on: bool) -> None:
        """The exposition started (read the catalog ahead of the first scrape) or stopped."""
        self.exported = on
        if on:
            self.census.warm(self.daemon.engine)

    def register(self, collector: Collector) -> None:
        """Add another collector to what is exported: automatic tiering registers its own
        (speedloaderd/autotiering.py, TieringCollector: speedloader_tier_*), read at scrape
        time; the dashboard's hit-ratio and eviction panels query it."""
        self.registry.register(collector)

    def on_event(self, kind: EventKind, name: str) -> None:
        """A daemon listener (on the event loop): job ends and what the census must reread."""
        if self.census.changed(kind, name) and self.exported:
            self.census.warm(self.daemon.engine)
        if kind is EventKind.JOB:
            engine = self.daemon.engine
            job = engine.jobs.get(int(name)) if engine is not None and name.isdigit() else None
            if job is not None:
                self.tally.seen(job)

    def render(self) -> bytes:
        """The exposition in Prometheus' text format (0.0.4), read now. Blocking: the
        HTTP server's threads call it, the textfile writer through asyncio.to_thread."""
        with self._render_lock:  # one reading of the engine at a time
            return generate_latest(self.registry)
