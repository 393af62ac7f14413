"""Issue 12 item 5: after a promote, a server that loaded the model from cold storage keeps
reading it there; ``slctl promote --reload`` / ``backend.reloadAfterPromote`` has it load
the model again from the pool when it is idle (speedloaderd/reload.py). On the real daemon
with the fake servers (which map the file they load, as the real ones do), and with the
real llama-server router.

Each case checks what the server maps afterwards (/proc), not only what the job says: the
pool copy after a reload, the cold file still when the model was busy or could not be
reloaded. A promote never fails because of the reload.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Variant

from speedloader_client.client import Client, ClientError
from speedloader_lab.fake_backend import FakeProcess
from speedloader_lab.llama import LlamaServer, child_pids, mappings_of, wait_for
from speedloader_lab.modelgen import make_llama_gguf
from speedloaderd.backends import backend_for
from speedloaderd.config import BackendType, save_config

from .buslab import DaemonLab, run
from .test_demote_policy import MODEL_NAME, backend_lab, fake_for, fakes, set_backend
from .test_holders import LAYER, blob_of, llama_binary

__all__ = ["fakes", "llama_binary"]  # fixtures


def configure(dl: DaemonLab, kind: BackendType, url: str, always: bool = False) -> None:
    backend = dl.config.backend
    backend.type, backend.api_url, backend.reload_after_promote = kind, url, always
    save_config(dl.config, dl.lab.config_path)


async def promote(c: Client, name: str, reload: bool) -> tuple[bool, str]:
    await c.subscribe()
    result = await c.follow_job(await c.promote(name, reload=reload), timeout=120)
    return result.success, result.message


def cold_and_copy(dl: DaemonLab, rel: str) -> tuple[Path, Path]:
    return dl.lab.cold / rel, dl.lab.pool_path("local") / rel


def test_promote_reload_has_ollama_load_it_again_from_the_pool(daemon_factory, fakes):
    dl = daemon_factory()
    rel = blob_of(dl.lab, LAYER)
    fake = FakeProcess("fake_ollama", "--model", f"{MODEL_NAME}={dl.lab.models / rel}")
    fakes.append(fake)
    configure(dl, BackendType.OLLAMA, fake.url)
    dl.start()
    cold, copy = cold_and_copy(dl, rel)

    async def scenario() -> None:
        assert (await backend_for(dl.config.backend).preload(MODEL_NAME)).ok
        assert fake.maps_file(cold)  # loaded before the promote: from cold storage
        async with await dl.client() as c:
            ok, message = await promote(c, MODEL_NAME, reload=True)
            assert ok, message
            comm = Path(f"/proc/{fake.pid}/comm").read_text().strip()
            assert message.endswith(
                f"; ollama reloaded it from the pool ({comm} (pid {fake.pid}) maps it)"
            ), message
            assert fake.maps_file(copy) and not fake.maps_file(cold)
            # Asked again with nothing reading cold storage: said, nothing done.
            ok, message = await promote(c, MODEL_NAME, reload=True)
            assert ok and "nothing had tiny:1b loaded from cold storage" in message, message
            assert fake.maps_file(copy)

    run(scenario())


def test_without_reload_the_server_keeps_the_cold_file(daemon_factory, fakes):
    """The control: a plain promote leaves a loaded model reading cold storage (the reason
    for the option), and its message does not talk about reloading."""
    dl = daemon_factory()
    rel = blob_of(dl.lab, LAYER)
    fake = FakeProcess("fake_ollama", "--model", f"{MODEL_NAME}={dl.lab.models / rel}")
    fakes.append(fake)
    configure(dl, BackendType.OLLAMA, fake.url)
    dl.start()
    cold, copy = cold_and_copy(dl, rel)

    async def scenario() -> None:
        assert (await backend_for(dl.config.backend).preload(MODEL_NAME)).ok
        async with await dl.client() as c:
            ok, message = await promote(c, MODEL_NAME, reload=False)
            assert ok and "reload" not in message, message
            assert fake.maps_file(cold) and not fake.maps_file(copy)

    run(scenario())


@pytest.mark.parametrize("kind", ["llamacpp-router", "vllm-sleep"])
def test_reload_after_promote_when_idle_and_not_when_busy(daemon_factory, fakes, kind):
    dl = daemon_factory()
    name = backend_lab(dl, kind)
    btype = dl.config.backend.type
    configure(dl, btype, "http://127.0.0.1:9", always=True)
    dl.start()

    async def scenario() -> None:
        async with await dl.client() as c:
            await c.subscribe()
            # Where the weights are: the model's largest file, found by promoting and
            # demoting once (nothing holds it yet).
            ok, _ = await promote(c, name, reload=False)
            assert ok
            rel = max(dl.lab.pool_files("local"), key=lambda r: (dl.lab.cold / r).stat().st_size)
            assert (await c.follow_job(await c.demote(name), timeout=60)).success
            cold, copy = cold_and_copy(dl, rel)
            fake, load = fake_for(kind, name, dl.lab.models / rel)
            fakes.append(fake)
            await set_backend(c, apiUrl=fake.url)
            if load:
                assert (await backend_for(dl.config.backend.model_copy(
                    update={"api_url": fake.url})).preload(name)).ok  # fmt: skip
            assert fake.maps_file(cold)
            # Busy: left alone, and the promote still succeeds.
            fake.set_busy(True)
            ok, message = await promote(c, name, reload=False)
            assert ok, message
            assert f"is answering a request with {name}" in message, message
            assert f"(pid {fake.pid}) keeps reading it from cold storage" in message
            assert fake.maps_file(cold) and not fake.maps_file(copy)
            # Idle: asked again (the model is hot; only the reload is done).
            fake.set_busy(False)
            ok, message = await promote(c, name, reload=True)
            assert ok and "reloaded it from the pool" in message, message
            assert fake.maps_file(copy) and not fake.maps_file(cold)

    run(scenario())


def test_ollama_defers_a_busy_unload_and_the_promote_does_not_wait_forever(daemon_factory, fakes):
    """Ollama does not say whether a model is busy, and unloads it only once its requests
    end (sched.go expireRunner): the reload asks, the server keeps it listed, and after
    reload.CONFIRM_FOR the promote ends saying so; the model is let go when idle."""
    dl = daemon_factory()
    rel = blob_of(dl.lab, LAYER)
    fake = FakeProcess("fake_ollama", "--model", f"{MODEL_NAME}={dl.lab.models / rel}")
    fakes.append(fake)
    configure(dl, BackendType.OLLAMA, fake.url)
    dl.start()
    cold, copy = cold_and_copy(dl, rel)

    async def scenario() -> None:
        assert (await backend_for(dl.config.backend).preload(MODEL_NAME)).ok
        fake.set_busy(True)
        async with await dl.client() as c:
            ok, message = await promote(c, MODEL_NAME, reload=True)
            assert ok, message
            assert "not reloaded: ollama at" in message and "still lists" in message, message
            assert "its next load reads the pool" in message
            assert fake.maps_file(cold)

    run(scenario())


def test_llama_single_mode_and_a_down_server_are_not_reloaded(daemon_factory, fakes):
    dl = daemon_factory()
    name = backend_lab(dl, "llamacpp-single")
    configure(dl, BackendType.LLAMACPP, "http://127.0.0.1:9")
    dl.start()

    async def scenario() -> None:
        async with await dl.client() as c:
            await c.subscribe()
            ok, _ = await promote(c, name, reload=False)
            rel = max(dl.lab.pool_files("local"), key=lambda r: (dl.lab.cold / r).stat().st_size)
            assert (await c.follow_job(await c.demote(name), timeout=60)).success
            cold, copy = cold_and_copy(dl, rel)
            fake = FakeProcess("fake_llamacpp", "--model", f"{name}={dl.lab.models / rel}")
            fakes.append(fake)
            assert fake.maps_file(cold)
            # Down (nothing at port 9): said, the promote stands.
            ok, message = await promote(c, name, reload=True)
            assert ok and "not reloaded (llama.cpp at http://127.0.0.1:9" in message, message
            # It maps the cold file, not the pool copy: a demote frees at once.
            assert (await c.follow_job(await c.demote(name), timeout=60)).success
            ok, _ = await promote(c, name, reload=False)
            assert ok
            await set_backend(c, apiUrl=fake.url)
            ok, message = await promote(c, name, reload=True)
            assert ok and "single-model mode" in message, message
            assert fake.maps_file(cold) and not fake.maps_file(copy)

    run(scenario())


def test_an_unknown_promote_option_is_refused_and_changes_nothing(daemon):
    before = daemon.state()

    async def call(options: dict[str, Any]) -> ClientError:
        async with await daemon.client() as c:
            try:
                await c.manager("PromoteWithOptions", "ssa{sv}", MODEL_NAME, "", options)
            except ClientError as err:
                return err
        raise AssertionError(f"PromoteWithOptions({options}) was accepted")

    err = run(call({"reloda": Variant("b", True)}))
    assert err.name == "InvalidArgument" and "'reloda'" in str(err)
    err = run(call({"reload": Variant("s", "yes")}))
    assert err.name == "InvalidArgument" and "boolean" in str(err)
    assert daemon.state() == before


@pytest.mark.llama
def test_real_llama_server_router_reloads_from_the_pool(daemon_factory, llama_binary, workdir):
    dl = daemon_factory()
    lab = dl.lab
    make_llama_gguf(lab.cold / "tiny-llama.gguf")
    lab.seal()
    router = LlamaServer(
        ["--models-dir", str(lab.models), "--no-models-autoload", "-c", "256", "-np", "1",
         "-t", "1"],
        workdir / "llama-server.log",
    )  # fmt: skip
    dl.config = lab.config(backend="llamacpp", pools=(("local", dl.pool_size, 100),))
    dl.config.backend.api_url = router.url
    save_config(dl.config, lab.config_path)
    dl.start()
    cold, copy = cold_and_copy(dl, "tiny-llama.gguf")
    try:
        router.start()

        async def scenario() -> None:
            assert router.post("/models/load", {"model": "tiny-llama"}) == {"success": True}
            child = wait_for(lambda: child_pids(router.pid), 60, "the router's child")[0]
            # Loaded before the promote: it maps the cold file.
            wait_for(lambda: mappings_of(child, cold), 60, "the child mapping the model")
            async with await dl.client() as c:
                ok, message = await promote(c, "tiny-llama", reload=True)
                assert ok, message
                assert "llama.cpp reloaded it from the pool (llama-server (pid " in message
            (child,) = child_pids(router.pid)  # a new child, started for the reload
            assert mappings_of(child, copy) and not mappings_of(child, cold)
            reply = router.post("/v1/completions", {"model": "tiny-llama", "prompt": "a",
                                                   "max_tokens": 2})  # fmt: skip
            assert reply["choices"], reply  # and it answers, from the pool

        run(scenario())
    finally:
        router.stop()
