"""Non-finite guards for training: refuse an optimiser step on NaN/Inf gradients and describe where it happened.

The sparse (embedding) optimiser is fused into the backward pass, so only the dense step can still be refused:
`FiniteGradGuard` wraps the optimiser that `TrainPipelineSparseDist` calls and checks every dense gradient before
delegating `step()`. Dense gradients are all-reduced across ranks before the step, so every rank sees the same
non-finite gradient and raises in the same step (no rank is left waiting in a collective).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence

import torch

from recsys.errors import NumericsError

log = logging.getLogger("recsys.train.numerics")


class FiniteGradGuard:
    """Duck-typed optimiser (zero_grad/step/state_dict/param_groups) that raises `NumericsError` instead of
    stepping when a watched gradient is NaN or Inf. The wrapped optimiser is left untouched, so the weights
    stay as they were after the last good step (except embedding rows, updated in backward)."""

    def __init__(self, optimizer: Any, params: Dict[str, torch.Tensor]):
        self.optimizer = optimizer
        self.params = params

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def first_bad(self) -> Optional[str]:
        """Name of the first parameter whose gradient is not finite, else None. One reduction over all gradients
        first, so the common (all finite) case costs one pass per gradient, no temporaries and one host sync: a sum
        is NaN or Inf when any element is (or, rarely, when finite gradients overflow float32, a false alarm the
        per-parameter check below then clears). Only a non-finite total checks parameter by parameter."""
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        if not grads:
            return None
        total = torch.stack([g.detach().sum(dtype=torch.float32) for g in grads]).sum()
        if torch.isfinite(total):
            return None
        for name, p in self.params.items():
            if p.grad is not None and not torch.isfinite(p.grad).all():
                return name
        return None

    def step(self, closure=None) -> None:
        bad = self.first_bad()
        if bad is not None:
            raise NumericsError(f"non-finite gradient in parameter {bad}")
        self.optimizer.step()

    def __getattr__(self, name: str) -> Any:  # state_dict, param_groups, ... of the wrapped optimiser
        return getattr(self.optimizer, name)


def describe_batch(batch: Any, domain_names: Sequence[str], limit: int = 5) -> str:
    """`domains [...]; rows [...]` of a Batch (the rows are global row numbers of the split file)."""
    if batch is None:
        return "batch unknown"
    parts: List[str] = []
    dom = getattr(batch, "domain", None)
    if dom is not None:
        parts.append("domains " + str(sorted({domain_names[i] for i in dom.tolist()})))
    rows = getattr(batch, "row_id", None)
    if rows is not None:
        r = rows.tolist()
        shown = ", ".join(map(str, r[:limit])) + (", ..." if len(r) > limit else "")
        parts.append(f"{len(r)} rows, file rows [{shown}]")
    return "; ".join(parts) or "batch unknown"
