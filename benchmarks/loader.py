#!/usr/bin/env python
"""Loader throughput: rows/s of `BatchLoader` over a train split, for 1 and 2 loader instances (simulated ranks,
each a separate process so they compete for the CPU like real ranks), side by side with the loader of an earlier
commit (`--baseline`, default the last one before the torchdata.nodes pipeline), each with and without background
loading (baseline: its prefetch thread; current: `workers=1`, the Prefetcher's thread), runs interleaved. Each launch
iterates `--epochs` epochs: the first epoch (one-time costs) and the median of the later ones are reported apart.

    python benchmarks/loader.py [--specs movielens amazon_sr] [--batch-size 4096] [--repeat 3]
    python benchmarks/loader.py --quick     # movielens only, one repeat (smoke test, under a minute)

The current loader keeps the mapped rows of a train split that fits its store (`recsys.data.loader.STORE_BYTES`:
MovieLens and amazon-sr do) and gathers its later epochs from them: there the later-epoch columns measure that
gather (plus, on 2 instances, mapping the rows an instance had not read before), and the first-epoch column is where
both loaders read and map every row (the current one in file order, storing them, then gathering its batches).

Writes benchmarks/results/loader.json and prints a markdown table. Prepares the specs first if needed (not timed).
Loader construction (schema check, cached validity index) is timed separately from iteration.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED = Path(os.environ.get("RECSYS_SHARED_DATA", REPO.parent / "shared" / "data"))


def _spec(name: str):
    from recsys.spec.loader import load_spec

    sets = [f"data.raw_dir={SHARED / 'bench' / 'amazon-sr'}"] if name == "amazon_sr" else []
    return load_spec(REPO / "feature_specs" / f"{name}.yaml", sets)


BASELINE = "85c6487"  # the loader before the torchdata.nodes pipeline


def _baseline_module(rev: str):
    """recsys/data/loader.py as of `rev`, imported under another name (it uses the same recsys.data helpers)."""
    import importlib.util
    import subprocess
    import tempfile

    src = subprocess.run(["git", "show", f"{rev}:recsys/data/loader.py"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / f"loader_{rev}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"loader_{rev}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if hasattr(mod, "assemble"):  # written against older helpers: assemble(spec, keys, arrays) and FeatureMapper.keys
        from recsys.data.features import kjt_keys
        from recsys.data.mapping import FeatureMapper, assemble

        class _Mapper(FeatureMapper):
            @property
            def keys(self):  # the key order those batches were assembled in: the spec's
                return kjt_keys(self.spec)

        mod.FeatureMapper = _Mapper
        mod.assemble = lambda spec, keys, arrays, owner=None: assemble(spec, arrays, owner)
    return mod


def _run(name: str, batch_size: int, rank: int, world: int, impl: str, background: bool, epochs: int, q) -> None:
    from recsys.train.dist import set_cpu_threads

    set_cpu_threads(world, announce=False)  # each simulated rank sizes its torch threads like a real rank
    spec = _spec(name)
    if impl == "current":
        from recsys.data.loader import BatchLoader

        make = lambda: BatchLoader(spec, "train", batch_size // world, rank=rank, world_size=world, seed=0,  # noqa
                                   prefetch=background, workers=1 if background else 0)
    else:
        BatchLoader = _baseline_module(impl).BatchLoader  # noqa: N806
        if spec.train.shuffle_buffer_row_groups is None:  # the baseline needs a count: the current default's
            # single window over the file (main() checks that it is one), so both loaders shuffle alike
            spec = spec.model_copy(update={"train": spec.train.model_copy(
                update={"shuffle_buffer_row_groups": 1 << 30})})
        make = lambda: BatchLoader(spec, "train", batch_size // world, rank=rank, world_size=world, seed=0,  # noqa
                                   prefetch=background)
    t0 = time.perf_counter()
    loader = make()
    init_s = time.perf_counter() - t0
    rows, iter_s = [], []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        t1, n = time.perf_counter(), 0
        for b in loader:
            n += b.size
        iter_s.append(time.perf_counter() - t1)
        rows.append(n)
    q.put({"rank": rank, "rows": rows, "init_s": init_s, "iter_s": iter_s})


def _check_one_window(name: str, batch_size: int) -> None:
    """The baseline is given one shuffle window over the file (see `_run`): true of the current default only when
    every rank's row groups fit the loader's cache; otherwise the two would not shuffle alike."""
    from recsys.data.loader import BatchLoader

    spec = _spec(name)
    if spec.train.shuffle_buffer_row_groups is not None:
        return
    for world in (1, 2):
        for rank in range(world):
            loader = BatchLoader(spec, "train", batch_size // world, rank=rank, world_size=world, seed=0)
            if len(loader._windows()) != 1:
                raise SystemExit(f"error: {name}: the current loader makes several shuffle windows here; "
                                 f"set train.shuffle_buffer_row_groups to compare")


def measure(name: str, batch_size: int, world: int, impl: str, background: bool, epochs: int) -> dict:
    """One launch of `world` loader processes, each iterating `epochs` epochs. The first epoch of a process pays
    one-time costs (first dictionary lookups, allocator growth) that a training pays once; the later epochs are
    what every further epoch costs. Both are reported: rows/s of epoch 1, and the median over epochs 2.."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_run, args=(name, batch_size, r, world, impl, background, epochs, q))
             for r in range(world)]
    for p in procs:
        p.start()
    res = []
    while len(res) < len(procs):
        try:
            res.append(q.get(timeout=2))
        except queue.Empty:  # a process that died would otherwise leave this waiting for ever
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                for p in procs:
                    p.terminate()
                raise SystemExit(f"error: {name}: a {impl} loader process exited with code {dead[0]}")
    for p in procs:
        p.join()
    total = [sum(r["rows"][e] for r in res) / max(r["iter_s"][e] for r in res) for e in range(epochs)]
    per = [min(r["rows"][e] / r["iter_s"][e] for r in res) for e in range(epochs)]
    later = slice(1, None) if epochs > 1 else slice(0, None)
    return {"spec": name, "instances": world, "impl": impl, "background": background, "batch_size": batch_size,
            "epochs": epochs, "rows": sum(r["rows"][0] for r in res),
            "first_epoch_rows_per_s_total": total[0],
            "rows_per_s_per_instance": float(np.median(per[later])),
            "rows_per_s_total": float(np.median(total[later])), "init_s": max(r["init_s"] for r in res)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", nargs="+", default=["movielens", "amazon_sr"])
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--baseline", default=BASELINE, help=f"git revision of the loader compared (default {BASELINE})")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved repeats; the median is reported")
    ap.add_argument("--epochs", type=int, default=5, help="epochs per launch: the first and the median of the rest")
    ap.add_argument("--quick", action="store_true", help="movielens, 1 repeat, 2 epochs")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "loader.json")
    args = ap.parse_args()
    if args.quick:
        args.specs, args.repeat, args.epochs = ["movielens"], 1, 2
        args.out = args.out.with_name(args.out.stem + "_quick.json")
    from recsys.data.prepare import prepare

    sys.path.insert(0, str(REPO / "benchmarks"))
    import common  # noqa: E402
    import torch

    results = []
    for name in args.specs:
        if name == "amazon_sr" and not (SHARED / "bench" / "amazon-sr").exists():
            print(f"skip amazon_sr: {SHARED / 'bench' / 'amazon-sr'} not found")
            continue
        prepare(_spec(name))
        _check_one_window(name, args.batch_size)
        measure(name, args.batch_size, 1, "current", False, 1)  # warm-up: validity index, page cache
        for world in (1, 2):
            for background in (False, True):
                runs = {impl: [] for impl in (args.baseline, "current")}
                for _ in range(args.repeat):  # interleaved, so load changes hit both alike
                    for impl in runs:
                        runs[impl].append(measure(name, args.batch_size, world, impl, background, args.epochs))
                for impl, rs in runs.items():
                    rs.sort(key=lambda r: r["rows_per_s_total"])
                    # the first epoch's median over the launches too (a launch's first epoch is one noisy figure)
                    firsts = [r["first_epoch_rows_per_s_total"] for r in rs]
                    med = dict(rs[len(rs) // 2], all_rows_per_s_total=[r["rows_per_s_total"] for r in rs],
                               first_epoch_rows_per_s_total=float(np.median(firsts)),
                               all_first_epoch_rows_per_s_total=firsts)
                    results.append(med)
    meta = dict(common.machine(), baseline=args.baseline, repeat=args.repeat, epochs=args.epochs,
                capability=torch.backends.cpu.get_cpu_capability())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = ["| spec | instances | loader | background | rows/s per instance | rows/s total | first epoch rows/s total "
             "| init s |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        impl = "torchdata.nodes (current)" if r["impl"] == "current" else f"before ({r['impl']})"
        lines.append(f"| {r['spec']} | {r['instances']} | {impl} | {r['background']} | "
                     f"{r['rows_per_s_per_instance']:,.0f} | {r['rows_per_s_total']:,.0f} | "
                     f"{r['first_epoch_rows_per_s_total']:,.0f} | {r['init_s']:.2f} |")
    lines.append(f"\n{meta['cpu_model']} ({meta['capability']}), {meta['nproc']} CPUs, commit {meta['commit']}, "
                 f"load {meta['load_avg_1min']:.1f}; batch {args.batch_size} global (each instance "
                 f"batch/instances); {args.epochs} epochs per launch: rows/s are the median over epochs "
                 f"2-{args.epochs} "
                 f"(each launch a fresh process), the first epoch apart; medians of {args.repeat} interleaved launches")
    table = "\n".join(lines)
    print(table)
    args.out.with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
