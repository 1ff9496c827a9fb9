"""The training step: one CPU process trains through `OneProcessStep` (no TorchRec pipeline), several ranks or a GPU
through TrainPipelineSparseDist; on one process both train the same model from the same batches alike."""
from __future__ import annotations

import itertools

import pytest
import torch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist


def _train(spec, group, step_kind: str, steps: int):
    """(per-step losses, final state dict) of `steps` steps from a seeded model, via the given step."""
    from recsys.data.loader import BatchLoader
    from recsys.train.loop import Trainer
    from recsys.train.step import OneProcessStep

    torch.manual_seed(0)
    trainer = Trainer(spec, group, for_training=False)
    trainer.dmp.train()
    guard = trainer.finite_grad_guard()
    step = OneProcessStep(trainer.dmp, guard) if step_kind == "plain" else \
        TrainPipelineSparseDist(trainer.dmp, guard, group.device, execute_all_batches=True)
    it = itertools.islice(iter(BatchLoader(spec, "train", spec.train.batch_size, seed=0)), steps)
    losses, seen = [], []
    while True:
        upcoming = step.batches[0] if step.batches else None
        try:
            loss, _, labels, _, _ = step.progress(it)
        except StopIteration:
            break
        losses.append(float(loss))
        seen.append((upcoming is None, int(labels.shape[0])))
    step.detach()
    state = {k: _local(v).detach().clone() for k, v in trainer.dmp.state_dict().items()}
    return losses, state, seen


def _local(value):
    """A state-dict value as one tensor: a ShardedTensor's (only, one-rank) shard."""
    return value.local_shards()[0].tensor if hasattr(value, "local_shards") else value


def test_one_process_step_trains_as_the_pipeline_does(group, tiny_spec, tmp_path):
    spec = tiny_spec(f"train.output_dir={tmp_path}", "train.batch_size=256")
    plain, plain_state, plain_seen = _train(spec, group, "plain", 6)
    piped, piped_state, _ = _train(spec, group, "pipeline", 6)
    assert len(plain) == len(piped) == 6, "every batch of the iterator trained, then StopIteration"
    assert plain == piped
    assert plain_state.keys() == piped_state.keys()
    for k in plain_state:
        torch.testing.assert_close(plain_state[k], piped_state[k], rtol=0, atol=0, msg=k)
    # before the first step no batch is staged (as the pipeline); afterwards batches[0] is the one trained next
    assert plain_seen[0][0] and not any(first for first, _ in plain_seen[1:])


def test_the_job_picks_the_plain_step_on_one_cpu_process_only():
    from recsys.train.step import OneProcessStep, make_train_step

    model, opt = torch.nn.Linear(2, 1), object()
    assert isinstance(make_train_step(model, opt, torch.device("cpu"), 1), OneProcessStep)


@pytest.mark.parametrize("device, world_size", [("cpu", 2), ("cuda", 1)])
def test_ranks_or_a_gpu_keep_the_pipeline(monkeypatch, device, world_size):
    import recsys.train.step as step_mod

    made = []
    monkeypatch.setattr("torchrec.distributed.train_pipeline.TrainPipelineSparseDist",
                        lambda *a, **k: made.append((a, k)) or "pipeline")
    assert step_mod.make_train_step(torch.nn.Linear(2, 1), object(), torch.device(device), world_size) == "pipeline"
    assert made and made[0][1] == {"execute_all_batches": True}
