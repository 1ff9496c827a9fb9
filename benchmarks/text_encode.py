#!/usr/bin/env python
"""Text encoding throughput: our TextEncoder vs sentence-transformers on the same texts and model, plus the
cached re-run of the spec-level pipeline (goal: >= 100x faster than encoding).

    python benchmarks/text_encode.py [--n 1000] [--device cpu] [--batch-size 128] [--max-length 64]

Texts: the first N item texts of amazon-sr (../shared/data/bench/amazon-sr/items.parquet, or $RECSYS_SHARED_DATA),
else MovieLens titles shipped in recsys/datasets. sentence-transformers is optional (skipped when absent).
Writes benchmarks/results/text_encode.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from recsys.spec.config import Spec  # noqa: E402
from recsys.text.model_source import extract_package_model, model_identity  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def shared_data() -> Path:
    return Path(os.environ.get("RECSYS_SHARED_DATA", ROOT.parent / "shared" / "data"))


def load_texts(n: int) -> Tuple[List[str], str]:
    import pyarrow.parquet as pq

    items = shared_data() / "bench" / "amazon-sr" / "items.parquet"
    if items.is_file():
        texts = [t for t in pq.read_table(items, columns=["text"]).column("text").to_pylist() if t][:n]
        return texts, f"amazon-sr items.parquet text (first {len(texts)})"
    import csv

    movies = ROOT / "recsys" / "datasets" / "ml-latest-small" / "movies.csv"
    with open(movies, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:n]
    return [f"{r['title']}. {r['genres'].replace('|', ' ')}." for r in rows], f"MovieLens titles (first {len(rows)})"


def timed(fn, repeats: int = 1):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def make_ours(folder: Path, args):
    from recsys.text.encoder import TextEncoder

    enc = TextEncoder(folder, pooling="mean", max_length=args.max_length, batch_size=args.batch_size,
                      normalize=True, device=args.device)
    return lambda sub: enc.encode(sub)


def make_sentence_transformers(folder: Path, args):
    try:
        import sentence_transformers
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None, None
    model = SentenceTransformer(str(folder), device=args.device, local_files_only=True)
    model.max_seq_length = args.max_length  # same truncation as ours
    return (lambda sub: np.asarray(model.encode(sub, batch_size=args.batch_size, normalize_embeddings=True,
                                                convert_to_numpy=True, show_progress_bar=False), dtype=np.float32),
            sentence_transformers.__version__)


def interleaved(runners: dict, texts: List[str], repeats: int) -> dict:
    """Time each runner `repeats` times, alternating between them so load drift on a shared machine hits all
    of them alike; returns name -> (all seconds, last vectors)."""
    for run in runners.values():
        run(texts[:64])  # warm-up (allocator, kernels, lazy init)
    times = {name: [] for name in runners}
    vectors = {}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            vectors[name] = run(texts)
            times[name].append(time.perf_counter() - start)
    return {name: (times[name], vectors[name]) for name in runners}


def bench_cached_pipeline(texts: List[str], args) -> dict:
    """encode_text_tables cold (model load + encode) vs a second, fully cached run, and text_table_vectors."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recsys.text import encode_text_tables, text_table_vectors

    with tempfile.TemporaryDirectory(prefix="text_bench_") as tmp:
        tmp = Path(tmp)
        table_dir = tmp / "prepared" / "text_tables"
        table_dir.mkdir(parents=True)
        keys = [f"k{i}" for i in range(len(texts))]
        pq.write_table(pa.table({"row": pa.array(range(1, len(texts) + 1), pa.int64()), "key": keys,
                                 "text": texts}), table_dir / "items.parquet")
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
                                 "max_length": args.max_length, "device": args.device},
                     "tables": [{"name": "items", "source": "items", "key": "item_id", "text": "text"}]},
        })
        cold, stats_cold = timed(lambda: encode_text_tables(spec, progress=False))
        warm, stats_warm = timed(lambda: encode_text_tables(spec, progress=False), repeats=3)
        assert stats_warm["items"]["new"] == 0 and stats_cold["items"]["new"] == len(set(texts))
        vec_s, vecs = timed(lambda: text_table_vectors(spec, "items"), repeats=3)
        assert vecs.shape[0] == len(texts) + 1
    return {"cold_run_s": cold, "cached_run_s": warm, "cached_speedup": cold / warm,
            "text_table_vectors_s": vec_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="package:all_minilm_l6_v2")
    parser.add_argument("--out", default=str(RESULTS / "text_encode.json"))
    args = parser.parse_args()
    import torch

    texts, source = load_texts(args.n)
    load_at_start = os.getloadavg()[0]  # the numbers mean little when other jobs share the cores
    if args.model.startswith("package:"):
        models_root = Path(tempfile.gettempdir()) / "recsys_bench_models"
        args.model_dir = extract_package_model(args.model.split(":", 1)[1], models_root)
    else:
        args.model_dir = Path(args.model)

    runners = {"ours": make_ours(args.model_dir, args)}
    st_run, st_version = make_sentence_transformers(args.model_dir, args)
    if st_run is not None:
        runners["st"] = st_run
    else:
        print("sentence-transformers not installed: comparison skipped", file=sys.stderr)
    timings = interleaved(runners, texts, args.repeats)
    ours_times, ours_v = timings["ours"]
    ours_s = min(ours_times)
    result = {
        "texts": len(texts), "source": source, "model": args.model, "model_identity": model_identity(args.model_dir),
        "device": args.device, "batch_size": args.batch_size, "max_length": args.max_length,
        "repeats": args.repeats, "load_average_at_start": load_at_start,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or
        platform.machine(), "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "ours": {"seconds": ours_s, "all_seconds": ours_times, "texts_per_s": len(texts) / ours_s},
        "sentence_transformers": None,
    }
    if st_run is not None:
        st_times, st_v = timings["st"]
        st_s = min(st_times)
        cos = np.sum(ours_v * st_v, axis=1)
        result["sentence_transformers"] = {"version": st_version, "seconds": st_s, "all_seconds": st_times,
                                           "texts_per_s": len(texts) / st_s,
                                           "min_cosine_vs_ours": float(cos.min()),
                                           "max_abs_diff": float(np.abs(ours_v - st_v).max())}
        result["speed_ratio_ours_vs_st"] = st_s / ours_s
    result["pipeline"] = bench_cached_pipeline(texts, args)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    md = [f"# Text encoding ({result['texts']} texts: {source}; {args.model}; device {args.device}, "
          f"{result['threads']} threads, batch {args.batch_size}, max_length {args.max_length}; best of "
          f"{args.repeats} interleaved runs; 1-min load average {load_at_start:.1f} at start)", "",
          "| what | seconds | texts/s |", "|---|---:|---:|",
          f"| recsys TextEncoder | {ours_s:.2f} | {len(texts) / ours_s:.1f} |"]
    if result["sentence_transformers"]:
        s = result["sentence_transformers"]
        md.append(f"| sentence-transformers {s['version']} encode | {s['seconds']:.2f} | {s['texts_per_s']:.1f} |")
    p = result["pipeline"]
    md += [f"| encode_text_tables, cold (load + encode + cache write) | {p['cold_run_s']:.2f} | "
           f"{len(texts) / p['cold_run_s']:.1f} |",
           f"| encode_text_tables, cached re-run | {p['cached_run_s']:.3f} | {len(texts) / p['cached_run_s']:.0f} |",
           f"| text_table_vectors (assemble from cache) | {p['text_table_vectors_s']:.3f} | "
           f"{len(texts) / p['text_table_vectors_s']:.0f} |", "",
           f"Cached re-run speed-up: {p['cached_speedup']:.0f}x (goal 100x)."]
    if result["sentence_transformers"]:
        s = result["sentence_transformers"]
        md.append(f"Vectors vs sentence-transformers: min cosine {s['min_cosine_vs_ours']:.6f}, "
                  f"max abs diff {s['max_abs_diff']:.2e}.")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
