"""50 clients at once for a minute, each promoting, demoting and reading state: the daemon
stays up, every job it hands out completes exactly once, no model ever has two jobs
running, and the models dir is consistent afterwards. Latencies are reported, not judged
(bench/bus.py prints them; timing thresholds do not belong in tests).

SL_SOAK_SECONDS shortens or lengthens the run (default 60)."""

from __future__ import annotations

import os

from bench.bus import soak

from .buslab import run
from .test_bus_daemon import assert_consistent

CLIENTS = 50
SECONDS = float(os.environ.get("SL_SOAK_SECONDS", "60"))
MODELS = ["tiny:1b", "small:3b", "team/coder:7b"]


def test_fifty_clients_for_a_minute(daemon):
    report = run(soak(daemon.address, MODELS, CLIENTS, SECONDS))
    summary = report.summary()
    print(f"\nsoak: {summary}")
    assert daemon.proc.poll() is None, "the daemon died:\n" + daemon.log()[-3000:]
    assert not report.unexpected, report.unexpected[:10]
    assert not report.unfinished, report.unfinished[:10]
    assert not report.overlaps, report.overlaps[:10]
    assert report.job_outcomes["succeeded"] > CLIENTS, summary  # it really did work
    assert report.calls["read"] > CLIENTS
    # Every job handed to a client was announced and completed exactly once.
    assert report.returned_jobs <= report.announced
    twice = {p: n for p, n in report.completions.items() if n != 1}
    assert not twice, twice
    assert report.returned_jobs <= set(report.completions)

    async def after():
        async with await daemon.client() as c:
            return await c.manager("Health", "bb", False, False), await c.managed_objects()

    (ok, findings), objects = run(after())
    assert ok, findings
    assert not [
        p
        for p, o in objects.items()
        if "/models/" in p
        and o["org.speedloader.Speedloader1.Model"]["State"] not in ("hot", "cold")
    ]
    assert_consistent(daemon)
