"""The backend adapters (speedloaderd/backends/) against fakes of their servers
(speedloader_lab/fake_*.py), each fake a child process that maps a loaded model's file as
the real server does, so ``/proc/<fake pid>/maps`` tells whether an unload freed it.

What is proved: the round trips (preload maps, loaded() lists, unload unmaps and is
confirmed by the listing), and what each adapter says when the server is down, slow past
the timeout, answers something malformed or oversized, refuses, or lies.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from speedloader_lab.fake_backend import FakeProcess
from speedloaderd.backends import Status, Timing, backend_for
from speedloaderd.backends.http import Http, HttpProblem
from speedloaderd.backends.llamacpp import LlamaCppBackend
from speedloaderd.backends.ollama import OllamaBackend
from speedloaderd.backends.vllm import VllmBackend
from speedloaderd.config import BackendConfig, BackendType

# Short enough that the slow and stuck cases end quickly, far above a loopback answer.
FAST = Timing(connect=2.0, total=1.0, confirm_for=3.0, confirm_every=0.05)
SLOW_SERVER = 30.0  # the fake's delay in "slow" mode: far past FAST.total


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(1 << 20))
    return path


@pytest.fixture
def fakes() -> Iterator[list[FakeProcess]]:
    started: list[FakeProcess] = []
    yield started
    for fake in started:
        fake.stop()


def start(fakes: list[FakeProcess], module: str, *args: str) -> FakeProcess:
    fake = FakeProcess(module, *args)
    fakes.append(fake)
    return fake


# --- Ollama ---------------------------------------------------------------------------


@pytest.fixture
def ollama(fakes, model_file) -> FakeProcess:
    return start(fakes, "fake_ollama", "--model", f"llama3:8b={model_file}")


def test_ollama_preload_lists_and_maps_then_unload_unmaps(ollama, model_file):
    backend = OllamaBackend(ollama.url, FAST)
    assert run(backend.loaded()) == []
    assert not ollama.maps_file(model_file)

    out = run(backend.preload("llama3:8b"))
    assert out.ok, out.reason
    assert ollama.maps_file(model_file)
    (m,) = run(backend.loaded())
    assert m.name == "llama3:8b"
    assert m.size == model_file.stat().st_size
    assert m.expires_at is not None  # the keep-alive deadline, parsed from Go's RFC 3339
    assert datetime.now(UTC) < m.expires_at < datetime.now(UTC) + timedelta(minutes=6)
    state = run(backend.state())
    assert state.status is Status.UP and "1 model(s) loaded" in state.reason

    out = run(backend.unload("llama3:8b"))
    assert out.ok, out.reason
    assert "no longer lists" in out.reason
    assert run(backend.loaded()) == []
    assert not ollama.maps_file(model_file)  # the fake unmaps before it unlists


def test_ollama_unknown_model_and_not_loaded(ollama):
    backend = OllamaBackend(ollama.url, FAST)
    out = run(backend.preload("nope:latest"))
    assert not out.ok and "does not know model 'nope:latest'" in out.reason
    out = run(backend.unload("llama3:8b"))
    assert out.ok and "does not have 'llama3:8b' loaded" in out.reason


def test_ollama_lying_unload_is_reported_as_the_server_said_and_the_file_stays_mapped(
    ollama, model_file
):
    """The adapter claims only what the server said; the mapping is left for the file
    holders (/proc) to find, which is why demote must check them after an unload."""
    backend = OllamaBackend(ollama.url, FAST)
    assert run(backend.preload("llama3:8b")).ok
    ollama.set_mode("lying")
    out = run(backend.unload("llama3:8b"))
    assert out.ok and "no longer lists" in out.reason
    assert ollama.maps_file(model_file)


def test_ollama_unload_that_never_happens_times_out_with_a_reason(ollama, model_file):
    backend = OllamaBackend(ollama.url, FAST)
    assert run(backend.preload("llama3:8b")).ok
    ollama.set_mode("stuck")
    out = run(backend.unload("llama3:8b"))
    assert not out.ok
    assert "still lists 'llama3:8b' as loaded 3 s after it was asked to unload it" in out.reason
    assert ollama.maps_file(model_file)


def test_ollama_many_loaded_models_come_chunked_as_from_go(fakes, model_file):
    """Go's net/http chunks an answer past 2 KiB: /api/ps of 20 models is, and reads whole."""
    names = [f"m{i}:latest" for i in range(20)]
    fake = start(fakes, "fake_ollama", *[f"--model={n}={model_file}" for n in names])
    backend = OllamaBackend(fake.url, FAST)
    for n in names:
        assert run(backend.preload(n)).ok
    assert sorted(m.name for m in run(backend.loaded())) == sorted(names)


