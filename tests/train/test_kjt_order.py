"""Batches assembled in the key order the sharded tables read (`recsys.data.features.KjtOrder`, set up by
`recsys.train.sharding.pin_kjt_order`): the same features as the spec's order, the same scores, no permute inside
TorchRec's input distribution; and a batch in any other order still reaches every table with its own features."""
from __future__ import annotations

from pathlib import Path

import torch

ML_SPEC = Path(__file__).resolve().parents[2] / "feature_specs" / "movielens.yaml"


def test_block_order_accepts_only_reorderings_of_whole_features():
    from recsys.data.features import block_order

    blocks = {"a": ["a"], "s": ["s__pos0", "s__pos1"], "b": ["b"]}
    assert block_order(["s__pos0", "s__pos1", "b", "a"], blocks) == ["s", "b", "a"]
    assert block_order(["a", "b", "s__pos0", "s__pos1"], blocks) == ["a", "b", "s"]
    assert block_order(["a", "s__pos1", "s__pos0", "b"], blocks) is None  # positions out of order
    assert block_order(["a", "s__pos0", "b", "s__pos1"], blocks) is None  # a feature split
    assert block_order(["a", "b"], blocks) is None  # a feature missing
    assert block_order(["a", "a", "s__pos0", "s__pos1", "b"], blocks) is None  # a feature twice (column-wise shards)


def _per_key(kjt):
    return {k: (v.values().tolist(), v.lengths().tolist()) for k, v in kjt.to_dict().items()}


def test_batches_in_the_sharded_order_score_as_in_the_spec_order(llm_overrides, group, tmp_path):
    from recsys.data.features import kjt_keys, sparse_key_blocks, text_key_blocks
    from recsys.data.loader import BatchLoader
    from recsys.spec.loader import load_spec
    from recsys.train.loop import Trainer

    spec = load_spec(ML_SPEC, llm_overrides(f"train.output_dir={tmp_path}"))
    trainer = Trainer(spec, group, for_training=False)
    order = trainer.kjt_order
    assert order.sparse is not None and order.text is not None
    sparse_keys = [k for n in order.sparse for k in sparse_key_blocks(spec)[n]]
    text_keys = [k for n in order.text for k in text_key_blocks(spec)[n]]
    # MovieLens' spec order is not the shardings' (else this test would show nothing)
    assert sparse_keys != kjt_keys(spec)

    ordered = next(iter(BatchLoader(spec, "valid", 64, shuffle=False, kjt_order=order)))
    plain = next(iter(BatchLoader(spec, "valid", 64, shuffle=False)))
    assert ordered.sparse.keys() == sparse_keys
    assert ordered.text_ids.keys() == text_keys
    assert _per_key(ordered.sparse) == _per_key(plain.sparse)
    assert _per_key(ordered.text_ids) == _per_key(plain.text_ids)

    trainer.dmp.eval()
    with torch.no_grad():
        first = trainer.dmp(ordered)[1][1]
        other = trainer.dmp(plain)[1][1]  # spec order after the sharded order: brought to it, not misread
        again = trainer.dmp(ordered)[1][1]
    assert torch.equal(first, other) and torch.equal(first, again)
    l0 = trainer.dmp.module.model.l0
    assert not l0.ebc._has_features_permute and not l0.text_ebc._has_features_permute


def test_a_batch_in_the_spec_order_first_is_read_right_too(llm_overrides, group, tmp_path):
    """TorchRec fixes its permutation at the first KJT it sees: a spec-order batch first, then a sharded-order one,
    must score as the sharded-order one alone."""
    from recsys.data.loader import BatchLoader
    from recsys.spec.loader import load_spec
    from recsys.train.loop import Trainer

    spec = load_spec(ML_SPEC, llm_overrides(f"train.output_dir={tmp_path}"))
    scores = []
    for first in ("plain", "ordered"):
        torch.manual_seed(0)
        trainer = Trainer(spec, group, for_training=False)
        batches = {"plain": next(iter(BatchLoader(spec, "valid", 64, shuffle=False))),
                   "ordered": next(iter(BatchLoader(spec, "valid", 64, shuffle=False, kjt_order=trainer.kjt_order)))}
        trainer.dmp.eval()
        with torch.no_grad():
            trainer.dmp(batches[first])
            scores.append(trainer.dmp(batches["ordered"])[1][1])
    assert torch.equal(scores[0], scores[1])
