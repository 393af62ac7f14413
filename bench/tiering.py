"""Trace-driven replay of model loads against the real tiering policy (speedloaderd/tiering).

Pure Python, no I/O, no clock: each trace is a list of timed model loads, replayed at full
speed through ``Policy.record`` and ``Policy.plan`` (after every load, as the engine would
on each use it is told of), with each planned promote and eviction applied at once. Side
by side on the same traces and pool: no tiering, LRU and LFU (classic caches: every miss is
admitted, the least recent / least frequent evicted until it fits), the policy, a
popularity oracle (the set an online policy that knew the popularity the loads are drawn
from would hold: what no online policy can expect to beat), a per-day oracle, and the
offline optimum bracketed by the bounds of Berger, Beckmann and Harchol-Balter 2018
(PFOO-L, a feasible offline schedule, so OPT is at least it; PFOO-U, a relaxation, so OPT
is at most it), both computed for byte hit ratio.

    python3 -m bench --only tiering [--seed N]        (or python3 -m bench.tiering [N])

Catalog: 200 models drawn from the sizes real model files have (1.3-70 GB: a 1B to a 70B
model, quantised or not), sizes as they are (nothing is copied, so nothing is scaled).
Pool: 20 % of the catalog's bytes (also 10 and 30 % for the summary). Fourteen days, a
load a minute on average. Bandwidths (README "Benchmarks" and shared/notes/copy-limits.md,
same machine kind): cold load from disk and promote copy 1.73 GB/s (the promote bench,
disk-bound), load from a pool 12.3 GB/s (sequential read, huge=within_size tmpfs).
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from speedloaderd.tiering import Access, Evict, Model, Policy, PoolRoom, Promote, Settings

GB = 10**9
COLD_GBPS = 1.73
POOL_GBPS = 12.3
COPY_GBPS = 1.73
DAYS = 14
MEAN_GAP = 60.0  # seconds between loads, whole box
N_MODELS = 200
SIZES_GB = [1.3, 2.0, 2.2, 3.8, 4.1, 4.7, 4.9, 5.5, 7.4, 8.1, 9.0, 12.0, 14.8, 16.1, 19.9,
            26.4, 39.6, 42.5, 47.0, 70.0]  # fmt: skip
SIZE_WEIGHTS = [1 / math.sqrt(s) for s in SIZES_GB]  # small models are the common ones
ZIPF = 0.9
MIN_RESIDENCY = Settings().min_residency  # the thrash window, the same for every policy

Trace = list[tuple[float, str, str]]  # (when, model, source)
Popularity = list[tuple[float, list[str]]]
"""What a trace's loads are drawn from: (from when, the models by rank, most used first),
each weighted by ``_zipf_weights``. The popularity oracle below knows it; policies do not."""


# -- catalog and traces ------------------------------------------------------------------


def catalog(rng: random.Random) -> dict[str, int]:
    sizes = rng.choices(SIZES_GB, SIZE_WEIGHTS, k=N_MODELS)
    return {f"m{i:03d}": int(s * GB) for i, s in enumerate(sizes)}


def _zipf_weights(n: int) -> list[float]:
    return [1 / (r + 1) ** ZIPF for r in range(n)]


def _arrivals(rng: random.Random, start: float, end: float, gap: float) -> list[float]:
    times, t = [], start
    while True:
        t += rng.expovariate(1 / gap)
        if t >= end:
            return times
        times.append(t)


def _loads(rng: random.Random, times: list[float], rank: list[str], w: list[float]) -> Trace:
    picks = rng.choices(rank, w, k=len(times))
    return [(t, m, "load") for t, m in zip(times, picks, strict=True)]


def trace_zipf(rng: random.Random, names: list[str]) -> tuple[Trace, Popularity]:
    ranked = rng.sample(names, len(names))
    w = _zipf_weights(len(ranked))
    times = _arrivals(rng, 0, DAYS * 86_400, MEAN_GAP)
    return _loads(rng, times, ranked, w), [(0.0, ranked)]


def trace_shifting(rng: random.Random, names: list[str]) -> tuple[Trace, Popularity]:
    """Popularity that moves: each day three models are 'released' into the top ten ranks
    (the rest slide down), as new models and quantisations come out."""
    ranked = rng.sample(names, len(names))
    w = _zipf_weights(len(ranked))
    out: Trace = []
    popularity: Popularity = []
    for day in range(DAYS):
        if day:
            for _ in range(3):
                new = ranked.pop(rng.randrange(len(ranked) // 2, len(ranked)))
                ranked.insert(rng.randrange(10), new)
        times = _arrivals(rng, day * 86_400, (day + 1) * 86_400, MEAN_GAP)
        out += _loads(rng, times, ranked, w)
        popularity.append((day * 86_400.0, list(ranked)))
    return out, popularity


def trace_daily(rng: random.Random, names: list[str]) -> tuple[Trace, Popularity]:
    """A daily cycle: interactive use 08-20 h (one popularity, a load every 40 s), batch
    jobs at night (another popularity over partly the same models, a load every 3 min)."""
    day_rank = rng.sample(names, len(names))
    # At night: twenty models the day hardly uses lead, then the day's top ten reshuffled.
    night_lead = rng.sample(day_rank[100:], 20) + rng.sample(day_rank[:10], 10)
    night_rank = night_lead + [m for m in day_rank if m not in night_lead]
    w = _zipf_weights(len(names))
    out: Trace = []
    popularity: Popularity = []
    for day in range(DAYS):
        d = day * 86_400
        for start, end, rank, gap in (
            (0, 8, night_rank, 180.0),
            (8, 20, day_rank, 40.0),
            (20, 24, night_rank, 180.0),
        ):
            times = _arrivals(rng, d + start * 3600, d + end * 3600, gap)
            out += _loads(rng, times, rank, w)
            popularity.append((d + start * 3600.0, rank))
    return out, popularity


SCAN_DAYS = (3, 7, 11)
SCAN_AT = 3 * 3600  # 03:00


def trace_scan(rng: random.Random, names: list[str]) -> tuple[Trace, Popularity]:
    """The Zipf trace plus, on three nights, a scan: something (a backup, a checksum run)
    opens every model once, one a second."""
    out, popularity = trace_zipf(rng, names)
    for day in SCAN_DAYS:
        t0 = day * 86_400 + SCAN_AT
        out += [(t0 + i, m, "open") for i, m in enumerate(rng.sample(names, len(names)))]
    out.sort()
    return out, popularity


TRACES: dict[str, Callable[[random.Random, list[str]], tuple[Trace, Popularity]]] = {
    "zipf": trace_zipf,
    "shifting": trace_shifting,
    "daily": trace_daily,
    "scan": trace_scan,
}


# -- replay ------------------------------------------------------------------------------


@dataclass
class Tally:
    requested: int = 0
    hit: int = 0
    copied: int = 0
    promotes: int = 0
    evictions: int = 0
    thrash: int = 0
    hot_kept: list[float] | None = None

    def row(self) -> dict:
        saved = self.hit / GB * (1 / COLD_GBPS - 1 / POOL_GBPS)
        return {
            "byte_hit_ratio": round(self.hit / self.requested, 4) if self.requested else 0.0,
            "copied_TB": round(self.copied / 1e12, 2),
            "promotes": self.promotes,
            "evictions": self.evictions,
            "thrash": self.thrash,
            "load_hours_saved": round(saved / 3600, 2),
            "copy_hours": round(self.copied / GB / COPY_GBPS / 3600, 2),
            "hot_set_kept_after_scan": (
                round(sum(self.hot_kept) / len(self.hot_kept), 3) if self.hot_kept else None
            ),
        }


class Resident:
    """What is in the pool, with the thrash count: a model evicted within MIN_RESIDENCY of
    its promote, or promoted again within MIN_RESIDENCY of its eviction."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.since: dict[str, float] = {}
        self.evicted_at: dict[str, float] = {}
        self.used = 0

    def promote(self, m: str, size: int, now: float) -> None:
        if now - self.evicted_at.get(m, -math.inf) < MIN_RESIDENCY:
            self.tally.thrash += 1
        self.since[m] = now
        self.used += size
        self.tally.copied += size
        self.tally.promotes += 1

    def evict(self, m: str, size: int, now: float) -> None:
        if now - self.since.pop(m) < MIN_RESIDENCY:
            self.tally.thrash += 1
        self.evicted_at[m] = now
        self.used -= size
        self.tally.evictions += 1


