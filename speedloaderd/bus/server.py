"""The daemon's bus side: exports the engine's pools, models and jobs as objects, keeps
their properties current with coalesced PropertiesChanged, and survives a full socket.

Engine events mark objects dirty; one flush, at most every ``FLUSH_INTERVAL``, recomputes
their properties and emits only what changed. A burst of ten thousand model changes is
thus a bounded stream of signals, and each job's progress reaches clients at <= 10 Hz.

No message leaves this daemon larger than ``MAX_MESSAGE_BYTES``: dbus-daemon drops the
connection of a sender whose message passes its ``max_message_size`` (32 MiB on a stock
system bus), and that is the daemon leaving the bus. A reply that would be larger becomes
the named error TooLarge (GetManagedObjects of a big catalog says so at once, from the
count of objects); clients then read models in pages with Manager.ListModels. Should the
bus drop us anyway (a bus configured with a smaller limit, dbus-daemon restarting), the
server reconnects and exports everything again instead of exiting.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import time
from collections.abc import Iterable, Iterator
from copy import copy
from pathlib import Path
from typing import Any

from dbus_fast import BusType, Message, MessageType, RequestNameReply, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface

from .. import __version__
from ..autotiering import AutoTiering
from ..config import Config, dump_config
from ..daemon import Daemon
from ..engine import Engine, ModelStatus, PoolStatus
from ..errors import Failed, InvalidArgument
from ..events import EventKind
from ..holders import Process
from ..jobs import Job
from ..tiering import Promote
from .auth import Polkit, remember_caller
from .names import BUS_NAME, ERROR_PREFIX, ROOT, job_path, model_path, pool_path
from .objects import (
    JobInterface,
    ManagerInterface,
    ModelInterface,
    PoolInterface,
    Snapshot,
    job_values,
)

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.1
JOB_RETENTION_S = 600.0
JOB_RETENTION_MAX = 100
SCAN_PROBLEMS_MAX = 200  # scan problems on the Manager; Health lists every one

# The largest message this daemon sends: a quarter of dbus-daemon's default max_message_size
# (32 MiB), so a bus configured tighter than the default still takes every message.
MAX_MESSAGE_BYTES = 8 << 20
# Every object in a GetManagedObjects reply takes at least this many bytes (285 for a
# model with a one-letter name and no format, by dbus-fast's marshaller, as
# tests/robustness checks), so a count of objects alone tells when a reply cannot fit.
MIN_OBJECT_BYTES = 280
# ListModels: at most this many models per call, and a page stops early at PAGE_BYTES.
MAX_PAGE = 2000
PAGE_BYTES = 4 << 20
# A model's Problems: at most this many, each at most PROBLEM_CHARS long (a hostile tree
# could otherwise make one model's properties as large as it likes).
MAX_PROBLEMS = 20
PROBLEM_CHARS = 500
# A model's Holders: at most this many processes (a fork bomb mapping one file must not make
# the model's properties as large as it likes; health lists every one).
MAX_HOLDERS = 50
MAX_U32 = (1 << 32) - 1
TOO_LARGE = ERROR_PREFIX + "TooLarge"
RECONNECT_DELAYS = (0.1, 0.5, 1.0, 2.0, 5.0)
RECONNECT_GIVE_UP_S = 120.0  # then exit: under systemd, a restart tries afresh
# Filters ListModels accepts: key -> the model value it matches.
_FILTER_KEYS = ("name", "state", "tier", "format", "after")
# Engine events after which every object is read again (a job's or one object's do not).
_RESYNC_EVENTS = {EventKind.CATALOG, EventKind.POOL_ADDED, EventKind.POOL_REMOVED, EventKind.CONFIG}


class _EagainSafeSocket:
    """dbus-fast treats EAGAIN from send() as fatal and drops the connection, taking the
    daemon off the bus when a burst fills the socket buffer. Report "0 bytes sent" instead:
    the writer then keeps the rest queued and waits for the socket to become writable."""

    def __init__(self, sock: Any):
        self._sock = sock

    def send(self, data: Any) -> int:
        try:
            return self._sock.send(data)
        except BlockingIOError:
            return 0

    def sendmsg(self, buffers: Any, ancdata: Any = ()) -> int:
        # We never send unix fds, whose retry the library would get wrong; refuse loudly.
        if ancdata:
            return self._sock.sendmsg(buffers, ancdata)
        try:
            return self._sock.sendmsg(buffers)
        except BlockingIOError:
            return 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class SystemBus(MessageBus):
    """The message bus with the EAGAIN fix, and ObjectManager signals sent from the
    ObjectManager's own path (the spec's way; dbus-fast sends them from the child's path,
    which clients matching on the manager's path never see)."""

    quiet = False  # set while exporting the initial objects: nobody can know of them yet

    async def connect(self) -> SystemBus:
        await super().connect()
        writer = self._writer
        assert writer is not None, "dbus-fast sets its writer in connect()"
        writer.sock = _EagainSafeSocket(writer.sock)  # type: ignore[assignment]  # a wrapper
        # dbus-fast's writer has no hook for this: patched, hence the pinned dbus-fast.
        writer.buffer_message = self._buffer_bounded  # type: ignore[method-assign]
        return self

    def _buffer_bounded(self, msg: Message, future: asyncio.Future | None = None) -> None:
        """The writer's buffer_message, refusing to send any message larger than
        MAX_MESSAGE_BYTES: a reply becomes the error TooLarge, a signal is dropped (logged).
        Same queue entry as dbus-fast's own (marshalled bytes, unix fds, future)."""
        writer = self._writer
        assert writer is not None, "connected"
        data = msg._marshall(writer.negotiate_unix_fd)
        if len(data) > MAX_MESSAGE_BYTES:
            replacement = _oversized(msg, len(data))
            if replacement is None:
                if future is not None and not future.done():
                    future.set_result(None)
                return
            data = replacement._marshall(writer.negotiate_unix_fd)
        writer.messages.append((data, copy(msg.unix_fds) if msg.unix_fds else None, future))

    def _emit_interface_added(self, path: str, interface: ServiceInterface) -> None:
        if self.quiet or self._disconnected:
            return
        self.send(
            Message.new_signal(
                ROOT,
                "org.freedesktop.DBus.ObjectManager",
                "InterfacesAdded",
                "oa{sa{sv}}",
                [path, {interface.name: _properties(path, interface)}],
            )
        )

    def answer_get_managed_objects(self, msg: Message) -> Message | None:
        """dbus-fast's own GetManagedObjects re-checks the whole reply after each object
        (quadratic: 1.4 s of 1.9 for 10,000 models); ours reads each property once."""
        if not (
            msg.message_type is MessageType.METHOD_CALL
            and msg.member == "GetManagedObjects"
            and msg.interface == "org.freedesktop.DBus.ObjectManager"
            and msg.path == ROOT
            and not msg.signature
        ):
            return None
        count = len(self._path_exports)
        if count * MIN_OBJECT_BYTES > MAX_MESSAGE_BYTES:
            return Message.new_error(msg, TOO_LARGE, _too_large_text(count * MIN_OBJECT_BYTES))
        prefix = ROOT + "/"
        result = {
            path: {iface.name: _properties(path, iface) for iface in ifaces.values()}
            for path, ifaces in self._path_exports.items()
            if path.startswith(prefix)
        }
        return Message.new_method_return(msg, "a{oa{sa{sv}}}", [result])

    def _emit_interface_removed(self, path: str, removed_interfaces: list[str]) -> None:
        if self._disconnected:
            return
        self.send(
            Message.new_signal(
                ROOT,
                "org.freedesktop.DBus.ObjectManager",
                "InterfacesRemoved",
                "oas",
                [path, removed_interfaces],
            )
        )


