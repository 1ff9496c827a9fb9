"""The model on its own (plain CPU modules, no DistributedModelParallel): every tower x fusion trains, the level
structure fine-tuning relies on, the cross-domain regulariser, and per-domain aspect gates."""
from __future__ import annotations

import itertools
import math
from typing import List

import numpy as np
import pytest
import torch

from recsys.models.build import build_model
from recsys.models.model import TrainTask
from recsys.models.regularizers import divergence, js_divergence, js_regularizer, mmd_regularizer

TOWERS = ["sr_foundation", "shared_bottom", "mmoe", "ple", "star"]
FUSIONS = ["domain", "mean", "cls"]


@pytest.fixture(scope="module")
def batches(tiny_spec):
    """Four fixed shuffled train batches of 128 rows (all domains present) and one held-out batch."""
    from recsys.data.loader import BatchLoader

    loader = BatchLoader(tiny_spec(), "train", batch_size=128, shuffle=True, seed=7)
    out = list(itertools.islice(iter(loader), 5))
    for b in out:
        assert len(torch.unique(b.domain)) == 4, "every fixture batch must hold all four domains"
    return out


def _task(spec, seed: int = 0) -> TrainTask:
    torch.manual_seed(seed)
    return TrainTask(build_model(spec, torch.device("cpu")), spec)


def _train(task: TrainTask, batches, steps: int, lr: float = 1e-2) -> List[float]:
    opt = torch.optim.Adam(task.parameters(), lr=lr)
    task.train()
    losses = []
    for i in range(steps):
        loss, _ = task(batches[i % len(batches)])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("tower,fusion", list(itertools.product(TOWERS, FUSIONS)))
def test_every_tower_and_fusion_trains(tiny_spec, batches, tower, fusion):
    # two experts: the point is that every combination trains, not expert capacity
    spec = tiny_spec(f"model.tower={tower}", f"model.fusion={fusion}", "model.num_experts=2")
    task = _task(spec)
    losses = _train(task, batches[:1], steps=10)  # fitting one batch: the loss must go down, whatever the noise
    assert all(math.isfinite(x) for x in losses), losses
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.01, losses
    assert losses[-1] < losses[0], losses
    loss, (_, logits, labels, domain, reg) = task(batches[4])
    assert logits.shape == labels.shape == domain.shape and torch.isfinite(logits).all() and torch.isfinite(reg)


def test_children_are_the_three_levels(tiny_spec):
    model = build_model(tiny_spec("model.fusion=cls", "model.tower=ple"), torch.device("cpu"))
    assert [n for n, _ in model.named_children()] == ["l0", "l1", "l2"]
    names = [n for n, _ in model.named_parameters()] + list(model.state_dict())
    assert names and all(n.split(".")[0] in ("l0", "l1", "l2") for n in names), names
    for level in ("l0", "l1", "l2"):  # each level really holds trainable weights
        assert any(n.startswith(level + ".") for n, _ in model.named_parameters())
    assert any(".embedding_bags." in n and n.startswith("l0.") for n in names)  # tables live in L0


# ------------------------------------------------------------------------------------------------ regulariser
def test_js_divergence_properties():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(5, 16, generator=g), dim=1)
    q = torch.softmax(torch.randn(5, 16, generator=g) * 3, dim=1)
    assert torch.allclose(js_divergence(p, p), torch.zeros(5), atol=1e-6)
    assert torch.allclose(js_divergence(p, q), js_divergence(q, p), atol=1e-7)
    assert (js_divergence(p, q) > 1e-3).all()
    assert (js_divergence(p, q) <= math.log(2) + 1e-6).all()
    disjoint_a = torch.tensor([[1.0, 0.0]])
    disjoint_b = torch.tensor([[0.0, 1.0]])
    assert js_divergence(disjoint_a, disjoint_b).item() == pytest.approx(math.log(2), abs=1e-5)  # the maximum