def _scan_windows(trace: Trace) -> list[tuple[float, float]]:
    ends = []
    for day in SCAN_DAYS:
        t0 = day * 86_400 + SCAN_AT
        ends.append((t0, t0 + N_MODELS))
    return ends


def replay(
    trace: Trace,
    sizes: dict[str, int],
    capacity: int,
    step: Callable[[Resident, str, int, float, str], None],
    scans: list[tuple[float, float]],
) -> Tally:
    tally = Tally(hot_kept=[] if scans else None)
    res = Resident(tally)
    pending = list(scans)
    before: set[str] | None = None
    for when, m, source in trace:
        if pending and before is None and when >= pending[0][0]:
            before = set(res.since)
        if pending and before is not None and when > pending[0][1]:
            kept = sum(sizes[x] for x in before if x in res.since)
            total = sum(sizes[x] for x in before)
            assert tally.hot_kept is not None
            tally.hot_kept.append(kept / total if total else 1.0)
            pending.pop(0)
            before = None
        tally.requested += sizes[m]
        if m in res.since:
            tally.hit += sizes[m]
        step(res, m, sizes[m], when, source)
        assert res.used <= capacity, "a policy overfilled the pool"
    return tally


def run_policy(trace: Trace, sizes: dict[str, int], capacity: int, settings: Settings, scans):
    policy = Policy(settings)
    models = {m: Model(m, s) for m, s in sizes.items()}
    pool = "ram"

    def step(res: Resident, m: str, size: int, now: float, source: str) -> None:
        policy.record(Access(m, size, now, source))
        room = PoolRoom(pool, capacity, res.used, settings.high_watermark,
                        settings.low_watermark, 100)  # fmt: skip
        for a in policy.plan(models.values(), [room], now):
            if isinstance(a, Promote):
                models[a.model] = Model(a.model, sizes[a.model], pool, resident_since=now)
                res.promote(a.model, sizes[a.model], now)
            elif isinstance(a, Evict):
                models[a.model] = Model(a.model, sizes[a.model])
                res.evict(a.model, sizes[a.model], now)
                policy.evicted(a.model, now)
            assert res.used <= capacity

    return replay(trace, sizes, capacity, step, scans)


