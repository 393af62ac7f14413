"""The real llama.cpp ``llama-server`` for tests: built once per machine, cached, and run.

Built once per machine into ``/var/cache/speedloader-llama/<version>/`` (``bin/llama-server``,
``stamp.json``; ``$SPEEDLOADER_LLAMA_CACHE`` moves it) by ``python -m speedloader_lab.llama
build``, from the llama.cpp that the ``llama-cpp-python`` sdist on PyPI vendors: pip downloads
the sdist (hash-pinned below), only ``vendor/llama.cpp`` is unpacked into a scratch dir, cmake
builds the ``llama-server`` target alone, and the scratch dir is removed. Nothing of llama.cpp
is ever in this repository. Measured on the 2-core dev VM (shared with other work, load ~3):
474 s; a 15 MB static binary (libllama and ggml linked in; needs only libstdc++, libgomp,
libm, libc). The tiny model of ``modelgen.make_llama_gguf`` (400 KiB) loads in 0.07 s.

What this llama.cpp answers, observed by tests/test_llama_server.py (which asserts the fields
the backend adapters use). Version: llama-cpp-python 0.3.36 vendors llama.cpp commit
0c1e57098bba43ac29e6e3b677cdceebdd22334f, "version: 0.5.0-dev (build 0, commit 0c1e5709)"
(``--version``); ``build_info`` in /props is "b0-0c1e5709" (build number 0: no git history in
the sdist). README lines are of ``vendor/llama.cpp/tools/server/README.md`` in that sdist.

Router mode (README 1676-2095: "Using multiple models"; code: tools/server/server-models.cpp):
started with no model and ``--models-dir DIR``. Each ``DIR/<name>.gguf`` (a symlink to a file
counts: ``std::filesystem::is_regular_file`` follows it) is the model ``<name>``; a
subdirectory is one model named after it (its ``*-00001-of-*.gguf`` or single gguf, plus an
``mmproj*`` file). Each loaded model runs in its OWN CHILD PROCESS: the router re-executes its
binary (``/proc/self/exe``) with the model's args and a free loopback port, in the router's
process group; the CHILD maps the GGUF (``mmap``, the default), the router never maps it.

- ``GET /props`` (no ``?model``): ``{"role": "router", "max_instances": 4,
  "models_autoload": bool, "model_alias": "llama-server", "model_path": "none",
  "build_info": "b0-0c1e5709", ...}``. Only a router has ``role``: that tells the two modes
  apart. ``GET /props?model=<id>`` is the child's /props (single-mode shape, below;
  ``model_alias`` is the id).
- ``GET /health``: ``{"status": "ok"}`` as soon as the router listens, models loaded or not.
- ``GET /models`` (also ``/v1/models``): ``{"object": "list", "data": [entry, ...]}``, entry =
  ``{"id": "tiny-llama", "aliases": [], "tags": [], "object": "model", "owned_by":
  "llamacpp", "created": <now, unix s>, "source": "models_dir", "can_remove": false,
  "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
  "status": {...}}``, and while running also ``"meta": {"vocab_type", "n_vocab", "n_ctx",
  "n_ctx_train", "n_embd", "n_params", "size" (tensor bytes), "ftype"}`` from the child.
  There is NO ``path`` field (README 1832 shows one; the code has none): the model's file is
  the value after ``"--model"`` in ``status.args``, the models dir path as the router found it
  (the link, not the pool file it resolves to). ``status`` = ``{"value": V, "args": [binary,
  "--host", "127.0.0.1", "--port", P, "--alias", id, ..., "--model", PATH, ...], "preset":
  "<ini text>"}``; V is one of ``unloaded``, ``loading``, ``loaded``, ``sleeping``,
  ``downloading``, ``downloaded`` (server-models.h ``server_model_status_to_string``); a
  child that exited non-zero leaves ``"value": "unloaded", "failed": true, "exit_code": N``.
  ``?reload=1`` rescans the dir (a running model whose file went is unloaded).
- ``POST /models/load {"model": id}`` -> ``{"success": true}`` at once; status goes
  ``loading`` -> ``loaded`` (poll /models, or ``GET /models/sse`` events ``{"model", "event":
  "model_status", "data": {"status": ...}}``, README 1951). Loaded already: 400 ``{"error":
  {"code": 400, "message": "model is already running", "type": "invalid_request_error"}}``;
  an unknown id: 404 ``{"error": {"code": 404, "message": "File Not Found", "type":
  "not_found_error"}}``.
- ``POST /models/unload {"model": id}`` -> ``{"success": true}`` at once; the status stays
  ``loaded`` until the child has exited (it is sent an exit command, force-killed after
  ``stop-timeout``, 10 s by default, README 1795), then ``unloaded`` and the mapping is gone.
  Not running: 400 ``"model is not running"``. A model still ``loading`` is killed at once.
- Requests name the model in the body (``"model"``) or query (``?model=``); with
  ``--no-models-autoload`` a request for an unloaded model is 400 ``"model is not loaded"``,
  without it the router loads it first (README 1798-1822). No model in the body: 400
  ``"model name is missing from the request"``. Errors are OpenAI-shaped (README 2080).

Single-model mode (``-m PATH``; README 470-482, 830-925; code: server-context.cpp
``get_res_props``): one process, which maps the GGUF itself.

- ``GET /health``: 503 ``{"error": {"code": 503, "message": "Loading model", "type":
  "unavailable_error"}}`` while loading, then 200 ``{"status": "ok"}``.
- ``GET /props``: no ``role``; ``"model_path"`` is the ``-m`` argument as given (the models
  dir link, not resolved), ``"model_alias"`` the same unless ``--alias``, ``"model_ftype"``,
  ``"total_slots"``, ``"build_info"``, ``"is_sleeping"`` (``--sleep-idle-seconds`` frees the
  model while idle, README 2096), ``"bos_token"``, ``"eos_token"``, ``"chat_template"``, ...
- ``GET /models`` and ``/v1/models``: ``{"object": "list", "models": [Ollama-style entry],
  "data": [{"id": <-m path>, "aliases": [<-m path>], "owned_by": "llamacpp", "meta": {...}}]}``
  with no ``status``; ``POST /models/unload`` is 404: unloading means the process exits.

Both: ``POST /completion {"prompt", "n_predict", "temperature", "ignore_eos"}`` answers
``content``, ``tokens_predicted``, ``tokens_evaluated``, ``stop_type``, ``model``,
``timings``, ``generation_settings``, ...
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "LLAMA_CPP_PYTHON",
    "CannotBuild",
    "LlamaServer",
    "build",
    "cache_dir",
    "child_pids",
    "free_port",
    "group_alive",
    "mappings_of",
    "server_binary",
    "wait_for",
]

# Pinned, with its hash: the API shapes written above were read from this exact sdist, and a
# new release on PyPI must not change the server under the tests without anyone noticing.
LLAMA_CPP_PYTHON = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"

# CPU only; one static binary (BUILD_SHARED_LIBS=OFF: libllama and ggml linked in, so the
# cache holds one file and no rpath); no HTTPS (LLAMA_OPENSSL=OFF: the tests never download a
# model; this llama.cpp has no CURL option any more, downloads go through cpp-httplib); no web
# UI (LLAMA_USE_PREBUILT_UI=OFF: it would download the UI from a Hugging Face bucket at build
# time; LLAMA_BUILD_UI=OFF: it would run npm). GGML_NATIVE stays on (its default): the binary is
# built on the machine that runs it, the cache is per machine.
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DGGML_CCACHE=OFF",
)
JOBS = 2  # the machines this runs on (CI, the dev VM) have 2 cores, shared with the tests
# Debian packages the build needs (scripts/setup installs them): the compiler, cmake and make.
BUILD_TOOLS = {"cmake": "cmake", "c++": "g++", "make": "make"}


class CannotBuild(Exception):
    """This machine cannot build llama-server; the message says what is missing."""


def cache_root() -> Path:
    return Path(os.environ.get("SPEEDLOADER_LLAMA_CACHE", "/var/cache/speedloader-llama"))


def cache_dir(version: str = LLAMA_CPP_PYTHON) -> Path:
    """Where the build of llama-cpp-python ``version``'s llama.cpp lives: bin/, stamp.json."""
    return cache_root() / version


