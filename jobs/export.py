#!/usr/bin/env python
"""Export a trained model as a self-contained serving bundle.

    python jobs/export.py --spec feature_specs/amazon_sr.yaml --checkpoint runs/amazon_sr --out bundles/amazon_sr \
        [--quantize none|fp16|int8] [--force]

--checkpoint takes a checkpoint folder or a run folder (its best checkpoint, else its newest good one), written by
any number of ranks. The bundle holds the resolved spec and schema, the catalogue, the text tables, a reference to
the text encoder and the unsharded weights, each file's sha256 in manifest.json (see docs/serving.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recsys.cli import add_spec_args, load_spec_from_args, run_main, setup_logging  # noqa: E402


def main(argv=None) -> int:
    from recsys.serving.quantize import QUANTIZE_CHOICES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_spec_args(p)
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="none",
                   help="embedding tables in TorchRec's int8/fp16 layout (dense layers stay fp32)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    args = p.parse_args(argv)
    setup_logging(verbose=args.verbose)
    spec = load_spec_from_args(args)
    from recsys.serving.export import export_bundle

    m = export_bundle(spec, args.checkpoint, args.out, quantize=args.quantize, force=args.force)
    tb = m["table_bytes"]
    print(f"bundle {args.out}: {spec.name}, checkpoint {m['checkpoint']['name']}, quantize {m['quantize']}, "
          f"tables {tb['bundle'] / 1e6:.2f} MB (fp32 {tb['float32'] / 1e6:.2f} MB), {len(m['files'])} files")
    return 0


if __name__ == "__main__":
    run_main(main)
