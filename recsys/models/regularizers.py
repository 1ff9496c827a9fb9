"""Divergence between the domains' distributions in L2's common space, over the *global* batch.

`js` (the paper's choice): each sample's representation z is turned into a distribution over the representation's
dimensions, p(z) = softmax(z / tau); a domain's distribution P_d is the mean of p(z) over its samples in the batch.
The regulariser is the mean Jensen-Shannon divergence JS(P_a || P_b) over all pairs of domains present in the batch
(natural log, so 0 <= JS <= ln 2). Domains absent from a batch contribute nothing.

`mmd`: squared maximum mean discrepancy with a Gaussian kernel between the samples of each pair of domains (at most
`max_samples` per domain, bandwidth = median pairwise distance, detached), averaged over pairs of present domains.

One objective on any number of ranks: with `across_ranks=True` (what training uses) the domain distributions are
those of the global batch. JS all-reduces the per-domain sums of p(z) and the counts (a [K, D+1] tensor per step);
MMD all-gathers each rank's capped per-domain samples. Each rank differentiates the global value through its own
samples only, with the gradient scaled by the world size, because DDP *averages* dense gradients over ranks: the
average of the W ranks' (W x local) gradients is the gradient of the global regulariser, exactly what one rank
holding the whole batch computes (and the sparse rows, which get the ranks' sum, see the same W x factor as the
BCE's per-rank means, which their row-wise optimiser normalises away).

No host synchronisation: domain lists are static (all K domains, with presence masks), never `nonzero`/`unique`/
`tolist`, and counts use `index_add_` rather than `bincount` (which reads its maximum on the host on CUDA).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from recsys.models.domain_ops import domain_sums


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; gradient multiplied by `factor` in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def _world(across_ranks: bool) -> int:
    if across_ranks and dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _global_sum(local: torch.Tensor, world: int) -> torch.Tensor:
    """The sum of `local` over ranks as value; gradient flows into the local term only, scaled by `world`."""
    if world == 1:
        return local
    total = local.detach().clone()
    dist.all_reduce(total)
    mine = _ScaleGrad.apply(local, float(world))
    return total + (mine - mine.detach())  # value: exactly the all-reduced sum


def _global_cat(local: torch.Tensor, world: int) -> torch.Tensor:
    """[world * n, ...]: every rank's `local` stacked in rank order; gradient into this rank's block, scaled."""
    if world == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.detach().contiguous())
    parts[dist.get_rank()] = _ScaleGrad.apply(local, float(world))
    return torch.cat(parts)


def _domain_counts(domain: torch.Tensor, num_domains: int, dtype: torch.dtype) -> torch.Tensor:
    ones = torch.ones(domain.shape[0], 1, dtype=dtype, device=domain.device)
    return domain_sums(ones, domain, num_domains).squeeze(1)


def _mean_over_present_pairs(values: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """values [K, K] (only a < b is read) -> the mean over pairs of present domains; 0 (with a graph) if none."""
    k = values.shape[0]
    a, b = torch.triu_indices(k, k, offset=1, device=values.device)
    w = (present[a] & present[b]).to(values.dtype)
    return (values[a, b] * w).sum() / w.sum().clamp_min(1.0)


def domain_distributions(z: torch.Tensor, domain: torch.Tensor, num_domains: int, tau: float = 1.0,
                         across_ranks: bool = False):
    """-> (P [num_domains, D] rows summing to 1 where present, present [num_domains] bool)."""
    p = torch.softmax(z if tau == 1.0 else z / tau, dim=1)  # x / 1 is x: no pass over [B, D] for it
    sums = domain_sums(p, domain, num_domains)
    counts = _domain_counts(domain, num_domains, p.dtype)
    both = _global_sum(torch.cat([sums, counts.unsqueeze(1)], dim=1), _world(across_ranks))  # one collective
    sums, counts = both[:, :-1], both[:, -1].detach()
    return sums / counts.clamp_min(1).unsqueeze(1), counts > 0


def js_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    m = 0.5 * (p + q)
    kl = lambda a, b: (a * (torch.log(a + eps) - torch.log(b + eps))).sum(-1)  # noqa: E731
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def js_regularizer(z: torch.Tensor, domain: torch.Tensor, num_domains: int,
                   across_ranks: bool = False) -> torch.Tensor:
    dist_, present = domain_distributions(z, domain, num_domains, across_ranks=across_ranks)
    pairwise = js_divergence(dist_.unsqueeze(1), dist_.unsqueeze(0))  # [K, K]
    return _mean_over_present_pairs(pairwise, present)


def _first_per_domain(z: torch.Tensor, domain: torch.Tensor, num_domains: int, cap: int):
    """-> (samples [K, cap, D], valid [K, cap]): each domain's first `cap` samples in batch order, padded with
    (masked) copies, in static shapes: a stable sort by domain, then `cap` slots from each domain's start."""
    n = z.shape[0]
    order = torch.sort(domain, stable=True).indices
    counts = _domain_counts(domain, num_domains, torch.long)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(cap, device=z.device)
    valid = slot.unsqueeze(0) < counts.unsqueeze(1)
    rows = order[(starts.unsqueeze(1) + slot.unsqueeze(0)).clamp_max(n - 1)]
    return z[rows], valid