def server_binary(version: str = LLAMA_CPP_PYTHON) -> Path:
    return cache_dir(version) / "bin" / "llama-server"


def _wanted_stamp() -> dict[str, object]:
    """What a build is made from; a cached build with another stamp is rebuilt."""
    return {
        "llama_cpp_python": LLAMA_CPP_PYTHON,
        "sdist_sha256": SDIST_SHA256,
        "cmake_flags": list(CMAKE_FLAGS),
    }


def read_stamp(version: str = LLAMA_CPP_PYTHON) -> dict[str, object] | None:
    """The stamp of the cached build (with the commit, build time and size), or None."""
    try:
        return json.loads((cache_dir(version) / "stamp.json").read_text())
    except (OSError, ValueError):
        return None


def is_built() -> bool:
    stamp = read_stamp()
    if stamp is None or not os.access(server_binary(), os.X_OK):
        return False
    return all(stamp.get(k) == v for k, v in _wanted_stamp().items())


def _preflight() -> None:
    missing = [pkg for tool, pkg in BUILD_TOOLS.items() if shutil.which(tool) is None]
    if missing:
        raise CannotBuild(
            "building llama-server needs the Debian packages "
            + " ".join(missing)
            + " (scripts/setup installs them)"
        )


def _run(argv: list[str], log: Path, cwd: Path | None = None) -> None:
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(argv)}\n")
        out.flush()
        r = subprocess.run(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, check=False)
    if r.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-40:]
        raise RuntimeError(
            f"{argv[0]} failed ({r.returncode}); the last lines of {log}:\n" + "\n".join(tail)
        )


