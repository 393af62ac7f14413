"""Issue 9, the catalog's side of findings 3, 4 and 5: a cold-storage writer against the scan.

Every tree here is made by the test as someone who can write into cold storage would make
it (files in a temporary cold dir; any victim or secret is a file the test made beside it,
never one of the host's). Each test asserts that the trick fails (a problem on the model,
nothing listed that leads out) and that nothing changed (cold storage and the victims keep
their content, mode and owner).
"""

from __future__ import annotations

import os
import shutil
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from speedloader_lab.modelgen import (
    KiB,
    git_blob_sha1,
    make_gguf,
    make_hf_hub_repo,
    make_ollama_model,
    make_safetensors_dir,
    tree_fingerprint,
)
from speedloaderd.catalog import FileRole, ScanResult, scan
from speedloaderd.catalog.coldfs import MAX_DEPTH
from speedloaderd.catalog.hf import REF_LIMIT
from speedloaderd.catalog.ollama import MANIFEST_LIMIT
from speedloaderd.modelsdir import ModelsDir
from speedloaderd.roots import Identity

SECRET = b"root-only secret 6c1f0e: must never reach a model\n"
SCAN_TIMEOUT_S = 60.0
"""Generous: a scan here takes milliseconds; only a scan that hangs (a FIFO read) gets near."""
WRITER_UID, WRITER_GID = 23456, 34567
"""Owner of the files a cold-storage writer made (no such user needs to exist)."""