def test_js_and_mmd_regularisers_on_domains():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(64, 8, generator=g)
    domain = torch.arange(64) % 2
    same = torch.cat([z[:32], z[:32]])  # both domains hold exactly the same samples
    dom_same = torch.cat([torch.zeros(32, dtype=torch.long), torch.ones(32, dtype=torch.long)])
    assert js_regularizer(same, dom_same, 3).item() == pytest.approx(0.0, abs=1e-6)
    assert mmd_regularizer(same, dom_same, 3).item() == pytest.approx(0.0, abs=1e-6)
    shifted = z + 3.0 * domain.unsqueeze(1).float() * torch.linspace(-1, 1, 8)
    js, mmd = js_regularizer(shifted, domain, 3), mmd_regularizer(shifted, domain, 3)
    assert js.item() > 0.01 and mmd.item() > 0.01
    swapped = 1 - domain  # symmetric in the domains
    assert js_regularizer(shifted, swapped, 3).item() == pytest.approx(js.item(), rel=1e-5)
    assert mmd_regularizer(shifted, swapped, 3).item() == pytest.approx(mmd.item(), rel=1e-5)
    one = torch.zeros(64, dtype=torch.long)  # a single domain present: nothing to compare, still differentiable
    zz = shifted.clone().requires_grad_(True)
    for kind in ("js", "mmd", "none"):
        val = divergence(kind, zz, one, 3)
        assert val.item() == 0.0
        val.backward()
    assert divergence("none", shifted, domain, 3).item() == 0.0