def _download_sdist(dest: Path, log: Path) -> Path:
    """The sdist from PyPI through pip, checked against SDIST_SHA256 (pip refuses another).

    pip prepares an sdist's metadata even with --no-deps, so it fetches the sdist's build
    backend (scikit-build-core) into an isolated env: a few hundred KB more from PyPI.
    """
    req = dest / "requirements.txt"
    req.write_text(f"llama-cpp-python=={LLAMA_CPP_PYTHON} --hash=sha256:{SDIST_SHA256}\n")
    _run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         "--require-hashes", "-r", str(req), "-d", str(dest)],
        log,
    )  # fmt: skip
    (sdist,) = dest.glob("llama_cpp_python-*.tar.gz")
    h = hashlib.sha256()
    with sdist.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    if h.hexdigest() != SDIST_SHA256:
        raise RuntimeError(f"{sdist.name}: sha256 {h.hexdigest()}, expected {SDIST_SHA256}")
    return sdist


def _check_member(m: tarfile.TarInfo) -> None:
    """Refuse what could write outside the tree: Debian 12's Python 3.11.2 has no
    ``extractall(filter="data")`` (3.11.4 added it), so the check is ours."""
    parts = Path(m.name).parts
    bad = m.name.startswith("/") or ".." in parts or not (m.isfile() or m.isdir() or m.issym())
    if m.issym():
        target = Path(m.name).parent / m.linkname
        bad = bad or m.linkname.startswith("/") or ".." in Path(os.path.normpath(target)).parts
    if bad:
        raise RuntimeError(f"the sdist holds an entry that points outside its tree: {m.name}")


