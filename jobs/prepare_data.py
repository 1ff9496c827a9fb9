#!/usr/bin/env python
"""Prepare a spec's data: run its adapter, build vocabularies, text tables and stats.json in `data.prepared_dir`.

    python jobs/prepare_data.py --spec feature_specs/movielens.yaml [--set data.prepared_dir=...] [--force]

Idempotent: outputs newer than their inputs (and built from the same spec fields) are skipped. Prints the table
sizes and per-split row counts.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from recsys.cli import add_spec_args, attach_log_file, load_spec_from_args, run_main, setup_logging  # noqa: E402


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Build vocabularies, text tables and stats for a spec.")
    add_spec_args(parser)
    parser.add_argument("--force", action="store_true", help="rebuild every output even when up to date")
    args = parser.parse_args(argv)
    setup_logging(rank=0, verbose=args.verbose)
    spec = load_spec_from_args(args)
    from recsys.data.paths import prepared_dir

    attach_log_file(prepared_dir(spec))
    from recsys.data.prepare import prepare

    stats = prepare(spec, force=args.force)
    print(f"{'table':<12} {'rows':>10}")
    for name, n in stats["tables"].items():
        print(f"{name:<12} {n:>10d}")
    print(f"\n{'split':<8} {'domain':<16} {'rows':>10} {'positives':>10}")
    for split, s in stats["splits"].items():
        for dom, c in sorted(s["domains"].items()):
            print(f"{split:<8} {dom:<16} {c['rows']:>10d} {c['positives']:>10d}")
        print(f"{split:<8} {'(all)':<16} {s['rows']:>10d}")
    return 0


if __name__ == "__main__":
    run_main(main)