@pytest.mark.parametrize("kind", ["js", "mmd"])
def test_regularisers_under_bf16_autocast_are_the_fp32_ones(kind):
    """Training under bf16 autocast hands the regulariser a bf16 z: it must measure what fp32 does, at a real batch
    size (a domain's sample count accumulated in bf16 stopped at 256, which made JS 5-14x off at batch 4,096)."""
    g = torch.Generator().manual_seed(2)
    domain = torch.randint(0, 3, (4096,), generator=g)
    z = (torch.randn(4096, 64, generator=g) + 0.5 * domain.unsqueeze(1) * torch.linspace(-1, 1, 64)).bfloat16()
    exact = divergence(kind, z.float(), domain, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = divergence(kind, z, domain, 3)
    assert under.dtype == torch.float32 and exact.item() > 1e-3
    assert under.item() == pytest.approx(exact.item(), rel=1e-5)


def _domain_gap(task: TrainTask, batch) -> float:
    task.eval()
    with torch.no_grad():
        out = task.model(batch)
    return float(js_regularizer(out.representation, batch.domain, 4))


def test_regulariser_lowers_the_domain_gap(tiny_spec, batches):
    """Same seed, same batches: reg_weight>0 must end with a smaller measured JS between domains on held-out rows."""
    gaps = {}
    for w in (0.0, 2.0):
        task = _task(tiny_spec("model.regularizer=js", f"model.reg_weight={w}"), seed=3)
        _train(task, batches[:4], steps=24)
        gaps[w] = _domain_gap(task, batches[4])
    assert gaps[2.0] < 0.5 * gaps[0.0], gaps


# ------------------------------------------------------------------------------------------------------ gates
def test_gate_weights_differ_between_domains(tiny_spec, batches):
    spreads = {}
    for fusion in ("domain", "mean"):
        task = _task(tiny_spec(f"model.fusion={fusion}"), seed=5)
        _train(task, batches[:4], steps=12)
        task.eval()
        with torch.no_grad():
            task.model(batches[4])
        gates = task.model.l1.gate_weights_by_domain(batches[4].domain, 4)
        assert set(gates) == {"user", "query", "item"}
        spread = 0.0
        for side, w in gates.items():
            assert w.shape == (4, len(task.model.l1.aspect_names[side])) and torch.isfinite(w).all()
            assert torch.allclose(w.sum(1), torch.ones(4), atol=1e-5)
            spread = max(spread, float((w.max(0).values - w.min(0).values).max()))
        spreads[fusion] = spread
    assert spreads["domain"] > 0.02, spreads  # each domain weighs the aspects its own way
    assert spreads["mean"] < 1e-6, spreads  # control: the plain average cannot


def test_domain_gate_starts_as_the_aspect_mean(tiny_spec, batches):
    """Zero-initialised domain embeddings: before any step every sample's gate is uniform (the `mean` fusion), so
    the gates depart from the mean only as far as training moves them."""
    task = _task(tiny_spec("model.fusion=domain"), seed=7)
    task.eval()
    with torch.no_grad():
        task.model(batches[0])
    for side, w in task.model.l1.last_weights.items():
        torch.testing.assert_close(w, torch.full_like(w, 1.0 / w.shape[1]))


class _NoHostSync(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails on the ops that make a CUDA stream wait for the host: a scalar read (.item(), bool(), tolist) and the
    ops whose output size depends on the data. Checked on CPU, where the ops are the same."""

    FORBIDDEN = ("_local_scalar_dense", "nonzero", "unique", "_unique", "_unique2", "unique_dim", "bincount",
                 "masked_select", "unique_consecutive")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name.split("::")[-1] in self.FORBIDDEN:
            raise AssertionError(f"host synchronisation: {func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("tower", ["sr_foundation", "star"])
@pytest.mark.parametrize("kind", ["js", "mmd"])
def test_regularisers_and_towers_have_no_host_sync(kind, tower):
    from recsys.models.towers import build_tower

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 12, generator=g, requires_grad=True)
    domain = torch.randint(0, 3, (40,), generator=g)  # domain 3 of 4 absent: masks, not lists
    net = build_tower(tower, 12, [16, 8], 4, 2, 1, 0.0, True)
    with _NoHostSync():
        h, z = net(x, domain)
        reg = divergence(kind, z, domain, 4)
        (h.sum() + reg).backward()
    assert torch.isfinite(reg) and x.grad is not None and torch.isfinite(x.grad).all()
    with pytest.raises(AssertionError, match="host synchronisation"), _NoHostSync():
        torch.unique(domain)  # the check itself works


# ------------------------------------------------------------------------------------------------ text mode hybrid
def test_hybrid_text_is_the_llm_vector_beside_trainable_tokens(llm_overrides, batches):
    """Mode hybrid: each text vector is [frozen LLM row, token vector] / sqrt(2): the LLM half equals mode llm's
    vector, the token half mode random's lookup, the norm is 1 (0 for "no text"); the tokens train, the frozen rows
    do not."""
    from pathlib import Path

    from recsys.spec.loader import load_spec

    ml = Path(__file__).resolve().parents[2] / "feature_specs" / "movielens.yaml"
    llm = build_model(load_spec(ml, llm_overrides()), torch.device("cpu"))
    spec = load_spec(ml, llm_overrides("text.mode=hybrid"))
    torch.manual_seed(0)
    task = TrainTask(build_model(spec, torch.device("cpu")), spec)
    enc = task.model.l0
    assert enc.text_dim == llm.l0.text_dim + spec.text.random_dim
    batch = batches[0]
    calls = []
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: calls.append(name))
             for name, m in enc.text_lookup.items()]
    with torch.no_grad():
        got = enc.text_vectors(batch)
        want_llm = llm.l0.text_vectors(batch)
    for h in hooks:
        h.remove()
    text_features = [f for f in spec.features if f.kind == "text"]
    assert len({f.text_table for f in text_features}) < len(text_features), "the spec has features sharing a table"
    assert sorted(calls) == sorted(enc.text_lookup), "one token lookup per table, for all its features together"
    for f in text_features:
        v, rows = got[f.name], batch.text[f.name]
        half = llm.l0.text_dim
        torch.testing.assert_close(v[..., :half] * math.sqrt(2), want_llm[f.name], atol=1e-6, rtol=0)
        tokens = enc.text_lookup[f"table_{f.text_table}"](rows)
        torch.testing.assert_close(v[..., half:] * math.sqrt(2), tokens, atol=1e-6, rtol=0)
        norms = v.norm(dim=-1)
        has = rows > 0
        assert has.any() and (~has).any() if f.sequence else has.any()
        torch.testing.assert_close(norms[has], torch.ones_like(norms[has]), atol=1e-3, rtol=0)
        assert (norms[~has] == 0).all()
    token_weights = [m.tokens.weight for m in enc.text_lookup.values()]
    before = [w.detach().clone() for w in token_weights]
    frozen_before = {n: p.detach().clone() for n, p in enc.text_ebc.named_parameters()}
    losses = _train(task, batches[:1], steps=10)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.01, losses
    assert any(not torch.equal(a, w) for a, w in zip(before, token_weights)), "the token tables did not train"
    for n, p in enc.text_ebc.named_parameters():
        assert torch.equal(frozen_before[n], p), f"frozen text table {n} changed"
