#!/usr/bin/env python
"""Loader throughput: rows/s of `BatchLoader` over a train split, for 1 and 2 loader instances (simulated ranks,
each a separate process so they compete for the CPU like real ranks), with and without the prefetch thread.

    python benchmarks/loader.py [--specs movielens amazon_sr] [--batch-size 4096]

Writes benchmarks/results/loader.json and prints a markdown table. Prepares the specs first if needed (not timed).
Loader construction (schema check, cached validity index) is timed separately from iteration.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED = Path(os.environ.get("RECSYS_SHARED_DATA", REPO.parent / "shared" / "data"))


def _spec(name: str):
    from recsys.spec.loader import load_spec

    sets = [f"data.raw_dir={SHARED / 'bench' / 'amazon-sr'}"] if name == "amazon_sr" else []
    return load_spec(REPO / "feature_specs" / f"{name}.yaml", sets)


def _run(name: str, batch_size: int, rank: int, world: int, prefetch: bool, q) -> None:
    from recsys.data.loader import BatchLoader

    spec = _spec(name)
    t0 = time.perf_counter()
    loader = BatchLoader(spec, "train", batch_size // world, rank=rank, world_size=world, seed=0, prefetch=prefetch)
    t1 = time.perf_counter()
    rows = 0
    for b in loader:
        rows += b.size
    t2 = time.perf_counter()
    q.put({"rank": rank, "rows": rows, "init_s": t1 - t0, "iter_s": t2 - t1})


def measure(name: str, batch_size: int, world: int, prefetch: bool) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_run, args=(name, batch_size, r, world, prefetch, q)) for r in range(world)]
    for p in procs:
        p.start()
    res = [q.get() for _ in procs]
    for p in procs:
        p.join()
    per = [r["rows"] / r["iter_s"] for r in res]
    return {"spec": name, "instances": world, "prefetch": prefetch, "batch_size": batch_size,
            "rows": sum(r["rows"] for r in res), "rows_per_s_per_instance": min(per),
            "rows_per_s_total": sum(r["rows"] for r in res) / max(r["iter_s"] for r in res),
            "init_s": max(r["init_s"] for r in res)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", nargs="+", default=["movielens", "amazon_sr"])
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "loader.json")
    args = ap.parse_args()
    from recsys.data.prepare import prepare

    results = []
    for name in args.specs:
        if name == "amazon_sr" and not (SHARED / "bench" / "amazon-sr").exists():
            print(f"skip amazon_sr: {SHARED / 'bench' / 'amazon-sr'} not found")
            continue
        prepare(_spec(name))
        measure(name, args.batch_size, 1, True)  # warm-up: builds the validity index, fills the page cache
        for world in (1, 2):
            for prefetch in (False, True):
                results.append(measure(name, args.batch_size, world, prefetch))
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"| spec | instances | prefetch | rows/s per instance | rows/s total | init s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['spec']} | {r['instances']} | {r['prefetch']} | {r['rows_per_s_per_instance']:,.0f} | "
              f"{r['rows_per_s_total']:,.0f} | {r['init_s']:.2f} |")
    print(f"\n{meta['cpus']} CPUs; batch {args.batch_size} global (each instance batch/instances); -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