def _too_large_text(size: int) -> str:
    return (
        f"the reply would be {size / (1 << 20):.0f} MiB or more, larger than the "
        f"{MAX_MESSAGE_BYTES >> 20} MiB speedloaderd sends in one message; read the models "
        "in pages with Manager.ListModels (slctl and the dashboard do)"
    )


def _oversized(msg: Message, size: int) -> Message | None:
    """What to send instead of ``msg`` (``size`` bytes, too large): an error reply to the
    same call, or nothing for a signal."""
    if msg.message_type is MessageType.METHOD_RETURN:
        log.warning("a reply of %d bytes was refused: answered TooLarge instead", size)
        return Message(
            message_type=MessageType.ERROR,
            destination=msg.destination,
            reply_serial=msg.reply_serial,
            serial=msg.serial,
            error_name=TOO_LARGE,
            signature="s",
            body=[_too_large_text(size)],
        )
    log.error(
        "dropped a %s %s of %d bytes from %s: larger than the bus may carry",
        msg.message_type.name.lower(),
        msg.member,
        size,
        msg.path,
    )
    return None


def _forget_other_buses(iface: ServiceInterface, bus: MessageBus) -> None:
    """Unbind ``iface`` from every connection but ``bus`` (they are dead)."""
    for other in list(ServiceInterface._get_buses(iface)):
        if other is not bus:
            ServiceInterface._remove_bus(iface, other)


