#!/usr/bin/env python
"""Evaluate a checkpoint on a split: per-domain AUC, GAUC, logloss, the cold-item slice and overall AUC.

    python jobs/evaluate.py --spec feature_specs/amazon_sr.yaml --checkpoint runs/amazon_sr --split test \
        --out results.json [--save-predictions pred.npy]

--checkpoint takes a checkpoint folder or a run folder (its best checkpoint, else its newest good one).
--save-predictions writes raw logits in the split's row order (the input of shared/tools/score_amazon_sr.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recsys.cli import (add_evaluation_output_args, add_spec_args, attach_log_file,  # noqa: E402
                         check_evaluation_outputs, load_spec_from_args, run_main, setup_logging)
from recsys.errors import RecsysError  # noqa: E402


def run_folder_of(checkpoint: Path) -> Path:
    """The run folder of `--checkpoint` (a run folder itself, or `<run>/checkpoints/<step>`)."""
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent
    return checkpoint


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_spec_args(p)
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--split", default="test")
    add_evaluation_output_args(p)
    args = p.parse_args(argv)
    setup_logging(verbose=args.verbose)
    spec = load_spec_from_args(args)
    check_evaluation_outputs(args)
    if args.split not in spec.data.splits:
        raise RecsysError(f"--split {args.split!r}: the spec has splits {sorted(spec.data.splits)}")

    from recsys.train.dist import init_distributed, shutdown
    from recsys.train.evaluation import predict, publish
    from recsys.train.loop import load_for_inference

    attach_log_file(run_folder_of(args.checkpoint))
    ctx = init_distributed(args.device)
    try:
        model, ckpt = load_for_inference(spec, ctx, args.checkpoint)
        scores = predict(model, spec, args.split, ctx)
        if ctx.is_main:
            publish(spec, args.split, scores, source=str(ckpt), out=args.out, save_predictions=args.save_predictions)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    run_main(main)