def run_lru(trace: Trace, sizes: dict[str, int], capacity: int, scans) -> Tally:
    order: OrderedDict[str, None] = OrderedDict()

    def step(res: Resident, m: str, size: int, now: float, source: str) -> None:
        if m in order:
            order.move_to_end(m)
            return
        if size > capacity:
            return
        while res.used + size > capacity:
            victim, _ = order.popitem(last=False)
            res.evict(victim, sizes[victim], now)
        order[m] = None
        res.promote(m, size, now)

    return replay(trace, sizes, capacity, step, scans)


def run_lfu(trace: Trace, sizes: dict[str, int], capacity: int, scans) -> Tally:
    """Perfect LFU: counts over the whole trace, every miss admitted, fewest uses evicted."""
    counts: dict[str, int] = {}

    def step(res: Resident, m: str, size: int, now: float, source: str) -> None:
        counts[m] = counts.get(m, 0) + 1
        if m in res.since or size > capacity:
            return
        while res.used + size > capacity:
            victim = min(res.since, key=lambda x: (counts[x], x))
            res.evict(victim, sizes[victim], now)
        res.promote(m, size, now)

    return replay(trace, sizes, capacity, step, scans)


# -- offline bounds (Berger et al. 2018, for byte hit ratio) -----------------------------