@pytest.fixture
def cold(tmp_path: Path) -> Path:
    root = tmp_path / "cold"
    root.mkdir()
    return root


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A root-only file outside cold storage, next to it (as /etc/shadow would be)."""
    path = tmp_path / "secret"
    path.write_bytes(SECRET)
    path.chmod(0o600)
    return path


def victim_state(path: Path) -> tuple[bytes, int, int, int]:
    st = path.stat()
    return path.read_bytes(), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


def scan_in_thread(cold: Path, backend: str, unblock: Callable[[], None] = lambda: None):
    """Run a scan in a thread, so a scan that hangs fails the test instead of wedging it."""
    out: list[ScanResult | BaseException] = []

    def run() -> None:
        try:
            out.append(scan(cold, backend))
        except BaseException as exc:  # noqa: BLE001 (handed to the test thread)
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(SCAN_TIMEOUT_S)
    if t.is_alive():
        unblock()  # let the stuck thread go, then fail
        t.join(5)
        pytest.fail(f"the {backend} scan did not finish within {SCAN_TIMEOUT_S} s")
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def all_content(result: ScanResult) -> list[bytes]:
    return [f.content for m in result.models.values() for f in m.files if f.content is not None]


def inside(path: str, root: Path) -> bool:
    root_s = os.path.realpath(root)
    return path == root_s or path.startswith(root_s + "/")


# --------------------------------------------------------------------------- finding 5


def test_hf_snapshot_link_tricks_are_problems_and_the_models_dir_stays_inside(
    cold: Path, tmp_path: Path, secret: Path
) -> None:
    repo = make_hf_hub_repo(cold / "hub", "org/m", files={"config.json": b"{}", "w.bin": 300})
    snap = repo.snapshot()
    base = "hub/models--org--m"
    snap_rel = f"{base}/snapshots/{repo.revision}"
    blob = repo.files["w.bin"]
    # The chain of finding 5: each link lexically inside the repo, physically not.
    # sub is the repo's blobs dir, up is the repo itself (sub/..), and a climbs three
    # levels from there: lexically snapshots/<rev>/up/../../../secret = <repo>/secret,
    # physically <repo>/../../../secret = the secret beside cold storage.
    (snap / "sub").symlink_to("../../blobs")
    (snap / "up").symlink_to("sub/..")
    (snap / "a").symlink_to("up/../../../secret")
    (repo.path / "secret").write_bytes(b"decoy the lexical check would have listed")
    # More tricks: a blob that is itself a link out, a link to the blobs dir, a blob name
    # with a path in it, the right name at the wrong depth, a harmless-looking detour, and
    # an absolute link.
    (repo.path / "blobs/linkblob").symlink_to(secret)
    (snap / "b").symlink_to("../../blobs/linkblob")
    (snap / "c").symlink_to("../../blobs")
    (snap / "d").symlink_to(f"../../blobs/../blobs/{blob}")
    (snap / "deep").mkdir()
    (snap / "deep/e").symlink_to(f"../../blobs/{blob}")
    (snap / "f").symlink_to(f"./../../blobs/{blob}")
    (snap / "g").symlink_to(secret)
    before = tree_fingerprint(cold)
    secret_before = victim_state(secret)

    result = scan_in_thread(cold, "huggingface")

    m = result.models["org/m"]
    for name in ("sub", "up", "a", "c", "d", "deep/e", "f"):
        assert any(
            p.startswith(f"{snap_rel}/{name}: symlink to ")
            and "is not a link to a blob of hub/models--org--m" in p
            for p in m.problems
        ), (name, m.problems)
    assert (
        f"{snap_rel}/deep/e: symlink to '../../blobs/{blob}' is not a link to a blob of "
        f"{base} (expected '../../../blobs/<name>'); not followed" in m.problems
    )
    assert (
        f"{snap_rel}/b -> {base}/blobs/linkblob: symlink to '{secret}' leads outside cold "
        "storage; not followed" in m.problems
    )
    assert f"{snap_rel}/g: absolute symlink to '{secret}'; expected a relative one" in m.problems
    assert len(m.problems) == 9
    # Only what huggingface_hub itself wrote is listed, and it resolves to a blob of the repo.
    links = {f.rel: f.link_target for f in m.files if f.role is FileRole.LINK}
    assert links == {f"{snap_rel}/{p}": f"../../blobs/{b}" for p, b in repo.files.items()}
    assert {f.rel for f in m.data_files} == {f"{base}/blobs/{b}" for b in repo.files.values()}
    for f in m.files:
        real = os.path.realpath(cold / f.rel)
        assert inside(real, repo.path / "blobs") or f.role is FileRole.META, (f.rel, real)
    assert secret.read_bytes() not in all_content(result)

    # The models dir reproduces every LINK verbatim: none may lead out of it or cold storage.
    models = tmp_path / "models"
    models.mkdir()
    ModelsDir(models, cold, {}).sync(result, [])
    made = 0
    for dirpath, dirnames, filenames in os.walk(models):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                made += 1
                real = os.path.realpath(path)
                assert inside(real, models) or inside(real, cold), (path, real)
                assert not inside(real, cold) or os.path.isfile(real), (path, real)
                assert real != os.path.realpath(secret)
    assert made == 2 * len(repo.files)  # each snapshot link and its blob's data link

    assert tree_fingerprint(cold) == before
    assert victim_state(secret) == secret_before


# --------------------------------------------------------------------------- finding 4, scan side


def _hostile(kind: str, path: Path, secret: Path, limit: int) -> str:
    """Make ``path`` (a manifest or a ref) hostile; return what the problem must say."""
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
        return "is a FIFO, expected a regular file"
    if kind == "device":  # a device node on cold storage (an NFS export can carry one)
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 5))  # what /dev/zero is
        return "is a device node, expected a regular file"
    if kind == "dev-zero":
        path.symlink_to("/dev/zero")
        return "symlink to '/dev/zero' leads outside cold storage; not followed"
    if kind == "secret":
        path.symlink_to(secret)
        return f"symlink to '{secret}' leads outside cold storage; not followed"
    if kind == "secret-relative":
        path.symlink_to(os.path.relpath(secret, path.parent))
        return "leads outside cold storage; not followed"
    assert kind == "huge"
    with open(path, "wb") as f:
        f.truncate(64 * limit)  # sparse: no disk used
    return f"more than the {limit} expected"


HOSTILE = ["fifo", "device", "dev-zero", "secret", "secret-relative", "huge"]


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_ollama_manifest_is_a_problem_and_nothing_secret_is_read(
    cold: Path, secret: Path, kind: str
) -> None:
    good = make_ollama_model(cold, "good:1", layers=[KiB])
    bad = make_ollama_model(cold, "bad:1", layers=[KiB + 1])
    want = _hostile(kind, cold / bad.manifest_rel, secret, MANIFEST_LIMIT)
    before = tree_fingerprint(cold)
    secret_before = victim_state(secret)

    result = scan_in_thread(cold, "ollama", lambda: _unblock(cold / bad.manifest_rel))

    m = result.models["bad:1"]
    assert len(m.problems) == 1 and m.problems[0].startswith(f"{bad.manifest_rel}: ")
    assert want in m.problems[0], m.problems
    assert m.files == ()
    g = result.models["good:1"]
    assert g.ok and g.files[0].content == (cold / good.manifest_rel).read_bytes()
    assert not any(SECRET in c for c in all_content(result))
    assert tree_fingerprint(cold) == before
    assert victim_state(secret) == secret_before


@pytest.mark.parametrize("kind", HOSTILE)
@pytest.mark.parametrize("ref", ["main", "v1"])
def test_hostile_hf_ref_is_a_problem_and_nothing_secret_is_read(
    cold: Path, secret: Path, kind: str, ref: str
) -> None:
    good = make_hf_hub_repo(cold / "hub", "org/good", files={"w.bin": 100})
    bad = make_hf_hub_repo(cold / "hub", "org/bad", files={"w.bin": 101}, ref=ref)
    ref_path = bad.path / "refs" / ref
    want = _hostile(kind, ref_path, secret, REF_LIMIT)
    before = tree_fingerprint(cold)
    secret_before = victim_state(secret)

    result = scan_in_thread(cold, "huggingface", lambda: _unblock(ref_path))

    m = result.models["org/bad"]
    ref_rel = f"hub/models--org--bad/refs/{ref}"
    assert len(m.problems) == 1 and m.problems[0].startswith(f"{ref_rel}: "), m.problems
    assert want in m.problems[0], m.problems
    assert ref_rel not in [f.rel for f in m.files]
    g = result.models["org/good"]
    assert g.ok and g.files[0].content == good.revision.encode()
    assert not any(SECRET in c for c in all_content(result))
    assert tree_fingerprint(cold) == before
    assert victim_state(secret) == secret_before


def _unblock(path: Path) -> None:
    """If a reader is stuck on the FIFO at ``path``, give it a writer and EOF."""
    if stat.S_ISFIFO(os.lstat(path).st_mode):
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


# --------------------------------------------------------------------------- what the scan saw


def test_scan_records_identity_content_mode_and_owner(cold: Path) -> None:
    o = make_ollama_model(cold, "m:1", layers=[2 * KiB, 50])
    (cold / "store").mkdir()
    blob = cold / o.layers[0].rel
    blob.rename(cold / "store/weights")
    blob.symlink_to("../store/weights")  # a blob that is a link within cold storage
    manifest = cold / o.manifest_rel
    os.chown(manifest, WRITER_UID, WRITER_GID)
    manifest.chmod(0o640)
    make_gguf(cold / "gguf/a.gguf")
    (cold / "gguf/alias.gguf").symlink_to("a.gguf")
    make_safetensors_dir(cold / "hf", "org/dir", shards=2)
    repo = make_hf_hub_repo(cold / "hub", "org/hub", shards=2)
    make_hf_hub_repo(cold / "hub", "org/hub", files={"x.bin": 10}, ref="v2")
    ref = repo.path / "refs/v2"
    os.chown(ref, WRITER_UID, 0)
    ref.chmod(0o600)

    results = {b: scan(cold, b) for b in ("ollama", "llamacpp", "vllm")}

    files = [f for r in results.values() for m in r.models.values() for f in m.files]
    assert all(m.ok for r in results.values() for m in r.models.values())
    roles = [f.role for f in files]
    assert roles.count(FileRole.META) == 3 and roles.count(FileRole.DATA) > 10
    for f in files:
        st = os.stat(cold / f.rel)  # follows links: the file itself, as the scan must see it
        if f.role is FileRole.DATA:
            assert f.ident == Identity.of(st), f.rel
            assert f.content is None
        elif f.role is FileRole.META:
            assert f.content == (cold / f.rel).read_bytes(), f.rel
            assert (f.mode, f.owner) == (stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid))
            assert f.ident is None
    meta = {f.rel: f for f in files if f.role is FileRole.META}
    assert (meta[o.manifest_rel].mode, meta[o.manifest_rel].owner) == (
        0o640,
        (WRITER_UID, WRITER_GID),
    )
    v2 = meta["hub/models--org--hub/refs/v2"]
    assert (v2.mode, v2.owner, v2.content) == (0o600, (WRITER_UID, 0), ref.read_bytes())
    by_rel = {f.rel: f for f in files}
    assert by_rel[o.layers[0].rel].ident == Identity.of(os.stat(cold / "store/weights"))
    assert by_rel["gguf/alias.gguf"].ident == Identity.of(os.stat(cold / "gguf/a.gguf"))


def test_a_tree_deeper_than_the_limit_is_a_problem_not_a_crash(cold: Path) -> None:
    deep = cold.joinpath(*["d"] * (MAX_DEPTH + 5))
    make_gguf(deep / "x.gguf")
    make_gguf(cold / "ok.gguf")

    result = scan_in_thread(cold, "llamacpp")

    assert list(result.models) == ["ok"]
    assert any(f"more than {MAX_DEPTH} directories deep" in p.message for p in result.problems)


# --------------------------------------------------------------------------- finding 3, scan side

RACE_SCANS = 1000
RACE_SECONDS = 20.0


def _flip_forever(
    cold: Path, rel: str, outside: Path, stop: threading.Event
) -> tuple[list[int], threading.Thread]:
    """Swap ``cold/rel`` between the real directory and a symlink to ``outside``, as a
    cold-storage writer would, until ``stop`` (bounded by count and time as well). Hidden
    names park the one not in place: the scan skips them. Returns ([cycles], thread)."""
    path = cold / rel
    real = path.with_name(".real-" + path.name)
    link = path.with_name(".link-" + path.name)
    link.symlink_to(outside)
    flips = [0]

    def run() -> None:
        deadline = time.monotonic() + RACE_SECONDS + 10
        while not stop.is_set() and flips[0] < 2_000_000 and time.monotonic() < deadline:
            os.rename(path, real)  # the directory steps aside...
            os.rename(link, path)  # ...and the link takes its name
            os.rename(path, link)
            os.rename(real, path)  # back, so the next scan may start on the real one
            flips[0] += 1

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return flips, t


def _make_race_tree(cold: Path, outside: Path, backend: str) -> tuple[str, Path]:
    """A model on cold storage and a look-alike outside, under the same names; returns the
    directory to flip and what the link points at."""
    if backend == "llamacpp":
        make_gguf(cold / "team/a.gguf")
        make_gguf(outside / "a.gguf", n_tensors=2)
        return "team", outside
    if backend == "vllm":
        make_safetensors_dir(cold / "org", "m", shards=2)
        make_safetensors_dir(outside, "m", shards=3)
        return "org", outside
    if backend == "ollama":
        make_ollama_model(cold, "m:1", layers=[KiB, 10])
        make_ollama_model(outside, "m:1", layers=[KiB, 10])  # the very same blob names
        return "blobs", outside / "blobs"
    assert backend == "huggingface"
    repo = make_hf_hub_repo(cold / "hub", "org/m", files={"w.bin": 500})
    for p in (repo.path / "blobs").iterdir():  # same names, other files
        (outside / p.name).write_bytes(b"x" * 500)
    return "hub/models--org--m/blobs", outside


@pytest.mark.parametrize("backend", ["llamacpp", "vllm", "ollama", "huggingface"])
def test_directory_swapped_for_a_link_during_scans_never_yields_an_outside_file(
    cold: Path, tmp_path: Path, backend: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    flip, target = _make_race_tree(cold, outside, backend)
    cold_idents = {
        Identity.of(os.lstat(os.path.join(d, n))) for d, _, names in os.walk(cold) for n in names
    }
    outside_idents = {
        Identity.of(os.lstat(os.path.join(d, n))) for d, _, names in os.walk(outside) for n in names
    }
    assert outside_idents
    stop = threading.Event()
    flips, flipper = _flip_forever(cold, flip, target, stop)
    seen_broken = 0
    scans = 0
    deadline = time.monotonic() + RACE_SECONDS
    try:
        while scans < RACE_SCANS and time.monotonic() < deadline:
            result = scan(cold, backend)
            scans += 1
            models = list(result.models.values())
            for m in models:
                for f in m.data_files:
                    assert f.ident not in outside_idents, (scans, f.rel)
                    assert f.ident in cold_idents, (scans, f.rel)  # one the test made there
            if result.problems or not models or not all(m.ok for m in models):
                seen_broken += 1  # this scan met the link (or the gap between renames)
    finally:
        stop.set()
        flipper.join(30)
    assert not flipper.is_alive()
    # The race was driven, not hoped for: the flipper ran and scans met the swapped state.
    assert flips[0] > 0 and seen_broken > 0, (flips[0], scans, seen_broken)
    # Afterwards the tree is back as it was made, and scans clean.
    assert all(m.ok for m in scan(cold, backend).models.values())


# --------------------------------------------------------------------------- hostile trees (fuzz)

_TARGET_TAILS = ["secret", "outside", ".", "..", "blobs", "sub/..", "a.gguf", "main", "x/../.."]
_TARGET_TAILS += ["blobs/<blob>", "new0/../../../blobs/<blob>", "new1/../blobs/<blob>"]
"""Link targets (after some '../'); <blob> is a real blob's name, new0/new1 links made by
earlier steps: chains like finding 5's come out of a few steps."""


