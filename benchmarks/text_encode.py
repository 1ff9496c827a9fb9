#!/usr/bin/env python
"""Text encoding throughput: sentence-transformers' `encode` and every recsys backend on the same texts, model,
batch size and max_length, timed in one interleaved run (so load on a shared machine hits all alike), plus the
vectors' cosine to the fp32 reference and the cached re-run of the spec-level pipeline.

    python benchmarks/text_encode.py                     # 1000 amazon-sr texts, 3 interleaved repeats (~5 min quiet)
    python benchmarks/text_encode.py --quick             # 64 texts, 1 repeat: a smoke test (~1 min)
    python benchmarks/text_encode.py --backends torch,onnx-int8 --batch-size 32

Texts: the first N item texts of amazon-sr (../shared/data/bench/amazon-sr/items.parquet, or $RECSYS_SHARED_DATA),
else MovieLens titles shipped in recsys/datasets. sentence-transformers is optional (`RECSYS_BENCH_EXTRAS=1
scripts/install.sh`); without it the ratios are against the torch backend. Writes benchmarks/results/
text_encode.{json,md,png} (`--quick`: text_encode_quick.*), each naming the machine, its int8-relevant CPU flags and
the commit.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from recsys.spec.config import Spec  # noqa: E402
from recsys.text.backends import BACKENDS  # noqa: E402
from recsys.text.model_source import extract_package_model, model_identity  # noqa: E402

REFERENCE = "torch"  # the fp32 numerics every cosine is measured against


def load_texts(n: int) -> Tuple[List[str], str]:
    import pyarrow.parquet as pq

    items = common.AMAZON_RAW / "items.parquet"
    if items.is_file():
        texts = [t for t in pq.read_table(items, columns=["text"]).column("text").to_pylist() if t][:n]
        return texts, f"amazon-sr items.parquet text (first {len(texts)})"
    import csv

    movies = common.REPO / "recsys" / "datasets" / "ml-latest-small" / "movies.csv"
    with open(movies, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:n]
    return [f"{r['title']}. {r['genres'].replace('|', ' ')}." for r in rows], f"MovieLens titles (first {len(rows)})"


def make_backend(backend: str, args) -> Callable[[List[str]], np.ndarray]:
    from recsys.text.encoder import TextEncoder

    enc = TextEncoder(args.model_dir, pooling="mean", max_length=args.max_length, batch_size=args.batch_size,
                      normalize=True, device=args.device, backend=backend, derived_root=args.derived_root,
                      identity=args.identity)
    return enc.encode


def make_sentence_transformers(args):
    try:
        import sentence_transformers
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None, None
    model = SentenceTransformer(str(args.model_dir), device=args.device, local_files_only=True)
    model.max_seq_length = args.max_length  # same truncation as ours

    def run(texts: List[str]) -> np.ndarray:
        return np.asarray(model.encode(texts, batch_size=args.batch_size, normalize_embeddings=True,
                                       convert_to_numpy=True, show_progress_bar=False), dtype=np.float32)

    return run, sentence_transformers.__version__


def interleaved(runners: Dict[str, Callable], texts: List[str], repeats: int) -> Dict[str, tuple]:
    """Time each runner `repeats` times, alternating between them; name -> (all seconds, last vectors)."""
    for run in runners.values():
        run(texts[:32])  # warm-up (allocator, kernels, lazy init)
    times: Dict[str, List[float]] = {name: [] for name in runners}
    vectors = {}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            vectors[name] = run(texts)
            times[name].append(time.perf_counter() - start)
    return {name: (times[name], vectors[name]) for name in runners}


def bench_cached_pipeline(texts: List[str], args) -> dict:
    """encode_text_tables cold (model load + encode + cache write) vs a fully cached re-run, and
    text_table_vectors."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recsys.text import encode_text_tables, text_table_vectors

    def timed(fn, repeats=1):
        best, out = float("inf"), None
        for _ in range(repeats):
            start = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - start)
        return best, out

    with tempfile.TemporaryDirectory(prefix="text_bench_") as tmp:
        tmp = Path(tmp)
        table_dir = tmp / "prepared" / "text_tables"
        table_dir.mkdir(parents=True)
        pq.write_table(pa.table({"row": pa.array(range(1, len(texts) + 1), pa.int64()),
                                 "key": [f"k{i}" for i in range(len(texts))], "text": texts}),
                       table_dir / "items.parquet")
        spec = Spec.model_validate({
            "name": "text_bench",
            "data": {"adapter": "parquet", "raw_dir": str(tmp), "prepared_dir": str(tmp / "prepared"),
                     "side_tables": [{"name": "items", "path": "items.parquet", "key": "item_id",
                                      "join_on": "item_id"}]},
            "domains": [{"name": "rec", "kind": "rec"}],
            "features": [{"kind": "id", "name": "item_id", "column": "item_id", "side": "item", "table": "item"},
                         {"kind": "text", "name": "item_text", "column": "item_id", "side": "item",
                          "text_table": "items"}],
            "tables": [{"name": "item", "dim": 8}],
            "text": {"mode": "llm", "cache_dir": str(tmp / "cache"),
                     "encoder": {"model": str(args.model_dir), "batch_size": args.batch_size,
                                 "max_length": args.max_length, "device": args.device,
                                 "backend": args.pipeline_backend},
                     "tables": [{"name": "items", "source": "items", "key": "item_id", "text": "text"}]},
        })
        cold, stats_cold = timed(lambda: encode_text_tables(spec, progress=False))
        warm, stats_warm = timed(lambda: encode_text_tables(spec, progress=False), repeats=3)
        assert stats_warm["items"]["new"] == 0 and stats_cold["items"]["new"] == len(set(texts))
        vec_s, vecs = timed(lambda: text_table_vectors(spec, "items"), repeats=3)
        assert vecs.shape[0] == len(texts) + 1
    return {"backend": args.pipeline_backend, "cold_run_s": cold, "cached_run_s": warm,
            "cached_speedup": cold / warm, "text_table_vectors_s": vec_s}


