"""Crash + resume of a 2-rank torchrun pretrain ends with exactly the metrics of an uninterrupted run.

Exactness holds because everything a step depends on is restored: model weights, dense Adam and the fused
RowWiseAdagrad state (DCP), the loader position (epoch, batches consumed -- the batch order is a pure function of
(seed, epoch, rank, world size), and batches the pipeline had prefetched but not trained are simply read again),
each rank's torch/numpy/python RNG, step counters and the evaluation history, and the training weights beside the
weight average these runs keep (`train.ema_decay`: checkpoints hold the average in the weights' place). CPU gloo
reductions are deterministic for the same shapes, so the comparison is bitwise (floats compared with ==)."""
from __future__ import annotations

import re
import time

import pytest

from reliability_helpers import SPEC, kill_when, small_overrides, summary, torchrun

pytestmark = [pytest.mark.slow, pytest.mark.multirank]
AVERAGED = {"train.ema_decay": "0.9"}


@pytest.fixture(scope="module")
def uninterrupted(ml_prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("rel_baseline") / "run"
    proc = torchrun(["--spec", str(SPEC), *small_overrides(ml_prepared, out, **AVERAGED)], out.parent / "torchrun.log")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return summary(out)


def _metrics(s: dict) -> list:
    return [(h["epoch"], h["valid"]) for h in s["history"]]


def test_kill_9_mid_epoch_then_resume_is_exact(ml_prepared, tmp_path, uninterrupted):
    out = tmp_path / "run"
    args = ["--spec", str(SPEC), *small_overrides(ml_prepared, out, **AVERAGED)]
    # step 15 = epoch 1, 3 of 12 batches done: a mid-epoch checkpoint after one finished epoch
    kill_when(args, out / "checkpoints" / "step_000000015", tmp_path / "killed.log")
    time.sleep(1.0)  # nothing may still be writing after a kill of launcher and workers
    assert not (out / "train_summary.json").exists()
    proc = torchrun([*args, "--resume"], tmp_path / "resumed.log")
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = re.search(r"resumed from \S+step_(\d+) \(epoch (\d+), step (\d+) in epoch", proc.stderr)
    assert m, proc.stderr[-3000:]
    assert int(m.group(1)) >= 15 and 0 < int(m.group(3)) < 12  # a mid-epoch checkpoint, not an epoch end
    resumed = summary(out)
    assert _metrics(resumed) == _metrics(uninterrupted)
    assert resumed["best_valid_metric"] == uninterrupted["best_valid_metric"]


def test_torchrun_max_restarts_resumes_by_itself(ml_prepared, tmp_path, uninterrupted):
    out = tmp_path / "run"
    # RECSYS_TEST_CRASH_AT_STEP: every rank os._exit(1)s after global step 8 (first attempt only); the newest
    # checkpoint then is step 5, mid-epoch 0. torchrun restarts the workers, which resume from it.
    proc = torchrun(["--spec", str(SPEC), *small_overrides(ml_prepared, out, **AVERAGED)], tmp_path / "torchrun.log",
                    max_restarts=1,
                    RECSYS_TEST_CRASH_AT_STEP="8")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "RECSYS_TEST_CRASH_AT_STEP=8" in proc.stderr
    assert "resumed from" in proc.stderr and "step_000000005" in proc.stderr
    assert _metrics(summary(out)) == _metrics(uninterrupted)