def _intervals(trace: Trace, sizes: dict[str, int], capacity: int) -> list[tuple[int, int, int]]:
    """(start, end, size): a model's consecutive loads at access indices start < end. Kept
    in RAM over it, the load at ``end`` is a hit of ``size`` bytes."""
    last: dict[str, int] = {}
    out = []
    for i, (_, m, _) in enumerate(trace):
        if m in last and sizes[m] <= capacity:
            out.append((last[m], i, sizes[m]))
        last[m] = i
    return out


def pfoo_upper(trace: Trace, sizes: dict[str, int], capacity: int) -> float:
    """PFOO-U: the capacity constraint summed over time (space-time budget capacity x n),
    a fractional knapsack: shortest intervals first (hit bytes per byte-step is 1/length)."""
    budget = float(capacity) * len(trace)
    hit = 0.0
    for a, b, s in sorted(_intervals(trace, sizes, capacity), key=lambda x: x[1] - x[0]):
        cost = s * (b - a)
        if cost <= budget:
            budget -= cost
            hit += s
        else:
            hit += s * budget / cost
            break
    return hit


class _MaxTree:
    """Range add, range max over n slots (the bytes in RAM at each access index)."""

    def __init__(self, n: int) -> None:
        self.size = 1
        while self.size < n:
            self.size *= 2
        self.mx = [0] * (2 * self.size)
        self.lazy = [0] * (2 * self.size)

    def _go(self, node: int, lo: int, hi: int, a: int, b: int, add: int) -> int:
        if b <= lo or hi <= a:
            return -(1 << 62)
        if a <= lo and hi <= b:
            self.mx[node] += add
            self.lazy[node] += add
            return self.mx[node]
        mid = (lo + hi) // 2
        left = self._go(2 * node, lo, mid, a, b, add)
        right = self._go(2 * node + 1, mid, hi, a, b, add)
        self.mx[node] = max(self.mx[2 * node], self.mx[2 * node + 1]) + self.lazy[node]
        return max(left, right) + self.lazy[node]

    def max(self, a: int, b: int) -> int:
        return self._go(1, 0, self.size, a, b, 0)

    def add(self, a: int, b: int, v: int) -> None:
        self._go(1, 0, self.size, a, b, v)


def pfoo_lower(trace: Trace, sizes: dict[str, int], capacity: int) -> Tally:
    """PFOO-L: intervals greedily, cheapest first, each kept only if RAM has room for it at
    every access it spans: a schedule an offline cache could follow, so OPT >= it. Two
    orders (by length, by length x size); the better schedule is taken."""
    best: Tally | None = None
    ivs = _intervals(trace, sizes, capacity)
    for key in (lambda x: (x[1] - x[0], x[0]), lambda x: ((x[1] - x[0]) * x[2], x[0])):
        tree = _MaxTree(len(trace))
        chosen: set[tuple[int, int]] = set()
        for a, b, s in sorted(ivs, key=key):
            if tree.max(a, b) + s <= capacity:
                tree.add(a, b, s)
                chosen.add((a, b))
        tally = Tally(requested=sum(sizes[m] for _, m, _ in trace))
        ends = {b for _, b in chosen}
        for a, b, s in ivs:
            if (a, b) in chosen:
                tally.hit += s
                if a not in ends:  # not already in RAM from the interval before: a copy
                    tally.copied += s
                    tally.promotes += 1
        tally.evictions = tally.promotes
        if best is None or tally.hit > best.hit:
            best = tally
    assert best is not None
    return best


