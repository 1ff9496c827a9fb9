#!/usr/bin/env python
"""Pretrain the S&R foundation model on every domain of a spec.

    torchrun --nproc_per_node=2 jobs/pretrain.py --spec feature_specs/movielens.yaml [--set train.epochs=2]
    python jobs/pretrain.py --spec ... --dry-run      # validate spec, data schema and sharding plan; no training

gloo on CPU, NCCL on GPU; the TorchRec planner picks the sharding. A run directory that already holds checkpoints is
refused unless --resume (a torchrun restart with --max-restarts resumes by itself).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recsys.cli import add_spec_args, attach_log_file, load_spec_from_args, run_main, setup_logging  # noqa: E402
from recsys.errors import RecsysError  # noqa: E402

log = logging.getLogger("recsys.jobs.pretrain")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_spec_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint of the run")
    p.add_argument("--allow-spec-change", action="store_true",
                   help="with --resume: continue even though spec values differ from the checkpoint's (named in "
                        "the error you get without this flag)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dry-run", action="store_true", help="validate spec, data schema and sharding plan, then stop")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(verbose=args.verbose)
    spec = load_spec_from_args(args)
    if args.dry_run:  # writes nothing: the planner's own output is shown only with --verbose
        from recsys.train.dry_run import dry_run

        print(dry_run(spec, world_size=int(os.environ.get("WORLD_SIZE", "1")), device=args.device,
                      resume=args.resume))
        return 0

    from recsys.spec.loader import resolve_path
    from recsys.train import checkpoint
    from recsys.train.dist import init_distributed, shutdown
    from recsys.train.loop import Trainer
    from recsys.train.preflight import preflight
    from recsys.train.report import summary_table
    from recsys.train.run_lock import lock_for_this_rank

    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    resume = args.resume or restarted
    preflight(spec, int(os.environ.get("WORLD_SIZE", "1")))
    out_dir = resolve_path(spec, spec.train.output_dir)
    lock = lock_for_this_rank(out_dir)  # noqa: F841 (one training per run folder; held until the process ends)
    ckpts = checkpoint.list_checkpoints(out_dir / "checkpoints")
    if ckpts and not resume:
        raise RecsysError(f"train.output_dir {spec.train.output_dir!r} already holds checkpoints; pass --resume to "
                          f"continue it or --set train.output_dir=<new dir>")
    attach_log_file(resolve_path(spec, spec.train.output_dir))
    ctx = init_distributed(args.device)
    try:
        trainer = Trainer(spec, ctx)
        if resume and not trainer.resume(allow_spec_change=args.allow_spec_change):
            log.info("no checkpoint to resume from; starting fresh")
        summary = trainer.fit()
        if ctx.is_main:
            print(summary_table(summary))  # the whole summary: <run>/train_summary.json
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    run_main(main)
