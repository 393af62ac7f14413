"""Health: check that pools, links and cold storage agree, and repair what can be repaired.

Repairs only ever move toward the always-valid state: a link pointing at cold storage.
Nothing here writes to cold storage.
"""

from __future__ import annotations

import enum
import hashlib
import os
from collections.abc import Callable, Mapping
from typing import Protocol

from pydantic import BaseModel, Field

from . import holders, hostmem
from .catalog.types import FileRole, ScanResult
from .config import BackendType, Config
from .ledger import SpaceLedger
from .modelsdir import LINK_TMP_MARKER, META_TMP_MARKER, ModelsDir
from .pools import Pool, PoolState
from .roots import Root, is_partial
from .sizes import format_size


class Checked(Protocol):
    """What health reads of the engine (and a repair changes): the engine is one."""

    @property
    def catalog(self) -> ScanResult: ...

    @property
    def users(self) -> Mapping[str, list[str]]:
        """Data rel -> the models using it."""
        ...

    @property
    def models_dir(self) -> ModelsDir: ...

    @property
    def pools(self) -> Mapping[str, Pool]: ...

    @property
    def ledger(self) -> SpaceLedger: ...

    @property
    def config(self) -> Config: ...

    meminfo: Callable[[], hostmem.MemInfo]
    """/proc/meminfo's figures (tests give their own numbers rather than fill the RAM)."""

    @property
    def cold_problem(self) -> str:
        """Why cold storage is unavailable; "" when it is there."""
        ...

    def jobs_running(self) -> bool:
        """Is a promote or demote running? (Its temporary names come and go.)"""
        ...

    def clear_stale_reservations(self) -> list[str]:
        """Under the engine lock: drop what no running promote owns; say what."""
        ...


class Status(str, enum.Enum):
    OK = "ok"
    WARNING = "warning"
    ERROR = "error"


class Finding(BaseModel):
    check: str
    status: Status
    subject: str = ""
    message: str
    repaired: bool = False


class HealthReport(BaseModel):
    ok: bool
    findings: list[Finding] = Field(default_factory=list)
    checked: dict[str, int] = Field(default_factory=dict)

    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.status is Status.ERROR and not f.repaired]


def _sha256(tree: Root, rel: str) -> str:
    h = hashlib.sha256()
    fd = tree.open_source(rel)
    try:
        while chunk := os.read(fd, 8 << 20):
            h.update(chunk)
    finally:
        os.close(fd)
    return "sha256:" + h.hexdigest()


