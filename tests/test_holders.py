"""Who holds a model's files (speedloaderd/holders.py), on the real daemon and real tmpfs:
a plain mapper of the pool copy, a process with the cold file open, the RAM a deleted copy
keeps after a demote (HeldBytes, UsedBytes) and its release, a hostile command name, and
the fake Ollama's Loaded through its API."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from speedloader_client.client import MODEL, POOL, Client
from speedloader_client.fmt import held, model_use
from speedloader_lab import llama
from speedloader_lab.fake_backend import FakeProcess
from speedloader_lab.llama import LlamaServer, child_pids
from speedloader_lab.modelgen import make_llama_gguf
from speedloaderd.backends.ollama import OllamaBackend
from speedloaderd.bus.names import model_path, pool_path
from speedloaderd.config import DemotePolicy, save_config
from speedloaderd.holders import printable

from .buslab import GUEST, as_user, run

HOLDER = Path(__file__).with_name("holder_proc.py")
WAIT = 20.0  # the daemon looks every 5 s (1 s while RAM is held): far above either


class Holder:
    def __init__(self, how: str, path: Path, comm: str | None = None) -> None:
        args = [sys.executable, str(HOLDER), how, str(path)] + ([comm] if comm else [])
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == b"ready\n"
        self.pid = self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    started: list[Holder] = []
    yield started
    for h in started:
        h.stop()


async def until(
    c: Client, path: str, iface: str, ok: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    """The object's properties once ``ok`` holds: read again at each PropertiesChanged of it."""
    changed = asyncio.Event()
    remove = c.add_listener(lambda m: m.path == path and changed.set())
    try:
        async with asyncio.timeout(WAIT):
            while True:
                changed.clear()
                props = await c.get_all(path, iface)
                if ok(props):
                    return props
                await changed.wait()
    except TimeoutError:
        raise AssertionError(f"{what} not seen within {WAIT} s: {props}") from None
    finally:
        remove()


def blob_of(lab: Any, size: int) -> str:
    """The models dir's blob link of ``size`` bytes (tiny:1b's 256 KiB layer)."""
    for blob in sorted((lab.cold / "blobs").iterdir()):
        if blob.stat().st_size == size:
            return f"blobs/{blob.name}"
    raise AssertionError(f"no blob of {size} bytes")


LAYER = 256 * 1024


def test_mapper_of_the_pool_copy_then_demote_holds_ram_until_it_exits(daemon_factory, holders):
    daemon = daemon_factory()
    lab = daemon.lab
    rel = blob_of(lab, LAYER)
    # force: the demote deletes the copy the mapper holds (wait and refuse are in
    # tests/test_demote_policy.py); the RAM it keeps is what this test follows.
    daemon.config.backend.demote_policy = DemotePolicy.FORCE
    save_config(daemon.config, lab.config_path)
    daemon.start()

    async def scenario() -> None:
        async with await daemon.client() as c:
            await c.subscribe()
            assert (await c.follow_job(await c.promote("tiny:1b"), timeout=60)).success
            base = await c.get_all(pool_path("local"), POOL)
            # Through the models dir link, as a server reads it: the pool copy is mapped.
            mapper = Holder("map", lab.models / rel)
            holders.append(mapper)
            props = await until(
                c, model_path("tiny:1b"), MODEL,
                lambda p: [mapper.pid, "python3"] in p["Holders"] or any(
                    h[0] == mapper.pid for h in p["Holders"]), "the mapper in Holders",
            )  # fmt: skip
            (pid, command), *_ = [h for h in props["Holders"] if h[0] == mapper.pid]
            assert command == Path(sys.executable).name[:15]  # comm: the executable's name
            assert props["Loaded"] is False  # no backend answers here
            # The demote deletes the copy; the mapping keeps its pages in the pool.
            assert (await c.follow_job(await c.demote("tiny:1b"), timeout=60)).success
            assert not (lab.pool_path("local") / rel).exists()
            pool = await until(
                c, pool_path("local"), POOL, lambda p: p["HeldBytes"] >= LAYER, "HeldBytes"
            )
            assert pool["HeldBytes"] == LAYER  # st_blocks of the deleted 256 KiB file
            assert pool["UsedBytes"] >= LAYER
            st = os.statvfs(lab.pool_path("local"))
            assert (st.f_blocks - st.f_bfree) * st.f_frsize >= LAYER  # df agrees: still taken
            model = await c.get_all(model_path("tiny:1b"), MODEL)
            assert model["State"] == "cold" and not any(
                h[0] == mapper.pid for h in model["Holders"]
            )
            mapper.stop()
            pool = await until(
                c, pool_path("local"), POOL,
                lambda p: p["HeldBytes"] == 0 and p["UsedBytes"] < LAYER, "the RAM released",
            )  # fmt: skip
            assert pool["UsedBytes"] <= base["UsedBytes"]  # back to the empty pool's usage

    run(scenario())