def test_down_server_is_down_with_the_reason(ollama):
    backend = OllamaBackend(ollama.url, FAST)
    ollama.stop()
    state = run(backend.state())
    assert state.status is Status.DOWN
    assert f"ollama at {ollama.url}: cannot connect to 127.0.0.1:{ollama.port}" in state.reason
    with pytest.raises(HttpProblem):
        run(backend.loaded())
    out = run(backend.unload("llama3:8b"))
    assert not out.ok and "cannot connect" in out.reason


def test_slow_server_is_down_after_the_timeout_not_after_the_server(ollama):
    backend = OllamaBackend(ollama.url, FAST)
    ollama.set_mode("slow", slow=SLOW_SERVER)
    began = time.monotonic()
    state = run(backend.state())
    took = time.monotonic() - began
    assert state.status is Status.DOWN
    assert "GET /api/ps got no answer within 1 s" in state.reason
    assert took < SLOW_SERVER / 2  # the timeout held: not retried, not waited out


@pytest.mark.parametrize(
    ("mode", "says"),
    [
        ("garbage", "GET /api/ps answered something that is not JSON"),
        ("shape", "GET /api/ps answered JSON of another shape (models: Field required)"),
        ("huge", "GET /api/ps answered more than 1048576 bytes"),
    ],
)
def test_malformed_or_oversized_answers_give_a_clear_unknown_state(ollama, mode, says):
    backend = OllamaBackend(ollama.url, FAST)
    ollama.set_mode(mode)
    state = run(backend.state())
    assert state.status is Status.UNKNOWN
    assert says in state.reason


def test_an_answer_past_the_limit_by_its_content_length_is_refused_unread(fakes, model_file):
    """The llama.cpp fake sends Content-Length (the Ollama one chunks, as Go does)."""
    fake = start(fakes, "fake_llamacpp", "--router", f"--model=tiny={model_file}")
    fake.set_mode("huge")
    state = run(LlamaCppBackend(fake.url, FAST).state())
    assert state.status is Status.UNKNOWN
    assert "GET /props answered more than 1048576 bytes" in state.reason


@pytest.mark.parametrize(
    "entry",
    [
        {"name": "evil\x1b]0;pwned\x07:latest"},  # a terminal escape in a model name
        {"name": "x" * 1025},
        {"name": ""},
        {"name": "ok:latest", "size": -1},
    ],
)
def test_names_with_controls_and_absurd_fields_are_refused_at_the_edge(entry):
    import json

    from speedloaderd.backends.http import Reply
    from speedloaderd.backends.ollama import _Ps

    http = Http("http://127.0.0.1:1", 1.0, 1.0, 1 << 20)
    reply = Reply(200, json.dumps({"models": [entry]}).encode())
    with pytest.raises(HttpProblem, match="GET /api/ps answered JSON of another shape"):
        http.validate(reply, "GET /api/ps", _Ps)


def test_a_connection_closed_without_an_answer_is_down(ollama):
    backend = OllamaBackend(ollama.url, FAST)
    ollama.set_mode("drop")
    state = run(backend.state())
    assert state.status is Status.DOWN
    assert "closed" in state.reason


def test_a_get_is_retried_once_after_a_dropped_connection():
    """A restarting server drops one connection: the GET's second try gets the answer;
    a POST (not idempotent) is not retried."""

    async def scenario() -> tuple[list[str], object, str]:
        seen: list[str] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            line = (await reader.readline()).decode()
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
            seen.append(line.split()[0])
            if len(seen) > 1 and line.startswith("GET"):
                body = b'{"models": []}'
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        http = Http(f"http://127.0.0.1:{port}", 2.0, 2.0, 1 << 20)
        async with server:
            reply = await http.request("GET", "/api/ps")
            seen.clear()
            try:
                await http.request("POST", "/api/generate", {})
                post = "answered"
            except HttpProblem as problem:
                post = problem.reason
        return seen, reply.body, post

    seen, body, post = run(scenario())
    assert body == b'{"models": []}'
    assert seen == ["POST"]  # once
    assert "closed without answering" in post


# --- llama.cpp ------------------------------------------------------------------------


