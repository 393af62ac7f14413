"""The model catalog against real files in every layout, healthy and damaged.

Runs as root, so unreadable files are made with FIFOs, directories where files belong and
symlinks, not with permissions.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import gguf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from speedloader_lab.modelgen import (
    KiB,
    git_blob_sha1,
    make_gguf,
    make_hf_hub_repo,
    make_ollama_model,
    make_safetensors_dir,
    make_split_gguf,
    tree_fingerprint,
)
from speedloaderd.catalog import BACKENDS, FileRole, Model, ModelFormat, scan
from speedloaderd.errors import InvalidArgument


@pytest.fixture
def cold(tmp_path: Path) -> Path:
    root = tmp_path / "cold"
    root.mkdir()
    return root


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to cold storage, with a secret a scan must never list."""
    out = tmp_path / "outside"
    out.mkdir()
    (out / "secret").write_bytes(b"s" * 1234)
    return out


def problems(model: Model) -> str:
    return "\n".join(model.problems)


def rels(model: Model, role: FileRole | None = None) -> list[str]:
    return [f.rel for f in model.files if role is None or f.role is role]


# --------------------------------------------------------------------------- general


def test_unknown_backend_is_refused(cold: Path) -> None:
    with pytest.raises(InvalidArgument, match="unknown backend 'tgi'"):
        scan(cold, "tgi")


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_cold_root_is_a_problem_not_an_exception(tmp_path: Path, backend: str) -> None:
    result = scan(tmp_path / "nope", backend)
    assert result.models == {}
    assert len(result.problems) == 1
    assert "missing or not a directory" in result.problems[0].message


# --------------------------------------------------------------------------- ollama


def test_ollama_names_files_and_sizes(cold: Path) -> None:
    lib = make_ollama_model(cold, "llama3:8b", layers=[8 * KiB, 100, 50])
    ns = make_ollama_model(cold, "someone/tiny:q4", layers=[3 * KiB])
    other = make_ollama_model(cold, "example.com:5000/team/big:v2", layers=[2 * KiB, 70])
    latest = make_ollama_model(cold, "phi3", layers=[KiB])

    result = scan(cold, "ollama")

    assert result.problems == []
    assert list(result.models) == sorted(
        ["llama3:8b", "someone/tiny:q4", "example.com:5000/team/big:v2", "phi3:latest"]
    )
    m = result.models["llama3:8b"]
    assert m.format is ModelFormat.OLLAMA and m.ok
    assert m.files[0].rel == "manifests/registry.ollama.ai/library/llama3/8b"
    assert m.files[0].role is FileRole.META
    assert m.files[0].size == lib.manifest_size == (cold / lib.manifest_rel).stat().st_size
    data = m.files[1:]
    assert [f.rel for f in data] == [b.rel for b in (lib.config, *lib.layers)]
    assert [f.digest for f in data] == [b.digest for b in (lib.config, *lib.layers)]
    assert [f.size for f in data] == [b.size for b in (lib.config, *lib.layers)]
    assert all(f.role is FileRole.DATA for f in data)
    assert data[1].rel.startswith("blobs/sha256-") and len(data[1].rel) == 13 + 64
    assert m.size == lib.size == 8 * KiB + 100 + 50 + lib.config.size
    assert (
        rels(result.models["someone/tiny:q4"])[0] == "manifests/registry.ollama.ai/someone/tiny/q4"
    )
    assert rels(result.models["example.com:5000/team/big:v2"])[0] == (
        "manifests/example.com:5000/team/big/v2"
    )
    assert result.models["someone/tiny:q4"].size == ns.size
    assert result.models["example.com:5000/team/big:v2"].size == other.size
    assert result.models["phi3:latest"].size == latest.size


def test_ollama_shared_blobs_are_one_file(cold: Path) -> None:
    a = make_ollama_model(cold, "a:1", layers=[10 * KiB, 200])
    b = make_ollama_model(cold, "b:1", layers=[a.layers[0], 300])
    # The same blob twice in one manifest (and the config reused as a layer).
    c = make_ollama_model(cold, "c:1", layers=[a.layers[1], a.layers[1], 400])

    result = scan(cold, "ollama")

    ma, mb, mc = (result.models[n] for n in ("a:1", "b:1", "c:1"))
    shared = a.layers[0].rel
    assert shared in rels(ma) and shared in rels(mb)
    assert rels(mc).count(a.layers[1].rel) == 1
    assert len(mc.data_files) == 3  # config, shared layer once, own layer
    assert mc.size == c.config.size + 200 + 400
    assert mb.size == b.config.size + 10 * KiB + 300
    assert all(m.ok for m in (ma, mb, mc))


