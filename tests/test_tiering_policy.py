"""The tiering policy (speedloaderd/tiering/) on its own: no daemon, no clock, exact.

Property tests (hypothesis) build random pools, models and use histories and check what
``plan`` promises: protected and pinned models never evicted, nor one resident for less than
the minimum residency; no promote that needs more room than the pool has after the
evictions listed before it, nor one past the high watermark; a pool above its high
watermark evicted down to its low one as far as evictable models allow; the same plan for
the same inputs in any order; a one-off scan over a hot set changes nothing. Then the
state's round trip and corrupt states refused with one sentence.
"""

from __future__ import annotations

import json
import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from speedloaderd.errors import InvalidArgument
from speedloaderd.tiering import (
    Access,
    Evict,
    Model,
    Policy,
    PoolRoom,
    Promote,
    Settings,
    StateError,
)
from speedloaderd.tiering.history import FAST_HALF_LIFE, RECENT

GB = 10**9
NOW = 10 * 86_400.0
S = Settings(enabled=True)
PROTECTIONS = ["", "", "", "loaded", "held"]


@st.composite
def worlds(draw: st.DrawFn) -> tuple[Policy, list[Model], list[PoolRoom], float]:
    """A policy with a random history, models in random places, pools with room or not."""
    n_pools = draw(st.integers(1, 3))
    pool_names = [f"p{i}" for i in range(n_pools)]
    n_models = draw(st.integers(0, 25))
    models: list[Model] = []
    resident: dict[str, int] = dict.fromkeys(pool_names, 0)
    for i in range(n_models):
        size = draw(st.integers(1, 70)) * GB
        pool = draw(st.sampled_from([None, None, *pool_names]))
        pinned = draw(st.sampled_from([None] * 6 + pool_names))
        protected = draw(st.sampled_from(PROTECTIONS)) if pool else ""
        since = None
        if pool is not None:
            resident[pool] += size
            since = draw(
                st.one_of(st.none(), st.floats(NOW - 2 * S.min_residency, NOW, allow_nan=False))
            )
        models.append(Model(f"m{i}", size, pool, pinned, protected, since))
    pools = []
    for name in pool_names:
        capacity = draw(st.integers(10, 400)) * GB
        other = draw(st.integers(0, 20)) * GB  # files that are no model's (in flight...)
        high = draw(st.sampled_from([0.8, 0.9, 0.95, 1.0]))
        low = high - draw(st.sampled_from([0.05, 0.1, 0.3]))
        pools.append(
            PoolRoom(name, capacity, resident[name] + other, high, low, draw(st.integers(0, 3)))
        )
    policy = Policy(S)
    for m in models:
        if m.pool is None and draw(st.booleans()):
            policy.evicted(m.name, draw(st.floats(NOW - 2 * S.min_residency, NOW)))
        for _ in range(draw(st.integers(0, 6))):
            when = draw(st.floats(NOW - 3 * 86_400, NOW, allow_nan=False))
            policy.record(Access(m.name, m.size, when, draw(st.sampled_from(["open", "load"]))))
    return policy, models, pools, NOW


