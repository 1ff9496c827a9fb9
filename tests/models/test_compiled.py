"""`train.compile`: the compiled dense layers compute what the plain ones do (loss, logits and every gradient), only
in training at the compiled batch size, and `auto` decides from the device, the installed compiler and the run's
length (never from a timing)."""
from __future__ import annotations

import pytest
import torch

from recsys.models import compiled
from recsys.models.build import build_model
from recsys.models.compiled import COMPILE_MIN_STEPS, compile_dense_layers, resolve_compile
from recsys.models.model import TrainTask


def test_auto_compiles_only_long_cpu_runs_with_a_compiler(monkeypatch):
    monkeypatch.setattr(compiled, "cpp_compiler", lambda: "/usr/bin/g++")
    assert resolve_compile("auto", "cpu", COMPILE_MIN_STEPS)[0]
    assert not resolve_compile("auto", "cpu", COMPILE_MIN_STEPS - 1)[0]
    assert not resolve_compile("auto", "cpu", None)[0]
    assert not resolve_compile("auto", "cuda", 10 * COMPILE_MIN_STEPS)[0]
    assert resolve_compile(True, "cpu", 1)[0] and not resolve_compile(False, "cpu", 10 ** 9)[0]
    monkeypatch.setattr(compiled, "cpp_compiler", lambda: None)
    on, why = resolve_compile("auto", "cpu", 10 * COMPILE_MIN_STEPS)
    assert not on and "no C++ compiler" in why
    assert not resolve_compile(True, "cpu", 1)[0]  # nothing to compile with: the plain layers, said in the log
    with pytest.raises(ValueError, match="unknown setting"):
        resolve_compile("yes", "cpu", 1)


def test_the_spec_reads_on_and_off_as_the_forced_settings(tiny_spec):
    assert tiny_spec().train.compile == "auto"
    assert tiny_spec("train.compile=on").train.compile is True
    assert tiny_spec("train.compile=off").train.compile is False


@pytest.mark.slow  # inductor compiles the projections and L1 + L2, forward and backward (~a minute on 2 cores)
@pytest.mark.skipif(compiled.cpp_compiler() is None, reason="no C++ compiler for inductor's CPU backend")
def test_compiled_dense_layers_compute_the_plain_loss_and_gradients(tiny_spec):
    from recsys.data.loader import BatchLoader

    # fp32, no dropout: the two models must agree up to the fused kernels' summation order
    spec = tiny_spec("train.precision=fp32", "model.dropout=0")
    torch.manual_seed(0)
    plain = TrainTask(build_model(spec, torch.device("cpu")), spec)
    fast = TrainTask(build_model(spec, torch.device("cpu")), spec)
    fast.load_state_dict(plain.state_dict())
    compile_dense_layers(fast.model)
    batches = iter(BatchLoader(spec, "train", batch_size=256, shuffle=True, seed=3))
    batch, other = next(batches), next(batches)
    for step in range(2):  # the second step runs the cached graphs
        losses = []
        for task in (plain, fast):
            task.zero_grad(set_to_none=True)
            loss, (_, logits, *_rest) = task(batch)
            loss.backward()
            losses.append((loss.detach(), logits))
        torch.testing.assert_close(losses[1][0], losses[0][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(losses[1][1], losses[0][1], rtol=1e-5, atol=1e-5)
        grads = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
        assert grads and grads.keys() == {n for n, p in fast.named_parameters() if p.grad is not None}
        for name, p in fast.named_parameters():
            if name in grads:
                torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the compiled path really ran
    # eval mode and another batch size take the plain layers: bit-identical to the plain model
    with torch.no_grad():
        short = next(iter(BatchLoader(spec, "train", batch_size=100, shuffle=True, seed=3)))
        assert torch.equal(fast.model(short).logits, plain.model(short).logits)
        plain.eval(), fast.eval()
        assert torch.equal(fast.model(batch).logits, plain.model(batch).logits)
        assert torch.equal(fast.model(other).logits, plain.model(other).logits)


@pytest.mark.skipif(compiled.cpp_compiler() is None, reason="no C++ compiler for inductor's CPU backend")
@pytest.mark.parametrize("shape", [(3,), (3, 5)])
def test_compiled_domain_rows_are_the_lookup_s_rows_and_gradients(shape):
    """Compiled, `domain_rows` is a one-hot product instead of an embedding lookup (inductor's lookup backward is
    atomic adds into the few domain rows): the same rows exactly, the same gradient up to summation order."""
    from recsys.models.domain_ops import domain_rows

    torch.manual_seed(0)
    domain = torch.randint(0, shape[0], (64,))
    grads = []
    for fn in (domain_rows, torch.compile(domain_rows, backend="inductor", fullgraph=True)):
        table = torch.randn(*shape, requires_grad=True)
        table.data.copy_(torch.arange(table.numel(), dtype=torch.float32).view(shape) / 7)
        rows = fn(table, domain)
        if fn is domain_rows:
            expected = rows.detach()
        else:
            assert torch.equal(rows.detach(), expected)
        (rows * torch.linspace(-1, 1, rows.numel()).view(rows.shape)).sum().backward()
        grads.append(table.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(compiled.cpp_compiler() is None, reason="no C++ compiler for inductor's CPU backend")
def test_compiled_domain_sums_are_the_index_add_s_sums_and_gradients():
    """Compiled, `domain_sums` is a product with the transposed domain mask (inductor's index_add is atomic adds
    into the few domain rows): the same sums up to summation order and the same gradients, in fp32 rows' precision
    under bf16 autocast too."""
    from recsys.models.domain_ops import domain_sums

    torch.manual_seed(0)
    domain = torch.tensor([0, 2, 2, 0, 2, 0, 0, 2] * 8)  # domain 1 absent: its row stays zero
    x0 = torch.randn(domain.shape[0], 5)
    out, grads = [], []
    for fn in (domain_sums, torch.compile(domain_sums, backend="inductor", fullgraph=True)):
        x = x0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sums = fn(x, domain, 3)
        assert sums.dtype == torch.float32
        (sums * torch.linspace(-1, 1, sums.numel()).view(sums.shape)).sum().backward()
        out.append(sums.detach())
        grads.append(x.grad)
    assert torch.equal(out[1][1], torch.zeros(5))
    torch.testing.assert_close(out[1], out[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(grads[1], grads[0])  # a gather both ways