def test_llamacpp_router_load_and_unload_through_the_api(fakes, model_file, tmp_path):
    missing = tmp_path / "gone.gguf"
    fake = start(
        fakes, "fake_llamacpp", "--router", f"--model=tiny={model_file}", f"--model=bad={missing}"
    )
    backend = LlamaCppBackend(fake.url, FAST)
    caps = run(backend.capabilities())
    assert caps.can_unload and caps.can_preload
    assert run(backend.loaded()) == []
    assert "llama.cpp (router)" in run(backend.state()).reason

    out = run(backend.preload("tiny"))
    assert out.ok, out.reason
    assert fake.maps_file(model_file)
    (m,) = run(backend.loaded())
    assert (m.name, m.paths, m.status) == ("tiny", (str(model_file),), "loaded")

    out = run(backend.unload("tiny"))
    assert out.ok, out.reason
    assert not fake.maps_file(model_file)
    assert run(backend.loaded()) == []

    out = run(backend.preload("bad"))
    assert not out.ok
    assert "could not load 'bad': its llama-server exited with 1" in out.reason


def test_llamacpp_router_lying_unload_leaves_the_mapping(fakes, model_file):
    fake = start(fakes, "fake_llamacpp", "--router", f"--model=tiny={model_file}")
    backend = LlamaCppBackend(fake.url, FAST)
    assert run(backend.preload("tiny")).ok
    fake.set_mode("lying")
    assert run(backend.unload("tiny")).ok
    assert fake.maps_file(model_file)


def test_llamacpp_single_model_mode_lists_its_model_and_cannot_unload(fakes, model_file):
    fake = start(fakes, "fake_llamacpp", f"--model=tiny={model_file}")
    backend = LlamaCppBackend(fake.url, FAST)
    (m,) = run(backend.loaded())
    assert m.paths == (str(model_file),) and m.status == "loaded"
    caps = run(backend.capabilities())
    assert not caps.can_unload and not caps.can_preload
    out = run(backend.unload(m.name))
    assert not out.ok and "single-model mode" in out.reason
    assert fake.maps_file(model_file)
    assert "llama.cpp (single-model)" in run(backend.state()).reason


# --- vLLM -----------------------------------------------------------------------------


def test_vllm_dev_mode_sleeps_level_2_and_wakes(fakes, model_file):
    fake = start(fakes, "fake_vllm", "--dev-mode", f"--model=tiny={model_file}")
    backend = VllmBackend(fake.url + "/v1", FAST)  # as OpenAI clients configure it
    (m,) = run(backend.loaded())
    assert (m.name, m.paths) == ("tiny", (str(model_file),))
    assert fake.maps_file(model_file)

    out = run(backend.unload("tiny"))
    assert out.ok, out.reason
    assert run(backend.loaded()) == []
    assert not fake.maps_file(model_file)
    assert "(asleep)" in run(backend.state()).reason

    out = run(backend.preload("tiny"))
    assert out.ok, out.reason
    assert fake.maps_file(model_file)


def test_vllm_without_dev_mode_cannot_unload_and_says_why(fakes, model_file):
    fake = start(fakes, "fake_vllm", f"--model=tiny={model_file}")
    backend = VllmBackend(fake.url, FAST)
    caps = run(backend.capabilities())
    assert not caps.can_unload
    out = run(backend.unload("tiny"))
    assert not out.ok and "VLLM_SERVER_DEV_MODE=1" in out.reason
    assert fake.maps_file(model_file)
    assert run(backend.state()).status is Status.UP


def test_vllm_lying_sleep_leaves_the_mapping(fakes, model_file):
    fake = start(fakes, "fake_vllm", "--dev-mode", f"--model=tiny={model_file}")
    backend = VllmBackend(fake.url, FAST)
    fake.set_mode("lying")
    assert run(backend.unload("tiny")).ok
    assert fake.maps_file(model_file)


# --- huggingface and the choice of adapter --------------------------------------------


def test_huggingface_has_no_server_to_ask():
    backend = backend_for(BackendConfig(type=BackendType.HUGGINGFACE))
    state = run(backend.state())
    assert state.status is Status.UNKNOWN and "no server to ask" in state.reason
    assert run(backend.loaded()) == []
    assert not run(backend.unload("any")).ok


def test_backend_for_follows_the_type_and_the_url():
    ollama = backend_for(BackendConfig(type=BackendType.OLLAMA, api_url="http://10.1.2.3:9/"))
    assert isinstance(ollama, OllamaBackend) and ollama.url == "http://10.1.2.3:9"
    assert backend_for(BackendConfig(type=BackendType.OLLAMA)).url == "http://127.0.0.1:11434"
    assert isinstance(backend_for(BackendConfig(type=BackendType.LLAMACPP)), LlamaCppBackend)
    assert isinstance(backend_for(BackendConfig(type=BackendType.VLLM)), VllmBackend)
    bad = backend_for(BackendConfig(type=BackendType.OLLAMA, api_url="file:///etc/shadow"))
    state = run(bad.state())
    assert state.status is Status.UNKNOWN
    assert "backend.apiUrl: 'file:///etc/shadow' is not an http:// or https:// URL" in (
        state.reason
    )
    assert not run(bad.unload("x")).ok


