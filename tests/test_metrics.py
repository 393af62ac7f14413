"""Prometheus metrics of the real daemon on the private bus (speedloaderd/metrics.py,
speedloaderd/metrics_export.py): the exposition after a promote, `promtool check metrics` on
it, Debian's `prometheus` scraping the daemon and answering through its HTTP API, the
node_exporter textfile replaced atomically, the unix socket's access, what the HTTP
endpoint refuses (anything a web page could use), and bounded cardinality.

`prometheus` and `promtool` come from Debian's `prometheus` package (scripts/setup installs
it, with its service left disabled): without them these tests fail, saying so."""

from __future__ import annotations

import asyncio
import grp
import http.client
import json
import logging
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import types
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from speedloader_client.client import MODEL, POOL
from speedloader_lab.modelgen import make_ollama_model
from speedloader_lab.sandbox import REPO
from speedloaderd.bus.names import model_path, pool_path
from speedloaderd.config import (
    MetricsConfig,
    dump_config,
    parse_listen,
    save_config,
    with_changes,
)
from speedloaderd.errors import ConfigError, Failed, NoSpace, VerificationFailed
from speedloaderd.events import EventKind
from speedloaderd.jobs import Job, JobState
from speedloaderd.metrics import PROMOTE_BUCKETS, JobTally, ModelCensus
from speedloaderd.metrics_export import MetricsExport
from speedloaderd.privilege import admin_changes
from speedloaderd.tiers import ModelState

from .buslab import ADMIN, GROUP, GUEST, as_user, run

# Automatic tiering's (speedloaderd/autotiering.py, through Metrics.register): the dashboard's
# hit-ratio and eviction panels query them.
TIERING_NAMES = {
    "speedloader_tier_hits_total",
    "speedloader_tier_misses_total",
    "speedloader_tier_evictions_total",
    "speedloader_tier_thrash_total",
}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_metrics(dl, **metrics: Any) -> None:
    """Give the lab's config a ``metrics`` key (before the daemon starts)."""
    dl.config = with_changes(dl.config, metrics=metrics)
    save_config(dl.config, dl.lab.config_path)


def get(port: int, path: str = "/metrics", headers: dict[str, str] | None = None,
        method: str = "GET") -> http.client.HTTPResponse:  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, headers=headers or {})
    return conn.getresponse()


def scrape(port: int) -> str:
    r = get(port)
    assert r.status == 200, r.read()
    return r.read().decode()


def samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(found: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in found, f"no sample {name}{labels}; have {sorted(k[0] for k in found)}"
    return found[key]


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def promote(dl, model: str) -> dict[str, Any]:
    """Promote ``model`` to the end; return what the bus says of it and of the pool."""

    async def go() -> dict[str, Any]:
        async with await dl.client() as c:
            await c.subscribe()
            result = await c.follow_job(await c.promote(model), timeout=120)
            assert result.success, result.message
            return {
                "model": await c.get_all(model_path(model), MODEL),
                "pool": await c.get_all(pool_path("local"), POOL),
            }

    return run(go())


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"{name} is not installed: it comes with Debian's prometheus package "
            "(apt-get install prometheus; scripts/setup installs it). This tier does not skip."
        )
    return found


# --- the exposition after a promote ----------------------------------------------------------


