"""The real llama.cpp ``llama-server`` serving a model from a real tmpfs pool, via the models dir.

The binary is built once per machine from the llama.cpp that the llama-cpp-python sdist vendors
(``python -m speedloader_lab.llama build``; scripts/test runs it before pytest); the model is a
tiny llama-architecture GGUF (speedloader_lab.modelgen.make_llama_gguf) that the daemon's
engine promotes into a tmpfs pool, so the models dir entry the server opens is the engine's
symlink into the pool. The API shapes asserted here are the ones speedloader_lab/llama.py's
docstring records for the backend adapters: if llama.cpp changes them, this fails.

When the binary cannot be built (no cmake or compiler) the tests skip with a banner saying why;
with SPEEDLOADER_LLAMA_REQUIRED=1 (scripts/test sets it) they fail instead.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from speedloader_lab import llama
from speedloader_lab.llama import LlamaServer, child_pids, group_alive, mappings_of, wait_for
from speedloader_lab.modelgen import make_llama_gguf

pytestmark = pytest.mark.llama

MODEL = "tiny-llama"  # the router names a models dir file by its name without ".gguf"
# Small and quiet on a shared 2-core machine: one slot, one thread, a short context.
SERVER_ARGS = ["-c", "256", "-np", "1", "-t", "1"]
COMPLETION = {"prompt": "hello world", "n_predict": 4, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def llama_binary(request: pytest.FixtureRequest) -> Path:
    capman = request.config.pluginmanager.getplugin("capturemanager")
    try:
        with capman.global_and_fixture_disabled():  # the build's progress lines show
            return llama.build()
    except llama.CannotBuild as err:
        banner = f"llama-server tier not run: {err}"
        if os.environ.get("SPEEDLOADER_LLAMA_REQUIRED") == "1":
            pytest.fail(banner + " (SPEEDLOADER_LLAMA_REQUIRED=1)")
        pytest.skip(banner)


@dataclass
class HotModel:
    link: Path  # the models dir entry the server is given
    pool_file: Path  # the copy in the tmpfs pool the link resolves to
    cold_file: Path


@pytest.fixture
def hot_model(lab, llama_binary) -> HotModel:
    """The tiny model on cold storage, promoted by the engine into the lab's tmpfs pool."""
    cold = make_llama_gguf(lab.cold / f"{MODEL}.gguf").path
    lab.seal()

    async def promote() -> None:
        engine = await lab.engine(lab.config(backend="llamacpp"))
        await engine.promote(MODEL).wait()
        assert engine.model_status(MODEL).state == "hot"

    asyncio.run(promote())
    link = lab.models / f"{MODEL}.gguf"
    pool_file = Path(os.path.realpath(link))
    assert pool_file.is_relative_to(lab.pool_path("local")), pool_file
    assert pool_file.read_bytes() == cold.read_bytes()
    return HotModel(link, pool_file, cold)


@pytest.fixture
def servers(workdir) -> Iterator[list[LlamaServer]]:
    """Servers a test starts (append them); each is stopped, with its model children."""
    started: list[LlamaServer] = []
    yield started
    for server in started:
        pgid = server.proc.pid if server.proc else None
        server.stop()
        if pgid is not None:  # nothing of its session may outlive the test (zombies: reaped)
            gone = functools.partial(lambda g: not group_alive(g), pgid)
            wait_for(gone, 10, f"llama-server group {pgid} to go")


def start(servers: list[LlamaServer], workdir: Path, *args: str) -> LlamaServer:
    server = LlamaServer([*args, *SERVER_ARGS], workdir / f"llama-server-{len(servers)}.log")
    servers.append(server)
    return server.start()


def router_entry(server: LlamaServer) -> dict:
    (entry,) = [m for m in server.get("/models")["data"] if m["id"] == MODEL]
    return entry


def test_router_loads_the_pool_copy_in_a_child_and_unloads_it(hot_model, servers, workdir):
    router = start(servers, workdir, "--models-dir", str(hot_model.link.parent),
                   "--no-models-autoload")  # fmt: skip
    assert router.get("/health") == {"status": "ok"}  # no model loaded: the router is up
    # /props tells a router from a single-model server: only the router has "role".
    props = router.get("/props")
    assert props["role"] == "router"
    assert props["model_path"] == "none"
    assert props["models_autoload"] is False

    listing = router.get("/models")
    assert listing["object"] == "list"
    entry = router_entry(router)
    assert entry["status"]["value"] == "unloaded"
    assert entry["source"] == "models_dir"
    assert {"id", "object", "owned_by", "created", "status", "aliases", "tags"} <= set(entry)
    assert child_pids(router.pid) == []
    assert mappings_of(router.pid, hot_model.pool_file) == []

    t0 = time.monotonic()
    assert router.post("/models/load", {"model": MODEL}) == {"success": True}
    loaded = wait_for(
        lambda: (e := router_entry(router))["status"]["value"] == "loaded" and e,
        60, "the router to report the model loaded",
    )  # fmt: skip
    print(f"router load of the tiny model: {time.monotonic() - t0:.2f} s")
    # The model runs in a child llama-server spawned by the router, in the router's process
    # group; the child maps the pool copy, the router does not.
    (child,) = child_pids(router.pid)
    assert os.getpgid(child) == router.pid
    assert mappings_of(child, hot_model.pool_file), Path(f"/proc/{child}/maps").read_text()
    assert mappings_of(router.pid, hot_model.pool_file) == []
    assert mappings_of(child, hot_model.cold_file) == []
    # status.args is the child's command line: the models dir path it was given, not the pool.
    args = loaded["status"]["args"]
    assert str(hot_model.link) in args, args

    answer = router.post("/completion", {"model": MODEL, **COMPLETION})
    assert answer["tokens_predicted"] == 4, answer
    props = router.get(f"/props?model={MODEL}")  # answered by the child
    assert "role" not in props
    assert props["model_path"] == str(hot_model.link)
    assert props["model_alias"] == MODEL
    assert props["is_sleeping"] is False

    # Unloading answers at once; the status turns "unloaded" when the child has exited.
    assert router.post("/models/unload", {"model": MODEL}) == {"success": True}
    unloaded = wait_for(
        lambda: (e := router_entry(router))["status"]["value"] == "unloaded" and e,
        30, "the router to report the model unloaded",
    )  # fmt: skip
    assert "failed" not in unloaded["status"], unloaded
    wait_for(lambda: child not in child_pids(router.pid), 10, "the model's child to exit")
    assert mappings_of(child, hot_model.pool_file) == []
    # Unloading what is not loaded is an error in the OpenAI shape.
    status, body = router.request("POST", "/models/unload", {"model": MODEL})
    assert status == 400
    assert body["error"]["message"] == "model is not running"