def mmd_regularizer(z: torch.Tensor, domain: torch.Tensor, num_domains: int, max_samples: int = 256,
                    across_ranks: bool = False) -> torch.Tensor:
    """Across ranks every rank contributes its first ceil(max_samples / W) samples of each domain, so the global
    estimate equals one rank's whenever no domain has more than that many samples on a rank (otherwise it is the
    same estimator on a different subsample)."""
    world = _world(across_ranks)
    samples, valid = _first_per_domain(z, domain, num_domains, math.ceil(max_samples / world))
    samples = _global_cat(samples.transpose(0, 1), world).transpose(0, 1)  # [K, W * cap, D], rank-major slots
    valid = _global_cat(valid.transpose(0, 1), world).transpose(0, 1)
    x = samples.reshape(-1, z.shape[1])
    v = valid.reshape(-1)
    counts = valid.sum(1).to(x.dtype)
    # weights [K, M]: 1/count on the domain's own valid slots, so W K W^T holds the kernel means of every pair
    # (a comparison, not one_hot, which validates its input on the host on CUDA)
    ids = torch.arange(num_domains, device=z.device)
    owner = ids.repeat_interleave(valid.shape[1])
    weights = ((owner.unsqueeze(0) == ids.unsqueeze(1)) & v.unsqueeze(0)).to(x.dtype) / counts.clamp_min(1).unsqueeze(1)
    sq = x.pow(2).sum(1)
    d2 = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * x @ x.T).clamp_min(0)
    with torch.no_grad():
        pair_ok = v.unsqueeze(1) & v.unsqueeze(0)
        bw = d2.sqrt().masked_fill(~pair_ok, float("nan")).nanmedian().nan_to_num(1e-3).clamp_min(1e-3)
    means = weights @ torch.exp(-d2 / (2 * bw * bw)) @ weights.T  # [K, K]
    diag = torch.diagonal(means)
    pairwise = diag.unsqueeze(1) + diag.unsqueeze(0) - 2 * means
    return _mean_over_present_pairs(pairwise, counts > 0)


def divergence(kind: str, z: torch.Tensor, domain: torch.Tensor, num_domains: int,
               across_ranks: bool = False) -> torch.Tensor:
    """The regulariser of `kind` in fp32 whatever the autocast. Under bf16 (`train.precision: auto` on AVX512-BF16 /
    AMX CPUs and GPUs) z arrives in bf16 and everything computed from it stayed bf16: a count of a domain's samples
    accumulated in bf16 stops at 256 (8 significant bits: 256 + 1 rounds back to 256), so at batch 4,096 the
    larger domains' means came out 5-14x too large and the divergence measured nothing meaningful; the per-domain
    means, logs and kernel distances also need more than bf16's 3 digits."""
    with torch.autocast(z.device.type, enabled=False):
        z = z.float()
        if kind == "js":
            return js_regularizer(z, domain, num_domains, across_ranks)
        if kind == "mmd":
            return mmd_regularizer(z, domain, num_domains, across_ranks=across_ranks)
        return z.sum() * 0.0
