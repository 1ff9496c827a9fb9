"""The default text path end to end (issue 15 item 13): `text.mode: llm` with a tiny BERT built in code
(tests/tiny_llm.py), its vectors encoded into a cache, projected once to a 16-wide basis into frozen text tables,
training, evaluation, and a checkpoint load that restores the basis and the text tables."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

ML_SPEC = Path(__file__).resolve().parents[2] / "feature_specs" / "movielens.yaml"


@pytest.fixture(scope="module")
def llm_run(llm_overrides, group, tmp_path_factory):
    from recsys.spec.loader import load_spec
    from recsys.train.loop import Trainer

    out = tmp_path_factory.mktemp("llm_run")
    spec = load_spec(ML_SPEC, llm_overrides(f"train.output_dir={out}", "train.max_steps=30", "train.lr=0.003"))
    trainer = Trainer(spec, group)
    return spec, trainer, trainer.fit()


def _basis_buffers(module: torch.nn.Module):
    return {n: b for n, b in module.named_buffers() if n.endswith("basis")}


@pytest.mark.slow
def test_default_text_path_trains_on_encoder_vectors(llm_run, tiny_llm):
    from recsys.models.build import text_tables_for
    from recsys.text import text_table_vectors

    spec, trainer, summary = llm_run
    assert spec.text.mode == "llm" and spec.text.encoder.model == str(tiny_llm)
    raw = text_table_vectors(spec, "movies")  # the cached vectors of the tiny encoder: width 32, distinct per title
    assert raw.shape[1] == 32 and len(np.unique(np.round(raw[1:], 5), axis=0)) > 0.9 * (len(raw) - 1)
    movies = text_tables_for(spec)["movies"]  # the frozen table the model reads: projected to text.reduce_dim
    assert movies.shape == (len(raw), 16)
    (name, basis), = _basis_buffers(trainer.dmp).items()
    assert tuple(basis.shape) == (32, 16)  # the text basis reduces the encoder's 32 to text.reduce_dim
    assert summary["best_valid_metric"] is not None and summary["best_valid_metric"] > 0.5


@pytest.mark.slow
def test_checkpoint_load_restores_basis_and_text_tables(llm_run, group):
    from recsys.train import checkpoint
    from recsys.train.evaluation import predict
    from recsys.train.frozen_text import fill_text_tables
    from recsys.train.loop import Trainer

    spec, trainer, summary = llm_run
    before = predict(trainer.dmp, spec, "valid", group)
    fresh = Trainer(spec, group, for_training=False)
    # a different basis in the fresh model (as if fitted on other vectors), its text tables projected otherwise
    with torch.no_grad():
        for b in _basis_buffers(fresh.dmp).values():
            b.neg_()
    fill_text_tables(fresh.dmp, {n: -np.asarray(t) for n, t in fresh.text_tables.items()})
    fresh.dmp.eval()
    scrambled = predict(fresh.dmp, spec, "valid", group)
    assert not np.array_equal(scrambled, before)
    checkpoint.load(trainer.out_dir / summary["best_checkpoint"], fresh.dmp)
    fresh.dmp.eval()
    np.testing.assert_array_equal(predict(fresh.dmp, spec, "valid", group), before)  # bit-identical
    restored = fresh.model.l0.text_projection.to_projection()
    assert restored.id == trainer.model.l0.text_projection.to_projection().id