def apply(
    policy: Policy, models: list[Model], pools: list[PoolRoom], actions: list, now: float
) -> dict[str, int]:
    """Replay a plan against the pools' bytes, checking each step; returns used per pool."""
    by_name = {m.name: m for m in models}
    used = {p.name: p.used for p in pools}
    room = {p.name: p for p in pools}
    where = {m.name: m.pool for m in models}
    for a in actions:
        m = by_name[a.model]
        if isinstance(a, Evict):
            assert where[m.name] is not None, f"evicts {m.name}, which is not in RAM"
            assert not m.protected, f"evicts {m.name}, protected ({m.protected})"
            assert m.pinned_pool is None, f"evicts {m.name}, pinned to {m.pinned_pool}"
            if m.resident_since is not None:
                assert now - m.resident_since >= S.min_residency, f"evicts {m.name} too soon"
            used[where[m.name]] -= m.size
            where[m.name] = None
        else:
            assert isinstance(a, Promote)
            assert a.pool in room
            assert where[m.name] != a.pool, f"promotes {m.name} where it is"
            uses = policy.history.models.get(m.name)
            if uses and uses.evicted is not None and not a.reason.startswith("pinned"):
                assert now - uses.evicted >= S.min_residency, f"promotes {m.name} back too soon"
            p = room[a.pool]
            assert used[a.pool] + m.size <= p.capacity, "a promote needs more room than exists"
            assert used[a.pool] + m.size <= p.capacity * p.high, "a promote passes the high mark"
            used[a.pool] += m.size
            where[m.name] = a.pool
    return used


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds())
def test_plan_keeps_its_promises(world) -> None:
    policy, models, pools, now = world
    actions = policy.plan(models, pools, now)
    used = apply(policy, models, pools, actions, now)
    assert len({a.model for a in actions}) == len(actions), "a model gets two actions"
    for p in pools:
        if p.used > p.capacity * p.high:
            left = [
                m
                for m in models
                if m.pool == p.name
                and not any(isinstance(a, Evict) and a.model == m.name for a in actions)
                and not m.protected
                and m.pinned_pool is None
                and (m.resident_since is None or now - m.resident_since >= S.min_residency)
            ]
            assert used[p.name] <= p.capacity * p.low or not left, (
                f"pool {p.name} left above its low watermark with {[m.name for m in left]} "
                "evictable"
            )
    for a in actions:
        assert a.reason, "every action says why"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds(), st.randoms(use_true_random=False))
def test_plan_is_deterministic(world, rnd: random.Random) -> None:
    policy, models, pools, now = world
    first = policy.plan(models, pools, now)
    shuffled_models, shuffled_pools = list(models), list(pools)
    rnd.shuffle(shuffled_models)
    rnd.shuffle(shuffled_pools)
    again = Policy.from_json(policy.to_json(), S).plan(shuffled_models, shuffled_pools, now)
    assert again == first


def hot_world(rnd: random.Random, n_hot: int, n_scan: int, free: int):
    """n_hot models used every ten minutes for a day, in a pool with ``free`` bytes left;
    then a scan opens n_scan other models once each, a second apart."""
    policy = Policy(S)
    hot = [Model(f"hot{i}", rnd.randint(1, 70) * GB) for i in range(n_hot)]
    t = NOW - 86_400
    while t < NOW - 3600:
        for m in hot:
            policy.record(Access(m.name, m.size, t, "load"))
        t += 600
    used = sum(m.size for m in hot)
    pool = PoolRoom("ram", int((used + free) / 0.95) + 1, used, 0.95, 0.85, 100)
    hot = [Model(m.name, m.size, "ram", resident_since=NOW - 86_400) for m in hot]
    scanned = [Model(f"cold{i}", rnd.randint(1, 70) * GB) for i in range(n_scan)]
    for i, m in enumerate(scanned):
        policy.record(Access(m.name, m.size, NOW - n_scan + i, "open"))
    return policy, hot + scanned, pool


@pytest.mark.parametrize("seed", range(60))
def test_a_scan_promotes_and_evicts_nothing(seed: int) -> None:
    rnd = random.Random(seed)
    free = rnd.choice([0, 5 * GB, 500 * GB])  # a full pool, a little room, a lot
    policy, models, pool = hot_world(rnd, rnd.randint(1, 8), rnd.randint(1, 300), free)
    assert policy.plan(models, [pool], NOW) == []


