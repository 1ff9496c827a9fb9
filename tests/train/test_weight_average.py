"""train.ema_decay: the moving average of the dense weights (recsys/train/weight_average.py) is what a run is
evaluated, selected and checkpointed with; the training weights ride beside it, so a resume continues exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys.errors import RecsysError
from recsys.train.weight_average import WARMUP, WeightAverage


def test_update_is_the_warmed_up_moving_average():
    w = torch.nn.Parameter(torch.zeros(3))
    avg = WeightAverage({"w": w}, decay=0.9)
    expected = torch.zeros(3)
    for step, value in enumerate([1.0, 2.0, 4.0, 8.0] + [3.0] * 40):
        with torch.no_grad():
            w.fill_(value)
        avg.update(step)
        d = min(0.9, (1 + step) / (WARMUP + step))
        expected = d * expected + (1 - d) * value
        torch.testing.assert_close(avg.state_dict()["w"], expected)
    assert avg.decay_at(0) == pytest.approx(0.1) and avg.decay_at(1000) == 0.9
    assert float(w[0]) == 3.0  # the training weight itself is untouched


def test_swapped_puts_the_average_in_place_and_back_and_does_not_nest():
    w = torch.nn.Parameter(torch.full((2,), 5.0))
    avg = WeightAverage({"w": w}, decay=0.5)
    with torch.no_grad():
        w.fill_(7.0)
    with avg.swapped():
        assert w.tolist() == [5.0, 5.0] and avg.state_dict()["w"].tolist() == [7.0, 7.0]
        with avg.swapped():  # already in place: a nested block changes nothing
            assert w.tolist() == [5.0, 5.0]
        assert w.tolist() == [5.0, 5.0]
        with pytest.raises(RecsysError, match="updated while"):
            avg.update(3)
    assert w.tolist() == [7.0, 7.0] and avg.state_dict()["w"].tolist() == [5.0, 5.0]


def _fit(spec, group):
    from recsys.train.loop import Trainer

    trainer = Trainer(spec, group)
    return trainer, trainer.fit()


@pytest.mark.slow
def test_a_run_is_selected_and_checkpointed_with_its_average(group, tiny_spec, tmp_path):
    from recsys.train import checkpoint
    from recsys.train.evaluation import evaluate_split
    from recsys.train.loop import TRAINING_WEIGHTS, load_for_inference

    spec = tiny_spec(f"train.output_dir={tmp_path / 'run'}", "train.batch_size=512", "train.max_steps=20",
                     "train.epochs=1", "train.ema_decay=0.9")
    trainer, summary = _fit(spec, group)
    averaged = trainer._averaged_weights()
    assert averaged and not any(".l0.ebc." in k for k in averaged)  # dense weights only, no TorchRec table
    # what a checkpoint's reader gets (evaluation, export, fine-tuning) is the average the epoch was selected with
    model, chosen = load_for_inference(spec, group, trainer.out_dir)
    again = evaluate_split(model, spec, "valid", group)
    assert again["domains"] == summary["history"][0]["valid"]["domains"]
    loaded = dict(model.named_parameters())
    training = {k: p.detach().clone() for k, p in averaged.items()}
    assert any(not torch.equal(loaded[k], training[k]) for k in training)  # the average is not the last step's
    with trainer.averaged():
        for k, p in averaged.items():
            torch.testing.assert_close(loaded[k], p, rtol=0, atol=0)
    # and the training weights are in the checkpoint beside it, under their own names
    keys = checkpoint.saved_keys(chosen)
    assert {f"{TRAINING_WEIGHTS}.{k}" for k in averaged} <= keys


@pytest.mark.slow
def test_resume_with_an_average_continues_exactly(group, tiny_spec, tmp_path):
    from recsys.train.loop import Trainer

    sets = ("train.batch_size=512", "train.max_steps=8", "train.ema_decay=0.8")
    _, straight = _fit(tiny_spec(f"train.output_dir={tmp_path / 'straight'}", "train.epochs=2", *sets), group)
    _fit(tiny_spec(f"train.output_dir={tmp_path / 'split'}", "train.epochs=1", *sets), group)
    resumed = Trainer(tiny_spec(f"train.output_dir={tmp_path / 'split'}", "train.epochs=2", *sets), group)
    assert resumed.resume()
    summary = resumed.fit()
    assert [h["valid"] for h in summary["history"]] == [h["valid"] for h in straight["history"]]
    assert np.isfinite(summary["best_valid_metric"])


@pytest.mark.slow
def test_a_checkpoint_without_the_training_weights_is_refused_by_a_resume_that_averages(group, tiny_spec,
                                                                                         tmp_path):
    from recsys.errors import CheckpointError
    from recsys.train.loop import Trainer

    out = tmp_path / "run"
    _fit(tiny_spec(f"train.output_dir={out}", "train.batch_size=512", "train.max_steps=4", "train.epochs=1"), group)
    later = Trainer(tiny_spec(f"train.output_dir={out}", "train.batch_size=512", "train.max_steps=4",
                              "train.epochs=2", "train.ema_decay=0.9"), group)
    with pytest.raises(CheckpointError, match="ema_decay"):
        later.resume(allow_spec_change=False)
    with pytest.raises(CheckpointError, match="trained without train.ema_decay"):
        later.resume(allow_spec_change=True)