def _rewrite_manifest(cold: Path, rel: str, change) -> None:
    path = cold / rel
    doc = json.loads(path.read_bytes())
    change(doc)
    path.write_text(json.dumps(doc))


def test_ollama_damage_is_reported_per_model(cold: Path, outside: Path) -> None:
    good = make_ollama_model(cold, "good:1", layers=[4 * KiB, 10])
    lib = cold / "manifests/registry.ollama.ai/library"

    missing = make_ollama_model(cold, "missing:1", layers=[4 * KiB + 1, 11])
    (cold / missing.layers[0].rel).unlink()

    mismatch = make_ollama_model(cold, "mismatch:1", layers=[4 * KiB + 2])
    _rewrite_manifest(cold, mismatch.manifest_rel, lambda d: d["layers"][0].update(size=999))

    (lib / "broken").mkdir()
    (lib / "broken/1").write_bytes(b'{"schemaVersion": 2, "layers": [')

    (lib / "fifo").mkdir()
    os.mkfifo(lib / "fifo/1")

    (lib / "dirtag/1").mkdir(parents=True)

    blobdir = make_ollama_model(cold, "blobdir:1", layers=[4 * KiB + 3])
    (cold / blobdir.layers[0].rel).unlink()
    (cold / blobdir.layers[0].rel).mkdir()

    baddigest = make_ollama_model(cold, "baddigest:1", layers=[4 * KiB + 4])
    _rewrite_manifest(
        cold,
        baddigest.manifest_rel,
        lambda d: d["layers"][0].update(digest="sha256:../../outside/secret"),
    )

    escape = make_ollama_model(cold, "escape:1", layers=[1234])
    (cold / escape.layers[0].rel).unlink()
    (cold / escape.layers[0].rel).symlink_to(outside / "secret")

    dangling = make_ollama_model(cold, "dangling:1", layers=[4 * KiB + 5])
    (cold / dangling.layers[0].rel).unlink()
    (cold / dangling.layers[0].rel).symlink_to("sha256-" + "0" * 64)

    (lib / "evil").mkdir()
    (outside / "manifest").write_bytes((cold / good.manifest_rel).read_bytes())
    (lib / "evil/1").symlink_to(outside / "manifest")

    result = scan(cold, "ollama")
    m = result.models

    assert m["good:1"].ok and m["good:1"].size == good.size
    assert f"{missing.layers[0].rel} (layer 0 of {missing.manifest_rel}): is missing" in (
        problems(m["missing:1"])
    )
    assert missing.layers[0].rel not in rels(m["missing:1"])
    assert problems(m["mismatch:1"]) == (
        f"{mismatch.layers[0].rel}: {4 * KiB + 2} bytes on disk, "
        f"but {mismatch.manifest_rel} says 999"
    )
    assert "manifests/registry.ollama.ai/library/broken/1: not valid JSON" in problems(
        m["broken:1"]
    )
    assert rels(m["broken:1"]) == ["manifests/registry.ollama.ai/library/broken/1"]
    assert problems(m["fifo:1"]) == (
        "manifests/registry.ollama.ai/library/fifo/1: is a FIFO, expected a regular file"
    )
    assert m["fifo:1"].files == ()
    assert "dirtag:1" not in m
    assert [p.rel for p in result.problems] == ["manifests/registry.ollama.ai/library/dirtag/1"]
    assert "unexpected directory" in result.problems[0].message
    assert "is a directory, expected a regular file" in problems(m["blobdir:1"])
    assert "has digest 'sha256:../../outside/secret'" in problems(m["baddigest:1"])
    assert not any("outside" in r for r in rels(m["baddigest:1"]))
    assert f"symlink to '{outside / 'secret'}' leads outside cold storage" in problems(
        m["escape:1"]
    )
    assert escape.layers[0].rel not in rels(m["escape:1"])
    assert "is a dangling symlink" in problems(m["dangling:1"])
    assert "leads outside cold storage" in problems(m["evil:1"])
    assert m["evil:1"].files == ()
    bad = set(m) - {"good:1"}
    assert all(not m[n].ok for n in bad), [n for n in bad if m[n].ok]


