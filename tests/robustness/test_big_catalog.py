"""Issue 10, item 4: a big catalog never takes the daemon off the bus.

dbus-daemon drops the connection of a sender whose message is larger than its
``max_message_size`` (32 MiB on a stock system bus): with 100,000 models one
GetManagedObjects, asked by anyone, did that to speedloaderd, which then exited. Here the
real daemon serves 100,000 GGUF models (built once per module) on the test bus, and
unprivileged users read it all with slctl; a catalog of long names makes a reply too large
that only the send guard can catch; and a bus with a tight limit drops the daemon, which
comes back by itself.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dbus_fast import Message, Variant

from bench.scan import make_gguf_tree
from speedloader_client.client import OBJECT_MANAGER, ROOT, Client, ClientError
from speedloader_lab.sandbox import Sandbox
from speedloader_tui.link import DaemonLink
from speedloader_tui.state import DaemonState
from speedloaderd.bus.names import model_path
from speedloaderd.bus.objects import HEALTH_BYTES, ModelInterface, bounded_findings
from speedloaderd.bus.server import (
    MAX_MESSAGE_BYTES,
    MAX_PAGE,
    MIN_OBJECT_BYTES,
    _properties,
    model_values,
)
from speedloaderd.config import save_config
from speedloaderd.engine import ModelStatus
from speedloaderd.health import Finding, Status

from ..buslab import GUEST, as_user, ensure_users
from ..conftest import unmount_below
from ..lab import Lab

SLCTL = str(Path(sys.executable).with_name("slctl"))
N_MODELS = 100_000


@dataclass
class Served:
    lab: Lab
    sandbox: Sandbox
    proc: subprocess.Popen
    start_s: float
    names: set[str]

    def slctl(
        self, *args: str, user: str | None = GUEST
    ) -> tuple[subprocess.CompletedProcess, float]:
        t0 = time.perf_counter()
        r = subprocess.run(
            as_user(user, [SLCTL, *args], self.sandbox.address),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert "Traceback" not in r.stderr + r.stdout, r.stderr
        return r, time.perf_counter() - t0

    def call(self, *args, **kw):
        async def go():
            async with await Client.connect(self.sandbox.address) as c:
                return await c.call(*args, **kw)

        return asyncio.run(go())

    def manager(self, member: str, signature: str = "", *args):
        return self.call(ROOT, "org.speedloader.Speedloader1.Manager", member, signature, args)

    def assert_alive(self) -> None:
        assert self.proc.poll() is None, self.sandbox.daemon_log()[-3000:]
        assert self.manager("GetVersion")  # on the bus, answering


def gguf_names(cold: Path) -> set[str]:
    """The model names the llama.cpp catalog gives make_gguf_tree's files."""
    names = set()
    for p in cold.rglob("*.gguf"):
        rel = str(p.relative_to(cold)).removesuffix(".gguf")
        names.add(rel.split("-00001-of-")[0] if "-of-" in rel else rel)
    return {n for n in names if "-0000" not in n}


def serve(sandbox: Sandbox, root: Path, build) -> Served:
    lab = Lab(root)
    build(lab.cold)
    save_config(lab.config(backend="llamacpp"), lab.config_path)
    t0 = time.perf_counter()
    proc = sandbox.start_daemon(lab.config_path, timeout=600)
    return Served(lab, sandbox, proc, time.perf_counter() - t0, gguf_names(lab.cold))


def stop(served: Served, root: Path) -> None:
    if served.proc.poll() is None:
        served.sandbox.stop_daemon(served.proc)
    unmount_below(root)
    shutil.rmtree(root, ignore_errors=True)


def tempdir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="sl-bigcat-", dir="/tmp"))
    d.chmod(0o755)
    return d


