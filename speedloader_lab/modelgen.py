"""Builders of REAL model files for tests and benchmarks, in every layout the catalog knows.

Plain functions, no pytest: import them (``from speedloader_lab.modelgen import make_gguf``;
the tests, the demo and the benchmarks run with the repository root on the module path).
Each writes into the directory it is given and returns a small frozen record of what it
made. Content is pseudo-random but deterministic (seeded by the model name and file), so two
calls with the same arguments make identical bytes, and different models never share content
by accident; share on purpose by passing a
:class:`Blob` back in.

Sizes are bytes and may range from a few KiB to hundreds of MiB (content is made with
numpy's generator, about 1 GB/s; it is held in memory while written).

- :func:`make_ollama_model` an Ollama models dir entry (manifest + blobs named by sha256)
- :func:`make_gguf`, :func:`make_split_gguf` GGUF files ``gguf.GGUFReader`` opens
- :func:`make_llama_gguf` a tiny llama-architecture GGUF that llama.cpp's llama-server runs
- :func:`make_safetensors_dir` a transformers/vLLM model directory
- :func:`make_hf_hub_repo` a hub cache repo (``models--org--name``)
- :func:`tree_fingerprint` everything about a tree, to assert it did not change
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import safetensors.numpy

__all__ = [
    "KiB",
    "MiB",
    "OLLAMA_LAYER_TYPES",
    "Blob",
    "GGUFFile",
    "HubRepo",
    "ModelDir",
    "OllamaModel",
    "git_blob_sha1",
    "make_gguf",
    "make_hf_hub_repo",
    "make_llama_gguf",
    "make_ollama_model",
    "make_safetensors_dir",
    "make_split_gguf",
    "parse_ollama_name",
    "random_bytes",
    "tree_fingerprint",
    "write_ollama_blob",
]

KiB = 1 << 10
MiB = 1 << 20


def random_bytes(size: int, seed: str) -> bytes:
    """``size`` deterministic pseudo-random bytes for ``seed``."""
    key = int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "little")
    return np.random.default_rng(key).bytes(size)


def _content(data: bytes | int, seed: str) -> bytes:
    return data if isinstance(data, bytes) else random_bytes(data, seed)


def _write(path: Path, data: bytes, *, content_addressed: bool = False) -> None:
    """Write ``path`` whole (temp + rename). A content-addressed file that exists is kept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if content_addressed and path.exists():
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.rename(path)


# --------------------------------------------------------------------------- Ollama

OLLAMA_MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
OLLAMA_CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
OLLAMA_LAYER_TYPES = (
    "application/vnd.ollama.image.model",
    "application/vnd.ollama.image.template",
    "application/vnd.ollama.image.license",
    "application/vnd.ollama.image.params",
    "application/vnd.ollama.image.system",
)


@dataclass(frozen=True)
class Blob:
    """An Ollama blob: pass it in another model's ``layers`` (or ``config``) to share it."""

    digest: str
    size: int
    media_type: str

    @property
    def rel(self) -> str:
        return "blobs/sha256-" + self.digest.removeprefix("sha256:")

    def descriptor(self) -> dict:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class OllamaModel:
    name: str
    manifest_rel: str
    manifest_size: int
    config: Blob
    layers: tuple[Blob, ...]

    @property
    def blobs(self) -> tuple[Blob, ...]:
        """Config then layers, each blob once."""
        seen: dict[str, Blob] = {}
        for b in (self.config, *self.layers):
            seen.setdefault(b.digest, b)
        return tuple(seen.values())

    @property
    def size(self) -> int:
        return sum(b.size for b in self.blobs)


def parse_ollama_name(name: str) -> tuple[str, str, str, str]:
    """``"llama3:8b"`` -> ``("registry.ollama.ai", "library", "llama3", "8b")``."""
    path, _, tag = name.rpartition(":") if ":" in name.rsplit("/", 1)[-1] else (name, "", "")
    parts = path.split("/")
    if len(parts) == 1:
        parts = ["registry.ollama.ai", "library", *parts]
    elif len(parts) == 2:
        parts = ["registry.ollama.ai", *parts]
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"{name!r} is not an Ollama model name")
    return parts[0], parts[1], parts[2], tag or "latest"


