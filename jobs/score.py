#!/usr/bin/env python
"""Score a parquet file of impression rows with a bundle, streamed, in the input's row order.

    python jobs/score.py --bundle bundles/amazon_sr --input test.parquet --out scores.parquet [--keep col,col]

The input has the canonical row schema of the bundle's spec (labels optional). The output holds the key columns
(domain, user, ids, query, label when present; or --keep), `logit` and `score` (sigmoid), row for row; rows the
model does not score (a bad row, a domain it was not trained for) get NaN.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recsys.cli import run_main, setup_logging  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--input", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--keep", help="comma-separated columns to copy to the output (default: the key columns)")
    p.add_argument("--block-rows", type=int, default=65536, help="rows read and mapped per block")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: every core)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    setup_logging()
    import os

    from recsys.serving.batch_scoring import score_file
    from recsys.serving.ranker import Ranker

    ranker = Ranker.load(args.bundle, threads=args.threads or os.cpu_count())
    keep = [c.strip() for c in args.keep.split(",") if c.strip()] if args.keep else None
    r = score_file(ranker, args.input, args.out, block_rows=args.block_rows, keep=keep,
                   progress=not args.no_progress)
    print(f"{args.out}: {r['rows']} rows ({r['scored']} scored) in {r['seconds']:.1f}s, "
          f"{r['rows_per_s']:,.0f} rows/s")
    return 0


if __name__ == "__main__":
    run_main(main)
