"""L2, Domain Adaptive Multi-Task: from the fused user/query/item vectors to one logit per sample.

Every tower maps the input x [B, F] and the domain index [B] to (h [B, H], z [B, Z]): h feeds the per-domain heads,
z is the representation whose cross-domain divergence the regulariser measures.
- `sr_foundation` (the paper): a domain adaptive layer z = LN(W x) * (1 + gamma(E_D)) + beta(E_D) maps every domain
  into one common space conditioned on its domain embedding, then a shared MLP.
- `shared_bottom`, `mmoe`, `ple`, `star`: the multi-domain baselines.
Heads: one per domain (a search head for search domains, a rec head for rec domains: same shape, separate weights),
plus a per-domain linear "wide" term on L0's interactions so text similarity can score cold items directly.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

from recsys.models.domain_ops import domain_rows
from recsys.models.encoding import weighted_sum


def mlp(sizes: List[int], dropout: float = 0.0, last_act: bool = True) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if last_act or i < len(sizes) - 2:
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class DomainAdaptiveTower(nn.Module):
    def __init__(self, in_dim: int, hidden: List[int], num_domains: int, dropout: float, adaptive: bool = True):
        super().__init__()
        self.adaptive = adaptive
        self.common = nn.Linear(in_dim, hidden[0])
        self.norm = nn.LayerNorm(hidden[0])
        if adaptive:
            self.domain_embedding = nn.Embedding(num_domains, hidden[0])
            nn.init.normal_(self.domain_embedding.weight, std=0.1)
            self.film = nn.Linear(hidden[0], 2 * hidden[0])
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)
        self.shared = mlp(hidden, dropout)

    def forward(self, x: torch.Tensor, domain: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        z = self.norm(self.common(x))
        if self.adaptive:
            # FiLM of each *domain* once, then a row lookup: per sample it was ~45% of the model's FLOPs
            gamma, beta = domain_rows(self.film(self.domain_embedding.weight), domain).chunk(2, dim=1)
            z = z * (1 + gamma) + beta
        h = self.shared(torch.relu(z)) if len(self.shared) else torch.relu(z)
        return h, z


class SharedBottom(nn.Module):
    def __init__(self, in_dim: int, hidden: List[int], dropout: float):
        super().__init__()
        self.bottom = mlp([in_dim] + hidden, dropout)

    def forward(self, x, domain):
        h = self.bottom(x)
        return h, h


class MMoE(nn.Module):
    def __init__(self, in_dim: int, hidden: List[int], num_domains: int, num_experts: int, dropout: float):
        super().__init__()
        self.experts = nn.ModuleList(mlp([in_dim] + hidden, dropout) for _ in range(num_experts))
        self.gates = nn.Linear(in_dim, num_domains * num_experts)
        self.num_domains, self.num_experts = num_domains, num_experts

    def forward(self, x, domain):
        e = torch.stack([m(x) for m in self.experts], dim=1)  # [B, E, H]
        g = self.gates(x).view(-1, self.num_domains, self.num_experts)
        g = torch.softmax(g[torch.arange(x.shape[0], device=x.device), domain], dim=1)  # the sample's own gate
        h = weighted_sum(g, e)
        return h, h


class PLE(nn.Module):
    """One extraction layer: shared experts plus domain-specific experts, each domain gating over its own
    specific experts and the shared ones."""

    def __init__(self, in_dim: int, hidden: List[int], num_domains: int, num_shared: int, num_specific: int,
                 dropout: float):
        super().__init__()
        self.shared = nn.ModuleList(mlp([in_dim] + hidden, dropout) for _ in range(num_shared))
        self.specific = nn.ModuleList(mlp([in_dim] + hidden, dropout) for _ in range(num_domains * num_specific))
        self.gates = nn.Linear(in_dim, num_domains * (num_shared + num_specific))
        self.nd, self.ns, self.nsp = num_domains, num_shared, num_specific

    def forward(self, x, domain):
        shared = torch.stack([m(x) for m in self.shared], dim=1)  # [B, S, H]
        spec = torch.stack([m(x) for m in self.specific], dim=1).view(x.shape[0], self.nd, self.nsp, -1)
        rows = torch.arange(x.shape[0], device=x.device)
        own = spec[rows, domain]  # [B, P, H]
        experts = torch.cat([shared, own], dim=1)
        g = self.gates(x).view(-1, self.nd, self.ns + self.nsp)[rows, domain]
        h = weighted_sum(torch.softmax(g, dim=1), experts)
        return h, h


class StarLayer(nn.Module):
    """STAR: the weight of each domain is the element-wise product of a shared and a domain-specific matrix."""

    def __init__(self, in_dim: int, out_dim: int, num_domains: int):
        super().__init__()
        self.shared_w = nn.Parameter(torch.empty(in_dim, out_dim))
        nn.init.xavier_uniform_(self.shared_w)
        self.shared_b = nn.Parameter(torch.zeros(out_dim))
        self.domain_w = nn.Parameter(torch.ones(num_domains, in_dim, out_dim))
        self.domain_b = nn.Parameter(torch.zeros(num_domains, out_dim))

    def forward(self, x, domain):
        # Every domain's weights applied to every sample in one GEMM, then each sample's own block picked: K x the
        # FLOPs of one layer, but static shapes (no per-domain nonzero/unique, which synchronise with the host).
        k, d_out = self.domain_w.shape[0], self.shared_w.shape[1]
        w = (self.shared_w.unsqueeze(0) * self.domain_w).permute(1, 0, 2).reshape(x.shape[1], k * d_out)
        every = (x @ w).view(x.shape[0], k, d_out)
        own = every.gather(1, domain.view(-1, 1, 1).expand(-1, 1, d_out)).squeeze(1)
        return own + self.shared_b + domain_rows(self.domain_b, domain)


class Star(nn.Module):
    def __init__(self, in_dim: int, hidden: List[int], num_domains: int):
        super().__init__()
        # partitioned normalisation: shared scale/shift times per-domain scale/shift
        self.norm = nn.LayerNorm(in_dim, elementwise_affine=False)
        self.pn_gamma = nn.Parameter(torch.ones(num_domains, in_dim))
        self.pn_beta = nn.Parameter(torch.zeros(num_domains, in_dim))
        sizes = [in_dim] + hidden
        self.layers = nn.ModuleList(StarLayer(a, b, num_domains) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x, domain):
        x = self.norm(x) * domain_rows(self.pn_gamma, domain) + domain_rows(self.pn_beta, domain)
        for layer in self.layers:
            x = torch.relu(layer(x, domain))
        return x, x


def build_tower(kind: str, in_dim: int, hidden: List[int], num_domains: int, num_experts: int, num_specific: int,
                dropout: float, domain_adaptive: bool) -> nn.Module:
    if kind == "sr_foundation":
        return DomainAdaptiveTower(in_dim, hidden, num_domains, dropout, adaptive=domain_adaptive)
    if kind == "shared_bottom":
        return SharedBottom(in_dim, hidden, dropout)
    if kind == "mmoe":
        return MMoE(in_dim, hidden, num_domains, num_experts, dropout)
    if kind == "ple":
        return PLE(in_dim, hidden, num_domains, num_experts, num_specific, dropout)
    if kind == "star":
        return Star(in_dim, hidden, num_domains)
    raise ValueError(f"unknown tower {kind!r}")


class DomainHeads(nn.Module):
    """Per-domain logit: head_d(h) + wide_d . interactions + b_d, computed for all domains at once and gathered."""

    def __init__(self, hidden_dim: int, num_interactions: int, num_domains: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(num_domains, hidden_dim) * (1.0 / hidden_dim ** 0.5))
        self.wide = nn.Parameter(torch.zeros(num_domains, max(num_interactions, 1)))
        self.b = nn.Parameter(torch.zeros(num_domains))
        self.num_interactions = num_interactions

    def forward(self, h: torch.Tensor, interactions: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        # Every domain's logit for every sample as one [B, H] x [H, K] product (K domains, a handful), then each
        # sample's own column: the same sums as (h * w[domain]).sum(1), but one GEMM where the per-sample row
        # lookup made three element-wise passes over [B, H] (multiply forward, two multiplies backward) and a
        # scatter of [B, H] gradient rows into the K-row table. A matmul like the tower's, so under bf16 autocast
        # it runs in bf16 as they do.
        every = torch.matmul(h, self.w.t())
        if self.num_interactions:
            every = every + torch.matmul(interactions, self.wide.t())
        return (every + self.b).gather(1, domain.unsqueeze(1)).squeeze(1)
