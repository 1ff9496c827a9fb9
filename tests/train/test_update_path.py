"""FBGEMM's two CPU row-wise Adagrad backward paths (`recsys.train.update_path`): the loop path, taken through an
empty pad feature per one-feature table, trains exactly what the JIT path trains; the pad features stay inside
the sharded module (batches, checkpoints and outputs never see them); `auto` is decided by the start-up probe,
an explicit setting is honoured."""
from __future__ import annotations

import itertools

import pytest
import torch


def _train(spec, group, steps: int):
    """(per-step losses, final state dict, trainer) of `steps` steps from a seeded model."""
    from recsys.data.loader import BatchLoader
    from recsys.train.loop import Trainer
    from recsys.train.step import make_train_step

    torch.manual_seed(0)
    trainer = Trainer(spec, group, for_training=False)
    trainer.dmp.train()
    step = make_train_step(trainer.dmp, trainer.finite_grad_guard(), group.device, group.world_size)
    batches = itertools.islice(iter(BatchLoader(spec, "train", spec.train.batch_size, seed=0,
                                                kjt_order=trainer.kjt_order)), steps)
    losses = [float(step.progress(batches)[0]) for _ in range(steps)]
    state = {k: (v.local_shards()[0].tensor if hasattr(v, "local_shards") else v).detach().clone()
             for k, v in trainer.dmp.state_dict().items()}
    return losses, state, trainer


def test_the_loop_path_trains_what_the_jit_path_trains(group, tiny_spec, tmp_path):
    from recsys.train.sharding import _l0_of

    runs = {}
    for path in ("jit", "loop"):
        spec = tiny_spec(f"train.output_dir={tmp_path / path}", "train.batch_size=256",
                         f"train.embedding_update_path={path}")
        runs[path] = _train(spec, group, 6)
    (jit_losses, jit_state, jit_trainer), (loop_losses, loop_state, loop_trainer) = runs["jit"], runs["loop"]
    assert jit_trainer.loop_path_tables == [] and loop_trainer.loop_path_tables  # MovieLens has one-feature tables
    keys = {p: _l0_of(t.dmp).ebc.input_dist.keys for p, t in (("jit", jit_trainer), ("loop", loop_trainer))}
    pads = [k for k in keys["loop"] if k.endswith("__update_pad")]
    assert sorted(pads) == sorted(f"{t}__update_pad" for t in loop_trainer.loop_path_tables)
    assert not [k for k in keys["jit"] if k.endswith("__update_pad")]
    # the batches never carry the pads: the loader's order is the same for both
    assert jit_trainer.kjt_order == loop_trainer.kjt_order
    # same state-dict keys (a checkpoint of one path loads into the other), same training to rounding
    assert jit_state.keys() == loop_state.keys()
    torch.testing.assert_close(torch.tensor(loop_losses), torch.tensor(jit_losses), rtol=1e-5, atol=1e-6)
    updated = 0
    for k in jit_state:
        torch.testing.assert_close(loop_state[k], jit_state[k], rtol=1e-4, atol=1e-6, msg=k)
        updated += "embedding_bags" in k
    assert updated, "the tables' weights were compared"


def test_a_batch_in_any_key_order_gets_the_pads_and_scores_alike(group, tiny_spec, tmp_path):
    from recsys.data.loader import BatchLoader
    from recsys.train.loop import Trainer

    spec = tiny_spec(f"train.output_dir={tmp_path}", "train.embedding_update_path=loop")
    torch.manual_seed(0)
    trainer = Trainer(spec, group, for_training=False)
    ordered = next(iter(BatchLoader(spec, "valid", 64, shuffle=False, kjt_order=trainer.kjt_order)))
    plain = next(iter(BatchLoader(spec, "valid", 64, shuffle=False)))
    last = next(iter(BatchLoader(spec, "valid", 37, shuffle=False)))  # another batch size: its own pad lengths
    trainer.dmp.eval()
    with torch.no_grad():
        a = trainer.dmp(plain)[1][1]
        b = trainer.dmp(ordered)[1][1]
        c = trainer.dmp(last)[1][1]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(c, a[:37], rtol=1e-6, atol=1e-6)