def _extract_llama_cpp(sdist: Path, dest: Path) -> str:
    """Unpack the vendored llama.cpp (only) into ``dest``; return its commit.

    The sdist carries the submodule's git dir (.git/modules/vendor/llama.cpp): its HEAD is the
    llama.cpp commit. The work tree's own ``.git`` (a gitlink into that dir) is left out, so
    llama.cpp's cmake asks no git; the commit is passed as LLAMA_BUILD_COMMIT instead.
    """
    top = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/"
    vendor = top + "vendor/llama.cpp/"
    head_name = top + ".git/modules/vendor/llama.cpp/HEAD"
    commit = ""
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar:
            if m.name == head_name:
                f = tar.extractfile(m)
                commit = f.read().decode().strip() if f else ""
            elif m.name.startswith(vendor) and m.name != vendor + ".git":
                m.name = m.name[len(vendor) :]
                _check_member(m)
                members.append(m)
        tar.extractall(dest, members=members)
    if len(commit) != 40:
        raise RuntimeError(f"{sdist.name} names no llama.cpp commit ({head_name})")
    return commit


def build(*, force: bool = False, say: Callable[[str], None] = print) -> Path:
    """Build llama-server into the cache unless it is there already; return the binary.

    Once per machine: a lock makes a second caller wait for the first build and then find it
    done. Raises CannotBuild when a build tool is missing, RuntimeError when a step fails
    (with the tail of the build log).
    """
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_built() and not force:
            return server_binary()
        _preflight()
        say(
            f"llama: building llama-server from llama-cpp-python {LLAMA_CPP_PYTHON}'s llama.cpp"
            f" into {cache_dir()} (once per machine: about 5 min on 2 cores)"
        )
        t0 = time.monotonic()
        log = root / "build.log"  # kept: the last build's log, for when a step fails
        log.write_text("")
        work = Path(tempfile.mkdtemp(prefix=f".build-{LLAMA_CPP_PYTHON}-", dir=root))
        try:
            commit = _build_in(work, log, say)
        finally:
            shutil.rmtree(work)  # sources and objects: about 1 GB, never kept
        seconds = round(time.monotonic() - t0)
        stamp = json.loads((cache_dir() / "stamp.json").read_text())
        stamp["build_seconds"] = seconds
        (cache_dir() / "stamp.json").write_text(json.dumps(stamp, indent=2) + "\n")
        say(f"llama: built {server_binary()} (llama.cpp {commit[:8]}) in {seconds} s")
        return server_binary()


def _build_in(work: Path, log: Path, say: Callable[[str], None]) -> str:
    """Download, unpack, configure, compile in ``work``; install into the cache."""
    say(f"llama: downloading the sdist from PyPI; log in {log}")
    sdist = _download_sdist(work, log)
    src, out = work / "src", work / "build"
    commit = _extract_llama_cpp(sdist, src)
    say(f"llama: llama.cpp {commit[:8]}: cmake, then make llama-server -j{JOBS}")
    _run(
        ["cmake", "-S", str(src), "-B", str(out), *CMAKE_FLAGS,
         f"-DLLAMA_BUILD_COMMIT={commit[:8]}"],
        log,
    )  # fmt: skip
    _run(["cmake", "--build", str(out), "--target", "llama-server", f"-j{JOBS}"], log)
    built = out / "bin" / "llama-server"
    ldd = subprocess.run(["ldd", str(built)], capture_output=True, text=True, check=False)
    if "not found" in ldd.stdout:
        raise RuntimeError(f"{built} needs libraries this machine lacks:\n{ldd.stdout}")
    version = subprocess.run(
        [str(built), "--version"], capture_output=True, text=True, check=False, timeout=30
    )
    if version.returncode != 0:
        raise RuntimeError(f"{built} --version failed:\n{version.stderr[-2000:]}")
    dest = cache_dir()
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "bin").mkdir(parents=True)
    binary = dest / "bin" / "llama-server"
    shutil.copy2(built, binary)
    stamp = {
        **_wanted_stamp(),
        "llama_cpp_commit": commit,
        "version_output": (version.stdout + version.stderr).strip(),
        "binary_bytes": binary.stat().st_size,
        "libraries": ldd.stdout.strip().splitlines(),
    }
    (dest / "stamp.json").write_text(json.dumps(stamp, indent=2) + "\n")
    # Test users run the binary too (the daemon's tests act as unprivileged users).
    for p in (dest.parent, dest, dest / "bin", binary):
        p.chmod(0o755)
    (dest / "stamp.json").chmod(0o644)
    return commit