def int8_cpu_flags() -> List[str]:
    """The CPU flags int8 GEMM speed depends on (x86): AVX2 (vpmaddubsw), AVX512-BW, VNNI (one-instruction u8*s8
    dot products), AMX-INT8."""
    from recsys.hardware import cpu_flags

    wanted = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16", "amx_bf16")
    return [f for f in wanted if f in cpu_flags()]


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [r["name"] for r in rows]
    rates = [r["texts_per_s"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.8))
    colors = ["#888888" if r["name"].startswith("sentence") else "#1f77b4" for r in rows]
    ax.barh(names[::-1], rates[::-1], color=colors[::-1])
    for y, r in enumerate(rows[::-1]):
        cos = f", cos min {r['cosine_min']:.4f}" if r.get("cosine_min") is not None else ""
        ax.text(r["texts_per_s"], y, f" {r['texts_per_s']:.1f}/s ({r['ratio_vs_baseline']:.2f}x{cos})",
                va="center", fontsize=8)
    ax.set_xlabel("texts/s (higher is better)")
    ax.set_xlim(0, max(rates) * 1.6)
    m = result["machine"]
    ax.set_title(f"Text encoding, {result['texts']} texts, batch {result['batch_size']}, max_length "
                 f"{result['max_length']}\n{m['cpu']} ({m['capability']}; {'/'.join(m['int8_flags'])}), "
                 f"load {m['load_avg_1min']:.1f}, commit {m['commit'][:12]}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 texts, 1 repeat, torch + onnx-int8 only")
    parser.add_argument("--n", type=int, default=None, help="texts (default 1000; --quick 64)")
    parser.add_argument("--backends", default=None,
                        help=f"comma-separated, from {','.join(BACKENDS)} (default all; --quick torch,onnx-int8)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=None, help="interleaved timing rounds (default 3; --quick 1)")
    parser.add_argument("--model", default="package:all_minilm_l6_v2")
    parser.add_argument("--out", default=None, help="result .json (default benchmarks/results/text_encode[_quick].json)")
    args = parser.parse_args(argv)
    n = args.n or (64 if args.quick else 1000)
    repeats = args.repeats or (1 if args.quick else 3)
    backends = (args.backends or ("torch,onnx-int8" if args.quick else ",".join(BACKENDS))).split(",")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        parser.error(f"--backends: unknown {unknown} (use {', '.join(BACKENDS)})")
    if REFERENCE not in backends:
        backends.insert(0, REFERENCE)
    if args.device == "cuda":
        backends = [b for b in backends if b != "torch-int8"]  # CPU-only kernels
    from recsys.models.precision import bf16_native

    native, why = bf16_native(args.device)
    if "torch-bf16" in backends and not native:  # the encoder refuses it there (emulated bf16 is far slower)
        print(f"torch-bf16 skipped: {why}", file=sys.stderr)
        backends = [b for b in backends if b != "torch-bf16"]
    out = Path(args.out) if args.out else common.RESULTS / ("text_encode_quick.json" if args.quick else
                                                           "text_encode.json")
    import torch

    texts, source = load_texts(n)
    work = Path(tempfile.gettempdir()) / "recsys_bench_models"
    if args.model.startswith("package:"):
        args.model_dir = extract_package_model(args.model.split(":", 1)[1], work)
    else:
        args.model_dir = Path(args.model)
    args.identity = model_identity(args.model_dir)
    args.derived_root = work / "onnx"
    args.pipeline_backend = backends[-1]
    load_at_start = common.load_average()

    runners: Dict[str, Callable] = {}
    st_run, st_version = make_sentence_transformers(args)
    baseline = "sentence-transformers" if st_run is not None else REFERENCE
    if st_run is not None:
        runners["sentence-transformers"] = st_run
    else:
        print("sentence-transformers not installed (RECSYS_BENCH_EXTRAS=1 scripts/install.sh): ratios are against "
              "the torch backend", file=sys.stderr)
    for backend in backends:
        runners[backend] = make_backend(backend, args)
    timings = interleaved(runners, texts, repeats)

    reference = timings[REFERENCE][1]
    base_s = min(timings[baseline][0])
    rows = []
    for name, (times, vectors) in timings.items():
        best = min(times)
        cos = np.sum(vectors * reference, axis=1)
        rows.append({"name": name if name != "sentence-transformers" else f"sentence-transformers {st_version}",
                     "backend": name, "seconds": best, "all_seconds": times, "texts_per_s": len(texts) / best,
                     "ratio_vs_baseline": base_s / best, "cosine_min": float(cos.min()),
                     "cosine_mean": float(cos.mean())})
    info = common.machine()
    from recsys.hardware import cpu_info

    result = {
        "texts": len(texts), "source": source, "model": args.model, "model_identity": args.identity,
        "device": args.device, "batch_size": args.batch_size, "max_length": args.max_length, "repeats": repeats,
        "baseline": baseline, "reference": REFERENCE, "rows": rows,
        "machine": {"cpu": cpu_info().model, "capability": cpu_info().capability, "int8_flags": int8_cpu_flags(),
                    "cores": cpu_info().cores, "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "onnxruntime": _version("onnxruntime"), "commit": info["commit"], "date": info["date"],
                    "load_avg_1min": load_at_start, "load_avg_1min_end": common.load_average(),
                    "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None},
    }
    result["pipeline"] = bench_cached_pipeline(texts[: min(len(texts), 256)], args)
    common.write_json(out, result)
    plot(result, out.with_suffix(".png"))
    md = markdown(result)
    out.with_suffix(".md").write_text(md + "\n")
    print(md)
    return 0


def _version(package: str) -> str:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # not installed
        return "absent"


def markdown(result: dict) -> str:
    m = result["machine"]
    head = (f"# Text encoding: {result['texts']} texts ({result['source']}), {result['model']}, device "
            f"{result['device']}, batch {result['batch_size']}, max_length {result['max_length']}, best of "
            f"{result['repeats']} interleaved runs\n\n"
            f"Machine: {m['cpu']}, torch capability {m['capability']}, int8-relevant flags "
            f"{', '.join(m['int8_flags']) or 'none'}; {m['cores']} cores, {m['threads']} threads; torch {m['torch']}, "
            f"onnxruntime {m['onnxruntime']}; commit {m['commit']}; {m['date']}; 1-min load average "
            f"{m['load_avg_1min']:.1f} at start, {m['load_avg_1min_end']:.1f} at end (other jobs share the cores: "
            f"compare the ratios, not the absolute rates).\n")
    rows = [[r["name"], f"{r['seconds']:.2f}", f"{r['texts_per_s']:.1f}", f"{r['ratio_vs_baseline']:.2f}x",
             f"{r['cosine_min']:.5f}", f"{r['cosine_mean']:.5f}"] for r in result["rows"]]
    table = common.markdown_table(["encoder", "seconds", "texts/s", f"vs {result['baseline']}",
                                   f"cosine to {result['reference']} fp32, min", "mean"], rows)
    p = result["pipeline"]
    tail = (f"\nSpec-level pipeline ({p['backend']}, first 256 texts): cold run (load + encode + cache write) "
            f"{p['cold_run_s']:.2f} s, cached re-run {p['cached_run_s']:.3f} s ({p['cached_speedup']:.0f}x), "
            f"text_table_vectors {p['text_table_vectors_s']:.3f} s.")
    return head + "\n" + table + "\n" + tail


if __name__ == "__main__":
    sys.exit(main())
