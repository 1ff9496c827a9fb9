"""Non-finite loss/gradients stop training with step, domain and batch named; the last good checkpoint stays."""
from __future__ import annotations

import pytest
import torch

from recsys.errors import NumericsError
from recsys.train import checkpoint
from recsys.train.numerics import FiniteGradGuard, describe_batch

from reliability_helpers import SPEC, assert_clean_error, job, small_overrides


class _Counting:
    def __init__(self):
        self.steps = 0

    def step(self):
        self.steps += 1

    def zero_grad(self, set_to_none=True):
        pass


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_guard_refuses_non_finite_gradient_and_names_parameter(bad):
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    a.grad, b.grad = torch.ones(3), torch.tensor([1.0, bad])
    inner = _Counting()
    guard = FiniteGradGuard(inner, {"tower.a": a, "tower.b": b})
    with pytest.raises(NumericsError, match="parameter tower.b"):
        guard.step()
    assert inner.steps == 0  # the wrapped optimiser never stepped


def test_guard_steps_on_finite_gradients_even_when_huge():
    a = torch.nn.Parameter(torch.ones(4))
    a.grad = torch.full((4,), 3e38)  # finite in float32; their float32 sum would overflow
    inner = _Counting()
    FiniteGradGuard(inner, {"a": a}).step()
    assert inner.steps == 1


def test_describe_batch_names_domains_and_rows():
    class B:
        domain = torch.tensor([0, 2, 2])
        row_id = torch.tensor([7, 8, 9])
    text = describe_batch(B(), ["x", "y", "z"], limit=2)
    assert text == "domains ['x', 'z']; 3 rows, file rows [7, 8, ...]"


def test_overflowing_training_stops_with_step_and_batch(ml_prepared, tmp_path):
    """lr=1e30: the first Adam step makes dense weights ~1e30, the next forward overflows, the gradient check
    refuses step 2. The step-1 checkpoint must still verify and nothing later may exist."""
    out = tmp_path / "run"
    proc = job("pretrain.py", ["--spec", str(SPEC), *small_overrides(
        ml_prepared, out, **{"train.lr": "1e30", "train.checkpoint_every_steps": 1, "train.epochs": 1})])
    msg = assert_clean_error(proc, "non-finite", "parameter", "epoch 0 step 2", "global 2", "domains [",
                             "file rows [", "last good checkpoint")
    assert len(msg.splitlines()) == 1
    ckpts = checkpoint.list_checkpoints(out / "checkpoints")
    assert [p.name for p in ckpts] == ["step_000000001"]
    manifest = checkpoint.verify(ckpts[0])
    assert manifest["global_step"] == 1


def test_deferred_guard_skips_a_bad_step_on_the_device_and_reports_it_one_step_late():
    """defer=True (what CUDA uses; run here on CPU): the fused Adam skips the bad step through `found_inf` without
    the host reading the flag; the error comes at the next zero_grad (or flush), naming the parameter."""
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    adam = torch.optim.Adam([a, b], lr=0.1, fused=True)
    guard = FiniteGradGuard(adam, {"tower.a": a, "tower.b": b}, defer=True, device_skippable=[adam])
    guard.zero_grad()
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    guard.step()  # a good step moves the weights
    after_good = (a.detach().clone(), b.detach().clone(), adam.state[a]["step"].clone())
    assert not torch.equal(after_good[0], torch.ones(3))
    a.grad, b.grad = torch.ones(3), torch.tensor([1.0, float("nan")])
    guard.step()  # no exception yet: nothing read on the host
    assert torch.equal(a, after_good[0]) and torch.equal(b, after_good[1])  # skipped on the device
    assert torch.equal(adam.state[a]["step"], after_good[2])  # Adam's step count rolled back too
    with pytest.raises(NumericsError, match="parameter tower.b") as info:
        guard.zero_grad()
    assert info.value.steps_ago == 1
    guard.flush()  # reported once


def test_deferred_guard_flush_reports_the_last_step_and_refuses_unfusable_optimisers():
    a = torch.nn.Parameter(torch.ones(2))
    adam = torch.optim.Adam([a], lr=0.1, fused=True)
    guard = FiniteGradGuard(adam, {"a": a}, defer=True, device_skippable=[adam])
    a.grad = torch.tensor([float("inf"), 0.0])
    guard.step()
    with pytest.raises(NumericsError, match="parameter a"):
        guard.flush()
    with pytest.raises(ValueError, match="not fused"):
        FiniteGradGuard(torch.optim.SGD([a], lr=0.1), {"a": a}, defer=True,
                        device_skippable=[torch.optim.SGD([a], lr=0.1)])
    with pytest.raises(ValueError, match="not covered"):
        FiniteGradGuard(adam, {"a": a, "b": torch.nn.Parameter(torch.ones(1))}, defer=True, device_skippable=[adam])


def test_deferred_guard_undoes_an_unfused_optimiser_on_the_device():
    """`restorable` optimisers (no found_inf: e.g. a data-parallel table's row-wise optimiser) are put back, weights
    and state, after a bad step, still without reading the flag on the host."""
    dense, table = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(4, 2))
    adam = torch.optim.Adam([dense], lr=0.1, fused=True)
    sgd = torch.optim.SGD([table], lr=0.1, momentum=0.9)
    both = type("Both", (), {"step": lambda self: (adam.step(), sgd.step()),
                             "zero_grad": lambda self, set_to_none=True: None})()
    guard = FiniteGradGuard(both, {"dense": dense, "table": table}, defer=True, device_skippable=[adam],
                            restorable=[sgd])
    dense.grad, table.grad = torch.ones(3), torch.ones(4, 2)
    guard.step()
    good = (dense.detach().clone(), table.detach().clone(), sgd.state[table]["momentum_buffer"].clone())
    dense.grad, table.grad = torch.ones(3), torch.full((4, 2), float("nan"))
    guard.step()
    assert torch.equal(dense, good[0]) and torch.equal(table, good[1])
    assert torch.equal(sgd.state[table]["momentum_buffer"], good[2])
    with pytest.raises(NumericsError, match="parameter table"):
        guard.flush()