def test_a_second_use_promotes_a_model_and_a_hot_one_displaces_a_cold_one() -> None:
    """The scan's counterpart: admission is two uses, and value decides what is displaced."""
    policy = Policy(S)
    policy.record(Access("old", 40 * GB, NOW - 5 * 86_400, "load"))
    policy.record(Access("old", 40 * GB, NOW - 5 * 86_400 + 3600, "load"))
    pool = PoolRoom("ram", 50 * GB, 40 * GB, 0.95, 0.85, 100)
    old = Model("old", 40 * GB, "ram", resident_since=NOW - 5 * 86_400)
    new = Model("new", 20 * GB)
    policy.record(Access("new", new.size, NOW - 1800, "load"))
    assert policy.plan([old, new], [pool], NOW) == []  # one use is no evidence
    policy.record(Access("new", new.size, NOW - 60, "load"))
    actions = policy.plan([old, new], [pool], NOW)
    assert [type(a) for a in actions] == [Evict, Promote]
    assert actions[0].model == "old" and actions[1] == Promote("new", "ram", actions[1].reason)
    assert actions[1].reason == "auto: used 2x in 1 h"
    # The same model, resident for a minute only: not evicted, so no promote either.
    young = Model("old", 40 * GB, "ram", resident_since=NOW - 60)
    assert policy.plan([young, new], [pool], NOW) == []
    # Evicted a minute ago, "new" is not promoted again until min_residency has passed.
    policy.evicted("new", NOW - 60)
    empty = PoolRoom("ram", 50 * GB, 0, 0.95, 0.85, 100)
    assert policy.plan([new], [empty], NOW) == []
    later = NOW - 60 + S.min_residency
    policy.record(Access("new", new.size, later, "load"))
    assert [a.model for a in policy.plan([new], [empty], later)] == ["new"]


def test_a_pin_goes_to_its_pool_first_and_the_fastest_pool_with_room_is_chosen() -> None:
    policy = Policy(S)
    for t in range(5):
        policy.record(Access("a", 10 * GB, NOW - 3000 + t * 300, "load"))
    slow = PoolRoom("slow", 100 * GB, 0, 0.95, 0.85, 1)
    fast = PoolRoom("fast", 100 * GB, 90 * GB, 0.95, 0.85, 100)
    filler = Model("filler", 90 * GB, "fast", resident_since=NOW - 86_400)
    pinned = Model("p", 30 * GB, None, "fast")
    actions = policy.plan([Model("a", 10 * GB), pinned, filler], [slow, fast], NOW)
    assert actions[:2] == [
        Evict("filler", "made room for p, pinned to fast"),
        Promote("p", "fast", "pinned to fast"),
    ]
    assert actions[2].model == "a" and isinstance(actions[2], Promote)
    assert actions[2].pool == "fast"  # 100 - 30 GB used: room in the fast pool
    full = PoolRoom("fast", 100 * GB, 95 * GB, 0.95, 0.85, 100)
    assert policy.plan([Model("a", 10 * GB)], [slow, full], NOW)[0] == Promote(
        "a", "slow", "auto: used 5x in 1 h"
    )


def test_make_room_for_a_manual_promote() -> None:
    policy = Policy(S)
    pool = PoolRoom("ram", 100 * GB, 90 * GB, 0.95, 0.85, 100)
    models = [
        Model("x", 30 * GB, "ram", resident_since=NOW - 86_400),
        Model("y", 30 * GB, "ram", protected="loaded"),
        Model("z", 30 * GB, "ram", pinned_pool="ram"),
    ]
    assert policy.make_room(models, pool, 5 * GB, NOW) == []
    assert [e.model for e in policy.make_room(models, pool, 20 * GB, NOW) or []] == ["x"]
    assert policy.make_room(models, pool, 40 * GB, NOW) is None  # y and z must stay