def day_oracle(trace: Trace, sizes: dict[str, int], capacity: int) -> Tally:
    """The best fixed set for each day, chosen knowing that day's loads (most bytes loaded
    per byte of RAM first, what fits), loaded at midnight: what a policy that knew each
    day's popularity, but not the order of its loads, could get. Online policies cannot
    beat it by much on traces whose popularity holds for a day; the offline schedules
    above also know the order."""
    tally = Tally(requested=sum(sizes[m] for _, m, _ in trace))
    held: set[str] = set()
    days: dict[int, list[str]] = {}
    for when, m, _ in trace:
        days.setdefault(int(when // 86_400), []).append(m)
    for day in sorted(days):
        loads = days[day]
        count: dict[str, int] = {}
        for m in loads:
            count[m] = count.get(m, 0) + 1
        chosen: set[str] = set()
        used = 0
        for m in sorted(count, key=lambda x: (-count[x], x)):
            if used + sizes[m] <= capacity:
                chosen.add(m)
                used += sizes[m]
        for m in chosen - held:
            tally.copied += sizes[m]
            tally.promotes += 1
        tally.evictions += len(held - chosen)
        held = chosen
        tally.hit += sum(sizes[m] for m in loads if m in held)
    return tally


def popularity_oracle(trace: Trace, popularity: Popularity, sizes: dict[str, int],
                      capacity: int) -> Tally:  # fmt: skip
    """The best set for the popularity the loads are drawn from, held from the moment that
    popularity begins (most used per byte of RAM first, what fits). The loads are drawn
    independently of one another, so no online policy, which only sees the loads so far,
    can expect more byte hits than this: the chance that the next load is a model does not
    depend on the loads before it, and this set maximises the bytes it expects to hit. It
    can beat the per-day oracle (it switches at 08 and 20 h on the daily trace) and lose to
    it by luck (the per-day oracle counts the day's actual loads)."""
    tally = Tally(requested=sum(sizes[m] for _, m, _ in trace))
    held: set[str] = set()
    changes = sorted(popularity, key=lambda x: x[0])
    i = 0
    for when, m, _ in trace:
        while i < len(changes) and changes[i][0] <= when:
            chosen: set[str] = set()
            used = 0
            for x in changes[i][1]:
                if used + sizes[x] <= capacity:
                    chosen.add(x)
                    used += sizes[x]
            tally.copied += sum(sizes[x] for x in chosen - held)
            tally.promotes += len(chosen - held)
            tally.evictions += len(held - chosen)
            held = chosen
            i += 1
        if m in held:
            tally.hit += sizes[m]
    return tally


# -- the run -----------------------------------------------------------------------------

POLICY_ROWS = (
    "none", "lru", "lfu", "policy", "pop_oracle", "day_oracle", "opt_lower", "opt_upper",
)  # fmt: skip


def bench_tiering(seed: int = 13, fractions: tuple[float, ...] = (0.2, 0.1, 0.3), log=print):
    rng = random.Random(seed)
    sizes = catalog(rng)
    names = sorted(sizes)
    total = sum(sizes.values())
    settings = Settings(enabled=True)
    results: dict = {
        "conditions": {
            "models": N_MODELS,
            "catalog_TB": round(total / 1e12, 3),
            "days": DAYS,
            "mean_gap_s": MEAN_GAP,
            "zipf": ZIPF,
            "cold_GBps": COLD_GBPS,
            "pool_GBps": POOL_GBPS,
            "copy_GBps": COPY_GBPS,
            "seed": seed,
            "settings": {
                k: getattr(settings, k)
                for k in (
                    "policy",
                    "high_watermark",
                    "low_watermark",
                    "min_residency",
                    "half_life",
                    "admit_accesses",
                    "coalesce",
                )
            },  # fmt: skip
        },
        "runs": {},
    }
    made = {name: make(random.Random(f"{seed}-{name}"), names) for name, make in TRACES.items()}
    results["fractions"] = list(fractions)
    start = time.monotonic()  # the bench's own run time; the policy never reads a clock
    for frac in fractions:
        cap = int(total * frac)
        for tname, (trace, popularity) in made.items():
            scans = _scan_windows(trace) if tname == "scan" else []
            rows = {
                "none": Tally(requested=sum(sizes[m] for _, m, _ in trace)).row(),
                "lru": run_lru(trace, sizes, cap, scans).row(),
                "lfu": run_lfu(trace, sizes, cap, scans).row(),
                "policy": run_policy(trace, sizes, cap, settings, scans).row(),
                "pop_oracle": popularity_oracle(trace, popularity, sizes, cap).row(),
                "day_oracle": day_oracle(trace, sizes, cap).row(),
                "opt_lower": pfoo_lower(trace, sizes, cap).row(),
            }
            requested = sum(sizes[m] for _, m, _ in trace)
            upper = pfoo_upper(trace, sizes, cap)
            rows["opt_upper"] = {"byte_hit_ratio": round(upper / requested, 4)}
            key = f"{tname}@{frac:.0%}"
            results["runs"][key] = {"loads": len(trace), "capacity_TB": round(cap / 1e12, 3),
                                    "rows": rows}  # fmt: skip
            p, lo = rows["policy"]["byte_hit_ratio"], rows["opt_lower"]["byte_hit_ratio"]
            log(f"  tiering {key}: policy {p:.3f}, offline {lo:.3f}, lru "
                f"{rows['lru']['byte_hit_ratio']:.3f}")  # fmt: skip
    results["elapsed_s"] = round(time.monotonic() - start, 1)
    return results


LABELS = {
    "opt_lower": "OPT >=", "opt_upper": "OPT <=", "day_oracle": "day oracle",
    "pop_oracle": "pop oracle",
}  # fmt: skip


def print_tiering(r: dict) -> None:
    c = r["conditions"]
    runs = r["runs"]
    traces = list(TRACES)
    print(
        f"tiering replay: {c['models']} models ({c['catalog_TB']:.2f} TB), {c['days']} days, "
        f"a load every {c['mean_gap_s']:.0f} s; cold {c['cold_GBps']} GB/s, pool "
        f"{c['pool_GBps']} GB/s; seed {c['seed']}; {r['elapsed_s']:.0f} s"
    )
    main_frac = r["fractions"][0]
    print(f"  pool {main_frac:.0%} of the catalog: byte hit ratio, TB copied, thrash")
    print("  " + " " * 11 + "".join(f"{t:>19s}" for t in traces))
    for name in POLICY_ROWS:
        cells = []
        for t in traces:
            row = runs[f"{t}@{main_frac:.0%}"]["rows"][name]
            if name == "opt_upper":
                cells.append(f"{row['byte_hit_ratio']:7.3f}{'':12s}")
            else:
                cells.append(
                    f"{row['byte_hit_ratio']:7.3f} {row['copied_TB']:6.1f} {row['thrash']:4d}"
                )
        print(f"  {LABELS.get(name, name):11s}" + "".join(f"{x:>19s}" for x in cells))
    for frac in r["fractions"]:
        parts = []
        for t in traces:
            rows = runs[f"{t}@{frac:.0%}"]["rows"]
            opt = rows["opt_lower"]["byte_hit_ratio"]
            parts.append(
                f"{t} {rows['policy']['byte_hit_ratio'] / opt:.2f} "
                f"(LRU {rows['lru']['byte_hit_ratio'] / opt:.2f}, "
                f"pop oracle {rows['pop_oracle']['byte_hit_ratio'] / opt:.2f})"
            )
        print(f"  pool {frac:.0%}: policy / OPT>= byte hit ratio: " + ", ".join(parts))
    scan = runs[f"scan@{main_frac:.0%}"]["rows"]
    kept = ", ".join(
        f"{LABELS.get(n, n)} {scan[n]['hot_set_kept_after_scan']:.0%}"
        for n in ("lru", "lfu", "policy")
    )
    print(f"  hot set still in RAM right after each scan ({main_frac:.0%}): {kept}")
    saved = ", ".join(
        f"{t} {runs[f'{t}@{main_frac:.0%}']['rows']['policy']['load_hours_saved']:.1f} h "
        f"(OPT>= {runs[f'{t}@{main_frac:.0%}']['rows']['opt_lower']['load_hours_saved']:.1f})"
        for t in traces
    )
    print(f"  load time saved by the policy over {c['days']} days: {saved}")


def main() -> int:
    seed = int(sys.argv[1]) if len(sys.argv) > 1 else 13
    print_tiering(bench_tiering(seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
