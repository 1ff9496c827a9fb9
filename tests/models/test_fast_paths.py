"""The throughput work must not change what the model computes: batched-product history pooling equals the plain
weighted sums, the pooled-output chunk layout matches TorchRec's KeyedTensor, and bf16 dense compute stays close to
fp32 while keeping fp32 outputs and weights."""
from __future__ import annotations

import itertools

import pytest
import torch

from recsys.models.build import build_model
from recsys.models.attention import target_attention
from recsys.models.encoding import sequence_pool
from recsys.models.model import TrainTask


def _reference_attention_and_mean(scores, values, mask):
    m = mask.to(values.dtype)
    att = torch.softmax(scores.masked_fill(~mask, -1e4), dim=1) * m
    mean_w = m / m.sum(1, keepdim=True).clamp_min(1.0)
    return (att.unsqueeze(-1) * values).sum(1), (mean_w.unsqueeze(-1) * values).sum(1)


def _history(seed, batch=32, length=6, dim=4, empty=3):
    g = torch.Generator().manual_seed(seed)
    hist = torch.randn(batch, length, dim, generator=g, dtype=torch.float64)
    query = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    lengths = torch.randint(0, length + 1, (batch,), generator=g)
    lengths[:empty] = 0
    lengths[empty] = length  # a full row too
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    return hist, query, mask, g