def test_why_and_value_say_what_the_uses_were() -> None:
    policy = Policy(S)
    for i in range(14):
        policy.record(Access("m", GB, NOW - 3500 + i * 240, "open"))
    assert policy.why("m", NOW) == "used 14x in 1 h"
    assert policy.why(Model("m", GB, "ram", protected="held"), NOW) == "in use (held)"
    assert policy.why(Model("m", GB, None, "ram"), NOW) == "pinned to ram"
    assert policy.why("never", NOW) == "not used since tiering began"
    assert policy.why("m", NOW + 3 * 86_400) == "used 14x in 7 d"
    assert policy.why("m", NOW + 9 * 86_400) == "last used 9 d ago"
    # 14 uses within the hour. The fast count (2 h half-life) sees 14 uses decayed by at
    # most an hour, taken one square root below itself; a day later only the slow count
    # is left, and it halves in each half-life.
    fast = sum(2.0 ** (-(NOW - (NOW - 3500 + i * 240)) / FAST_HALF_LIFE) for i in range(14))
    expected = (fast - math.sqrt(fast)) * math.log(2) / (FAST_HALF_LIFE / 3600)
    assert policy.value("m", NOW) == pytest.approx(expected)
    day = NOW + 86_400
    slow = 14 * 2.0 ** (-(day - NOW) / S.half_life)  # within 5 %: the uses span an hour
    assert policy.value("m", day) == pytest.approx(
        slow * math.log(2) / (S.half_life / 3600), rel=0.05
    )
    assert policy.value("m", day + S.half_life) == pytest.approx(policy.value("m", day) / 2)


@pytest.mark.parametrize(
    "access",
    [
        Access("", GB, NOW),
        Access("x" * 5000, GB, NOW),
        Access("a\0b", GB, NOW),
        Access("m", GB, math.nan),
        Access("m", GB, NOW, "read"),
    ],
)
def test_an_access_the_state_could_not_keep_is_refused(access: Access) -> None:
    policy = Policy(S)
    with pytest.raises(ValueError):
        policy.record(access)
    assert policy.history.models == {}


def test_uses_close_together_count_once_and_history_is_bounded() -> None:
    policy = Policy(Settings(max_tracked=50))
    for i in range(5):  # a split GGUF's three files, then the backend's own report
        policy.record(Access("split", GB, NOW + i * 10, "open"))
    assert policy.history.models["split"].count == 1
    for i in range(500):
        policy.record(Access(f"x{i}", GB, NOW + i, "open"))
    assert len(policy.history.models) == 50
    assert len(json.loads(policy.to_json())["models"]) == 50
    for i in range(100):
        policy.record(Access("busy", GB, NOW + 1000 + i * 100, "load"))
    assert len(policy.history.models["busy"].recent) == RECENT


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds())
def test_state_round_trip(world) -> None:
    policy, models, pools, now = world
    text = policy.to_json()
    again = Policy.from_json(text, S)
    assert again.to_json() == text
    for m in models:
        assert again.value(m.name, now) == policy.value(m.name, now)
        assert again.why(m.name, now) == policy.why(m.name, now)


