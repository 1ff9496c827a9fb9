"""Each sample's row of a per-domain table, and each domain's sum of the samples' rows: a handful of domains,
thousands of samples.

Eager, an embedding lookup. Compiled (`train.compile`), inductor lowers an embedding's backward to atomic adds of
every sample's gradient row into the few domain rows, which threads serialise on: one such kernel of the peers'
configuration, the domain gate's [4,096, 16] gradient rows into 3, took 2.7 ms of a ~14 ms step on the 2-core Xeon
(0.2 ms after). Compiled, the lookup is therefore a product with the one-hot domain mask summed over the domains:
the same rows exactly (1 x row + 0 x the others), whose backward is a plain reduction over the batch. The mask is a
comparison with the domain ids, not `one_hot`, which validates its input on the host on CUDA.

The per-domain sums of the JS regulariser (`domain_sums`) have the same trouble forward: inductor's `index_add_` of
[4,096, 128] fp32 rows into 3 took 7 ms a step under fp32 (0.3 in bf16). Compiled they are the product of the
transposed mask with the rows (in the rows' dtype whatever the autocast), and their backward the gather that
`index_add_`'s is; a product with the mask summed over the batch made the backward kernel 3x slower (0.55 -> 1.6
ms a step), and a plain matmul's backward came out of inductor in bf16 under autocast.
"""
from __future__ import annotations

import torch
from torch import nn


def _mask(domain: torch.Tensor, num_domains: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, K]: 1 where the sample's domain is k."""
    return (domain.unsqueeze(1) == torch.arange(num_domains, device=domain.device)).to(dtype)


def domain_rows(table: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
    """table [K, ...] -> its row for each sample [B, ...]. Eager: an embedding lookup, not table[domain]: the
    backward of advanced indexing is an accumulating index_put, ~15x slower on CPU for [2048, 512] rows."""
    if torch.compiler.is_compiling():
        m = _mask(domain, table.shape[0], table.dtype)
        return (m.view(*m.shape, *([1] * (table.dim() - 1))) * table).sum(1)
    if table.dim() == 1:
        return nn.functional.embedding(domain, table.unsqueeze(1)).squeeze(1)
    return nn.functional.embedding(domain, table)


class _MaskedSums(torch.autograd.Function):
    """Compiled `domain_sums`: forward the transposed mask times the rows in the rows' dtype (autocast off), backward
    each sample's row of the gradient, as `index_add_`'s backward is (a gather)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, domain: torch.Tensor, num_domains: int) -> torch.Tensor:
        ctx.save_for_backward(domain)
        with torch.autocast(x.device.type, enabled=False):
            return _mask(domain, num_domains, x.dtype).t() @ x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (domain,) = ctx.saved_tensors
        return grad.index_select(0, domain), None, None


def domain_sums(x: torch.Tensor, domain: torch.Tensor, num_domains: int) -> torch.Tensor:
    """x [B, D] -> [K, D]: the sum of each domain's rows (zero for a domain absent from the batch)."""
    if torch.compiler.is_compiling():
        return _MaskedSums.apply(x, domain, num_domains)
    return torch.zeros(num_domains, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, domain, x)