def check(engine: Checked, repair: bool = False, verify_digests: bool = False) -> HealthReport:
    """Blocking: run in a worker thread; with ``repair``, while holding the engine lock.

    A look runs without the lock, beside promotes and demotes: it reads each shared
    collection once, as a copy (a dict another thread changes cannot be iterated), and does
    not report as leftovers the temporary names a running job makes and renames away."""
    findings: list[Finding] = []
    catalog = engine.catalog  # a rescan replaces it whole; this one stays consistent
    jobs_running = engine.jobs_running()
    checked: dict[str, int] = {}

    def add(check: str, status: Status, subject: str, message: str, repaired: bool = False):
        findings.append(
            Finding(check=check, status=status, subject=subject, message=message, repaired=repaired)
        )

    # Cold storage reachable.
    md = engine.models_dir
    cold = md.cold_root
    if engine.cold_problem:
        # Repairs would move links toward cold storage that is not there, or drop RAM
        # copies of models the (kept) catalog cannot vouch for: none while it is away.
        add(
            "cold-storage",
            Status.ERROR,
            str(cold),
            f"{engine.cold_problem}; nothing is repaired until it is back",
        )
        repair = False
    elif md.cold.stat_dir("") is None:
        add("cold-storage", Status.ERROR, str(cold), f"cold storage {cold} is not reachable")
    checked["cold-storage"] = 1
    for scan_problem in engine.catalog.problems:
        add("catalog", Status.WARNING, scan_problem.rel, scan_problem.message)

    # The models dir itself: deleted under a running daemon, every link check below fails.
    if not md.tree.exists():
        if repair:
            md.ensure()  # made again with its marker; the link checks below fill it
        add(
            "models-dir",
            Status.ERROR,
            str(md.root),
            f"models dir {md.root} is missing; run health --repair or a rescan to rebuild it",
            repaired=repair,
        )
        if not repair:
            return HealthReport(ok=False, findings=findings, checked=checked)

    # Pools mounted and sized as configured.
    mounted = set()
    for name, pool in list(engine.pools.items()):
        state = pool.state()
        if state is not PoolState.MOUNTED:
            fixed = False
            # Mounting a tmpfs costs only our RAM; connecting a remote pool takes another
            # host's, so that stays an explicit Connect.
            if repair and state is PoolState.UNMOUNTED and pool.kind == "tmpfs":
                try:
                    pool.mount()
                    fixed = pool.state() is PoolState.MOUNTED
                except Exception as err:  # reported below as the finding's message
                    add("pool-mounted", Status.ERROR, name, f"pool {name} cannot mount: {err}")
                    continue
            add(
                "pool-mounted",
                Status.ERROR,
                name,
                f"pool {name} is {state.value} at {pool.path}",
                repaired=fixed,
            )
            if not fixed:
                continue
        mounted.add(name)
        size = pool.usage().size
        # The kernel rounds tmpfs sizes to pages: compare with a page of slack. (A remote
        # pool's ext4 is smaller than its RAM by its metadata: nothing to compare.)
        if pool.kind == "tmpfs" and abs(size - pool.size) > os.sysconf("SC_PAGE_SIZE"):
            fixed = False
            if repair:
                try:
                    pool.resize(pool.size)
                    fixed = True
                except Exception as err:
                    add("pool-size", Status.ERROR, name, f"pool {name} cannot be resized: {err}")
                    continue
            add(
                "pool-size",
                Status.WARNING,
                name,
                f"pool {name} is {size} bytes, configured {pool.size}",
                repaired=fixed,
            )
    checked["pools"] = len(engine.pools)

    # Every data link valid and inside a configured root; descriptors present.
    wanted: set[str] = set()
    conflicted = {c.rel for c in md.conflicts}
    for model in list(catalog.models.values()):
        if model.problems:
            add("catalog", Status.WARNING, model.name, "; ".join(model.problems))
        for f in model.files:
            if f.rel in wanted:
                continue
            wanted.add(f.rel)
            if f.role is FileRole.META:
                if not md.tree.is_file(f.rel):
                    add(
                        "descriptor",
                        Status.ERROR,
                        f.rel,
                        f"{f.rel} is missing from the models dir",
                        repaired=repair and _resync(engine, mounted),
                    )
                continue
            if f.role is not FileRole.DATA or f.rel in conflicted:
                continue  # a conflict is reported below, and never repaired over
            problem = md.where(f.rel).problem(mounted)
            if not problem:
                continue
            fixable = repair and md.cold.stat_file(f.rel) is not None
            if fixable:
                md.point_cold(f.rel)
            add("links", Status.ERROR, f.rel, f"link {f.rel} {problem}", repaired=fixable)
    checked["links"] = len(wanted)
    # What the last sync left as it was (a file of someone else's in a link's place): a
    # person decides, so no repair touches it.
    for c in md.conflicts:
        add("models-dir", Status.WARNING, c.rel, f"{md.root / c.rel}: {c.problem}")

    # Leftovers in the models dir: half-written links, links into our roots we do not need.
    for e in md.walk():
        rel, name = e.rel, e.rel.rpartition("/")[2]
        if LINK_TMP_MARKER in name or META_TMP_MARKER in name:
            if not repair and jobs_running:
                continue  # most likely a running job's link swap, gone in a moment
            if repair:
                md.tree.unlink(rel)
            add(
                "orphans",
                Status.WARNING,
                rel,
                f"half-written entry {rel} in the models dir",
                repaired=repair,
            )
        elif e.is_link and rel not in wanted:
            target = md.tree.readlink(rel) or ""
            if md.tier_of_target(target) is None:
                add(
                    "links",
                    Status.WARNING,
                    rel,
                    f"{rel} links outside every configured root ({target}); left alone",
                )

    # Orphans in pools: partial copies and copies no link points to.
    for name in sorted(mounted):
        root = md.pool_roots[name]
        tree = md.pool(name)
        for e in tree.walk():
            rel, fn = e.rel, e.rel.rpartition("/")[2]
            if rel.split("/", 1)[0] == "lost+found":  # ext4's, in a remote pool
                continue
            referenced = md.where(rel).target == str(root / rel)
            if is_partial(fn) or not referenced:
                if engine.ledger.holds(name, rel) or engine.ledger.copying_into(name):
                    continue
                if repair:
                    tree.unlink(rel)
                what = "partial copy" if is_partial(fn) else "copy no link uses"
                add(
                    "orphans",
                    Status.WARNING,
                    f"{name}:{rel}",
                    f"{what} {rel} in pool {name}",
                    repaired=repair,
                )
            elif verify_digests:
                _verify(engine, name, rel, tree, repair, add)
    checked["pools-walked"] = len(mounted)

    # RAM held by copies already deleted: a process still maps them or has them open (an
    # inference server that loaded the model). The pool's usage counts them until it lets go.
    held = holders.deleted_pool_files({n: md.pool_roots[n] for n in sorted(mounted)})
    for h in held:
        add(
            "held",
            Status.WARNING,
            f"{h.pool}:{h.rel}",
            f"{format_size(h.size)} of pool {h.pool} stay used by the deleted copy of {h.rel}: "
            f"{h.how} by pid {h.pid} ({h.command}); freed when it unloads the model or exits",
        )
    checked["held"] = len(held)

    # Ollama turns mmap off under host pressure, counting the pools' shmem as used RAM.
    if engine.config.backend.type is BackendType.OLLAMA:
        _ollama_memory(engine, catalog, mounted, add)
        checked["ollama-memory"] = 1

    # Room promised to promotes that are no longer running (a leak would hold it until a
    # restart). Only a repair looks: it needs the engine lock, which a look does not take.
    if repair:
        for what in engine.clear_stale_reservations():
            add(
                "reservations",
                Status.WARNING,
                what,
                f"stale reservation of {what} released",
                repaired=True,
            )
        checked["reservations"] = 1

    report_ok = not any(f.status is Status.ERROR and not f.repaired for f in findings)
    return HealthReport(ok=report_ok, findings=findings, checked=checked)