def _state(**entry) -> str:
    row = {"heat": 2.0, "at": 100.0, "last": 100.0, "count": 2, "evicted": None, "fast": 2.0}
    row.update(entry)
    recent = row.pop("recent", [50.0, 100.0])
    values = [row["heat"], row["at"], row["last"], row["count"], row["evicted"], recent]
    return json.dumps({"version": 2, "models": {"m": [*values, row["fast"]]}})


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        b"\xff\xfe",
        "[]",
        '{"version": 3, "models": {}}',
        '{"version": true, "models": {}}',
        '{"version": 2}',
        '{"version": 2, "models": []}',
        '{"version": 2, "models": {"m": [1, 2, 3]}}',
        '{"version": 2, "models": {"m": [0, 0, 0, 0, null, []]}}',  # a version 1 row
        '{"version": 1, "models": {"m": [0, 0, 0, 0, null, [], 0]}}',  # a version 2 row
        '{"version": 2, "models": {"": [0, 0, 0, 0, null, [], 0]}}',
        _state(heat=-1.0),
        _state(fast=-1.0),
        _state(fast=float("inf")),
        _state(heat=float("nan")),
        _state(at="soon"),
        _state(count=True),
        _state(count=-1),
        _state(count=1),  # two recent uses, one counted
        _state(recent=[100.0, 50.0]),
        _state(recent=[float(i) for i in range(RECENT + 1)], count=99),
        _state(last=75.0),
        _state(evicted="yesterday"),
        json.dumps(
            {"version": 2, "models": {f"m{i}": [0, 0, 0, 0, None, [], 0] for i in range(11)}}
        ),
        '{"version": 2, "models": {}, "resident": []}',
        '{"version": 2, "models": {}, "resident": {"m": "at noon"}}',
        '{"version": 2, "models": {}, "resident": {"m": true}}',
        '{"version": 2, "models": {}, "resident": {"": 1.0}}',
        json.dumps({"version": 2, "models": {}, "resident": {f"m{i}": 1.0 for i in range(11)}}),
    ],
)
def test_a_corrupt_state_is_refused_in_one_sentence(text) -> None:
    with pytest.raises(StateError) as e:
        Policy.from_json(text, Settings(max_tracked=10))
    message = str(e.value)
    assert message.startswith("the tiering state") and message.endswith("it was ignored.")
    assert "\n" not in message
    assert Policy.from_json(_state(), S).value("m", 100.0) > 0  # the good one loads


def test_residency_times_survive_the_state_and_a_version_1_state_has_none() -> None:
    policy = Policy(S)
    policy.record(Access("m", GB, NOW, "load"))
    policy.history.resident.update({"m": NOW + 5.0, "pinned-only": NOW - 30.0})
    again = Policy.from_json(policy.to_json(), S)
    assert again.history.resident == {"m": NOW + 5.0, "pinned-only": NOW - 30.0}
    data = json.loads(policy.to_json())
    data["version"] = 1
    del data["resident"]
    data["models"]["m"] = data["models"]["m"][:6]
    assert Policy.from_json(json.dumps(data), S).history.resident == {}


def test_a_version_1_state_loads_with_its_fast_counts_rebuilt() -> None:
    """Version 1 had no fast count: it is rebuilt from the recent uses, which hold all of it
    for a model used at most RECENT times (here: three uses, so exactly)."""
    policy = Policy(S)
    for t in (NOW - 7200, NOW - 3600, NOW - 60):
        policy.record(Access("m", GB, t, "load"))
    data = json.loads(policy.to_json())
    assert data["version"] == 2
    data["version"] = 1
    data["models"]["m"] = data["models"]["m"][:6]
    old = Policy.from_json(json.dumps(data), S)
    assert old.value("m", NOW) == pytest.approx(policy.value("m", NOW), rel=1e-9)
    assert json.loads(old.to_json())["version"] == 2


@pytest.mark.parametrize(
    "bad",
    [
        {"policy": "mru"},
        {"high_watermark": 0.5, "low_watermark": 0.6},
        {"high_watermark": 1.5},
        {"low_watermark": 0.0},
        {"min_residency": -1.0},
        {"half_life": 0.0},
        {"half_life": float("inf")},
        {"admit_accesses": 0},
        {"coalesce": 7200.0},
        {"max_tracked": 0},
    ],
)
def test_bad_settings_are_refused(bad: dict) -> None:
    with pytest.raises(InvalidArgument, match="autoTiering"):
        Settings(**bad)


def test_lru_ranks_by_last_use_and_gdsf_by_uses() -> None:
    lru, gdsf = Policy(Settings(policy="lru")), Policy(S)
    for p in (lru, gdsf):
        for t in range(10):
            p.record(Access("often", GB, NOW - 7200 + t * 120, "load"))
        p.record(Access("lately", GB, NOW - 60, "load"))
    assert lru.value("lately", NOW) > lru.value("often", NOW)
    assert gdsf.value("lately", NOW) < gdsf.value("often", NOW)
