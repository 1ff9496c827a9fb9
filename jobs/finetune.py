#!/usr/bin/env python
"""Fine-tune a pretrained S&R foundation model on a (possibly new, cold-start) domain.

    python jobs/finetune.py --spec feature_specs/movielens_coldstart.yaml --from runs/movielens_pre \
        --freeze l0,l1 [--set train.epochs=2] [--out result.json]

The spec may add domains (a YAML edit): they get a new domain embedding and head initialised from the pretrained
domains of the same kind; tables are reused (keep `data.prepared_dir` so the vocabularies match), and ids the
pretraining never saw land in the reserved row 0 while their text vectors carry them. `--freeze` takes level
prefixes (`l0`, `l0,l1` — the paper's best —, `none`, or finer ones like `l2.tower`); a prefix matching nothing is an
error. Frozen tables get no optimiser and stay bit-identical. After training, the best epoch (on valid) is
evaluated like jobs/evaluate.py.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recsys.cli import (add_evaluation_output_args, add_spec_args, attach_log_file,  # noqa: E402
                         check_evaluation_outputs, load_spec_from_args, run_main, setup_logging)
from recsys.errors import RecsysError  # noqa: E402


def parse_freeze(text: str):
    text = text.strip()
    if text in ("", "none"):
        return []
    parts = [p.strip() for p in text.split(",")]
    if any(not p for p in parts):
        raise RecsysError(f"--freeze {text!r}: empty prefix")
    return parts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_spec_args(p)
    p.add_argument("--from", dest="source", type=Path, help="pretrained run folder or checkpoint (omit: scratch)")
    p.add_argument("--freeze", default="l0,l1", help="comma-separated level prefixes, or 'none' (default l0,l1)")
    p.add_argument("--freeze-untrained-rows", action="store_true",
                   help="freeze table rows that pretraining never updated too (default: they train, so users or "
                        "items seen only in the new domain do not keep their random initialisation)")
    p.add_argument("--split", default="test", help="split evaluated after training")
    p.add_argument("--zero-shot", action="store_true", help="evaluate the transferred model without training")
    add_evaluation_output_args(p)
    args = p.parse_args(argv)
    setup_logging(verbose=args.verbose)
    spec = load_spec_from_args(args)
    check_evaluation_outputs(args)
    freeze = parse_freeze(args.freeze)
    if args.source is None and (freeze or args.zero_shot):
        raise RecsysError("--freeze/--zero-shot need --from: there is nothing pretrained to keep")

    from recsys.train import checkpoint
    from recsys.train.dist import init_distributed, shutdown
    from recsys.train.evaluation import predict, publish
    from recsys.spec.loader import resolve_path
    from recsys.train.loop import Trainer
    from recsys.train.preflight import preflight
    from recsys.train.run_lock import lock_for_this_rank
    from recsys.train.transfer import load_pretrained_state, pretrained_text_projection, transfer_into

    if not args.zero_shot:
        preflight(spec, int(os.environ.get("WORLD_SIZE", "1")))
    hook, projection = None, None
    if args.source is not None:
        ckpt = checkpoint.best_or_latest(args.source)
        old_spec, old_state = load_pretrained_state(ckpt)
        hook = lambda tr: transfer_into(tr.dmp, spec, old_spec, old_state)  # noqa: E731
        projection = pretrained_text_projection(old_state)
    fresh = None
    if args.source is not None and freeze and not args.zero_shot and not args.freeze_untrained_rows:
        from recsys.models.build import spec_table_rows
        from recsys.train.transfer import rows_pretraining_updated

        fresh = {t: ~seen for t, seen in rows_pretraining_updated(old_spec, spec_table_rows(spec)).items()}
    lock = lock_for_this_rank(resolve_path(spec, spec.train.output_dir))  # noqa: F841 (held until exit)
    attach_log_file(resolve_path(spec, spec.train.output_dir))
    ctx = init_distributed(args.device)
    try:
        trainer = Trainer(spec, ctx, freeze=freeze, init_hook=hook, text_projection=projection,
                          fresh_rows=fresh)
        if args.zero_shot:
            model = trainer.dmp
            model.eval()
            source = f"zero-shot from {ckpt}"
        else:
            trainer.fit()
            best = checkpoint.best_or_latest(trainer.out_dir)
            checkpoint.load(best, trainer.dmp)
            model = trainer.dmp
            source = f"fine-tuned ({args.freeze}) {best}" if args.source else f"scratch {best}"
        scores = predict(model, spec, args.split, ctx)
        if ctx.is_main:
            publish(spec, args.split, scores, source=source, out=args.out, save_predictions=args.save_predictions,
                    frozen_parameters=len(trainer.frozen))
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    run_main(main)