def _ollama_memory(engine: Checked, catalog: ScanResult, mounted: set[str], add) -> None:
    """Warn when the largest hot model would load with mmap off (hostmem.py has the rule)."""
    pools = engine.pools
    tmpfs = {n for n in mounted if pools[n].kind == "tmpfs"}  # a remote pool's RAM is not ours
    if not tmpfs:
        return
    md = engine.models_dir
    # Ollama stats the model's blob (sched.go modelFileSize): a model's largest data file.
    hot: dict[str, int] = {}
    for model in list(catalog.models.values()):
        sizes = [f.size for f in model.data_files if md.where(f.rel).tier in tmpfs]
        if sizes:
            hot[model.name] = max(sizes)
    if not hot:
        return
    name = max(hot, key=lambda n: (hot[n], n))
    used = sum(pools[n].usage().used for n in tmpfs)
    message = hostmem.ollama_mmap_warning(engine.meminfo(), used, name, hot[name])
    if message:
        add("ollama-memory", Status.WARNING, name, message)


def _verify(engine: Checked, pool: str, rel: str, tree: Root, repair: bool, add) -> None:
    digest = None
    models = engine.catalog.models
    for name in engine.users.get(rel, ()):
        for f in models[name].data_files if name in models else ():
            if f.rel == rel:
                digest = f.digest
    if digest is None or not digest.startswith("sha256:"):
        return
    actual = _sha256(tree, rel)
    if actual == digest:
        return
    if repair:
        engine.models_dir.point_cold(rel)
        tree.unlink(rel)
    add(
        "digests",
        Status.ERROR,
        f"{pool}:{rel}",
        f"copy of {rel} in pool {pool} is corrupt ({actual}, expected {digest})",
        repaired=repair,
    )


def _resync(engine: Checked, mounted: set[str]) -> bool:
    engine.models_dir.sync(engine.catalog, mounted)
    return True
