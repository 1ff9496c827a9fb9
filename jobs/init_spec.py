#!/usr/bin/env python
"""Write a commented starting spec for one's own parquet files to stdout.

    python jobs/init_spec.py --data DIR [--domain-column surface] [--label-column clicked] [--user-column uid] \
        [--name my_data] [--text-mode llm|random|none] > feature_specs/my_data.yaml

DIR holds train.parquet and valid.parquet (test.parquet optional), one row per impression. The schema and a sample
of train rows decide each column's guess (id, multi-valued sparse, sequence, dense with a suggested transform, text,
slice); each line of the spec says why. See README, "Bring your own data", and docs/own_data.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recsys.cli import run_main  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="folder with train.parquet, valid.parquet[, test.parquet]")
    p.add_argument("--domain-column", help="column naming each row's domain (default: domain, surface, ...)")
    p.add_argument("--label-column", help="0/1 label column (default: label, clicked, ...)")
    p.add_argument("--user-column", help="user id column (default: user_id, uid, ...)")
    p.add_argument("--name", help="spec name (default: the folder's name)")
    p.add_argument("--text-mode", choices=["llm", "random", "hybrid", "none"], default="llm",
                   help="text.mode written when text columns are found (default llm)")
    args = p.parse_args(argv)
    from recsys.spec.scaffold import render

    sys.stdout.write(render(args.data, args.domain_column, args.label_column, args.user_column, args.name,
                            args.text_mode))
    return 0


if __name__ == "__main__":
    run_main(main)