def test_cold_file_open_and_a_hostile_command_name(daemon, holders):
    lab = daemon.lab
    rel = blob_of(lab, LAYER)
    hostile = "\x1b[31mx\x07"
    reader = Holder("open", lab.cold / rel, hostile)  # cold: the model is not promoted
    holders.append(reader)

    async def scenario() -> dict[str, Any]:
        async with await daemon.client() as c:
            await c.subscribe()
            return await until(
                c, model_path("tiny:1b"), MODEL,
                lambda p: any(h[0] == reader.pid for h in p["Holders"]), "the reader",
            )  # fmt: skip

    props = run(scenario())
    (command,) = [h[1] for h in props["Holders"] if h[0] == reader.pid]
    assert props["Loaded"] is False
    assert command == r"\x1b[31mx\x07" == printable(hostile.encode())
    # small:3b shares the layer (one blob, one inode): its holder too. Anyone may look.
    slctl = str(Path(sys.executable).with_name("slctl"))
    r = subprocess.run(
        as_user(GUEST, [slctl, "status"], daemon.address),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert f"held by \\x1b[31mx\\x07 (pid {reader.pid})" in r.stdout
    assert "\x1b" not in r.stdout


def test_loaded_follows_the_fake_ollama(daemon_factory, holders):
    dl = daemon_factory()
    lab = dl.lab
    rel = blob_of(lab, LAYER)
    fake = FakeProcess("fake_ollama", "--model", f"tiny:1b={lab.models / rel}")
    try:
        dl.config.backend.api_url = fake.url
        save_config(dl.config, lab.config_path)
        dl.start()

        async def scenario() -> None:
            async with await dl.client() as c:
                await c.subscribe()
                path = model_path("tiny:1b")
                assert (await c.get_all(path, MODEL))["Loaded"] is False
                backend = OllamaBackend(fake.url)
                assert (await backend.preload("tiny:1b")).ok
                props = await until(c, path, MODEL, lambda p: p["Loaded"], "Loaded")
                assert any(h[0] == fake.pid for h in props["Holders"])
                assert (await backend.unload("tiny:1b")).ok
                props = await until(c, path, MODEL, lambda p: not p["Loaded"], "not Loaded")
                assert not any(h[0] == fake.pid for h in props["Holders"])

        run(scenario())
    finally:
        fake.stop()


@pytest.fixture
def llama_binary() -> Path:
    try:
        return llama.build()  # cached under /var/cache/speedloader-llama after the first
    except llama.CannotBuild as err:
        banner = f"llama-server holder test not run: {err}"
        if os.environ.get("SPEEDLOADER_LLAMA_REQUIRED") == "1":
            pytest.fail(banner + " (SPEEDLOADER_LLAMA_REQUIRED=1)")
        pytest.skip(banner)


@pytest.mark.llama
def test_real_llama_server_router_child_is_the_holder(daemon_factory, llama_binary, workdir):
    dl = daemon_factory()
    lab = dl.lab
    make_llama_gguf(lab.cold / "tiny-llama.gguf")
    lab.seal()  # cold storage now holds the GGUF too; it must stay as it is
    router = LlamaServer(
        ["--models-dir", str(lab.models), "--no-models-autoload", "-c", "256", "-np", "1",
         "-t", "1"],
        workdir / "llama-server.log",
    )  # fmt: skip
    dl.config = lab.config(backend="llamacpp", pools=(("local", dl.pool_size, 100),))
    dl.config.backend.api_url = router.url
    save_config(dl.config, lab.config_path)
    dl.start()
    try:

        async def scenario() -> None:
            async with await dl.client() as c:
                await c.subscribe()
                assert (await c.follow_job(await c.promote("tiny-llama"), timeout=60)).success
                router.start()
                assert router.post("/models/load", {"model": "tiny-llama"}) == {"success": True}
                path = model_path("tiny-llama")
                props = await until(
                    c, path, MODEL, lambda p: p["Loaded"] and p["Holders"], "loaded and held"
                )
                # The router's loading -> loaded is one load (speedloaderd/usage.py).
                counted = await until(c, path, MODEL, lambda p: p["LoadCount"] == 1, "the load")
                assert counted["LastUsed"] > 0
                ((pid, command),) = props["Holders"]
                assert child_pids(router.pid) == [pid]  # the router's child maps the copy
                assert command == "llama-server"
                base = await c.get_all(pool_path("local"), POOL)
                # A demote unloads it through the router's API, then deletes the copy.
                done = await c.follow_job(await c.demote("tiny-llama"), timeout=60)
                assert done.success, done.message
                assert "(llama.cpp unloaded it first)" in done.message
                assert "stays in use" not in done.message
                await until(
                    c, path, MODEL, lambda p: not p["Loaded"] and not p["Holders"], "unloaded"
                )
                pool = await until(
                    c, pool_path("local"), POOL,
                    lambda p: p["UsedBytes"] < base["UsedBytes"], "the RAM back",
                )  # fmt: skip
                assert pool["HeldBytes"] == 0
                st = os.statvfs(lab.pool_path("local"))
                assert (st.f_blocks - st.f_bfree) * st.f_frsize == pool["UsedBytes"]  # as df

        run(scenario())
    finally:
        router.stop()


def test_untrusted_command_names_are_escaped_and_bounded():
    assert printable(b"python3\n") == "python3"
    assert printable(b"\x1b]0;pwn\x07") == r"\x1b]0;pwn\x07"
    assert printable(b"\xff\xfeab") == r"\xff\xfeab"  # not UTF-8: the bytes, escaped
    assert printable("\u202etxt".encode()) == r"\x202etxt"  # a bidi override is not printable
    assert len(printable(b"\x01" * 100)) == 64


def test_who_uses_a_model_reads_as_the_issue_says():
    assert (
        model_use(True, [[812, "llama-server"]], "llamacpp") == "loaded in llama-server (pid 812)"
    )
    assert model_use(False, [[900, "python3"]], "ollama") == "held by python3 (pid 900)"
    assert model_use(True, [], "ollama") == "loaded in ollama"
    assert model_use(False, [], "ollama") == ""
    assert model_use(False, [[1, "\x1b[2J"]], "") == r"held by \x1b[2J (pid 1)"
    assert held(int(2.7 * (1 << 30))) == "2.7G held by deleted copies" and held(0) == ""