def test_single_model_server_maps_the_pool_copy(hot_model, servers, workdir):
    server = start(servers, workdir, "-m", str(hot_model.link))
    assert server.get("/health") == {"status": "ok"}
    props = server.get("/props")
    assert "role" not in props
    # model_path is the -m argument as given (the models dir link), not the file it resolves to.
    assert props["model_path"] == str(hot_model.link)
    assert props["is_sleeping"] is False
    assert isinstance(props["build_info"], str)
    # /models answers here too, as /v1/models does: entries without "status"; no unload.
    (entry,) = server.get("/models")["data"]
    assert entry["id"] == str(hot_model.link)
    assert "status" not in entry
    assert server.request("POST", "/models/unload", {"model": entry["id"]})[0] == 404
    assert mappings_of(server.pid, hot_model.pool_file)
    assert mappings_of(server.pid, hot_model.cold_file) == []
    assert child_pids(server.pid) == []

    answer = server.post("/completion", COMPLETION)
    assert answer["tokens_predicted"] == 4, answer


def test_a_model_loaded_before_its_promote_keeps_mapping_the_cold_file(
    lab, llama_binary, servers, workdir
):
    """Why the daemon must reload after a promote (issue 12, item 5): repointing the link
    does not move a loaded model; the server goes on reading cold storage."""
    cold = make_llama_gguf(lab.cold / f"{MODEL}.gguf").path
    lab.seal()
    link = lab.models / f"{MODEL}.gguf"

    async def scenario() -> None:
        engine = await lab.engine(lab.config(backend="llamacpp"))
        assert Path(os.path.realpath(link)) == cold  # a cold model's link points at cold storage
        server = start(servers, workdir, "-m", str(link))
        assert mappings_of(server.pid, cold)
        await engine.promote(MODEL).wait()
        pool_file = Path(os.path.realpath(link))
        assert pool_file.is_relative_to(lab.pool_path("local"))
        assert mappings_of(server.pid, cold)
        assert mappings_of(server.pid, pool_file) == []
        assert server.post("/completion", COMPLETION)["tokens_predicted"] == 4

    asyncio.run(scenario())


def test_the_llamacpp_adapter_against_the_real_router(hot_model, servers, workdir):
    """speedloaderd/backends/llamacpp.py, written from the README, against the real router:
    it tells the router by /props, preloads and unloads through /models/load and /unload
    (confirmed by the listing), and names the file the model's child maps (status.args)."""
    from speedloaderd.backends import backend_for
    from speedloaderd.backends.base import Status
    from speedloaderd.config import BackendConfig, BackendType

    router = start(servers, workdir, "--models-dir", str(hot_model.link.parent),
                   "--no-models-autoload")  # fmt: skip
    backend = backend_for(BackendConfig(type=BackendType.LLAMACPP, api_url=router.url))

    async def scenario():
        state = await backend.state()
        caps = await backend.capabilities()
        before = await backend.loaded()
        preloaded = await backend.preload(MODEL)
        during = await backend.loaded()
        (child,) = child_pids(router.pid)
        mapped = bool(mappings_of(child, hot_model.pool_file))
        unloaded = await backend.unload(MODEL)
        after = await backend.loaded()
        return state, caps, before, preloaded, during, child, mapped, unloaded, after

    state, caps, before, preloaded, during, child, mapped, unloaded, after = asyncio.run(scenario())
    assert state.status is Status.UP, state
    assert caps.can_unload and caps.can_preload, caps
    assert before == [], before
    assert preloaded.ok, preloaded
    assert [m.name for m in during] == [MODEL] and mapped
    assert during[0].paths == (str(hot_model.link),), during  # the link the child was given
    assert unloaded.ok, unloaded
    assert after == [], after
    wait_for(lambda: child not in child_pids(router.pid), 10, "the model's child to exit")
    assert mappings_of(child, hot_model.pool_file) == []


def test_the_llamacpp_adapter_against_a_real_single_model_server(hot_model, servers, workdir):
    """A single-model server: the adapter reports its one model (the -m path) and says it
    cannot unload it, rather than pretending."""
    from speedloaderd.backends import backend_for
    from speedloaderd.backends.base import Status
    from speedloaderd.config import BackendConfig, BackendType

    server = start(servers, workdir, "-m", str(hot_model.link))
    backend = backend_for(BackendConfig(type=BackendType.LLAMACPP, api_url=server.url))

    async def scenario():
        return await backend.state(), await backend.capabilities(), await backend.loaded()

    state, caps, loaded = asyncio.run(scenario())
    assert state.status is Status.UP, state
    assert not caps.can_unload and caps.why_not, caps
    assert [m.paths for m in loaded] == [(str(hot_model.link),)], loaded
    assert mappings_of(server.pid, hot_model.pool_file)