@pytest.fixture(scope="module")
def big(sandbox) -> Iterator[Served]:
    """100,000 models (120,000 tiny .gguf files, one model in ten split in 3), served."""
    root = tempdir()
    served = serve(sandbox, root, lambda cold: make_gguf_tree(cold, N_MODELS * 6 // 5))
    try:
        assert len(served.names) == N_MODELS
        yield served
    finally:
        stop(served, root)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# --- 100,000 models ------------------------------------------------------------------------


def test_status_as_outsider_keeps_the_daemon_on_the_bus(big: Served):
    r, status_s = big.slctl("status")
    assert r.returncode == 0, r.stderr
    shown = [line.split()[0] for line in r.stdout.splitlines() if line.startswith("org")]
    assert len(shown) == N_MODELS
    big.assert_alive()
    print(
        f"\n{N_MODELS} models: daemon start to on-the-bus {big.start_s:.1f} s, "
        f"RSS {rss_kib(big.proc.pid) / 1024:.0f} MiB, `slctl status` as {GUEST} {status_s:.1f} s"
    )


def test_status_json_returns_every_model_in_its_shape(big: Served):
    r, seconds = big.slctl("status", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert set(doc) == {"backend", "pools", "models", "jobs", "coldStorage", "scanProblems"}
    assert {m["name"] for m in doc["models"]} == big.names
    assert set(doc["models"][0]) == {
        "name",
        "format",
        "sizeBytes",
        "tier",
        "pinnedPool",
        "state",
        "problems",
        "loaded",
        "holders",
        "lastUsed",
        "loadCount",
        "useCount",
        "value",
        "why",
    }
    assert [p["name"] for p in doc["pools"]] == ["local"]
    big.assert_alive()
    print(f"\n`slctl status --json` as {GUEST} with {N_MODELS} models: {seconds:.1f} s")


def test_get_managed_objects_answers_too_large_and_nothing_changes(big: Served):
    before = big.manager("ListModels", "uua{sv}", 0, 5, {})
    with pytest.raises(ClientError) as err:
        big.call(ROOT, OBJECT_MANAGER, "GetManagedObjects")
    assert err.value.name == "TooLarge"
    assert "ListModels" in err.value.message
    big.assert_alive()
    assert big.manager("ListModels", "uua{sv}", 0, 5, {}) == before


def test_list_models_pages_are_capped_and_filtered(big: Served):
    total, page = big.manager("ListModels", "uua{sv}", 0, 10**9, {})
    assert total == N_MODELS and len(page) == MAX_PAGE
    names = [props["Name"] for _, props in page]
    assert names == sorted(names)
    # "after" is a cursor: the next page starts right after the last name.
    _, nxt = big.manager("ListModels", "uua{sv}", 0, 3, {"after": Variant("s", names[-1])})
    assert [p["Name"] for _, p in nxt] == sorted(big.names)[MAX_PAGE : MAX_PAGE + 3]
    _, off = big.manager("ListModels", "uua{sv}", MAX_PAGE, 3, {})
    assert off == nxt
    # Filters: a name substring (any case), state, tier.
    total, page = big.manager("ListModels", "uua{sv}", 0, 0, {"name": Variant("s", "SPLIT")})
    assert total == sum(1 for n in big.names if "split" in n) and total > 0
    assert all("split" in p["Name"] for _, p in page)
    total, _ = big.manager("ListModels", "uua{sv}", 0, 1, {"state": Variant("s", "cold")})
    assert total == N_MODELS
    total, page = big.manager("ListModels", "uua{sv}", 0, 0, {"tier": Variant("s", "local")})
    assert (total, page) == (0, [])
    for bad in ({"colour": Variant("s", "red")}, {"name": Variant("u", 3)}):
        with pytest.raises(ClientError) as err:
            big.manager("ListModels", "uua{sv}", 0, 0, bad)
        assert err.value.name == "InvalidArgument"
    big.assert_alive()


# --- a reply only the send guard can catch -------------------------------------------------


def test_a_reply_over_the_cap_is_refused_by_name_not_by_the_bus():
    """20,000 models with 200-character names: few enough objects for GetManagedObjects
    to be built, each ~900 bytes, so the reply is ~18 MiB: the guard answers TooLarge (and
    slctl pages); the bus never sees the message. (A bus of its own: the module's 100,000
    model daemon still owns the name on the shared one.)"""
    n = 20_000
    assert n * MIN_OBJECT_BYTES < MAX_MESSAGE_BYTES  # the count check lets it through

    def build(cold: Path) -> None:
        d = cold / ("d" * 200)
        d.mkdir(parents=True)
        for i in range(n):
            (d / f"m{i:05d}.gguf").write_bytes(b"GGUF")

    ensure_users()
    root = tempdir()
    with Sandbox() as own:
        served = serve(own, root, build)
        try:
            with pytest.raises(ClientError) as err:
                served.call(ROOT, OBJECT_MANAGER, "GetManagedObjects")
            assert err.value.name == "TooLarge"
            served.assert_alive()
            assert "refused: answered TooLarge" in own.daemon_log()
            r, _ = served.slctl("status", "--json")
            assert r.returncode == 0, r.stderr
            assert {m["name"] for m in json.loads(r.stdout)["models"]} == served.names
            # The dashboard's link loads the same state in pages.
            state = asyncio.run(dashboard_state(own.address))
            assert {m.name for m in state.models.values()} == served.names
            assert [p.name for p in state.pools.values()] == ["local"]
            assert state.online and state.manager.model_count == len(served.names)
            served.assert_alive()
        finally:
            stop(served, root)


async def dashboard_state(address: str) -> DaemonState:
    """What the dashboard's DaemonLink holds once it says the daemon is online."""
    state = DaemonState()
    online = asyncio.get_running_loop().create_future()

    def on_event(kind: str, what) -> None:
        if kind in ("online", "error") and not online.done():
            online.set_result((kind, what))

    link = DaemonLink(state, address, lambda: None, on_event)
    task = asyncio.create_task(link.run())
    try:
        kind, what = await asyncio.wait_for(online, 120)
        assert kind == "online", what
    finally:
        link.stop()
        await asyncio.wait_for(task, 30)
    return state


# --- dropped by the bus: back by itself ------------------------------------------------------


def test_dropped_by_a_tight_bus_the_daemon_reconnects_with_its_state():
    """A bus allowing 1 MiB messages: a GetManagedObjects of 5,000 models (~1.5 MiB, under
    the daemon's cap) makes dbus-daemon drop the daemon. It must reconnect and serve the
    same objects, not exit."""
    ensure_users()
    root = tempdir()
    with Sandbox(limits={"max_message_size": 1 << 20}) as tight:
        served = serve(tight, root, lambda cold: make_gguf_tree(cold, 6000))
        try:
            before = served.manager("ListModels", "uua{sv}", 0, 0, {})
            with pytest.raises(ClientError):
                served.call(ROOT, OBJECT_MANAGER, "GetManagedObjects", timeout=60)
            tight.wait_for_name("org.speedloader.Speedloader1", served.proc, timeout=60)
            served.assert_alive()
            assert served.manager("ListModels", "uua{sv}", 0, 0, {}) == before
            log = tight.daemon_log()
            assert "dbus-daemon dropped the connection" in log
            assert "back on the system bus" in log
            # Its objects are exported again, not only its Manager.
            props = served.call(
                model_path(before[1][0][1]["Name"]),
                "org.freedesktop.DBus.Properties",
                "GetAll",
                "s",
                ["org.speedloader.Speedloader1.Model"],
            )
            assert props["Name"] == before[1][0][1]["Name"]

            # ...and signal on the new connection: a promote is followed to its end.
            async def promote(name: str) -> bool:
                async with await Client.connect(tight.address) as c:
                    await c.subscribe()
                    return (await c.follow_job(await c.promote(name), timeout=60)).success

            assert asyncio.run(promote(props["Name"]))
            served.assert_alive()
        finally:
            stop(served, root)


# --- the bounds, without a daemon -----------------------------------------------------------


def test_min_object_bytes_is_a_lower_bound_of_a_model_object():
    """The count check may refuse only replies that are surely too large: no model object
    marshals smaller than MIN_OBJECT_BYTES (one-letter name, empty format)."""

    def marshalled(objects: dict) -> int:
        return len(
            Message.new_signal("/a", "a.b", "c", "a{oa{sa{sv}}}", [objects])._marshall(False)
        )

    iface = ModelInterface(None, "x")  # type: ignore[arg-type]
    iface.update(model_values(ModelStatus("x", "", 0, "cold", "", "cold", ())))
    one = {model_path("x"): {iface.name: _properties(model_path("x"), iface)}}
    assert marshalled(one) - marshalled({}) >= MIN_OBJECT_BYTES


def test_problems_and_health_findings_are_bounded():
    st = ModelStatus("x", "gguf", 0, "cold", "", "degraded", tuple("p" * 5000 for _ in range(999)))
    problems = model_values(st)["Problems"]
    assert len(problems) <= 20 and all(len(p) <= 500 for p in problems)
    assert "more problems" in problems[-1]
    findings = [
        Finding(check="link", status=Status.OK, subject=f"m{i}", message="ok " * 40)
        for i in range(100_000)
    ]
    findings.append(Finding(check="link", status=Status.ERROR, subject="broken", message="no"))
    rows = bounded_findings(findings)
    assert rows[0][:3] == ["link", "error", "broken"]  # problems first, never cut
    assert sum(32 + 4 * sum(len(str(v)) for v in r) for r in rows) <= HEALTH_BYTES + 1024
    assert "more findings" in rows[-1][3]


# --- a Rescan that finds 30,000 new models ---------------------------------------------------


def test_rescan_announcing_30000_models_keeps_the_daemon_on_the_bus():
    """Each new model is one InterfacesAdded (one object, far under the cap); 30,000 of them
    at once must all reach a subscriber, and the daemon must stay on the bus."""
    n = 30_000
    ensure_users()
    root = tempdir()
    with Sandbox() as own:
        served = serve(own, root, lambda cold: make_gguf_tree(cold, 2))
        try:
            for i in range(n):
                d = served.lab.cold / f"new{i % 50}"
                d.mkdir(exist_ok=True)
                (d / f"m{i}.gguf").write_bytes(b"GGUF")

            async def rescan() -> tuple[int, int]:
                async with await Client.connect(own.address) as c:
                    await c.subscribe()
                    added = 0
                    all_seen = asyncio.Event()

                    def on_signal(msg: Message) -> None:
                        nonlocal added
                        if msg.member == "InterfacesAdded" and "models/new" in msg.body[0]:
                            added += 1
                            if added == n:
                                all_seen.set()

                    c.add_listener(on_signal)
                    count = await c.manager("Rescan")
                    await asyncio.wait_for(all_seen.wait(), 300)
                    return count, added

            count, added = asyncio.run(rescan())
            assert count == n + 2 and added == n
            served.assert_alive()
            manager = served.call(
                ROOT,
                "org.freedesktop.DBus.Properties",
                "GetAll",
                "s",
                ["org.speedloader.Speedloader1.Manager"],
            )
            assert manager["ModelCount"] == n + 2
        finally:
            stop(served, root)
