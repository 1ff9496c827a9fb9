"""Target attention over a behaviour sequence, with a hand-written backward.

`target_attention(hist, query, mask, scale)` scores every history position against a query vector, then pools the
history twice in one product: by the masked softmax of the scores (attention) and by the plain masked mean.

Why a custom autograd Function: a [2048, 20, 64] history is 10 MB, larger than a core's L2, so on CPU the block is
bound by passes over that tensor, not by FLOPs. Autograd's generic backward makes seven of them (one gradient of
the history per product, each written in full, then summed; plus two reads); this backward makes three: it reads
the history twice (for the attention weights' and the query's gradients) and writes the history's gradient ONCE,
as a single [L, 3] @ [3, D] product per row (score gradient x query + pooling weights x pooled gradient).
"""
from __future__ import annotations

from typing import Tuple, Union

import torch


def pool_weights(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, 2, L]: masked softmax of `scores` (row 0) and the masked mean's weights (row 1). Empty rows are zero."""
    m = mask.to(scores.dtype)
    attention = torch.softmax(scores.masked_fill(~mask, -1e4), dim=1) * m
    mean = m / m.sum(1, keepdim=True).clamp_min(1.0)
    return torch.stack([attention, mean], dim=1)


def _attend(hist: torch.Tensor, query: torch.Tensor, mask: torch.Tensor,
            scale: Union[float, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward computation: raw dot products [B, L], pooling weights [B, 2, L], pooled [B, 2, D]."""
    # [1, D] @ [D, L] per row: on CPU 7x faster than the [L, D] @ [D, 1] orientation matmul would pick
    raw = torch.bmm(query.unsqueeze(1), hist.transpose(1, 2)).squeeze(1)
    weights = pool_weights(raw * scale, mask)
    return raw, weights, torch.bmm(weights, hist)


def target_attention_reference(hist: torch.Tensor, query: torch.Tensor, mask: torch.Tensor,
                               scale: Union[float, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The same computation with autograd's own backward (used while fx-tracing, and as the tests' reference)."""
    raw, _, pooled = _attend(hist, query, mask, scale)
    return raw, pooled


class _TargetAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hist, query, mask, scale):
        raw, weights, pooled = _attend(hist, query, mask, scale)
        ctx.save_for_backward(hist, query, weights, raw, scale)
        return raw, pooled

    @staticmethod
    def backward(ctx, d_raw, d_pooled):
        hist, query, weights, raw, scale = ctx.saved_tensors
        need_hist, need_query, _, need_scale = ctx.needs_input_grad
        d_hist = d_query = d_scale = None
        # softmax backward: d_scores = a * (d_a - <a, d_a>); masked positions have a = 0 and get none
        d_weights = torch.bmm(d_pooled, hist.transpose(1, 2))  # [B, 2, L]; the mean's weights are constant
        att, d_att = weights[:, 0], d_weights[:, 0]
        d_scores = att * (d_att - (att * d_att).sum(1, keepdim=True))
        if need_scale:
            d_scale = (d_scores * raw).sum().reshape(scale.shape)
        d_raw = d_raw + d_scores * scale  # every gradient that reaches the raw dot products
        if need_query:
            d_query = torch.bmm(d_raw.unsqueeze(1), hist).squeeze(1)
        if need_hist:
            # d_hist[b] = d_raw[b]^T q[b] + weights[b]^T d_pooled[b] = [L, 3] @ [3, D]: one write of the history
            left = torch.cat([d_raw.unsqueeze(2), weights.transpose(1, 2)], dim=2)
            right = torch.cat([query.unsqueeze(1), d_pooled], dim=1)
            d_hist = torch.bmm(left, right)
        return d_hist, d_query, None, d_scale


def target_attention(hist: torch.Tensor, query: torch.Tensor, mask: torch.Tensor,
                     scale: Union[float, torch.Tensor], fused: bool = True
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hist [B, L, D], query [B, D], mask [B, L] bool, scale (float or 0-d tensor, may be trained) ->
    (raw dot products query . hist [B, L], attention-pooled [B, D], mean-pooled [B, D]); an empty history pools to
    zeros. `fused=False` runs the plain-autograd reference."""
    if isinstance(scale, (int, float)):  # a trained scale (or an fx Proxy while tracing) is passed through
        scale = torch.tensor(float(scale), dtype=hist.dtype, device=hist.device)
    if fused:
        raw, pooled = _TargetAttention.apply(hist, query, mask, scale)
    else:
        raw, pooled = target_attention_reference(hist, query, mask, scale)
    attended, mean = pooled.unbind(1)
    return raw, attended, mean


def grouped_target_attention(hist: torch.Tensor, query: torch.Tensor, mask: torch.Tensor,
                             scale: Union[float, torch.Tensor], groups
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`target_attention` for rows that share their history (serving: the candidates of one request,
    `recsys.data.batch.RequestGroups`): hist [R, L, D] holds each group's history ONCE, query [B, D] and mask [B, L]
    are per row. Returns the same (raw [B, L], attended [B, D], mean [B, D]) as `target_attention` on the history
    repeated per row, but attends with one [rows, D] x [D, L] product per group instead of B products of one row
    each, and never materialises the repeated [B, L, D] history (for a 100-candidate request one small GEMM instead
    of 100 one-row bmm calls). Forward only: serving runs it under inference_mode.

    Rows of unequal groups are padded to the largest group ([R, size, D]) for the two batched products and picked
    back out; the pooling weights (masked softmax and mean) are the per-row ones of `pool_weights`."""
    if isinstance(scale, (int, float)):
        scale = torch.tensor(float(scale), dtype=hist.dtype, device=hist.device)
    r, length, d = hist.shape
    b, m = query.shape[0], groups.size

    def padded(x: torch.Tensor) -> torch.Tensor:  # [B, ...] -> [R, size, ...]
        if groups.uniform:
            return x.reshape(r, m, *x.shape[1:])
        out = x.new_zeros((r, m) + tuple(x.shape[1:]))
        out[groups.owner, groups.pos] = x
        return out

    def unpadded(x: torch.Tensor) -> torch.Tensor:  # [R, size, ...] -> [B, ...]
        return x.reshape(b, *x.shape[2:]) if groups.uniform else x[groups.owner, groups.pos]

    raw = unpadded(torch.bmm(padded(query), hist.transpose(1, 2)))  # [B, L]
    weights = pool_weights(raw * scale, mask)  # [B, 2, L]
    pooled = unpadded(torch.bmm(padded(weights).reshape(r, m * 2, length), hist).reshape(r, m, 2, d))  # [B, 2, D]
    attended, mean = pooled.unbind(1)
    return raw, attended, mean