def test_ollama_blob_symlink_inside_cold_storage_is_followed(cold: Path) -> None:
    model = make_ollama_model(cold, "linked:1", layers=[5 * KiB])
    blob = cold / model.layers[0].rel
    (cold / "store").mkdir()
    blob.rename(cold / "store/weights")
    blob.symlink_to("../store/weights")

    m = scan(cold, "ollama").models["linked:1"]

    assert m.ok, m.problems
    assert m.data_files[1].rel == model.layers[0].rel
    assert m.data_files[1].size == 5 * KiB


def test_ollama_blobs_dir_leading_outside_is_not_followed(cold: Path, tmp_path: Path) -> None:
    model = make_ollama_model(cold, "m:1", layers=[KiB])
    (cold / "blobs").rename(tmp_path / "elsewhere")
    (cold / "blobs").symlink_to(tmp_path / "elsewhere")

    m = scan(cold, "ollama").models["m:1"]

    assert m.data_files == ()
    assert f"{model.layers[0].rel} (layer 0 of {model.manifest_rel}): blobs/ symlink to" in (
        problems(m)
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    manifest=st.one_of(
        st.binary(max_size=200),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=80),
            lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids),
            max_leaves=20,
        ).map(lambda doc: json.dumps(doc).encode()),
        st.fixed_dictionaries(
            {
                "schemaVersion": st.integers(0, 3),
                "config": st.dictionaries(st.sampled_from(["digest", "size"]), st.text()),
                "layers": st.lists(
                    st.dictionaries(
                        st.sampled_from(["digest", "size", "mediaType"]),
                        st.text(max_size=80) | st.integers(),
                    ),
                    max_size=4,
                ),
            }
        ).map(lambda doc: json.dumps(doc).encode()),
    )
)
def test_ollama_any_manifest_content_gives_a_model_never_an_exception(
    tmp_path_factory: pytest.TempPathFactory, manifest: bytes
) -> None:
    cold = tmp_path_factory.mktemp("fuzz")
    path = cold / "manifests/registry.ollama.ai/library/fuzz/1"
    path.parent.mkdir(parents=True)
    path.write_bytes(manifest)

    result = scan(cold, "ollama")

    model = result.models["fuzz:1"]
    assert model.files[0].rel == "manifests/registry.ollama.ai/library/fuzz/1"
    assert model.files[0].size == len(manifest)
    assert not model.ok  # there are no blobs, so no manifest can be whole
    assert all(f.rel.startswith("blobs/sha256-") for f in model.files[1:])


# --------------------------------------------------------------------------- gguf


def test_gguf_names_sizes_and_real_reader(cold: Path) -> None:
    q = make_gguf(cold / "qwen/qwen2-7b-q4_k_m.gguf", n_tensors=3, tensor_bytes=3000)
    top = make_gguf(cold / "top.gguf")
    make_gguf(cold / ".cache/hidden.gguf")
    make_gguf(cold / "qwen/.partial.gguf")
    (cold / "qwen/README.md").write_text("not a model")

    result = scan(cold, "llamacpp")

    assert result.problems == []
    assert list(result.models) == ["qwen/qwen2-7b-q4_k_m", "top"]
    m = result.models["qwen/qwen2-7b-q4_k_m"]
    assert m.format is ModelFormat.GGUF and m.ok
    assert [(f.rel, f.size, f.role, f.digest) for f in m.files] == [
        ("qwen/qwen2-7b-q4_k_m.gguf", q.size, FileRole.DATA, None)
    ]
    assert result.models["top"].size == top.size
    reader = gguf.GGUFReader(cold / m.files[0].rel)
    assert [t.name for t in reader.tensors] == list(q.tensor_names)
    assert [int(t.n_bytes) for t in reader.tensors] == [3000, 3000, 3000]


