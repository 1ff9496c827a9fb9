"""Fine-tuning (issue 5): a domain added to a pretrained checkpoint by editing the YAML only, frozen levels stay
bit-identical, a freeze prefix that matches nothing fails clearly, and unseen items are scored through their text."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
ML = REPO / "feature_specs" / "movielens.yaml"
HELD_OUT = "ml_comedy"


def _job(name: str, spec: Path, sets, *args, env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "jobs" / name), "--spec", str(spec), *[a for s in sets for a in ("--set", s)],
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


@pytest.fixture(scope="module")
def runs(tiny_overrides, tmp_path_factory):
    """Pretrain without the comedy domain, then fine-tune with the full spec (frozen l0,l1)."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    tmp = tmp_path_factory.mktemp("finetune")
    raw = yaml.safe_load(ML.read_text())
    raw["domains"] = [d for d in raw["domains"] if d["name"] != HELD_OUT]  # the YAML edit: one domain fewer
    raw["data"]["ignore_domains"] = [HELD_OUT]
    raw["data"]["raw_dir"] = str(REPO / raw["data"]["raw_dir"])
    pre_spec = tmp / "movielens_pre.yaml"
    pre_spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    pre, ft = tmp / "pre", tmp / "ft"
    # a spec of its own has a resolved schema of its own: prepare it first, as a user does (cheap: the rows and
    # vocabularies of the shared prepared folder are reused)
    res = _job("prepare_data.py", pre_spec, tiny_overrides(f"train.output_dir={pre}"), env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    res = _job("pretrain.py", pre_spec, tiny_overrides(f"train.output_dir={pre}", "train.max_steps=30"), env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    preds = tmp / "ft_test.npy"
    res = _job("finetune.py", ML, tiny_overrides(f"train.output_dir={ft}", "train.max_steps=15", "train.lr=0.01"),
               "--from", str(pre), "--freeze", "l0,l1", "--split", "test", "--save-predictions", str(preds), env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return {"pre": pre, "ft": ft, "preds": preds, "stdout": res.stdout, "env": env, "tmp": tmp}


@pytest.mark.slow
def test_added_domain_gets_predictions(runs, tiny_spec):
    spec = tiny_spec()
    test = pq.read_table(Path(spec.data.prepared_dir) / "test.parquet", columns=["domain"])
    dom = test["domain"].to_numpy(zero_copy_only=False).astype(str)
    scores = np.load(runs["preds"])
    assert len(scores) == len(dom) and (dom == HELD_OUT).sum() > 100
    assert np.isfinite(scores[dom == HELD_OUT]).all() and np.isfinite(scores).all()
    assert np.std(scores[dom == HELD_OUT]) > 1e-4  # real scores, not a constant
    assert HELD_OUT in runs["stdout"]  # the metrics table reports the new domain


@pytest.mark.slow
def test_frozen_levels_are_bit_identical(runs):
    from recsys.train import checkpoint
    from recsys.train.transfer import load_pretrained_state

    old_spec, old = load_pretrained_state(checkpoint.best_or_latest(runs["pre"]))
    new_spec, new = load_pretrained_state(checkpoint.best_or_latest(runs["ft"]))
    assert [d.name for d in old_spec.domains] == ["ml_action", "ml_drama", "ml_tag_search"]
    assert len(new_spec.domains) == 4
    old_names, new_names = [d.name for d in old_spec.domains], [d.name for d in new_spec.domains]
    frozen = [k for k in new if k.startswith(("model.l0.", "model.l1."))]
    assert any(".embedding_bags." in k for k in frozen) and any(k.startswith("model.l1.") for k in frozen)
    from recsys.train.transfer import rows_pretraining_updated

    rows = {k.split(".")[-2]: v.shape[0] for k, v in old.items() if ".embedding_bags." in k}
    seen = rows_pretraining_updated(old_spec, rows)
    fresh_changed = 0
    for k in frozen:
        a, b = old[k], new[k]
        if ".embedding_bags." in k:  # rows pretraining updated are frozen; rows it never looked up may train
            s = torch.from_numpy(seen[k.split(".")[-2]])
            assert torch.equal(a[s], b[s]), k
            fresh_changed += int((a[~s] != b[~s]).any(dim=1).sum())
        elif a.shape == b.shape:
            assert torch.equal(a, b), k
        else:  # per-domain rows (domain embeddings of the gates): the pretrained domains keep theirs exactly
            assert a.shape[0] == len(old_names) and b.shape[0] == len(new_names), k
            for i, name in enumerate(old_names):
                assert torch.equal(a[i], b[new_names.index(name)]), (k, name)
    trained = [k for k in new if k.startswith("model.l2.") and new[k].shape == old[k].shape
               and not torch.equal(new[k], old[k])]
    assert trained, "L2 did not change: the fine-tuning did not train"
    # users/items of the held-out domain that pretraining never looked up were trained, not left random
    assert fresh_changed > 0


@pytest.mark.slow
def test_freeze_prefix_matching_nothing_fails_clearly(runs, tiny_overrides):
    res = _job("finetune.py", ML, tiny_overrides(f"train.output_dir={runs['tmp'] / 'typo'}"), "--from",
               str(runs["pre"]), "--freeze", "l0,l9", env=runs["env"])
    assert res.returncode == 2, res.stderr[-2000:]
    assert "'l9'" in res.stderr and "matches no parameter" in res.stderr
    assert "Traceback" not in res.stderr


def _with_item_row(batch, feature: str, row: int):
    """The batch with every id of one KJT key replaced by `row` (0 = an id the vocabulary never saw)."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    kjt = batch.sparse
    keys, lengths, values = kjt.keys(), kjt.lengths(), kjt.values().clone()
    per_key = lengths.view(len(keys), -1).sum(1)
    start = int(per_key[: keys.index(feature)].sum())
    values[start:start + int(per_key[keys.index(feature)])] = row
    sparse = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths,
                                                 weights=kjt.weights_or_none())
    return dataclasses.replace(batch, sparse=sparse)


@pytest.mark.slow
def test_unseen_items_are_scored_through_text(runs):
    from recsys.data.loader import BatchLoader
    from recsys.models.build import build_model
    from recsys.models.model import TrainTask
    from recsys.train import checkpoint
    from recsys.train.transfer import load_pretrained_state

    spec, state = load_pretrained_state(checkpoint.best_or_latest(runs["ft"]))
    task = TrainTask(build_model(spec, torch.device("cpu")), spec)
    task.load_state_dict(state)
    task.eval()
    batch = next(iter(BatchLoader(spec, "test", batch_size=64, shuffle=False, eval_mode=True)))
    unseen = _with_item_row(batch, "item_id", 0)
    assert int(batch.text["item_text"].gt(0).sum()) == 64  # every candidate has a text row
    other = dataclasses.replace(unseen, text=dict(unseen.text, item_text=batch.text["item_text"].roll(1)))
    with torch.no_grad():
        s_seen = task.model(batch).logits
        s_unseen = task.model(unseen).logits
        s_other = task.model(other).logits
        s_again = task.model(_with_item_row(batch, "item_id", 0)).logits
    assert not torch.allclose(s_seen, s_unseen)  # the id really was replaced
    torch.testing.assert_close(s_again, s_unseen, rtol=0, atol=0)
    moved = (s_other - s_unseen).abs() > 1e-5
    assert moved.float().mean() > 0.5, "an unseen item's score must depend on its text"