def test_a_promote_shows_in_the_exposition_and_promtool_accepts_it(daemon_factory):
    dl = daemon_factory()
    port = free_port()
    with_metrics(dl, listen=f"127.0.0.1:{port}")
    dl.start()
    before = samples(scrape(port))
    assert value(before, "speedloader_promotions_total") == 0
    assert value(before, "speedloader_models", state="cold") == 3
    assert not [k for k in before if k[0] == "speedloader_model_resident_bytes"]

    seen = promote(dl, "tiny:1b")
    text = scrape(port)
    after = samples(text)
    assert value(after, "speedloader_promotions_total") == 1
    assert value(after, "speedloader_pool_used_bytes", pool="local") == seen["pool"]["UsedBytes"]
    assert value(after, "speedloader_pool_size_bytes", pool="local") == seen["pool"]["SizeBytes"]
    assert (
        value(after, "speedloader_model_resident_bytes", model="tiny:1b", pool="local")
        == (seen["model"]["SizeBytes"])
    )
    assert value(after, "speedloader_models", state="hot") == 1
    assert value(after, "speedloader_models", state="cold") == 2
    assert value(after, "speedloader_copied_bytes_total") > 0
    assert value(after, "speedloader_promote_duration_seconds_count") == 1
    assert value(after, "speedloader_pool_state", pool="local", kind="tmpfs", state="mounted") == 1
    assert value(after, "speedloader_cold_storage_available") == 1
    assert value(after, "process_resident_memory_bytes") > 0  # the daemon's own

    check = subprocess.run(
        [tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr

    # The Grafana dashboard queries these very names (tiering's too: counters with no sample
    # yet, by pool, are declared by their TYPE line, without the _total).
    dashboard = json.loads((REPO / "contrib" / "grafana" / "speedloader.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    queried = {n for e in exprs for n in re.findall(r"\bspeedloader_[a-z_]+", e)}
    exported = {k[0] for k in after} | set(re.findall(r"^# TYPE (\S+)", text, re.M))
    exported |= {f"{n}_total" for n in re.findall(r"^# TYPE (\S+) counter", text, re.M)}
    assert exported >= TIERING_NAMES
    assert queried <= exported, queried - exported


def test_prometheus_scrapes_the_daemon_and_answers_through_its_api(daemon_factory, workdir):
    prometheus = tool("prometheus")
    dl = daemon_factory()
    port, web = free_port(), free_port()
    with_metrics(dl, listen=f"127.0.0.1:{port}")
    dl.start()
    promote(dl, "tiny:1b")
    expected = samples(scrape(port))
    conf = workdir / "prometheus.yml"
    conf.write_text(
        json.dumps(  # YAML is a superset of JSON
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                "scrape_configs": [
                    {"job_name": "speedloader", "static_configs": [
                        {"targets": [f"127.0.0.1:{port}"]}]}
                ],
            }
        )
    )  # fmt: skip
    log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [prometheus, f"--config.file={conf}", f"--storage.tsdb.path={workdir / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{web}"],
        stdout=log, stderr=log,
    )  # fmt: skip

    def query(q: str) -> list[dict]:
        url = f"http://127.0.0.1:{web}/api/v1/query?" + urllib.parse.urlencode({"query": q})
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                answer = json.load(r)
        except OSError:
            assert proc.poll() is None, (workdir / "prometheus.log").read_text()
            return []
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    try:
        promotions = wait_for(
            lambda: query("speedloader_promotions_total"), 90, "Prometheus to scrape the daemon"
        )
        assert promotions[0]["value"][1] == "1"
        used = query('speedloader_pool_used_bytes{pool="local"}')
        assert float(used[0]["value"][1]) == value(
            expected, "speedloader_pool_used_bytes", pool="local"
        )
        resident = query('speedloader_model_resident_bytes{model="tiny:1b"}')
        assert resident[0]["metric"]["pool"] == "local"
        up = query('up{job="speedloader"}')
        assert up[0]["value"][1] == "1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


# --- the textfile route ----------------------------------------------------------------------


def test_the_textfile_is_replaced_atomically_with_the_same_values(daemon_factory, workdir):
    dl = daemon_factory()
    port = free_port()
    textdir = workdir / "textfile"
    textdir.mkdir(mode=0o755)
    with_metrics(dl, listen=f"127.0.0.1:{port}", textfileDir=str(textdir), textfileInterval=1)
    dl.start()
    promote(dl, "tiny:1b")
    prom = textdir / "speedloader.prom"

    def written_after_promote() -> os.stat_result | None:
        if not prom.exists():
            return None
        found = samples(prom.read_text())
        if found.get(("speedloader_promotions_total", frozenset())) != 1:
            return None
        return prom.stat()

    first = wait_for(written_after_promote, 30, "the textfile to show the promote")
    assert stat.S_IMODE(first.st_mode) == 0o644 and (first.st_uid, first.st_gid) == (0, 0)
    # Each write is a new file renamed over the old one (another inode), never a rewrite of
    # the file node_exporter may be reading.
    second = wait_for(
        lambda: (s := prom.stat()).st_ino != first.st_ino and s, 30, "the next textfile write"
    )
    assert second.st_ino != first.st_ino
    from_file = samples(prom.read_text())
    over_http = samples(scrape(port))
    for key in [
        ("speedloader_promotions_total", frozenset()),
        ("speedloader_pool_used_bytes", frozenset({("pool", "local")})),
        ("speedloader_model_resident_bytes", frozenset({("model", "tiny:1b"), ("pool", "local")})),
        ("speedloader_models", frozenset({("state", "hot")})),
    ]:
        assert from_file[key] == over_http[key], key
    assert sorted(p.name for p in textdir.iterdir()) == ["speedloader.prom"], "temp files left"

    dl.stop()
    assert not prom.exists(), "a stopped daemon's textfile would be read as current"


# --- cardinality -----------------------------------------------------------------------------


def test_a_catalog_of_many_cold_models_makes_no_series_for_them(daemon_factory):
    dl = daemon_factory()
    for i in range(3000):
        make_ollama_model(dl.lab.cold, f"cold{i}:1b", (64 + i,))
    dl.lab.seal()
    port = free_port()
    with_metrics(dl, listen=f"127.0.0.1:{port}")
    dl.start()
    promote(dl, "tiny:1b")
    found = samples(scrape(port))
    assert value(found, "speedloader_models", state="cold") == 3002
    resident = [k for k in found if k[0] == "speedloader_model_resident_bytes"]
    assert resident == [
        ("speedloader_model_resident_bytes", frozenset({("model", "tiny:1b"), ("pool", "local")}))
    ]
    assert len(found) < 100, f"{len(found)} series for 3,003 models"


# --- what the endpoint refuses ---------------------------------------------------------------


def test_the_http_endpoint_serves_the_exposition_to_nothing_but_a_scraper(daemon_factory):
    dl = daemon_factory()
    port = free_port()
    with_metrics(dl, listen=f"127.0.0.1:{port}")
    dl.start()
    ok = get(port)
    body = ok.read()
    assert ok.status == 200 and body.startswith(b"# HELP")
    assert ok.getheader("Content-Type", "").startswith("text/plain")
    assert ok.getheader("X-Content-Type-Options") == "nosniff"
    assert not [h for h, _ in ok.getheaders() if h.lower().startswith("access-control-")]
    refused = {
        "another path": get(port, "/"),
        "a query": get(port, "/metrics?name[]=speedloader_models"),
        "a POST": get(port, method="POST"),
        "a page's fetch (Origin)": get(port, headers={"Origin": "https://evil.example"}),
        "a page's request (Sec-Fetch-Site)": get(port, headers={"Sec-Fetch-Site": "cross-site"}),
        "a rebound name (Host)": get(port, headers={"Host": f"evil.example:{port}"}),
    }
    for what, r in refused.items():
        text = r.read()
        assert r.status in (403, 404, 501), f"{what}: {r.status}"
        assert b"speedloader_" not in text, f"{what} was given metrics"
        assert not [h for h, _ in r.getheaders() if h.lower().startswith("access-control-")]
    # What an admin's typed URL sends is served.
    typed = get(port, headers={"Sec-Fetch-Site": "none", "Host": f"localhost:{port}"})
    assert typed.status == 200


# --- the unix socket, set live -----------------------------------------------------------------

_READ_SOCKET = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("EACCES"); sys.exit(0)
s.sendall(b"GET /metrics HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
print(data.decode())
"""


def test_a_unix_socket_set_live_is_read_by_the_group_only(daemon_factory, workdir):
    dl = daemon_factory()
    dl.start()
    promote(dl, "tiny:1b")  # a model in RAM: a key that rebuilt the engine would be refused
    sock = workdir / "run" / "metrics.sock"
    new = with_changes(dl.config, metrics={"listen": f"unix:{sock}"})

    async def set_config() -> None:
        async with await dl.client() as c:
            await c.manager("SetConfig", "s", json.dumps(dump_config(new)))

    run(set_config())
    st = sock.stat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660

    assert (st.st_uid, st.st_gid) == (0, grp.getgrnam(GROUP).gr_gid)

    def read_as(user: str) -> str:
        r = subprocess.run(
            as_user(user, [sys.executable, "-c", _READ_SOCKET, str(sock)], dl.address),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        return r.stdout

    member = read_as(ADMIN)
    assert member.startswith("HTTP/1.0 200") and "speedloader_promotions_total 1.0" in member
    assert read_as(GUEST).strip() == "EACCES"
    dl.stop()
    assert not sock.exists()


# --- config and counters, without a daemon ---------------------------------------------------


def test_metrics_config_names_its_mistakes_and_is_an_admins_change(lab):
    base = lab.config()
    for bad, why in [
        ("localhost:9477", "not an IP address"),
        ("127.0.0.1", "not an address"),
        ("127.0.0.1:0", "not an address"),
        ("unix:run/m.sock", "not an absolute path"),
    ]:
        with pytest.raises(ConfigError, match=why):
            with_changes(base, metrics={"listen": bad})
    assert parse_listen("[::1]:9477") == ("::1", 9477)
    assert parse_listen("unix:/run/speedloader/metrics.sock") == Path(
        "/run/speedloader/metrics.sock"
    )
    with pytest.raises(ConfigError, match="unknown key 'port'"):
        with_changes(base, metrics={"port": 9477})
    old = {"modelsDir": "/m"}
    assert admin_changes(old, {**old, "metrics": {"listen": "0.0.0.0:9477"}}) == ["metrics"]
    assert "metrics" not in dump_config(base), "an unset metrics key is not written"


def _ended(operation: str, state: JobState, error=None, done: int = 0, total: int = 0) -> Job:
    job = Job(operation)
    job.bytes_done, job.bytes_total = done, total
    job._finish(state, "", error)
    return job


def test_job_ends_are_counted_once_by_operation_and_error():
    now = [0.0]
    tally = JobTally(clock=lambda: now[0])

    def through(job: Job, seconds: float) -> None:
        running = Job(job.operation)
        running.id = job.id
        tally.seen(running)
        now[0] += seconds
        tally.seen(job)
        tally.seen(job)  # a second event for an ended job counts nothing

    through(_ended("promote", JobState.SUCCEEDED, done=100, total=100), 3.0)
    through(_ended("promote", JobState.SUCCEEDED), 0.01)  # already hot: no duration
    through(_ended("promote", JobState.FAILED, NoSpace("full"), done=40, total=100), 1.0)
    through(_ended("promote", JobState.FAILED, VerificationFailed("bad digest")), 1.0)
    through(_ended("demote", JobState.SUCCEEDED), 0.5)
    through(_ended("pool-connect", JobState.FAILED, Failed("ssh")), 0.5)
    through(_ended("promote", JobState.SUCCEEDED, done=1, total=1), 5000.0)  # past the buckets
    tally.seen(_ended("promote", JobState.SUCCEEDED))  # ended before it was ever seen

    assert (tally.promotions, tally.demotions) == (3, 1)
    assert dict(tally.failures) == {
        ("promote", "NoSpace"): 1,
        ("promote", "Failed"): 1,
        ("pool-connect", "Failed"): 1,
    }
    assert tally.verify_failures == 1
    assert tally.copied_bytes == 141
    assert tally.duration_count == 2 and tally.duration_sum == 5003.0
    hist = {s.labels.get("le"): s.value for f in tally.families() for s in f.samples
            if s.name == "speedloader_promote_duration_seconds_bucket"}  # fmt: skip
    assert hist["2.5"] == 0 and hist["5.0"] == 1
    assert hist[repr(PROMOTE_BUCKETS[-1])] == 1 and hist["+Inf"] == 2


class _SlowEngine:
    """Enough of an Engine for the census: its whole-catalog read blocks until released."""

    def __init__(self) -> None:
        self.started, self.release = threading.Event(), threading.Event()
        self.catalog = types.SimpleNamespace(models={"a:1b": None})
        self.pools = types.SimpleNamespace(mounted=lambda: set())

    def model_statuses(self) -> list:
        self.started.set()
        assert self.release.wait(60), "never released"
        return [self.model_status("a:1b")]

    def model_status(self, name: str, mounted: object = None) -> types.SimpleNamespace:
        return types.SimpleNamespace(name=name, state=ModelState.HOT, tier="local", size=7)


def test_a_census_under_way_neither_holds_the_event_loop_nor_a_scrape():
    """A 100,000-model catalog takes ~20 s to read after a start or a rescan: meanwhile an
    engine event (on the event loop) is marked at once, and a scrape answers without the
    model families after its wait instead of queueing behind the read."""
    census, engine = ModelCensus(), _SlowEngine()
    census.warm(engine)  # type: ignore[arg-type]
    assert engine.started.wait(30)
    assert census.changed(EventKind.MODEL, "a:1b") is False  # would hang if it waited
    assert census.refresh(engine, wait=0.05) is None  # type: ignore[arg-type]
    engine.release.set()
    models = census.refresh(engine)  # type: ignore[arg-type]
    assert models is not None and models["a:1b"].state is ModelState.HOT


def test_a_wide_listen_address_is_warned_of_and_an_unsafe_textfile_dir_is_not_written(
    workdir, caplog
):
    """In-process (no daemon): 0.0.0.0 is served with a warning naming what it exposes; a
    textfile directory a group member owns is refused (root writes there), nothing
    written, the exposition still served."""
    member = pwd.getpwnam(ADMIN)
    unsafe = workdir / "member-owned"
    unsafe.mkdir()
    os.chown(unsafe, member.pw_uid, member.pw_gid)
    port = free_port()

    async def scenario() -> None:
        export = MetricsExport(lambda: b"# TYPE x gauge\nx 1\n")
        config = MetricsConfig(listen=f"0.0.0.0:{port}", textfile_dir=unsafe, textfile_interval=1)
        await export.apply(config)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while not any("not written" in r.getMessage() for r in caplog.records):
                assert loop.time() < deadline, "the unsafe textfile dir was not reported"
                await asyncio.sleep(0.05)
            r = await asyncio.to_thread(get, port, "/metrics", {"Host": f"gpu1.example:{port}"})
            assert r.status == 200 and r.read() == b"# TYPE x gauge\nx 1\n"
        finally:
            await export.stop()

    with caplog.at_level(logging.INFO, logger="speedloaderd.metrics_export"):
        asyncio.run(scenario())
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        "not loopback" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records
    )
    refused = next(m for m in messages if "not written" in m)
    assert "not safe" in refused and str(unsafe) in refused, refused
    assert list(unsafe.iterdir()) == []