def test_pad_features_go_to_the_chosen_one_feature_tables_only():
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    from recsys.train.update_path import pad_key, single_feature_tables, with_pad_features

    configs = [EmbeddingBagConfig(name="item", embedding_dim=8, num_embeddings=10, feature_names=["a", "b"]),
               EmbeddingBagConfig(name="user", embedding_dim=8, num_embeddings=10, feature_names=["u"]),
               EmbeddingBagConfig(name="brand", embedding_dim=8, num_embeddings=10, feature_names=["br"])]
    assert single_feature_tables(configs) == ["user", "brand"]
    padded = with_pad_features(configs, ["user"])
    assert [c.feature_names for c in padded] == [["a", "b"], ["u", pad_key("user")], ["br"]]
    assert [c.num_embeddings for c in padded] == [10, 10, 10]


def _configs():
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    return [EmbeddingBagConfig(name="item", embedding_dim=8, num_embeddings=500, feature_names=["a", "b"]),
            EmbeddingBagConfig(name="user", embedding_dim=16, num_embeddings=5000, feature_names=["u"]),
            EmbeddingBagConfig(name="cat", embedding_dim=8, num_embeddings=90, feature_names=["c"])]


def test_auto_moves_the_large_one_feature_tables_where_the_probe_says_so(monkeypatch):
    from recsys.train import update_path as up

    assert up.ProbeResult(jit_ms=2.5, loop_ms=0.7).chosen == "loop"
    assert up.ProbeResult(jit_ms=1.2, loop_ms=0.7).chosen == "jit"  # within the margin: the default kernels
    monkeypatch.setattr(up, "probe", lambda: up.ProbeResult(jit_ms=3.0, loop_ms=1.0))
    tables, why = up.resolve("auto", "cpu", _configs(), 256)
    assert tables == ["user"] and "3.00 / 1.00 ms" in why  # cat (90 rows) has fewer rows than a batch's bags
    assert "cat fewer rows than a batch's 256 bags: jit" in why
    monkeypatch.setattr(up, "probe", lambda: up.ProbeResult(jit_ms=1.0, loop_ms=1.0))
    assert up.resolve("auto", "cpu", _configs(), 256)[0] == []
    monkeypatch.setattr(up, "probe", lambda: pytest.fail("no table large enough: no probe"))
    assert up.resolve("auto", "cpu", _configs(), 8192)[0] == []


def test_a_resumed_run_takes_its_recorded_choice_and_checks_the_file(tmp_path, caplog):
    from recsys.train import update_path as up

    record = tmp_path / "embedding_update_path.json"
    up.write_record(record, ["user"], "why")
    assert up.read_record(record, _configs()) == ["user"]
    for bad in ('{"loop_path_tables": ["item"]}', '{"loop_path_tables": "user"}', "not json", "{}"):
        record.write_text(bad)  # a shared table, a wrong type, garbage: never trusted, probed again
        assert up.read_record(record, _configs()) is None
    assert "not a record of this model's one-feature tables" in caplog.text
    assert up.read_record(tmp_path / "absent.json", _configs()) is None


def test_explicit_settings_are_honoured_without_a_probe(monkeypatch):
    from recsys.train import update_path as up

    monkeypatch.setattr(up, "probe", lambda: pytest.fail("an explicit setting runs no probe"))
    assert up.resolve("jit", "cpu", _configs(), 256)[0] == []
    assert up.resolve("loop", "cpu", _configs(), 256)[0] == ["user", "cat"]
    assert up.resolve("auto", "cuda", _configs(), 256)[0] == []  # FBGEMM's CPU paths only


def test_the_probe_times_both_paths_on_this_machine():
    from recsys.train.update_path import probe_table

    r = probe_table(rows=2000, dim=8, bag=3, batch=128, repeat=2)
    assert r.jit_ms > 0 and r.loop_ms > 0 and r.chosen in ("jit", "loop")