# --------------------------------------------------------------------------- running it


def free_port() -> int:
    """A free TCP port on the loopback (the kernel picks it; closed again before use)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], Any], timeout: float, what: str, poll: float = 0.05) -> Any:
    """Poll ``cond`` until it returns something true; return that. TimeoutError names ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(poll)


def child_pids(pid: int) -> list[int]:
    """The live child processes of ``pid`` (from /proc/*/stat: no CONFIG_PROC_CHILDREN needed)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after it.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return sorted(found)


def mappings_of(pid: int, path: Path | str) -> list[str]:
    """The lines of /proc/<pid>/maps that map the file ``path`` is (same device and inode,
    whatever name the process opened it by: llama.cpp opens the models dir's symlink, the
    kernel shows the file it resolved to). Empty when the process has gone."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    try:
        lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return []
    out = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) >= 5 and parts[3] == dev and parts[4] == str(st.st_ino):
            out.append(line)
    return out


@dataclass
class LlamaServer:
    """One llama-server process on the loopback, its own session (so its model children, which
    it spawns in its process group, go with it). ``stop()`` in a finally or fixture teardown."""

    args: list[str]
    log: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, ready_timeout: float = 60, poll: float = 0.05) -> LlamaServer:
        """Start it and wait for ``/health`` 200 (looked at every ``poll`` s: bench/load.py
        times a load by this, and its loads from RAM take ~0.1 s)."""
        argv = [str(server_binary()), "--host", "127.0.0.1", "--port", str(self.port), *self.args]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        try:
            wait_for(self._healthy, ready_timeout, f"llama-server on {self.url} /health", poll)
        except BaseException:
            self.stop()
            raise
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"llama-server exited with {self.proc.returncode}:\n{self.log_tail()}"
            )
        try:
            return self.request("GET", "/health", timeout=2)[0] == 200
        except OSError:
            return False  # not listening yet

    def request(
        self, method: str, path: str, body: dict | None = None, timeout: float = 30
    ) -> tuple[int, Any]:
        """(HTTP status, decoded JSON body) of one request; error statuses are returned too."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def get(self, path: str, timeout: float = 30) -> Any:
        status, body = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {body}")
        return body

    def post(self, path: str, body: dict, timeout: float = 60) -> Any:
        status, answer = self.request("POST", path, body, timeout=timeout)
        if status != 200:
            raise RuntimeError(f"POST {path}: {status} {answer}")
        return answer

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM the session (the server and its model children), SIGKILL what is left."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group is the server's own pid
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                continue
            # the server is gone; its children must not outlive it
            if not group_alive(pgid):
                break
        self.proc.wait()
        self.proc = None


def group_alive(pgid: int) -> bool:
    """Whether any process (a zombie too, until its parent reaps it) is in group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m speedloader_lab.llama")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build llama-server into the cache (a no-op when cached)")
    b.add_argument("--force", action="store_true", help="build again even when cached")
    sub.add_parser("path", help="print the cached binary's path (exit 1 when not built)")
    args = parser.parse_args(argv)
    if args.command == "path":
        if not is_built():
            print("llama-server is not built; run: python -m speedloader_lab.llama build")
            return 1
        print(server_binary())
        return 0
    try:
        binary = build(force=args.force)
    except CannotBuild as err:
        print(f"llama: cannot build: {err}", file=sys.stderr)
        return 3
    except RuntimeError as err:
        print(f"llama: build failed: {err}", file=sys.stderr)
        return 1
    commit = (read_stamp() or {}).get("llama_cpp_commit", "?")
    print(f"llama: {binary} (llama.cpp {commit})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