def test_gguf_split_model_is_one_model_with_parts_in_order(cold: Path) -> None:
    parts = make_split_gguf(cold / "big", "llama-70b-q4", parts=3, tensor_bytes=2 * KiB)
    make_gguf(cold / "big/llama-70b-q4-extra.gguf")

    result = scan(cold, "llamacpp")

    assert list(result.models) == ["big/llama-70b-q4", "big/llama-70b-q4-extra"]
    m = result.models["big/llama-70b-q4"]
    assert m.ok, m.problems
    assert rels(m) == [
        "big/llama-70b-q4-00001-of-00003.gguf",
        "big/llama-70b-q4-00002-of-00003.gguf",
        "big/llama-70b-q4-00003-of-00003.gguf",
    ]
    assert m.size == sum(p.size for p in parts)
    for i, f in enumerate(m.files):
        fields = gguf.GGUFReader(cold / f.rel).fields
        assert int(fields["split.no"].parts[-1][0]) == i
        assert int(fields["split.count"].parts[-1][0]) == 3
        assert int(fields["split.tensors.count"].parts[-1][0]) == 3


def test_gguf_split_missing_part_is_a_problem_on_that_model(cold: Path) -> None:
    parts = make_split_gguf(cold, "mixtral", parts=4)
    parts[2].path.unlink()
    make_split_gguf(cold, "whole", parts=2)

    result = scan(cold, "llamacpp")

    m = result.models["mixtral"]
    assert m.problems == ("mixtral-00003-of-00004.gguf: part 3 of 4 is missing",)
    assert rels(m) == [p.path.name for i, p in enumerate(parts) if i != 2]
    assert result.models["whole"].ok


def test_gguf_split_inconsistent_parts(cold: Path) -> None:
    make_split_gguf(cold, "x", parts=2)
    make_gguf(cold / "x-00003-of-00002.gguf")
    make_gguf(cold / "y.gguf")
    make_split_gguf(cold, "y", parts=1)
    make_gguf(cold / "z-00001-of-00002.gguf")
    make_gguf(cold / "z-00002-of-00003.gguf")

    m = scan(cold, "llamacpp").models

    assert m["x"].problems == ("x-00003-of-00002.gguf: part number 3 is outside 1..2",)
    assert problems(m["y"]) == (
        "y.gguf and split parts y-00001-of-00001.gguf... both claim this model name"
    )
    assert rels(m["y"]) == ["y.gguf", "y-00001-of-00001.gguf"]
    assert problems(m["z"]) == "z: split parts disagree on the part count ([2, 3])"


def test_gguf_damage_and_symlinks(cold: Path, outside: Path) -> None:
    good = make_gguf(cold / "good.gguf")
    os.mkfifo(cold / "fifo.gguf")
    (cold / "escape.gguf").symlink_to(outside / "secret")
    (cold / "dangling.gguf").symlink_to("nothing-here.gguf")
    (cold / "alias.gguf").symlink_to("good.gguf")
    make_gguf(outside / "models/far.gguf")
    (cold / "far").symlink_to(outside / "models")
    (cold / "loop").symlink_to(".")
    (cold / "dir.gguf").mkdir()
    make_gguf(cold / "dir.gguf/inner.gguf")
    (cold / "bad name.gguf").write_bytes(b"GGUF")

    result = scan(cold, "llamacpp")
    m = result.models

    assert sorted(m) == ["alias", "dangling", "dir.gguf/inner", "escape", "fifo", "good"]
    assert m["good"].ok and m["good"].size == good.size
    assert m["alias"].ok and rels(m["alias"]) == ["alias.gguf"]
    assert m["alias"].size == good.size
    assert problems(m["fifo"]) == "fifo.gguf: is a FIFO, expected a regular file"
    assert problems(m["escape"]) == (
        f"escape.gguf: symlink to '{outside / 'secret'}' leads outside cold storage; not followed"
    )
    assert m["escape"].files == ()
    assert problems(m["dangling"]) == (
        "dangling.gguf: is a dangling symlink (to 'nothing-here.gguf')"
    )
    by_rel = {p.rel: p.message for p in result.problems}
    assert set(by_rel) == {"bad name.gguf", "far"}
    assert "leads outside cold storage" in by_rel["far"]
    assert "not a valid model name" in by_rel["bad name.gguf"]


# --------------------------------------------------------------------------- HF model dirs


