"""Each sample's row of a per-domain table: a handful of domains, thousands of samples.

Eager, an embedding lookup. Compiled (`train.compile`), inductor lowers an embedding's backward to atomic adds of
every sample's gradient row into the few domain rows, which threads serialise on: one such kernel of the peers'
configuration, the domain gate's [4,096, 16] gradient rows into 3, took 2.7 ms of a ~14 ms step on the 2-core Xeon
(0.2 ms after). Compiled, the lookup is therefore a product with the one-hot domain mask summed over the domains:
the same rows exactly (1 x row + 0 x the others), whose backward is a plain reduction over the batch. The mask is a
comparison with the domain ids, not `one_hot`, which validates its input on the host on CUDA.

(The JS regulariser's per-domain sums stay an `index_add_` when compiled: the same one-hot product there made its
backward kernel 3x slower, 0.55 -> 1.6 ms a step.)
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