_MODEL_KEYS = {"state": "State", "tier": "Tier", "format": "Format"}


def _estimate(path: str, props: dict[str, Variant]) -> int:
    """An upper bound of the bytes ``path`` and ``props`` take in a marshalled message."""
    size = 16 + len(path)  # object paths are ASCII
    for key, var in props.items():
        value = var.value
        size += 24 + len(key)
        if isinstance(value, str):
            size += 4 * len(value)  # len counts characters; UTF-8 takes up to 4 each
        elif isinstance(value, list):
            size += sum(8 + 4 * len(str(v)) for v in value)
    return size


def _properties(path: str, interface: ServiceInterface) -> dict[str, Variant]:
    props = {}
    for prop in ServiceInterface._get_properties(interface):
        if not prop.disabled:
            try:
                props[prop.name] = Variant(
                    prop.signature, getattr(interface, prop.prop_getter.__name__)
                )
            except Exception:
                log.exception("property %s of %s", prop.name, path)
    return props


def model_values(
    st: ModelStatus,
    loaded: bool = False,
    holders: Iterable[Process] = (),
    usage: tuple[int, int] = (0, 0),
    tiering: AutoTiering | None = None,
) -> dict[str, Any]:
    # LastUsed stays the backend's word (usage.py); the opens tiering saw are in UseCount
    # and Why.
    last_used, uses, value, why = usage[0], 0, 0.0, ""
    if tiering is not None:
        uses = min(tiering.use_count(st.name), MAX_U32)
        value = tiering.value(st.name)
        why = tiering.why(st.name, st.tier, st.pinned_pool)
    return {
        "LastUsed": last_used,
        "LoadCount": usage[1],
        "UseCount": uses,
        "Value": value,
        "Why": why,
        "Loaded": loaded,
        "Holders": [[p.pid, p.command] for p in list(holders)[:MAX_HOLDERS]],
        "Name": st.name,
        "Format": st.format,
        "SizeBytes": st.size,
        "Tier": st.tier,
        "PinnedPool": st.pinned_pool,
        "State": st.state,
        "Problems": bounded_problems(st.problems),
    }


def bounded_problems(problems: Iterable[str]) -> list[str]:
    """A model's problems, at most MAX_PROBLEMS of at most PROBLEM_CHARS each."""
    problems = list(problems)
    out = [p if len(p) <= PROBLEM_CHARS else p[: PROBLEM_CHARS - 3] + "..." for p in problems]
    if len(out) > MAX_PROBLEMS:
        out = out[: MAX_PROBLEMS - 1] + [f"... and {len(out) - MAX_PROBLEMS + 1} more problems"]
    return out


def pool_values(st: PoolStatus, held: int = 0) -> dict[str, Any]:
    return {
        "HeldBytes": held,
        "Name": st.name,
        "Kind": st.kind,
        "State": st.state,
        "Path": st.path,
        "SizeBytes": st.size,
        "UsedBytes": st.used,
        "FreeBytes": st.free,
        "Speed": st.speed,
        "Problem": st.problem,
    }