def test_safetensors_model_dir(cold: Path) -> None:
    made = make_safetensors_dir(cold, "org/name", shards=3, shard_bytes=8 * KiB)
    single = make_safetensors_dir(cold, "solo", shards=1)
    # a model dir inside a model dir: part of the outer model, not a model of its own
    make_safetensors_dir(cold / "org/name", "draft", shards=1)
    (cold / "org/name/.cache").mkdir()
    (cold / "org/name/.cache/junk").write_text("hidden")
    (cold / "notes").mkdir()
    (cold / "notes/config.json").write_text("{}")  # config alone is not a model

    for backend in ("vllm", "huggingface"):
        result = scan(cold, backend)
        assert result.problems == []
        assert list(result.models) == ["org/name", "solo"]
        m = result.models["org/name"]
        assert m.format is ModelFormat.SAFETENSORS and m.ok
        assert all(f.role is FileRole.DATA and f.digest is None for f in m.files)
        own = {rel: size for rel, size in made.files.items()}
        inner = {f.rel: f.size for f in m.files if f.rel.startswith("org/name/draft/")}
        assert {f.rel: f.size for f in m.files} == {**own, **inner}
        assert sorted(inner) == [
            "org/name/draft/config.json",
            "org/name/draft/model.safetensors",
            "org/name/draft/tokenizer.json",
        ]
        assert rels(m) == sorted(rels(m))
        assert result.models["solo"].size == single.size

    index = json.loads((cold / "org/name/model.safetensors.index.json").read_bytes())
    for shard_rel in made.shards:
        with safe_open(cold / shard_rel, framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                assert index["weight_map"][key] == shard_rel.rsplit("/", 1)[1]
                assert f.get_tensor(key).nbytes == 4 * KiB


def test_model_dir_damage(cold: Path, outside: Path) -> None:
    make_safetensors_dir(cold, "org/damaged", shards=1)
    os.mkfifo(cold / "org/damaged/fifo.bin")
    (cold / "org/damaged/escape.safetensors").symlink_to(outside / "secret")
    (cold / "org/damaged/sub").symlink_to(outside)
    (cold / "org/damaged/tok").symlink_to("tokenizer.json")

    m = scan(cold, "vllm").models["org/damaged"]

    assert m.problems == (
        "org/damaged/escape.safetensors: symlink to "
        f"'{outside / 'secret'}' leads outside cold storage; not followed",
        "org/damaged/fifo.bin: is a FIFO, expected a regular file",
        f"org/damaged/sub: symlink to '{outside}' leads outside cold storage; not followed",
    )
    assert "org/damaged/tok" in rels(m)
    assert not any("secret" in r or "sub" in r for r in rels(m))


# --------------------------------------------------------------------------- HF hub cache


def test_hub_repo_files_and_digests(cold: Path) -> None:
    repo = make_hf_hub_repo(cold / "hub", "org/name", shards=2)
    plain = make_hf_hub_repo(cold / "hub", "gpt2", files={"config.json": b"{}", "model.bin": 5000})
    make_hf_hub_repo(cold / "hub", "datasets-not", files={"x.bin": 10})
    (cold / "hub/models--datasets-not").rename(cold / "hub/datasets--org--data")

    result = scan(cold, "huggingface")

    assert result.problems == []
    assert list(result.models) == ["gpt2", "org/name"]
    m = result.models["org/name"]
    assert m.format is ModelFormat.HF_HUB and m.ok, m.problems
    base = "hub/models--org--name"
    snap = f"{base}/snapshots/{repo.revision}"
    assert [(f.rel, f.size) for f in m.files if f.role is FileRole.META] == [
        (f"{base}/refs/main", 40)
    ]
    links = {f.rel: f.link_target for f in m.files if f.role is FileRole.LINK}
    assert links == {f"{snap}/{p}": f"../../blobs/{b}" for p, b in repo.files.items()}
    data = {f.rel: (f.size, f.digest) for f in m.data_files}
    expected = {}
    for path, blob in repo.files.items():
        lfs = path.endswith(".safetensors")
        expected[f"{base}/blobs/{blob}"] = (repo.sizes[blob], f"sha256:{blob}" if lfs else None)
    assert data == expected
    assert m.size == repo.size
    config = (cold / snap / "config.json").read_bytes()
    assert repo.files["config.json"] == git_blob_sha1(config)
    with safe_open(cold / snap / "model-00002-of-00002.safetensors", framework="numpy") as f:
        assert sorted(f.keys()) == ["model.layers.2.weight", "model.layers.3.weight"]
    assert result.models["gpt2"].size == plain.size


def test_hub_revision_selection(cold: Path) -> None:
    hub = cold / "hub"
    old = make_hf_hub_repo(hub, "org/m", files={"config.json": b"{1}", "w.safetensors": 1000})
    new = make_hf_hub_repo(hub, "org/m", files={"config.json": b"{1}", "w.safetensors": 2000})
    base = "hub/models--org--m"

    def chosen_blobs() -> set[str]:
        return {f.rel.rsplit("/", 1)[1] for f in scan(cold, "vllm").models["org/m"].data_files}

    # refs/main names the newer revision: its blobs and its links only
    m = scan(cold, "vllm").models["org/m"]
    assert m.ok and m.size == 2000 + 3
    assert chosen_blobs() == set(new.files.values())
    assert {r.split("/")[3] for r in rels(m, FileRole.LINK)} == {new.revision}

    (hub / "models--org--m/refs/main").write_text(old.revision)
    assert chosen_blobs() == set(old.files.values())

    # no refs/main: the most recently modified snapshot
    (hub / "models--org--m/refs/main").unlink()
    snaps = hub / "models--org--m/snapshots"
    os.utime(snaps / old.revision, ns=(time.time_ns(), time.time_ns()))
    os.utime(snaps / new.revision, ns=(1, 1))
    m = scan(cold, "vllm").models["org/m"]
    assert m.ok and chosen_blobs() == set(old.files.values())
    os.utime(snaps / new.revision, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert chosen_blobs() == set(new.files.values())

    # refs/main naming a revision that is not there
    (hub / "models--org--m/refs/main").write_text("f" * 40)
    m = scan(cold, "vllm").models["org/m"]
    assert m.problems == (
        f"{base}/refs/main: names revision '{'f' * 40}', but snapshots/{'f' * 40} is not there",
    )

    # the only snapshot is chosen without a ref; other refs are META too
    single = make_hf_hub_repo(hub, "one", files={"a.bin": 10}, ref="v1.0")
    m = scan(cold, "vllm").models["one"]
    assert m.ok, m.problems
    assert rels(m, FileRole.META) == ["hub/models--one/refs/v1.0"]
    assert [f.digest for f in m.data_files] == [f"sha256:{single.files['a.bin']}"]


def test_hub_damage(cold: Path, outside: Path) -> None:
    hub = cold / "hub"
    # a link out of the repo and an absolute one: problems, not listed
    r = make_hf_hub_repo(hub, "org/escape", files={"config.json": b"{}", "w.bin": 100})
    snap = r.snapshot()
    (snap / "evil.json").symlink_to("../../../../../outside/secret")
    (snap / "abs.json").symlink_to(outside / "secret")
    # a blob that is itself a link out of cold storage
    b = make_hf_hub_repo(hub, "org/blob-out", files={"w.bin": 1234})
    blob = b.path / "blobs" / b.files["w.bin"]
    blob.unlink()
    blob.symlink_to(outside / "secret")
    # dangling link in the chosen snapshot; missing snapshots; refs/main a directory
    d = make_hf_hub_repo(hub, "org/dangling", files={"w.bin": 100})
    (d.path / "blobs" / d.files["w.bin"]).unlink()
    (hub / "models--org--empty/refs").mkdir(parents=True)
    f = make_hf_hub_repo(hub, "org/refdir", files={"w.bin": 100}, ref=None)
    (f.path / "refs/main").mkdir(parents=True)

    m = scan(cold, "huggingface").models

    e = m["org/escape"]
    snap_rel = f"hub/models--org--escape/snapshots/{r.revision}"
    assert e.problems == (
        f"{snap_rel}/abs.json: absolute symlink to '{outside / 'secret'}'; expected a relative one",
        f"{snap_rel}/evil.json: symlink to '../../../../../outside/secret' is not a link to a "
        "blob of hub/models--org--escape (expected '../../blobs/<name>'); not followed",
    )
    assert rels(e, FileRole.LINK) == [f"{snap_rel}/config.json", f"{snap_rel}/w.bin"]
    blob_rel = f"hub/models--org--blob-out/blobs/{b.files['w.bin']}"
    assert problems(m["org/blob-out"]) == (
        f"hub/models--org--blob-out/snapshots/{b.revision}/w.bin -> {blob_rel}: "
        f"symlink to '{outside / 'secret'}' leads outside cold storage; not followed"
    )
    assert m["org/blob-out"].data_files == ()
    dangling_blob = f"hub/models--org--dangling/blobs/{d.files['w.bin']}"
    assert problems(m["org/dangling"]) == (
        f"hub/models--org--dangling/snapshots/{d.revision}/w.bin -> {dangling_blob}: is missing"
    )
    assert problems(m["org/empty"]) == "hub/models--org--empty: has no snapshot to serve"
    assert "hub/models--org--refdir/refs/main: is a directory, expected a regular file" in problems(
        m["org/refdir"]
    )
    assert m["org/refdir"].data_files[0].size == 100  # the only snapshot still chosen


# --------------------------------------------------------------------------- cold storage untouched


def _mixed_damaged_tree(cold: Path, outside: Path) -> None:
    make_ollama_model(cold, "llama3:8b", layers=[64 * KiB, 100])
    m = make_ollama_model(cold, "broken:1", layers=[KiB])
    (cold / m.layers[0].rel).unlink()
    os.mkfifo(cold / "manifests/registry.ollama.ai/library/llama3/fifo")
    make_gguf(cold / "gguf/a.gguf")
    make_split_gguf(cold / "gguf", "s", parts=2)
    (cold / "gguf/out.gguf").symlink_to(outside / "secret")
    make_safetensors_dir(cold / "hf", "org/name")
    make_hf_hub_repo(cold / "hub", "org/hub")
    os.mkfifo(cold / "hf/org/name/pipe.bin")


def test_scan_leaves_cold_storage_untouched(cold: Path, outside: Path) -> None:
    _mixed_damaged_tree(cold, outside)
    before = tree_fingerprint(cold)
    before_out = tree_fingerprint(outside)

    for backend in BACKENDS:
        result = scan(cold, backend)
        assert result.models, backend

    assert tree_fingerprint(cold) == before
    assert tree_fingerprint(outside) == before_out
    # and the fingerprint does see a change of a single timestamp
    os.utime(cold / "gguf/a.gguf", ns=(1, 1))
    assert tree_fingerprint(cold) != before


def test_scan_does_not_move_access_times(cold: Path) -> None:
    model = make_ollama_model(cold, "m:1", layers=[KiB])
    repo = make_hf_hub_repo(cold / "hub", "org/x", files={"a.bin": 10})
    read_by_scan = [cold / model.manifest_rel, repo.path / "refs/main"]
    control = cold / "control"
    control.write_bytes(b"x")
    for p in [*read_by_scan, control]:
        mtime = p.stat().st_mtime_ns
        os.utime(p, ns=(mtime - 3600 * 10**9, mtime))  # atime older than mtime: relatime updates
    old_atime = control.stat().st_atime_ns
    control.read_bytes()
    if control.stat().st_atime_ns == old_atime:
        pytest.skip(f"LOUD: reads do not update atime on {cold} (noatime?); nothing to check")

    before = [p.stat().st_atime_ns for p in read_by_scan]
    assert scan(cold, "ollama").models["m:1"].ok
    assert scan(cold, "vllm").models["org/x"].ok

    assert [p.stat().st_atime_ns for p in read_by_scan] == before


def test_bench_scan_finds_a_whole_library() -> None:
    from bench.scan import bench_scan

    figures = bench_scan(n=300, runs=1)

    assert figures["ollama_models"] == 300 and figures["ollama_broken"] == 0
    assert figures["ollama_blobs"] == 300 * 2 + 50 + 10 + 200  # weights+configs, shared ones
    assert figures["gguf_files"] == 300 and figures["gguf_broken"] == 0
    assert figures["gguf_models"] == figures["gguf_models_made"] == 250
    assert figures["ollama_scan_s"] > 0 and figures["gguf_scan_s"] > 0