def write_ollama_blob(root: Path | str, data: bytes, media_type: str) -> Blob:
    """Write ``data`` as ``blobs/sha256-<its sha256>`` (once) and describe it."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blob = Blob(digest, len(data), media_type)
    _write(Path(root) / blob.rel, data, content_addressed=True)
    return blob


def make_ollama_model(
    root: Path | str,
    name: str = "llama3:8b",
    layers: list[bytes | int | Blob] | tuple[bytes | int | Blob, ...] = (64 * KiB, 300),
    *,
    config: bytes | Blob | None = None,
    media_types: tuple[str, ...] = OLLAMA_LAYER_TYPES,
) -> OllamaModel:
    """Write a model into the Ollama models dir ``root``: blobs and a correct manifest.

    ``layers`` items are content (bytes), a size (int: random content of that many bytes,
    unique to this model and position) or a :class:`Blob` from an earlier call (shared).
    Layer ``i`` gets ``media_types[i]`` (model, template, license, params, system).
    ``config`` defaults to a small JSON config unique to this model.
    """
    root = Path(root)
    host, ns, model, tag = parse_ollama_name(name)
    made: list[Blob] = []
    for i, layer in enumerate(layers):
        if isinstance(layer, Blob):
            made.append(layer)
            continue
        media = media_types[min(i, len(media_types) - 1)]
        made.append(write_ollama_blob(root, _content(layer, f"ollama:{name}:{i}"), media))
    if isinstance(config, Blob):
        config_blob = config
    else:
        if config is None:
            config = json.dumps(
                {
                    "model_format": "gguf",
                    "model_family": model,
                    "model_type": tag,
                    "rootfs": {"type": "layers", "diff_ids": [b.digest for b in made]},
                }
            ).encode()
        config_blob = write_ollama_blob(root, config, OLLAMA_CONFIG_TYPE)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OLLAMA_MANIFEST_TYPE,
        "config": config_blob.descriptor(),
        "layers": [b.descriptor() for b in made],
    }
    data = json.dumps(manifest, separators=(",", ":")).encode()
    manifest_rel = f"manifests/{host}/{ns}/{model}/{tag}"
    _write(root / manifest_rel, data)
    return OllamaModel(name, manifest_rel, len(data), config_blob, tuple(made))


# --------------------------------------------------------------------------- GGUF


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    size: int
    tensor_names: tuple[str, ...]


def _int8_tensor(nbytes: int, seed: str) -> np.ndarray:
    return np.frombuffer(random_bytes(nbytes, seed), dtype=np.int8)


def _write_gguf(
    path: Path, arch: str, kv: dict[str, int | float | str], tensors: dict[str, np.ndarray]
) -> GGUFFile:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, arch)
    for key, value in kv.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, tuple):  # (value, GGUFValueType) for exact types
            writer.add_key_value(key, value[0], value[1])
        else:
            writer.add_uint32(key, value)
    for tname, array in tensors.items():
        writer.add_tensor(tname, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGUFFile(path, path.stat().st_size, tuple(tensors))


def make_gguf(
    path: Path | str,
    n_tensors: int = 2,
    tensor_bytes: int = 4 * KiB,
    *,
    arch: str = "llama",
    name: str | None = None,
    kv: dict | None = None,
) -> GGUFFile:
    """Write a valid GGUF file with ``n_tensors`` int8 tensors of ``tensor_bytes`` each.

    ``kv`` adds metadata (str, float, int as uint32, or ``(value, gguf.GGUFValueType)``).
    """
    path = Path(path)
    name = name or path.stem
    tensors = {
        f"blk.{i}.weight": _int8_tensor(tensor_bytes, f"gguf:{path}:{i}") for i in range(n_tensors)
    }
    return _write_gguf(path, arch, {"general.name": name, **(kv or {})}, tensors)


def make_split_gguf(
    directory: Path | str,
    name: str,
    parts: int = 3,
    *,
    tensors_per_part: int = 1,
    tensor_bytes: int = 4 * KiB,
    arch: str = "llama",
) -> list[GGUFFile]:
    """Write ``name-0000k-of-0000n.gguf`` for k = 1..parts, as llama.cpp's gguf-split does.

    Every part is a valid GGUF file carrying ``split.no`` (0-based, uint16), ``split.count``
    (uint16) and ``split.tensors.count`` (int32); the first part also carries the model's
    general metadata. Returns the parts in order.
    """
    directory = Path(directory)
    total = parts * tensors_per_part
    made = []
    t = 0
    for k in range(parts):
        kv: dict = {
            gguf.Keys.Split.LLM_KV_SPLIT_NO: (k, gguf.GGUFValueType.UINT16),
            gguf.Keys.Split.LLM_KV_SPLIT_COUNT: (parts, gguf.GGUFValueType.UINT16),
            gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT: (total, gguf.GGUFValueType.INT32),
        }
        if k == 0:
            kv = {"general.name": name, **kv}
        tensors = {}
        for _ in range(tensors_per_part):
            tensors[f"blk.{t}.weight"] = _int8_tensor(tensor_bytes, f"gguf-split:{name}:{t}")
            t += 1
        path = directory / f"{name}-{k + 1:05d}-of-{parts:05d}.gguf"
        made.append(_write_gguf(path, arch, kv, tensors))
    return made


# --------------------------------------------------------------------------- llama.cpp runs it

# SentencePiece's word-start marker (U+2581): llama.cpp's SPM tokenizer ("llama") turns spaces
# into it and prefixes the text with one.
SPM_SPACE = "\u2581"
_WORDS = ("hello", "world", "the", "speed", "loader", "model", "pool", "ram", "cold", "hot")


def _spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """A small SentencePiece-style vocabulary: control tokens, the 256 byte-fallback tokens,
    single characters, and every prefix of a few words (the SPM tokenizer merges pairs of
    pieces whose join is a token, best score first, so a word is reachable only through its
    prefixes)."""
    T = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [T.BYTE] * 256
    chars = [SPM_SPACE, *"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-"]
    pieces: list[str] = list(chars)
    for word in _WORDS:
        for end in range(1, len(word) + 1):
            for piece in (word[:end], SPM_SPACE + word[:end]):
                if piece not in pieces:
                    pieces.append(piece)
    tokens += pieces
    types += [T.NORMAL] * len(pieces)
    # Scores: control and byte tokens 0; a longer piece scores higher, so it wins the merge.
    scores = [0.0] * (3 + 256) + [float(len(p)) for p in pieces]
    return tokens, scores, [int(t) for t in types]


def make_llama_gguf(
    path: Path | str,
    *,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx: int = 256,
    name: str | None = None,
) -> GGUFFile:
    """Write a llama-architecture GGUF that llama.cpp loads and generates from.

    Random F32 weights (seeded by the path: the same call makes the same bytes), a
    SentencePiece-style vocabulary of 403 tokens with byte fallback (so any text
    tokenizes), grouped-query attention (``n_head_kv`` < ``n_head``), no ``output.weight``
    (llama.cpp ties the output to ``token_embd``). The defaults make a 400 KiB file that
    llama-server loads in well under a second; larger dims make it as large as wanted
    (bytes ~ 4 * (n_vocab * n_embd + n_layer * (2 * n_embd**2 + 2 * n_embd * kv + 3 * n_embd
    * n_ff)), kv = n_embd * n_head_kv / n_head).
    """
    path = Path(path)
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must divide by n_head, and n_head by n_head_kv")
    tokens, scores, types = _spm_vocab()
    n_kv = n_embd // n_head * n_head_kv
    key = int.from_bytes(hashlib.sha256(f"llama:{path}".encode()).digest()[:8], "little")
    rng = np.random.default_rng(key)

    def weight(*shape: int) -> np.ndarray:
        # numpy's (rows, cols) is (out, in): GGUFWriter reverses it into ggml's ne order.
        return (rng.standard_normal(shape, dtype=np.float32) * 0.1).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    tensors: dict[str, np.ndarray] = {"token_embd.weight": weight(len(tokens), n_embd)}
    for i in range(n_layer):
        tensors |= {
            f"blk.{i}.attn_norm.weight": ones(n_embd),
            f"blk.{i}.attn_q.weight": weight(n_embd, n_embd),
            f"blk.{i}.attn_k.weight": weight(n_kv, n_embd),
            f"blk.{i}.attn_v.weight": weight(n_kv, n_embd),
            f"blk.{i}.attn_output.weight": weight(n_embd, n_embd),
            f"blk.{i}.ffn_norm.weight": ones(n_embd),
            f"blk.{i}.ffn_gate.weight": weight(n_ff, n_embd),
            f"blk.{i}.ffn_up.weight": weight(n_ff, n_embd),
            f"blk.{i}.ffn_down.weight": weight(n_embd, n_ff),
        }
    tensors["output_norm.weight"] = ones(n_embd)

    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(name or path.stem)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(len(tokens))
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    for tname, array in tensors.items():
        w.add_tensor(tname, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return GGUFFile(path, path.stat().st_size, tuple(tensors))


# --------------------------------------------------------------------------- safetensors

_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "torch_dtype": "uint8",
}
_TOKENIZER: dict[str, object] = {
    "version": "1.0",
    "truncation": None,
    "padding": None,
    "added_tokens": [],
    "normalizer": None,
    "pre_tokenizer": {"type": "Whitespace"},
    "post_processor": None,
    "decoder": None,
    "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 1}, "unk_token": "[UNK]"},
}


@dataclass(frozen=True)
class ModelDir:
    name: str
    path: Path
    files: dict[str, int] = field(default_factory=dict)
    """rel (to the root given) -> size, for every file made."""
    shards: tuple[str, ...] = ()
    """rels of the weight shards, in order."""

    @property
    def size(self) -> int:
        return sum(self.files.values())


def safetensors_shards(
    name: str, shards: int, shard_bytes: int, tensors_per_shard: int
) -> tuple[dict[str, bytes], dict]:
    """Shard file name -> safetensors bytes, and the ``model.safetensors.index.json`` doc.

    One shard is ``model.safetensors`` (and the index is still returned, unused by HF);
    more are ``model-0000k-of-0000n.safetensors``.
    """
    out: dict[str, bytes] = {}
    weight_map: dict[str, str] = {}
    total = 0
    per_tensor = max(1, shard_bytes // tensors_per_shard)
    t = 0
    for k in range(shards):
        fname = (
            "model.safetensors" if shards == 1 else f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        )
        tensors = {}
        for _ in range(tensors_per_shard):
            tname = f"model.layers.{t}.weight"
            tensors[tname] = np.frombuffer(random_bytes(per_tensor, f"st:{name}:{t}"), np.uint8)
            weight_map[tname] = fname
            total += per_tensor
            t += 1
        out[fname] = safetensors.numpy.save(tensors, metadata={"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    return out, index


def make_safetensors_dir(
    root: Path | str,
    name: str = "org/name",
    shards: int = 2,
    *,
    shard_bytes: int = 16 * KiB,
    tensors_per_shard: int = 2,
) -> ModelDir:
    """Write a transformers-style model directory ``root/name``.

    config.json, tokenizer.json, the weight shards (``model-0000k-of-0000n.safetensors``,
    or ``model.safetensors`` when ``shards == 1``) and, when sharded,
    ``model.safetensors.index.json`` mapping each tensor to its shard.
    """
    root = Path(root)
    model_dir = root / name
    weights, index = safetensors_shards(name, shards, shard_bytes, tensors_per_shard)
    contents: dict[str, bytes] = {
        "config.json": json.dumps(_CONFIG, indent=2).encode(),
        "tokenizer.json": json.dumps(_TOKENIZER).encode(),
        **weights,
    }
    if shards > 1:
        contents["model.safetensors.index.json"] = json.dumps(index, indent=2).encode()
    files = {}
    for fname, data in contents.items():
        _write(model_dir / fname, data)
        files[f"{name}/{fname}"] = len(data)
    return ModelDir(
        name, model_dir, dict(sorted(files.items())), tuple(f"{name}/{w}" for w in weights)
    )


# --------------------------------------------------------------------------- HF hub cache

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")


def git_blob_sha1(data: bytes) -> str:
    """The git object name of a file: what the hub names a non-LFS blob."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class HubRepo:
    name: str
    path: Path
    """The ``models--org--name`` directory."""
    revision: str
    files: dict[str, str]
    """Path inside the snapshot -> blob name (sha256 for LFS files, git sha1 otherwise)."""
    sizes: dict[str, int]
    """Blob name -> size."""

    def snapshot(self, rev: str | None = None) -> Path:
        return self.path / "snapshots" / (rev or self.revision)

    @property
    def size(self) -> int:
        return sum(self.sizes[b] for b in set(self.files.values()))