def _base_tree(cold: Path) -> None:
    """One healthy model of each layout, small; mutations make it hostile."""
    make_ollama_model(cold, "m:1", layers=[100, 10])
    make_gguf(cold / "g/a.gguf", n_tensors=1, tensor_bytes=64)
    make_safetensors_dir(cold / "hf", "org/d", shards=1, shard_bytes=256)
    repo = make_hf_hub_repo(cold / "hub", "org/h", files={"config.json": b"{}", "w.bin": 50})
    (repo.snapshot() / "sub").mkdir()


def _entries(cold: Path) -> list[str]:
    out = []
    for d, dirs, files in os.walk(cold):
        for n in dirs + files:
            out.append(os.path.relpath(os.path.join(d, n), cold))
    return sorted(out)


@st.composite
def _mutations(draw: st.DrawFn) -> list[tuple[int, str, str]]:
    """(which entry, what to make it, link target) steps, applied in order to the tree."""
    kinds = st.sampled_from(
        ["link", "link", "link", "abs", "fifo", "dir", "empty", "huge", "new", "deep", "long"]
    )
    steps = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(kinds)
        up = draw(st.integers(0, 7))
        tail = draw(st.sampled_from(_TARGET_TAILS + ["<entry>"]))
        where = draw(st.sampled_from(["any", "snapshot", "snapshot"]))
        steps.append((draw(st.integers(0, 10**6)), kind, f"{up}:{tail}:{where}"))
    return steps


