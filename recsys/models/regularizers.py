"""Divergence between the domains' distributions in L2's common space.

`js` (the paper's choice): each sample's representation z is turned into a distribution over the representation's
dimensions, p(z) = softmax(z / tau); a domain's distribution P_d is the mean of p(z) over its samples in the batch.
The regulariser is the mean Jensen-Shannon divergence JS(P_a || P_b) over all pairs of domains present in the batch
(natural log, so 0 <= JS <= ln 2). Domains absent from a batch contribute nothing.

`mmd`: squared maximum mean discrepancy with a Gaussian kernel between the samples of each pair of domains (at most
`max_samples` per domain, bandwidth = median pairwise distance, detached), averaged over pairs.
"""
from __future__ import annotations

import itertools
from typing import List

import torch


def domain_distributions(z: torch.Tensor, domain: torch.Tensor, num_domains: int, tau: float = 1.0):
    """-> (P [num_domains, D] rows summing to 1 where present, present [num_domains] bool)."""
    p = torch.softmax(z / tau, dim=1)
    sums = torch.zeros(num_domains, z.shape[1], dtype=z.dtype, device=z.device).index_add_(0, domain, p)
    counts = torch.bincount(domain, minlength=num_domains)
    present = counts > 0
    return sums / counts.clamp_min(1).unsqueeze(1).to(z.dtype), present


def js_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    m = 0.5 * (p + q)
    kl = lambda a, b: (a * (torch.log(a + eps) - torch.log(b + eps))).sum(-1)  # noqa: E731
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def js_regularizer(z: torch.Tensor, domain: torch.Tensor, num_domains: int) -> torch.Tensor:
    dist, present = domain_distributions(z, domain, num_domains)
    idx: List[int] = torch.nonzero(present).flatten().tolist()
    pairs = list(itertools.combinations(idx, 2))
    if not pairs:
        return z.sum() * 0.0
    a = torch.tensor([i for i, _ in pairs], device=z.device)
    b = torch.tensor([j for _, j in pairs], device=z.device)
    return js_divergence(dist[a], dist[b]).mean()


def mmd_regularizer(z: torch.Tensor, domain: torch.Tensor, num_domains: int, max_samples: int = 256) -> torch.Tensor:
    groups = []
    for d in range(num_domains):
        zd = z[domain == d]
        if zd.shape[0] > 0:
            groups.append(zd[:max_samples])
    if len(groups) < 2:
        return z.sum() * 0.0
    with torch.no_grad():
        allz = torch.cat(groups)
        bw = torch.cdist(allz, allz).median().clamp_min(1e-3)
    k = lambda x, y: torch.exp(-torch.cdist(x, y).pow(2) / (2 * bw * bw)).mean()  # noqa: E731
    vals = [k(x, x) + k(y, y) - 2 * k(x, y) for x, y in itertools.combinations(groups, 2)]
    return torch.stack(vals).mean()


def divergence(kind: str, z: torch.Tensor, domain: torch.Tensor, num_domains: int) -> torch.Tensor:
    if kind == "js":
        return js_regularizer(z, domain, num_domains)
    if kind == "mmd":
        return mmd_regularizer(z, domain, num_domains)
    return z.sum() * 0.0