# --- BackendState on the Manager (the real daemon on the test bus) --------------------


async def _manager_until(dl, key: str, value: str, timeout: float = 60) -> dict:
    from speedloader_client.client import MANAGER, ROOT

    async with await dl.client() as c:
        deadline = time.monotonic() + timeout
        while True:
            props = await c.get_all(ROOT, MANAGER)
            if props.get(key) == value:
                return props
            assert time.monotonic() < deadline, f"{key} stayed {props.get(key)!r}"
            await asyncio.sleep(0.1)


def test_manager_backend_state_follows_the_server(daemon_factory, fakes, model_file):
    """Up from the first look (taken before the daemon is on the bus), down within a look
    or two (every 15 s) after the server goes, with the URL and what failed."""
    from speedloaderd.config import save_config, with_changes

    fake = start(fakes, "fake_ollama", "--model", f"llama3:8b={model_file}")
    dl = daemon_factory()
    dl.config = with_changes(dl.config, backend={"type": "ollama", "apiUrl": fake.url})
    save_config(dl.config, dl.lab.config_path)
    dl.start()
    m = run(_manager_until(dl, "BackendState", "up", timeout=0))  # the first read
    assert m["BackendStateReason"] == f"ollama at {fake.url} has 0 model(s) loaded"
    fake.stop()
    m = run(_manager_until(dl, "BackendState", "down"))
    assert (
        f"ollama at {fake.url}: cannot connect to 127.0.0.1:{fake.port}"
        in (m["BackendStateReason"])
    )


def test_the_watch_logs_a_change_once_not_every_look(caplog):
    """journald gets one warning when the backend goes down, not one per look."""
    import logging
    import socket

    from speedloaderd.backends.watch import BackendWatch

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = BackendConfig(type=BackendType.OLLAMA, api_url=f"http://127.0.0.1:{port}")
    changes: list[str] = []
    watch = BackendWatch(lambda: config, lambda: changes.append(str(watch.state)))

    async def looks() -> None:
        for _ in range(3):
            await watch.check()

    with caplog.at_level(logging.INFO, logger="speedloaderd.backends.watch"):
        asyncio.run(looks())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(changes) == 1 and changes[0].startswith("down:"), changes
    assert len(warnings) == 1 and f"127.0.0.1:{port}" in warnings[0], warnings


# --- busy: whether a reload after a promote may unload the model now ---------------------


def test_busy_is_what_each_server_says_and_none_where_it_says_nothing(fakes, model_file):
    router = start(fakes, "fake_llamacpp", "--router", f"--model=tiny={model_file}")
    backend = LlamaCppBackend(router.url, FAST)
    assert run(backend.busy("tiny")) is None  # not loaded: the router's /slots refuses
    assert run(backend.preload("tiny")).ok
    assert run(backend.busy("tiny")) is False
    router.set_busy(True)
    assert run(backend.busy("tiny")) is True
    single = start(fakes, "fake_llamacpp", f"--model=tiny={model_file}")
    single.set_busy(True)
    assert run(LlamaCppBackend(single.url, FAST).busy("tiny")) is True
    vllm = start(fakes, "fake_vllm", f"--model=tiny={model_file}")
    assert run(VllmBackend(vllm.url, FAST).busy("tiny")) is False
    vllm.set_busy(True)
    assert run(VllmBackend(vllm.url, FAST).busy("tiny")) is True
    ollama = start(fakes, "fake_ollama", f"--model=tiny={model_file}")
    o = OllamaBackend(ollama.url, FAST)
    assert run(o.busy("tiny")) is None and o.unload_waits_for_requests
    router.stop()
    assert run(backend.busy("tiny")) is None  # down: cannot say


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (b'vllm:num_requests_running{engine="0",model_name="m"} 2.0\n', 2.0),
        (b"vllm:num_requests_running 0\n", 0.0),
        (b'vllm:num_requests_running{a="1"} 1\nvllm:num_requests_running{a="2"} 1.0\n', 2.0),
        (b"vllm:num_requests_running_total 5\nvllm:num_requests_waiting 3\n", None),
        (b"# TYPE vllm:num_requests_running gauge\n", None),
        (b"vllm:num_requests_running{} NaNx\n", None),
        (b"\x00\xff garbage", None),
    ],
)
def test_vllm_metrics_gauge_is_read_strictly(text, value):
    from speedloaderd.backends.vllm import _gauge

    assert _gauge(text, b"vllm:num_requests_running") == value
