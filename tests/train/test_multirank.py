"""1 rank vs 2 ranks: the same global batches give the same loss trajectory (DistributedModelParallel, the
in-backward sparse optimiser, DDP for dense weights, TrainPipelineSparseDist), with the cross-domain regulariser on:
it is computed over the global batch, so both runs train one objective."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.train.dist import GLOO_EXIT_ABORT

REPO = Path(__file__).resolve().parents[2]
STEPS = 8
REG_WEIGHT = 0.1  # the default

# Run under torchrun (or alone: a 1-rank group). Every rank reads the *same* 1-rank stream cut into batches of
# B / W rows and takes every W-th one, so global step k covers exactly the rows of the 1-rank batch k. Both runs
# start from one initial state file (sharded tables would otherwise be initialised per rank).
SCRIPT = r'''
import itertools, json, sys
import torch, torch.distributed as dist
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from recsys.data.loader import BatchLoader
from recsys.spec.loader import load_spec
from recsys.train.dist import exit_process, init_distributed, shutdown
from recsys.train.loop import Trainer
from recsys.train.transfer import transfer_into

spec_path, init_path, steps, overrides = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
spec = load_spec(spec_path, overrides)
ctx = init_distributed("cpu")
state = torch.load(init_path)
trainer = Trainer(spec, ctx, for_training=False, init_hook=lambda tr: transfer_into(tr.dmp, spec, spec, state))
W, B = ctx.world_size, spec.train.batch_size
loader = BatchLoader(spec, "train", batch_size=B // W, shuffle=False, seed=0)
mine = itertools.islice(iter(loader), ctx.rank, steps * W, W)
pipeline = TrainPipelineSparseDist(trainer.dmp, trainer.optimizer, ctx.device, execute_all_batches=True)
trainer.dmp.train()
losses, regs = [], []
while True:
    try:
        out = pipeline.progress(mine)
    except StopIteration:
        break
    loss = out[0].detach().clone()
    dist.all_reduce(loss)  # equal local batch sizes: the mean of local means is the global mean
    losses.append(float(loss) / W)
    regs.append(float(out[4]))  # the regulariser: already the global batch's on every rank
if ctx.rank == 0:
    print("LOSSES " + json.dumps(losses), flush=True)
    print("REGS " + json.dumps(regs), flush=True)
shutdown()
exit_process(0)
'''




def _untrained_losses(spec, init: Path) -> np.ndarray:
    """The initial model's losses on the 1-rank run's batches (BCE + regulariser, as in training)."""
    import itertools

    from recsys.data.loader import BatchLoader
    from recsys.models.build import build_model
    from recsys.models.model import TrainTask

    task = TrainTask(build_model(spec, torch.device("cpu")), spec)
    task.load_state_dict(torch.load(init))
    task.train()
    loader = BatchLoader(spec, "train", batch_size=spec.train.batch_size, shuffle=False, seed=0)
    with torch.no_grad():
        return np.array([float(task(b)[0]) for b in itertools.islice(iter(loader), STEPS)])


def _series(res: subprocess.CompletedProcess, key: str) -> list:
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith(key + " "))
    return json.loads(line[len(key) + 1:])


# (variant, spec overrides, rtol). `replicated_item`: the item table data_parallel (dense kernel, DDP-averaged
# gradient, the embedding optimiser stepped with the dense ones): the same objective, so the same tight tolerance.
# `fp16_all_to_all`: pooled embeddings and their gradients cross ranks in fp16 (rounding ~5e-4 relative per value;
# the 1-rank run has no all-to-all), compounded over the steps by RowWiseAdagrad, whose first updates are scale-free
# (g / rms(g)): measured at most 0.92% relative (step 5) once the tag-search rows gained two query-history sequence
# features, 0.27% before, the same on an AMD EPYC and an Intel AMX Xeon (deterministic). Not gradient underflow: a
# backward loss scale of 128 or 1024 leaves the trajectory unchanged. 3e-2 keeps 3x headroom and stays far below what
# a real mismatch moves: a per-rank regulariser alone shifts the loss by ~1e-3 absolute, ~40% of these ~2e-3 losses.
# `mmd`: each rank contributes its first ceil(256 / W) samples per domain, all of them at this batch size, so the
# gathered samples are the 1-rank ones; but its bandwidth is the median of ~30k pairwise distances whose last bits
# differ between the two layouts (differently blocked products), so a near-tie can pick the neighbouring distance
# (measured: 1.5e-4 relative on one step's MMD). 1e-3 sits far below what a per-rank MMD moves (~40%).
VARIANTS = [("sharded", [], 1e-5),
            ("mmd", ["model.regularizer=mmd"], 1e-3),
            ("replicated_item", ["train.sharding_constraints.item=[data_parallel]"], 1e-5),
            ("fp16_all_to_all", ["train.embedding_comm=fp16"], 3e-2),
            # FBGEMM's loop path for the one-feature tables (empty pad features inside the sharded module), also
            # for a column-wise table, whose shards TorchRec feeds by its own permutation
            ("loop_path", ["train.embedding_update_path=loop"], 1e-5),
            ("loop_path_column_wise", ["train.embedding_update_path=loop",
                                       "train.sharding_constraints.user=[column_wise]"], 1e-5)]


@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.parametrize("variant,overrides,rtol", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_one_and_two_ranks_follow_the_same_losses(tiny_spec, tiny_overrides, tmp_path, child_env, variant,
                                                  overrides, rtol):
    from recsys.models.build import build_model
    from recsys.models.model import TrainTask

    # The regulariser on (JS unless the variant says MMD) at its default weight: a per-rank regulariser (the mean
    # over ranks of each half batch's) differs from the global one by 40-90% relative on a random 256-row batch,
    # i.e. ~1e-3 of the loss here, 100x the tolerance.
    # fp32 explicitly: the tolerances are for fp32 arithmetic; `auto` picks bf16 on AVX512-BF16/AMX CPUs, whose
    # rounding (~4e-3 relative) differs between the 1- and 2-rank layouts far beyond them.
    extra = ["model.regularizer=js", f"model.reg_weight={REG_WEIGHT}", "train.batch_size=256",
             "train.precision=fp32", *overrides]
    spec = tiny_spec(*extra)
    torch.manual_seed(0)
    torch.save(TrainTask(build_model(spec, torch.device("cpu")), spec).state_dict(), tmp_path / "init.pt")
    script = tmp_path / "losses.py"
    script.write_text(SCRIPT)
    args = [str(script), str(REPO / "feature_specs" / "movielens.yaml"), str(tmp_path / "init.pt"), str(STEPS),
            *tiny_overrides(*extra)]
    child_env["OMP_NUM_THREADS"] = "1"
    procs = [subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=child_env, cwd=REPO),
             subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env,
                              cwd=REPO)]
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            p.kill()
            raise
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    if results[1].returncode != 0 and GLOO_EXIT_ABORT in results[1].stderr:
        # A gloo worker used to abort in C++ at exit ("terminate called without an active exception", ~1 in 10
        # two-rank launches here); the script now exits through exit_process, which removes the known cause. A
        # recurrence is reported and the 2-rank launch rerun once, alone; any other failure, or a second abort,
        # still fails the test.
        warnings.warn("gloo abort at exit recurred in the 2-rank launch; rerun once")
        results[1] = subprocess.run(procs[1].args, capture_output=True, text=True, env=child_env, cwd=REPO,
                                    timeout=300)
    one, two = (np.array(_series(r, "LOSSES")) for r in results)
    reg_one, reg_two = (np.array(_series(r, "REGS")) for r in results)
    assert (reg_one > 1e-4).all()  # the regulariser is really part of the objective
    np.testing.assert_allclose(reg_two, reg_one, rtol=max(rtol, 1e-4), atol=1e-7)
    assert len(one) == len(two) == STEPS
    # it trains at all (else equal trajectories would prove little): lower losses than the untrained model on the
    # same batches (batches in file order differ too much from each other for a plain "loss falls")
    untrained = _untrained_losses(spec, tmp_path / "init.pt")
    assert one[0] == pytest.approx(untrained[0], rel=1e-5)
    assert np.mean(one[-3:]) < np.mean(untrained[-3:]) - 0.01
    # Tolerance: dense gradients are averaged by DDP (identical up to float summation order); the embedding rows get
    # the *sum* of the two ranks' local-mean gradients, i.e. 2x the 1-rank gradient, which RowWiseAdagrad cancels
    # (g / sqrt(sum g^2)) except through its eps (1e-10 against squared gradients of ~1e-6..1e-3). What is left is
    # float32 rounding compounded over 8 steps: measured at most 9e-8 relative. 1e-5 keeps 100x headroom, while any
    # real mismatch (different rows, a doubled step, unsynchronised weights) moves the loss by 1e-3 or more.
    np.testing.assert_allclose(two, one, rtol=rtol, atol=1e-6)
