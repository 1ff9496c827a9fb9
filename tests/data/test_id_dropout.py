"""Train-time id dropout (tables[].id_dropout): rate, determinism for resume, eval untouched, text kept."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from recsys.data.loader import BatchLoader
from recsys.spec.loader import load_spec

SPEC = Path(__file__).resolve().parents[2] / "feature_specs" / "movielens.yaml"


def _spec(ml_spec, rate: float):
    return load_spec(SPEC, [f"data.prepared_dir={ml_spec.data.prepared_dir}", f"tables.item.id_dropout={rate}"])


def _first(spec, split="train", **kw):
    loader = BatchLoader(spec, split, 512, seed=3, **kw)
    return next(iter(loader))


def test_dropout_rate_and_text_kept(ml_spec):
    plain, dropped = _first(_spec(ml_spec, 0.0)), _first(_spec(ml_spec, 0.3))
    a, b = plain.sparse.to_dict()["item_id"].values(), dropped.sparse.to_dict()["item_id"].values()
    zeroed = (b == 0) & (a != 0)
    assert 0.2 < zeroed.float().mean() < 0.4  # ~30% of ids, within sampling noise of 512 rows
    assert ((b == a) | zeroed).all()  # ids are only ever replaced by row 0
    assert all((plain.text[k] == dropped.text[k]).all() for k in plain.text)  # the text still carries the item
    assert (plain.sparse.to_dict()["user_id"].values() == dropped.sparse.to_dict()["user_id"].values()).all()


def test_dropout_is_deterministic_and_resumes(ml_spec):
    spec = _spec(ml_spec, 0.3)
    full = [b.sparse.values().clone() for _, b in zip(range(3), BatchLoader(spec, "train", 256, seed=5))]
    resumed = BatchLoader(spec, "train", 256, seed=5)
    resumed.load_state_dict(dict(resumed.state_dict(), batches_yielded=2))
    assert np.array_equal(next(iter(resumed)).sparse.values().numpy(), full[2].numpy())


def test_eval_splits_are_never_dropped(ml_spec):
    a = _first(_spec(ml_spec, 0.0), "valid").sparse.values()
    b = _first(_spec(ml_spec, 0.5), "valid").sparse.values()
    assert (a == b).all()