def make_hf_hub_repo(
    root: Path | str,
    name: str = "org/name",
    files: dict[str, bytes | int] | None = None,
    *,
    revision: str | None = None,
    ref: str | None = "main",
    shards: int = 1,
    shard_bytes: int = 16 * KiB,
) -> HubRepo:
    """Write one revision of a hub cache repo: ``root/models--org--name/{blobs,snapshots,refs}``.

    ``root`` is the hub cache dir (what ``HF_HUB_CACHE`` points at). ``files`` maps paths
    inside the snapshot to content or a size; by default a real model (config.json,
    tokenizer.json, ``shards`` safetensors shards and their index when sharded). Weight
    files (LFS-tracked on the hub) become blobs named by their sha256, others by their git
    sha1; each snapshot entry is a relative symlink ``../../blobs/<name>``. ``revision``
    defaults to a 40-hex value derived from the content; ``ref`` (None for none) is written
    with it, as the hub client does. Call again with other files to add a revision.
    """
    repo = Path(root) / ("models--" + name.replace("/", "--"))
    if files is None:
        weights, index = safetensors_shards(name, shards, shard_bytes, 2)
        contents = {
            "config.json": json.dumps(_CONFIG, indent=2).encode(),
            "tokenizer.json": json.dumps(_TOKENIZER).encode(),
            **weights,
        }
        if shards > 1:
            contents["model.safetensors.index.json"] = json.dumps(index).encode()
    else:
        contents = {p: _content(d, f"hub:{name}:{p}") for p, d in files.items()}
    blob_of: dict[str, str] = {}
    sizes: dict[str, int] = {}
    for path, data in contents.items():
        lfs = path.endswith(LFS_SUFFIXES)
        blob = hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data)
        _write(repo / "blobs" / blob, data, content_addressed=True)
        blob_of[path] = blob
        sizes[blob] = len(data)
    if revision is None:
        revision = hashlib.sha1(json.dumps(sorted(blob_of.items())).encode()).hexdigest()
    snapshot = repo / "snapshots" / revision
    for path, blob in blob_of.items():
        link = snapshot / path
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            link.unlink()
        link.symlink_to("../" * (2 + path.count("/")) + f"blobs/{blob}")
    if ref is not None:
        ref_path = repo / "refs" / ref
        ref_path.parent.mkdir(parents=True, exist_ok=True)
        ref_path.write_text(revision)  # the hub client writes no newline
    return HubRepo(name, repo, revision, blob_of, sizes)


