#!/usr/bin/env python
"""FBGEMM's CPU row-wise Adagrad backward: the cost per updated row of its two code paths, side by side.

`split_embedding_backward_codegen_rowwise_adagrad_cpu` (fbgemm-gpu-cpu, the fused optimiser of every TorchRec table
trained here) takes one of two paths per table:

* a table read by ONE feature, fp32 weights and gradients: fbgemm's JIT-generated kernels (a gradient SpMDM, then
  a row-wise SparseAdaGrad), 64 rows per call;
* a table read by SEVERAL features (amazon-sr's item table: the candidate and the history), or fp16 weights: a
  plain compiled loop over the rows.

Both apply the same update. On the 2-core Xeon this was written on (AVX512, AMX) the JIT path costs ~400-510 ns
per updated row whatever the width (its generated row-wise kernel switches six times a row between legacy-SSE
scalar and VEX-encoded 256-bit instructions, ~105 ns a switch here: benchmarks/sse_avx_transition.c), against
~15-60 ns per entry on the loop: the user table's 4,096 rows a step take ~1.8 ms, a third of the peers'
configuration's embedding backward. Whether that holds on another CPU is what this measures: each table shape is
timed with one feature (JIT path) and with the same entries split over two features of the one table (loop path),
forward subtracted.

    python benchmarks/tbe_backward.py [--threads 2] [--repeat 20]

Prints a markdown table and writes benchmarks/results/tbe_backward.{json,md}.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402
from recsys.train.update_path import rowwise_adagrad_tbe  # noqa: E402

# (rows, dim, pooled entries per bag): amazon-sr's user table (one id a sample), its item history (20 a sample, mean
# pooled in the peers' configuration), a small table read several times a sample (categories)
SHAPES = [(58_985, 16, 1), (58_985, 32, 1), (19_965, 16, 20), (997, 16, 5)]
BATCH = 4096


def _ms(fn, repeat: int) -> float:
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat * 1e3


def measure(rows: int, dim: int, per_bag: int, repeat: int) -> dict:
    """The same BATCH x per_bag entries as one feature (BATCH bags) and as two features (BATCH/2 bags each)."""
    import torch

    g = torch.Generator().manual_seed(0)
    indices = torch.randint(0, rows, (BATCH * per_bag,), generator=g)
    offsets = torch.arange(0, BATCH * per_bag + 1, per_bag)
    out = {"rows": rows, "dim": dim, "entries": BATCH * per_bag,
           "distinct_rows": int(torch.unique(indices).numel())}
    for path, features in (("jit", 1), ("loop", 2)):
        tbe = rowwise_adagrad_tbe(rows, dim, features, learning_rate=0.05)
        grad = torch.ones(BATCH // features, dim * features)

        def forward():
            with torch.no_grad():
                tbe(indices, offsets)

        def train():
            tbe(indices, offsets).backward(grad)

        backward = _ms(train, repeat) - _ms(forward, repeat)
        out[f"{path}_backward_ms"] = backward
        out[f"{path}_ns_per_row"] = backward * 1e6 / out["distinct_rows"]
    out["jit_over_loop"] = out["jit_backward_ms"] / out["loop_backward_ms"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: one per core)")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--results-dir", type=Path, default=common.RESULTS)
    args = ap.parse_args()
    import torch

    from recsys import hardware

    torch.set_num_threads(args.threads or hardware.cpu_info().cores)
    results = [measure(r, d, n, args.repeat) for r, d, n in SHAPES]
    machine = common.machine()
    rows = [[f"{r['rows']:,} x {r['dim']}", f"{r['entries']:,}", f"{r['distinct_rows']:,}",
             f"{r['jit_backward_ms']:.2f} ({r['jit_ns_per_row']:.0f} ns/row)",
             f"{r['loop_backward_ms']:.2f} ({r['loop_ns_per_row']:.0f} ns/row)", f"{r['jit_over_loop']:.1f}x"]
            for r in results]
    md = (f"# FBGEMM CPU row-wise Adagrad backward: JIT path (one feature) vs loop path (two features)\n\n"
          f"CPU {machine['cpu_model']} (torch capability {machine['cpu_capability']}), "
          f"{torch.get_num_threads()} threads, torch {machine['torch']}, commit {machine['commit']}, "
          f"{machine['date']}; batch {BATCH:,}, forward subtracted, mean of {args.repeat} steps.\n\n"
          + common.markdown_table(["table", "entries", "distinct rows", "JIT path ms", "loop path ms",
                                   "JIT / loop"], rows) + "\n")
    print(md)
    common.write_json(args.results_dir / "tbe_backward.json", {"machine": machine, "batch": BATCH,
                                                                "threads": torch.get_num_threads(),
                                                                "results": results})
    (args.results_dir / "tbe_backward.md").write_text(md)


if __name__ == "__main__":
    main()
