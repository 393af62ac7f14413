"""How long a catalog scan takes on a large cold store: n Ollama models and n GGUF files.

Content is tiny (the scan never reads blob or GGUF content; the count of files is what
costs), blobs are shared the way real Ollama libraries share them (templates, licenses and
params reused across many models), and each scan is timed best of 3 with a warm cache.

    python3 -m bench.scan [n]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from speedloader_lab.modelgen import OLLAMA_LAYER_TYPES, make_ollama_model, write_ollama_blob
from speedloaderd.catalog import scan

TEMPLATES = 50
LICENSES = 10
PARAMS = 200
SPLIT_EVERY = 10
"""One GGUF model in SPLIT_EVERY is split into 3 parts."""


def make_ollama_library(root: Path, n: int) -> int:
    """Write n models with ~3 layers each (weights unique, the rest shared); return blob count."""
    types = OLLAMA_LAYER_TYPES
    template = [write_ollama_blob(root, f"tmpl {i}".encode(), types[1]) for i in range(TEMPLATES)]
    license_ = [write_ollama_blob(root, f"lic {i}".encode(), types[2]) for i in range(LICENSES)]
    params = [write_ollama_blob(root, f"par {i}".encode(), types[3]) for i in range(PARAMS)]
    for i in range(n):
        if i % 20 == 0:
            name = f"host{i % 7}.example.com/team/m{i}:v{i % 3}"
        elif i % 5 == 0:
            name = f"user{i % 97}/model{i // 5}:q{i % 4}"
        else:
            name = f"model{i // 4}:tag{i % 4}"
        layers = [f"weights {i}".encode(), template[i % TEMPLATES], license_[i % LICENSES]]
        if i % 2:
            layers.append(params[i % PARAMS])
        make_ollama_model(root, name, layers)
    return sum(1 for _ in (root / "blobs").iterdir())


def make_gguf_tree(root: Path, n: int) -> int:
    """Write n .gguf files in 100 directories (some as split models); return model count."""
    models = 0
    i = 0
    while i < n:
        d = root / f"org{i % 100}"
        d.mkdir(parents=True, exist_ok=True)
        if models % SPLIT_EVERY == 0 and i + 3 <= n:
            for k in range(1, 4):
                (d / f"split{i}-{k:05d}-of-00003.gguf").write_bytes(b"GGUF")
            i += 3
        else:
            (d / f"model{i}-q4_k_m.gguf").write_bytes(b"GGUF")
            i += 1
        models += 1
    return models


def _best_of(runs: int, root: Path, backend: str) -> tuple[float, list[float], int, int]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        result = scan(root, backend)
        times.append(time.perf_counter() - t0)
    broken = sum(1 for m in result.models.values() if not m.ok) + len(result.problems)
    return min(times), times, len(result.models), broken


def bench_scan(n: int = 10000, runs: int = 3) -> dict:
    """Generate n Ollama models and n GGUF files in a temp dir and time ``scan`` on each."""
    out: dict = {"n": n}
    with tempfile.TemporaryDirectory(prefix="sl-bench-scan-") as tmp:
        ollama_root, gguf_root = Path(tmp, "ollama"), Path(tmp, "gguf")
        t0 = time.perf_counter()
        out["ollama_blobs"] = make_ollama_library(ollama_root, n)
        out["gguf_models_made"] = make_gguf_tree(gguf_root, n)
        out["generate_s"] = round(time.perf_counter() - t0, 2)
        best, times, count, broken = _best_of(runs, ollama_root, "ollama")
        out.update(
            ollama_models=count,
            ollama_broken=broken,
            ollama_scan_s=round(best, 3),
            ollama_runs_s=[round(t, 3) for t in times],
        )
        best, times, count, broken = _best_of(runs, gguf_root, "llamacpp")
        out.update(
            gguf_files=n,
            gguf_models=count,
            gguf_broken=broken,
            gguf_scan_s=round(best, 3),
            gguf_runs_s=[round(t, 3) for t in times],
        )
    return out


if __name__ == "__main__":
    print(json.dumps(bench_scan(int(sys.argv[1]) if len(sys.argv) > 1 else 10000), indent=2))
