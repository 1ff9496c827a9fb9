#!/usr/bin/env python
"""Encode every text table of a spec with its frozen text encoder (only texts not cached yet run the model).

    python jobs/encode_text.py --spec feature_specs/amazon_sr.yaml [--set text.encoder.batch_size=256] [--device cuda]

Needs the prepared text tables (`jobs/prepare_data.py`). Prints one summary line per table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from recsys.cli import add_spec_args, attach_log_file, load_spec_from_args, run_main, setup_logging  # noqa: E402


def format_summary(stats: dict) -> str:
    header = f"{'table':<16} {'texts':>9} {'new':>9} {'cached':>9} {'seconds':>9} {'texts/s':>9}"
    lines = [header, "-" * len(header)]
    for name, s in stats.items():
        lines.append(f"{name:<16} {s['texts']:>9d} {s['new']:>9d} {s['cached']:>9d} {s['seconds']:>9.1f} "
                     f"{s['texts_per_s']:>9.1f}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Encode a spec's text tables into the text vector cache.")
    add_spec_args(parser)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="override text.encoder.device (default: the spec's, `auto` = cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    args = parser.parse_args(argv)
    setup_logging(rank=0, verbose=args.verbose)
    spec = load_spec_from_args(args)
    from recsys.data.paths import prepared_dir

    attach_log_file(prepared_dir(spec))
    from recsys.text import encode_text_tables

    stats = encode_text_tables(spec, device=args.device, progress=not args.no_progress)
    if not stats:
        print(f"text.mode is '{spec.text.mode}': nothing to encode")
        return 0
    print(format_summary(stats))
    return 0


if __name__ == "__main__":
    run_main(main)