class Server:
    def __init__(self, config: Config | None, config_path: Path | None, config_error: str = ""):
        # The domain: the engine, its config, and the rebuild-on-config policy.
        self.daemon = Daemon(config, config_path, config_error)
        self.daemon.listeners.append(self._on_engine_event)
        self.bus: SystemBus | None = None
        self.polkit: Polkit
        self.manager = ManagerInterface(self)
        self.models: dict[str, ModelInterface] = {}
        self.pools: dict[str, PoolInterface] = {}
        self.jobs: dict[int, JobInterface] = {}
        self._dirty: set[tuple[str, str]] = set()
        self._flush_handle: asyncio.TimerHandle | None = None
        self._resync_all = False
        self._model_order: list[str] | None = None  # sorted names, for ListModels

    # --- start and stop ----------------------------------------------------------------

    async def start(self) -> None:
        await self.daemon.start()
        await self._connect(sync=True)
        log.info(
            "on the system bus as %s (%d models, %d pools)",
            BUS_NAME,
            len(self.models),
            len(self.pools),
        )

    async def _connect(self, sync: bool) -> None:
        """Connect, export the Manager and every object (made from the engine if ``sync``,
        else those already known), then own the name: clients see the whole state at once."""
        bus = SystemBus(bus_type=BusType.SYSTEM)
        await bus.connect()
        bus.add_message_handler(remember_caller)
        bus.add_message_handler(bus.answer_get_managed_objects)
        self.bus = bus
        # Objects of a connection that was lost (some may have been exported on it while
        # we were away) now signal on this one only.
        for iface in [self.manager, *self.models.values(), *self.pools.values()]:
            _forget_other_buses(iface, bus)
        for jiface in self.jobs.values():
            _forget_other_buses(jiface, bus)
        self.polkit = Polkit(bus)
        bus.quiet = True
        bus.export(ROOT, self.manager)
        if sync:
            await self._sync_objects()
        else:
            for name, iface in self.models.items():
                bus.export(model_path(name), iface)
            for name, piface in self.pools.items():
                bus.export(pool_path(name), piface)
            for job_id, jiface in self.jobs.items():
                bus.export(job_path(job_id), jiface)
        bus.quiet = False
        reply = await bus.request_name(BUS_NAME)
        if reply is not RequestNameReply.PRIMARY_OWNER:
            raise Failed(
                f"cannot own {BUS_NAME} on the system bus ({reply.name}); "
                "is another speedloaderd running?"
            )

    async def wait(self) -> None:
        """Serve until ``stop()``. If dbus-daemon drops the connection (it does so to a
        sender of a message larger than it allows, or when it restarts), reconnect and
        export everything again: exiting would only restart into the same state."""
        while True:
            assert self.bus is not None
            try:
                await self.bus.wait_for_disconnect()
            except Exception as err:  # the library reports the lost socket as an exception
                log.error("dbus-daemon dropped the connection: %s", err or type(err).__name__)
            if self.bus._user_disconnect:
                return
            await self._reconnect()

    async def _reconnect(self) -> None:
        old = self.bus
        give_up = time.monotonic() + RECONNECT_GIVE_UP_S
        attempt = 0
        while True:
            await asyncio.sleep(RECONNECT_DELAYS[min(attempt, len(RECONNECT_DELAYS) - 1)])
            attempt += 1
            try:
                await self._connect(sync=False)
                break
            except Exception as err:
                if self.bus is not None and self.bus is not old:
                    self.bus.disconnect()  # half set up; the next attempt starts afresh
                if time.monotonic() > give_up:
                    raise Failed(f"cannot reconnect to the system bus: {err}") from None
                log.warning("reconnecting to the system bus failed (%s); retrying", err)
        log.warning(
            "back on the system bus as %s after a lost connection (%d models, %d pools)",
            BUS_NAME,
            len(self.models),
            len(self.pools),
        )
        # Clients see the name's owner change (NameOwnerChanged) and read the state afresh;
        # a resync makes the objects match what the engine did meanwhile.
        self._resync_all = True
        self._dirty |= {("job", str(j)) for j in self.jobs}
        self._schedule_flush()

    async def shutdown(self) -> None:
        """End running jobs (their Completed signals still go out), then leave the bus."""
        if self.engine is not None:
            await self.daemon.shutdown()
            await self.settle()
        self.stop()

    def stop(self) -> None:
        if self.bus is not None:
            self.bus.disconnect()

    # --- engine access -----------------------------------------------------------------

    @property
    def engine(self) -> Engine | None:
        return self.daemon.engine

    @property
    def config_path(self) -> Path | None:
        return self.daemon.config_path

    def require_engine(self) -> Engine:
        return self.daemon.require_engine()

    def config_json(self) -> str:
        config = self.daemon.shown_config()
        if config is None:
            return "{}"
        return json.dumps(dump_config(config), indent=2)

    # --- objects -----------------------------------------------------------------------

    def _export(self, path: str, iface: ServiceInterface) -> None:
        assert self.bus is not None
        self.bus.export(path, iface)

    def _unexport(self, path: str) -> None:
        assert self.bus is not None
        self.bus.unexport(path)

    async def _sync_objects(self) -> None:
        """Make the exported models and pools match the engine's (after start or rescan)."""
        engine = self.engine
        self._emit_changed(self.manager, self.manager.update(self._manager_values()))
        statuses = await asyncio.to_thread(engine.model_statuses) if engine else []
        pools = await asyncio.to_thread(engine.pool_statuses) if engine else []
        seen = set()
        for st in statuses:
            seen.add(st.name)
            iface = self.models.get(st.name)
            if iface is None:
                self._model_order = None
                iface = ModelInterface(self, st.name)
                iface.update(self._model_values(st))
                self.models[st.name] = iface
                self._export(model_path(st.name), iface)
            else:
                self._emit_changed(iface, iface.update(self._model_values(st)))
        for name in list(self.models):
            if name not in seen:
                self._model_order = None
                del self.models[name]
                self._unexport(model_path(name))
        self._emit_changed(self.manager, self.manager.update({"ModelCount": len(self.models)}))
        seen = set()
        for pst in pools:
            seen.add(pst.name)
            piface = self.pools.get(pst.name)
            if piface is None:
                piface = PoolInterface(self, pst.name)
                piface.update(self._pool_values(pst))
                self.pools[pst.name] = piface
                self._export(pool_path(pst.name), piface)
            else:
                self._emit_changed(piface, piface.update(self._pool_values(pst)))
        for name in list(self.pools):
            if name not in seen:
                del self.pools[name]
                self._unexport(pool_path(name))

    # --- paged reads (Manager.ListModels, ListPools, ListJobs) ------------------------------

    def list_models(self, offset: int, limit: int, filters: dict[str, Any]) -> list[Any]:
        """``[total, [[path, properties], ...]]``: the models that match ``filters``, in
        name order, from ``offset`` (after the name ``filters["after"]``, if given), at
        most ``limit`` (0: MAX_PAGE) and at most PAGE_BYTES of them. ``total`` counts every
        match, whatever the window: a client has them all when it has ``total``."""
        wanted = {}
        for key, value in filters.items():
            value = value.value if isinstance(value, Variant) else value
            if key not in _FILTER_KEYS:
                raise InvalidArgument(
                    f"ListModels has no filter {key!r}; use {', '.join(_FILTER_KEYS)}"
                )
            if not isinstance(value, str):
                raise InvalidArgument(f"ListModels filter {key!r} must be a string")
            wanted[key] = value
        order = self._ordered_models()
        start = bisect.bisect_right(order, wanted["after"]) if "after" in wanted else 0
        limit = MAX_PAGE if limit == 0 else min(limit, MAX_PAGE)
        needle = wanted.get("name", "").casefold()
        checks = [(k, wanted[k]) for k in ("state", "tier", "format") if k in wanted]

        def matches(name: str) -> bool:
            if needle and needle not in name.casefold():
                return False
            values = self.models[name].values
            return all(values.get(_MODEL_KEYS[k]) == v for k, v in checks)

        if needle or checks:
            total = sum(1 for name in order if matches(name))
            window: Iterator[str] = (name for name in order[start:] if matches(name))
        else:  # the common case, a client reading everything: no pass over the catalog
            total = len(order)
            window = iter(order[start : start + offset + limit])
        page: list[Any] = []
        size = 0
        for n, name in enumerate(window):
            if n < offset:
                continue
            if len(page) >= limit or size > PAGE_BYTES:
                break
            path = model_path(name)
            props = _properties(path, self.models[name])
            size += _estimate(path, props)
            page.append([path, props])
        return [total, page]

    def _ordered_models(self) -> list[str]:
        if self._model_order is None:
            self._model_order = sorted(self.models)
        return self._model_order

    def list_pools(self) -> list[Any]:
        return [[pool_path(n), _properties(pool_path(n), i)] for n, i in sorted(self.pools.items())]

    def list_jobs(self) -> list[Any]:
        return [[job_path(n), _properties(job_path(n), i)] for n, i in sorted(self.jobs.items())]

    async def tiering_plan(self) -> list[Any]:
        self.require_engine()
        actions = await asyncio.to_thread(self.daemon.tiering.plan)
        engine = self.require_engine()
        out = []
        for a in actions:
            if isinstance(a, Promote):
                out.append(["promote", a.model, a.pool, a.reason])
            else:
                tier = engine.model_status(a.model).tier if a.model in engine.catalog.models else ""
                out.append(["evict", a.model, tier, a.reason])
        return out

    def _manager_values(self) -> dict[str, Any]:
        backend = self.daemon.backend_watch.state
        tiering = self.daemon.tiering
        watch, watch_reason = tiering.watch_state()
        always = {
            "Tiering": "on" if tiering.enabled else "off",
            "TieringPaused": tiering.paused if tiering.enabled else "",
            "TieringWatch": watch,
            "TieringWatchReason": watch_reason,
            "TieringNextEviction": tiering.next_evict,
            "Version": __version__,
            "ConfigPath": str(self.config_path or ""),
            "ModelCount": len(self.models),
            "BackendState": backend.status.value,
            "BackendStateReason": backend.reason,
        }
        if self.engine is None:
            return always | {
                "ConfigValid": False,
                "ConfigError": self.daemon.config_error,
                "ColdStorageProblem": "speedloaderd has no valid configuration",
            }
        c = self.engine.config
        problems = [p.message for p in self.engine.catalog.problems]
        if len(problems) > SCAN_PROBLEMS_MAX:  # one bad tree must not make a huge reply
            more = len(problems) - SCAN_PROBLEMS_MAX
            tail = f"... and {more} more (slctl health lists them all)"
            problems = [*problems[:SCAN_PROBLEMS_MAX], tail]
        return always | {
            "ColdStorageState": "unavailable" if self.engine.cold_problem else "available",
            "ColdStorageProblem": self.engine.cold_problem,
            "ScanProblems": problems,
            "ConfigValid": True,
            "ConfigError": "",
            "Backend": c.backend.type.value,
            "BackendApiUrl": c.backend.api_url or "",
            "ModelsDir": str(c.models_dir),
            "ColdStorage": str(c.storage.path),
            "Strategy": c.model_placement.default_strategy.value,
        }

    def job_object(self, job: Job) -> str:
        path = job_path(job.id)
        if job.id in self.jobs:
            return path
        iface = JobInterface(self, job)
        iface.update(job_values(job))
        self.jobs[job.id] = iface
        self._export(path, iface)
        job.listeners.append(lambda j: self._mark("job", str(j.id)))
        if job.finished:  # e.g. a no-op that completed before anyone asked for its object
            self._mark("job", str(job.id))
        self._prune_jobs()
        return path

    def _prune_jobs(self) -> None:
        now = time.time()
        finished = sorted(
            (i for i in self.jobs.values() if i.job.finished), key=lambda i: i.job.started
        )
        excess = len(self.jobs) - JOB_RETENTION_MAX
        for iface in finished:
            if excess > 0 or now - iface.job.started > JOB_RETENTION_S:
                excess -= 1
                del self.jobs[iface.job.id]
                self._unexport(job_path(iface.job.id))

    # --- change propagation ---------------------------------------------------------------

    def _on_engine_event(self, kind: EventKind, name: str) -> None:
        if kind in _RESYNC_EVENTS:
            self._resync_all = True
            self._schedule_flush()
        elif kind is EventKind.JOB:
            job = self.engine.jobs.get(int(name)) if self.engine else None
            if job is None:
                return
            self.job_object(job)  # jobs started by the engine itself (pin) appear too
            iface = self.jobs.get(job.id)
            if job.finished and iface is not None:
                # Completed goes out now, not at the next flush: a job for the same model
                # may start in the meantime, and clients must see this one end first. The
                # models' new state goes out before it (its own, and those a pool job
                # moved), so a client woken by Completed reads them as the job left them.
                models = {n for k, n in self._dirty if k == "model"}
                if job.model is not None:
                    models.add(job.model)
                for model in sorted(models):
                    self._dirty.discard(("model", model))
                    self._refresh_model(model)
                pools = {n for k, n in self._dirty if k == "pool"}
                if job.pool is not None:
                    pools.add(job.pool)
                for pool in sorted(pools):  # mountinfo and statvfs of a few pools: quick
                    self._dirty.discard(("pool", pool))
                    self._refresh_pool(pool)
                self._flush_job(iface)
            else:
                self._mark("job", name)
        elif kind in (EventKind.BACKEND, EventKind.TIERING):
            self._mark("manager", "")
        else:
            self._mark(kind, name)

    def _mark(self, kind: str, name: str) -> None:
        self._dirty.add((kind, name))
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flush_handle is None:
            loop = asyncio.get_running_loop()
            self._flush_handle = loop.call_later(FLUSH_INTERVAL, self._start_flush)

    async def settle(self) -> None:
        """Publish pending changes now, before a method's reply (which returns object paths
        clients will use at once, or a state they will read next)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        await self._flush()

    def _start_flush(self) -> None:
        asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        dirty, self._dirty = self._dirty, set()
        resync, self._resync_all = self._resync_all, False
        try:
            if resync:
                await self._sync_objects()
            engine = self.engine
            for kind, name in sorted(dirty):
                if kind == "manager":
                    self._emit_changed(self.manager, self.manager.update(self._manager_values()))
                elif kind == "model":
                    self._refresh_model(name)
                elif kind == "pool" and engine and name in self.pools:
                    st_p = await asyncio.to_thread(engine.pool_status, name)
                    self._publish_pool(name, st_p)
                elif kind == "job" and int(name) in self.jobs:
                    self._flush_job(self.jobs[int(name)])
        except Exception:
            log.exception("updating bus objects failed")
        finally:
            self._flush_handle = None
            if self._dirty or self._resync_all:
                self._schedule_flush()

    def _refresh_model(self, name: str) -> None:
        iface = self.models.get(name)
        if self.engine is not None and iface is not None:
            self._emit_changed(
                iface, iface.update(self._model_values(self.engine.model_status(name)))
            )

    def _refresh_pool(self, name: str) -> None:
        if self.engine is not None and name in self.pools:
            self._publish_pool(name, self.engine.pool_status(name))

    def _publish_pool(self, name: str, st: PoolStatus) -> None:
        iface = self.pools.get(name)
        if iface is not None:
            self._emit_changed(iface, iface.update(self._pool_values(st)))

    def _model_values(self, st: ModelStatus) -> dict[str, Any]:
        loaded = st.name in self.daemon.loaded_names
        return model_values(
            st,
            loaded,
            self.daemon.holders_of(st.name),
            self.daemon.usage_of(st.name),
            self.daemon.tiering,
        )

    def _pool_values(self, st: PoolStatus) -> dict[str, Any]:
        return pool_values(st, self.daemon.held_bytes(st.name))

    def _flush_job(self, iface: JobInterface) -> None:
        was_running = iface.values.get("State") == "running"
        self._emit_changed(iface, iface.update(job_values(iface.job)))
        if iface.job.finished and was_running:
            iface.Completed(iface.job.state.value == "succeeded", iface.job.message)

    def _emit_changed(self, iface: Snapshot, changed: dict[str, Any]) -> None:
        if changed and self.bus is not None and not self.bus._disconnected:
            iface.emit_properties_changed(changed)
