"""Compute precision of the dense layers (`train.precision`).

`bf16` runs the dense matmuls (aspect projections, L1 gating, the L2 tower and heads) under autocast in bfloat16
while weights, optimiser state, the embedding tables, the history attention and the text cosines stay float32.
On CPUs with AVX512-BF16 (and on GPUs) a bf16 GEMM of the tower's shape is ~4.6x faster than fp32; the history
attention is left in fp32 because casting its [B, L, D] inputs costs more than its small products save, and the
cosine interactions that carry cold items keep full precision."""
from __future__ import annotations

import contextlib

import torch
from torch.fx._symbolic_trace import is_fx_tracing


def dense_autocast(precision: str, like: torch.Tensor):
    """Autocast context for the dense layers; `like` is any parameter of the model (its device picks the autocast
    backend). While TorchRec's train pipeline fx-traces forward (only to find the embedding modules' inputs; the
    traced graph is not run) parameters are proxies, so no autocast is entered."""
    if precision != "bf16" or is_fx_tracing():
        return contextlib.nullcontext()
    return torch.autocast(like.device.type, dtype=torch.bfloat16)