def test_sequence_pool_equals_multiply_and_sum():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(64, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(sequence_pool(w, x), (w.unsqueeze(-1) * x.unsqueeze(1)).sum(2))
    up = torch.randn(64, 3, 5, generator=g, dtype=torch.float64)
    fast = torch.autograd.grad((sequence_pool(w, x) * up).sum(), (w, x))
    slow = torch.autograd.grad(((w.unsqueeze(-1) * x.unsqueeze(1)).sum(2) * up).sum(), (w, x))
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_target_attention_matches_multiply_and_sum_and_empty_histories_pool_to_zero(fused):
    hist, query, mask, _ = _history(1)
    raw, attended, mean = target_attention(hist, query, mask, 0.5, fused=fused)
    torch.testing.assert_close(raw, (hist * query.unsqueeze(1)).sum(-1))
    ref_att, ref_mean = _reference_attention_and_mean(raw * 0.5, hist, mask)
    torch.testing.assert_close(attended, ref_att)
    torch.testing.assert_close(mean, ref_mean)
    assert attended[:3].abs().max() == 0 and mean[:3].abs().max() == 0


@pytest.mark.parametrize("needs", ["all", "hist_frozen", "scale_only"])
def test_target_attention_hand_written_backward_equals_autograd(needs):
    """The fused backward against autograd through the plain ops, for every input that may need a gradient (an
    id history trains hist and query; a frozen text history trains only the temperature), including a gradient
    that reaches the raw dot products directly (the interactions use them)."""
    hist, query, mask, g = _history(2)
    scale = torch.tensor(0.7, dtype=torch.float64)
    hist.requires_grad_(needs == "all")
    query.requires_grad_(needs != "scale_only")
    scale.requires_grad_(True)
    up_raw = torch.randn(mask.shape, generator=g, dtype=torch.float64)
    up_att = torch.randn(hist.shape[0], hist.shape[2], generator=g, dtype=torch.float64)
    up_mean = torch.randn(hist.shape[0], hist.shape[2], generator=g, dtype=torch.float64)
    inputs = [t for t in (hist, query, scale) if t.requires_grad]

    def grads(fused):
        raw, att, mean = target_attention(hist, query, mask, scale, fused=fused)
        loss = (raw * up_raw).sum() + (att * up_att).sum() + (mean * up_mean).sum() + raw.amax(1).sum()
        return torch.autograd.grad(loss, inputs)

    for a, b in zip(grads(True), grads(False)):
        torch.testing.assert_close(a, b)
    # and against finite differences, perturbing exactly the inputs that need a gradient
    names = [n for n, t in (("hist", hist), ("query", query), ("scale", scale)) if t.requires_grad]

    def fn(*xs):
        given = {"hist": hist, "query": query, "scale": scale}
        given.update(zip(names, xs))
        return target_attention(given["hist"], given["query"], mask, given["scale"])

    assert torch.autograd.gradcheck(fn, tuple(inputs))


def _reordered(real, order):
    """An EBC stand-in returning `real`'s output with its keys in another order (as a sharded EBC does: by
    sharding type and rank, not by table config)."""
    from torchrec.sparse.jagged_tensor import KeyedTensor

    class Reordered(torch.nn.Module):
        def forward(self, kjt):
            d = real(kjt).to_dict()
            keys = order(list(d))
            return KeyedTensor.from_tensor_list(keys, [d[k] for k in keys])

    return Reordered()


def _seq_moved_to_front(keys):
    seq = [k for k in keys if "__pos" in k]
    return seq + [k for k in keys if k not in seq]


@pytest.mark.parametrize("order", [_seq_moved_to_front, lambda keys: list(reversed(keys))],
                         ids=["positions_side_by_side", "positions_reversed"])
def test_model_output_does_not_depend_on_the_embedding_key_order(tiny_spec, order):
    """A sharded EBC returns its keys in its own order: the features must be read by key, whatever the order
    (positions side by side -> one [B, L, D] view; scattered -> stacked). Outputs must be bit-identical."""
    from recsys.data.loader import BatchLoader

    spec = tiny_spec()
    torch.manual_seed(0)
    model = build_model(spec, torch.device("cpu"))
    batch = next(iter(BatchLoader(spec, "train", batch_size=64, shuffle=True, seed=5)))
    model.eval()
    with torch.no_grad():
        expected = model(batch).logits
        real = model.l0.ebc
        model.l0.ebc = _reordered(real, order)
        got = model(batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    names = model.l0.id_layout._cache[tuple(order(real(batch.sparse).keys()))][0]
    seq = next(f.name for f in spec.features if f.kind == "sequence")
    assert (seq in names) == (order is _seq_moved_to_front)  # the view path is the one taken when it can be


def test_embedding_output_missing_a_key_is_a_clear_error(tiny_spec):
    from recsys.data.loader import BatchLoader

    spec = tiny_spec()
    model = build_model(spec, torch.device("cpu"))
    model.l0.ebc = _reordered(model.l0.ebc, lambda keys: [k for k in keys if k != "user_id"])
    batch = next(iter(BatchLoader(spec, "train", batch_size=8, shuffle=False)))
    with pytest.raises(RuntimeError, match="lacks key"):
        model(batch)


def test_bf16_dense_compute_is_close_to_fp32_with_fp32_outputs_and_weights(tiny_spec):
    from recsys.data.loader import BatchLoader

    # fp32 named explicitly: `auto` (the default) is bf16 itself on a CPU with native bf16. Dropout off: the
    # precision applies to training steps, so the two models are compared in train mode.
    fp32, bf16 = (tiny_spec(f"train.precision={p}", "model.dropout=0") for p in ("fp32", "bf16"))
    torch.manual_seed(0)
    task32 = TrainTask(build_model(fp32, torch.device("cpu")), fp32)
    task16 = TrainTask(build_model(bf16, torch.device("cpu")), bf16)
    task16.load_state_dict(task32.state_dict())
    batch = next(iter(BatchLoader(fp32, "train", batch_size=256, shuffle=True, seed=3)))
    with torch.no_grad():
        out32, out16 = task32.model(batch), task16.model(batch)
        assert out16.logits.dtype == out16.representation.dtype == torch.float32
        assert not torch.equal(out16.logits, out32.logits)  # bf16 really ran
        torch.testing.assert_close(out16.logits, out32.logits, rtol=0, atol=0.05)
        task32.eval(), task16.eval()  # evaluation and serving run fp32 whatever the training precision
        assert torch.equal(task16.model(batch).logits, task32.model(batch).logits)
    task16.train()
    loss, _ = task16(batch)
    loss.backward()
    for name, p in itertools.chain(task16.named_parameters()):
        assert p.dtype == torch.float32, name
        if p.grad is not None:
            assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


def test_mean_pooled_history_is_one_key_holding_the_history_mean(tiny_spec):
    """`pooling: mean` (the public baselines' history): one multi-valued KJT key per sequence, pooled by the
    EmbeddingBagCollection, and the model reads the mean of the history's item vectors."""
    from recsys.data.loader import BatchLoader

    att, mean = tiny_spec(), tiny_spec("features.hist_items.pooling=mean")
    b_att = next(iter(BatchLoader(att, "train", batch_size=64, shuffle=False)))
    b_mean = next(iter(BatchLoader(mean, "train", batch_size=64, shuffle=False)))
    assert "hist_items__pos0" in b_att.sparse.keys() and "hist_items__pos0" not in b_mean.sparse.keys()
    hist = b_mean.sparse["hist_items"]
    lens = b_mean.seq_lengths["hist_items"]
    torch.testing.assert_close(hist.lengths(), lens)
    assert lens.max() > 1
    # the same ids as the per-position keys, row by row
    per_pos = [b_att.sparse[f"hist_items__pos{i}"] for i in range(5)]
    for r in range(8):
        ids = [int(k.values()[k.offsets()[r]]) for k in per_pos if k.lengths()[r] > 0]
        start = int(hist.offsets()[r])
        assert hist.values()[start:start + int(lens[r])].tolist() == ids
    model, seen = _projection_input(mean, b_mean, "user_id")
    table = model.l0.ebc.embedding_bags["item"].weight.detach()
    with torch.no_grad():
        expected = torch.stack([table[hist.values()[hist.offsets()[r]:hist.offsets()[r + 1]]].mean(0)
                                if lens[r] > 0 else torch.zeros(table.shape[1]) for r in range(64)])
    user_dim = {t.name: t.dim for t in mean.tables}["user"]
    torch.testing.assert_close(seen[:, user_dim:user_dim + table.shape[1]], expected)
    assert model.l0.num_interactions == build_model(att, torch.device("cpu")).l0.num_interactions - 2


def _projection_input(spec, batch, proj: str):
    """A freshly built model (seed 0, eval) run on `batch`, and the input its L0 projection `proj` got (the
    aspect's concatenated parts)."""
    torch.manual_seed(0)
    model = build_model(spec, torch.device("cpu"))
    seen = {}
    model.l0.proj[proj].register_forward_hook(lambda m, inp, out: seen.update(x=inp[0]) and None)
    model.eval()
    with torch.no_grad():
        model(batch)
    return model, seen["x"]


@pytest.mark.parametrize("pooling", ["mean", "sum"])
def test_multi_valued_sparse_feature_is_the_mean_or_sum_of_its_rows(tiny_spec, pooling):
    """Every embedding table sum-pools (FBGEMM's CPU mean pooling is several times slower) and the model divides a
    mean table's multi-valued bags by their lengths: the model still reads the mean (or, for a sum table, the
    sum) of a bag's rows, and an empty bag reads zero."""
    from recsys.data.loader import BatchLoader
    from recsys.models.tables import embedding_bag_configs
    from torchrec.modules.embedding_configs import PoolingType

    spec = tiny_spec(f"tables.genre.pooling={pooling}")
    assert {c.pooling for c in embedding_bag_configs(spec, {t.name: 50 for t in spec.tables})} == {PoolingType.SUM}
    batch = next(iter(BatchLoader(spec, "train", batch_size=64, shuffle=False)))
    genres = batch.sparse["item_genres"]
    assert genres.lengths().max() > 1
    model, seen = _projection_input(spec, batch, "item_sparse")
    table = model.l0.ebc.embedding_bags["genre"].weight.detach()
    expected = []
    for r in range(64):
        rows = table[genres.values()[genres.offsets()[r]:genres.offsets()[r + 1]]]
        pooled = rows.sum(0) if pooling == "sum" or len(rows) == 0 else rows.mean(0)
        expected.append(pooled if len(rows) else torch.zeros(table.shape[1]))
    torch.testing.assert_close(seen[:, :table.shape[1]], torch.stack(expected))


def test_domain_heads_product_equals_the_per_sample_row_lookup():
    """The heads score every domain with one [B, H] x [H, K] product and pick each sample's column: the same
    values and gradients as the per-sample `(h * w[domain]).sum(1) + b[domain] + (x * wide[domain]).sum(1)`."""
    from recsys.models.towers import DomainHeads

    g = torch.Generator().manual_seed(0)
    heads = DomainHeads(8, 3, 4).double()
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    h = torch.randn(50, 8, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(50, 3, generator=g, dtype=torch.float64, requires_grad=True)
    domain = torch.randint(0, 4, (50,), generator=g)
    up = torch.randn(50, generator=g, dtype=torch.float64)

    def plain():
        return (h * heads.w[domain]).sum(1) + heads.b[domain] + (x * heads.wide[domain]).sum(1)

    inputs = [h, x, *heads.parameters()]
    torch.testing.assert_close(heads(h, x, domain), plain())
    for a, b in zip(torch.autograd.grad((heads(h, x, domain) * up).sum(), inputs),
                    torch.autograd.grad((plain() * up).sum(), inputs)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", ["domain", "cls", "mean"])
def test_a_single_aspect_gate_is_the_aspect_itself(mode):
    """A side with one aspect skips its gate: the softmax (or mean) of a single weight is exactly 1, so the fused
    vector is the aspect, in every fusion mode."""
    from recsys.models.encoding import weighted_sum
    from recsys.models.fusion import AspectGate

    g = torch.Generator().manual_seed(1)
    gate = AspectGate(mode, 3, 8)
    with torch.no_grad():
        for p in gate.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    aspects = torch.randn(20, 1, 8, generator=g)
    domain = torch.randint(0, 3, (20,), generator=g)
    fused, w = gate(aspects, domain)
    torch.testing.assert_close(w, gate.weights(aspects, domain))
    torch.testing.assert_close(fused, weighted_sum(gate.weights(aspects, domain), aspects))
    assert torch.equal(fused, aspects[:, 0])