def _apply(cold: Path, tmp: Path, steps: list[tuple[int, str, str]]) -> None:
    blob = git_blob_sha1(b"{}")  # the hub repo's config.json blob
    for pick, kind, target in steps:
        up, tail, where = target.split(":")
        entries = _entries(cold)
        if where == "snapshot":
            entries = [e for e in entries if "/snapshots/" in e] or entries
        rel = entries[pick % len(entries)]
        path = cold / rel
        if kind == "new":  # a new link beside the picked entry
            path = path.parent / f"new{(pick // 1000) % 2}"
            kind = "link"
        if kind == "long":  # a 250-character name beside the picked entry: fits NAME_MAX
            path = path.parent / ("l" * 245 + (".gguf", ".json", "-x")[pick % 3])
        if tail == "<entry>":
            tail = entries[(pick // 7) % len(entries)]
        link_target = "../" * int(up) + tail.replace("<blob>", blob)
        if os.path.lexists(path):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        if kind == "link":
            path.symlink_to(link_target)
        elif kind == "abs":
            path.symlink_to([str(tmp / "secret"), str(tmp / "outside"), "/dev/zero"][pick % 3])
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "dir":
            path.mkdir()
        elif kind == "empty":
            path.write_bytes(b"")
        elif kind == "deep":  # JSON nested past any recursion limit (RecursionError)
            path.write_bytes(b'{"a":' * (pick % 3000) + b"[" * (1000 + pick % 100_000))
        elif kind == "long":
            path.write_bytes(b"GGUF" + bytes(pick % 97))
        else:
            with open(path, "wb") as f:
                f.truncate(8 * MANIFEST_LIMIT)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=_mutations())
# Finding 5's chain, always tried: new0 -> ../../. (the repo), then a snapshot entry to
# new0/../../../blobs/<blob>: lexically <repo>/blobs/<blob>, physically above cold storage.
@example(steps=[(1, "new", "2:.:snapshot"), (3, "link", "0:new0/../../../blobs/<blob>:snapshot")])
# The manifest (entry 28 of 29) nested 88,028 deep and a 250-character name, always tried.
@example(steps=[(87_028, "deep", "0:.:any"), (4, "long", "0:.:any"), (5, "deep", "0:.:snapshot")])
def test_any_hostile_tree_lists_nothing_outside_and_reads_no_secret(
    tmp_path_factory: pytest.TempPathFactory, steps: list[tuple[int, str, str]]
) -> None:
    tmp = tmp_path_factory.mktemp("hostile")
    cold = tmp / "cold"
    cold.mkdir()
    (tmp / "secret").write_bytes(SECRET)
    (tmp / "secret").chmod(0o600)
    (tmp / "outside").mkdir()
    make_gguf(tmp / "outside/far.gguf", n_tensors=1, tensor_bytes=64)
    _base_tree(cold)
    _apply(cold, tmp, steps)
    outside_idents = {
        Identity.of(os.stat(tmp / "secret")),
        Identity.of(os.stat(tmp / "outside/far.gguf")),
    }
    before = tree_fingerprint(cold)

    for backend in ("ollama", "llamacpp", "huggingface"):
        result = scan_in_thread(cold, backend, lambda: _unblock_all(cold))
        for m in result.models.values():
            for f in m.files:
                path = cold / f.rel
                real = os.path.realpath(path)
                assert inside(real, cold), (backend, f.rel, real)
                if f.role is FileRole.LINK:
                    repo = f.rel.split("/snapshots/")[0]
                    assert inside(real, cold / repo / "blobs"), (f.rel, f.link_target, real)
                    assert stat.S_ISREG(os.lstat(real).st_mode)
                    continue
                st_ = os.stat(path)
                assert stat.S_ISREG(st_.st_mode), f.rel
                assert Identity.of(st_) not in outside_idents, f.rel
                if f.role is FileRole.DATA:
                    assert f.ident == Identity.of(st_), f.rel
                else:
                    assert f.content == path.read_bytes(), f.rel
        assert not any(SECRET in c for c in all_content(result))
    assert tree_fingerprint(cold) == before


def _unblock_all(cold: Path) -> None:
    for d, _, files in os.walk(cold):
        for n in files:
            _unblock(Path(d, n))
