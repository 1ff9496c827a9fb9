#!/usr/bin/env python
"""Encode every text table of a spec with its frozen text encoder (only texts not cached yet run the model).

    python jobs/encode_text.py --spec feature_specs/amazon_sr.yaml [--set text.encoder.backend=onnx-int8] [--device cuda]
    torchrun --nproc_per_node=N jobs/encode_text.py --spec S     # N ranks (or nodes x N), each encoding its chunks

Needs the prepared text tables (`jobs/prepare_data.py`). Resumable: a run killed at any point and rerun encodes
only the chunks not committed yet and ends with the same cache as an uninterrupted run. Prints one summary line
per table (rank 0).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from recsys.cli import add_spec_args, attach_log_file, load_spec_from_args, run_main, setup_logging  # noqa: E402


def format_summary(stats: dict) -> str:
    header = f"{'table':<16} {'texts':>9} {'new':>9} {'cached':>9} {'encoded':>9} {'seconds':>9} {'texts/s':>9}"
    lines = [header, "-" * len(header)]
    for name, s in stats.items():
        lines.append(f"{name:<16} {s['texts']:>9d} {s['new']:>9d} {s['cached']:>9d} {s['encoded']:>9d} "
                     f"{s['seconds']:>9.1f} {s['texts_per_s']:>9.1f}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Encode a spec's text tables into the text vector cache.")
    add_spec_args(parser)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="override text.encoder.device (default: the spec's, `auto` = cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    args = parser.parse_args(argv)
    setup_logging(verbose=args.verbose)  # rank from $RANK: other ranks show only warnings
    spec = load_spec_from_args(args)
    from recsys.data.paths import prepared_dir

    attach_log_file(prepared_dir(spec))
    from recsys.text.sharded import encode_on_all_ranks

    stats = encode_on_all_ranks(spec, device=args.device, progress=not args.no_progress)
    if stats is None:  # not rank 0: rank 0 prints the summary
        return 0
    if not stats:
        print(f"text.mode is '{spec.text.mode}': nothing to encode")
        return 0
    print(format_summary(stats))
    return 0


if __name__ == "__main__":
    run_main(main)