# --------------------------------------------------------------------------- fingerprint

_KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "chardev",
    stat.S_IFBLK: "blockdev",
}


def _sha256_noatime(path: str) -> str:
    flags = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NOATIME", 0)
    try:
        fd = os.open(path, flags)
    except PermissionError:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    h = hashlib.sha256()
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def tree_fingerprint(root: Path | str) -> dict[str, dict]:
    """Everything about a tree a read-only user must not change, by rel path ('' = root).

    For every entry (hidden ones too; lstat, links never followed): type, mode, uid, gid,
    size, nlink, mtime_ns, ctime_ns; for files the sha256 of the content (read with
    O_NOATIME, so taking a fingerprint does not move atimes); for symlinks the target.
    FIFOs and devices are never opened.
    """
    root = os.fspath(root)
    out: dict[str, dict] = {}

    def visit(path: str, rel: str) -> None:
        st = os.lstat(path)
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "other")
        rec: dict = {
            "type": kind,
            "mode": stat.S_IMODE(st.st_mode),
            "uid": st.st_uid,
            "gid": st.st_gid,
            "size": st.st_size,
            "nlink": st.st_nlink,
            "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns,
        }
        if kind == "file":
            rec["sha256"] = _sha256_noatime(path)
        elif kind == "symlink":
            rec["target"] = os.readlink(path)
        out[rel] = rec
        if kind == "dir":
            for name in sorted(os.listdir(path)):
                visit(os.path.join(path, name), f"{rel}/{name}" if rel else name)

    visit(root, "")
    return out
