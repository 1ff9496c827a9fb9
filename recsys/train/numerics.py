"""Non-finite guards for training: refuse an optimiser step on NaN/Inf gradients and describe where it happened.

The sparse (embedding) optimiser is fused into the backward pass, so only the dense step can still be refused:
`FiniteGradGuard` wraps the optimiser that `TrainPipelineSparseDist` calls and checks every dense gradient before
delegating `step()`. Dense gradients are all-reduced across ranks before the step, so every rank sees the same
non-finite gradient and raises in the same step (no rank is left waiting in a collective).

The check itself is one fused pass on the device (`torch._amp_foreach_non_finite_check_and_unscale_`, the kernel
AMP's GradScaler uses: per element, so finite gradients never raise a false alarm) writing a 0/1 flag. What happens
with the flag depends on `defer`:
- `defer=False` (CPU, or an optimiser that cannot skip on the device): the flag is read on the host before the step
  and a non-finite gradient raises before anything is stepped. On CPU this read costs nothing.
- `defer=True` (CUDA): the flag is handed to the fused optimisers as `found_inf`, so their kernels skip the update
  (and Adam's step count) on the device, without the host waiting; the flag is copied to pinned host memory behind
  a CUDA event and read at the next `zero_grad()` (when the event has long completed, and the bad step's gradients
  are still there to name the parameter) or at `flush()`, which the loop calls before every checkpoint and at the
  end of an epoch. The error then says `steps_ago=1`. Optimisers that cannot read `found_inf` (the row-wise
  optimiser of small data-parallel tables) are `restorable`: their parameters and state tensors are copied before
  the step and put back on the device where the flag is set (`torch.where`, no host read). No weight is ever
  stepped on a non-finite gradient.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence

import torch

from recsys.errors import NumericsError

log = logging.getLogger("recsys.train.numerics")


class DeferredNumericsError(NumericsError):
    """A non-finite gradient found `steps_ago` steps after the step it belongs to (that step was skipped)."""

    def __init__(self, message: str, steps_ago: int):
        super().__init__(message)
        self.steps_ago = steps_ago


class _HostFlag:
    """A device scalar readable on the host later without a stream-wide sync (pinned copy + event on CUDA)."""

    def __init__(self, flag: torch.Tensor):
        if flag.is_cuda:
            self.host = torch.empty((), dtype=flag.dtype, pin_memory=True)
            self.host.copy_(flag, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = flag, None

    def is_set(self) -> bool:
        if self.event is not None:
            self.event.synchronize()  # waits for this step's check only, not for work queued after it
        return bool(self.host)


class FiniteGradGuard:
    """Duck-typed optimiser (zero_grad/step/state_dict/param_groups) that never steps on a NaN or Inf gradient of
    a watched parameter and raises `NumericsError` naming it. The wrapped optimiser's state stays as it was after
    the last good step (except embedding rows, updated in backward).

    `device_skippable`: the torch optimisers that can skip a step on the device (fused ones read `found_inf`);
    `restorable`: other optimisers, undone on the device after a bad step (keep them small: one copy per step);
    `defer=True` requires every watched parameter to be stepped by one of them."""

    def __init__(self, optimizer: Any, params: Dict[str, torch.Tensor], defer: bool = False,
                 device_skippable: Sequence[torch.optim.Optimizer] = (),
                 restorable: Sequence[torch.optim.Optimizer] = ()):
        self.optimizer = optimizer
        self.params = params
        self.defer = defer
        self.device_skippable = list(device_skippable)
        self.restorable = list(restorable)
        self._pending: Optional[_HostFlag] = None
        if defer:
            covered = {id(p) for o in [*self.device_skippable, *self.restorable] for g in o.param_groups
                       for p in g["params"]}
            unfused = [o for o in self.device_skippable if not o.defaults.get("fused")]
            missing = [n for n, p in params.items() if id(p) not in covered]
            if unfused or missing:
                raise ValueError("defer=True needs fused optimisers stepping every watched parameter; not covered: "
                                 f"{missing[:3]}, not fused: {[type(o).__name__ for o in unfused]}")

    def _grads(self) -> List[torch.Tensor]:
        return [p.grad for p in self.params.values() if p.grad is not None]

    def _flag(self) -> Optional[torch.Tensor]:
        """0/1 float scalar on the gradients' device, set when any watched gradient has a NaN or Inf."""
        grads = self._grads()
        if not grads:
            return None
        found = torch.zeros((), dtype=torch.float32, device=grads[0].device)
        one = torch.ones((), dtype=torch.float32, device=grads[0].device)
        # grouped by device and dtype, as the fused kernel requires; x1.0 leaves the gradients untouched
        groups: Dict[Any, List[torch.Tensor]] = {}
        for g in grads:
            groups.setdefault((g.device, g.dtype), []).append(g.detach())
        for (device, _), gs in groups.items():
            if device != found.device:
                f = torch.zeros((), dtype=torch.float32, device=device)
                torch._amp_foreach_non_finite_check_and_unscale_(gs, f, one.to(device))
                found = torch.maximum(found, f.to(found.device))
            else:
                torch._amp_foreach_non_finite_check_and_unscale_(gs, found, one)
        return found

    def first_bad(self) -> Optional[str]:
        """Name of the first parameter whose gradient is not finite, else None (reads the flag on the host)."""
        flag = self._flag()
        if flag is None or not bool(flag):
            return None
        for name, p in self.params.items():
            if p.grad is not None and not torch.isfinite(p.grad).all():
                return name
        return None

    def _raise_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and pending.is_set():
            bad = next((n for n, p in self.params.items()
                        if p.grad is not None and not torch.isfinite(p.grad).all()), "unknown")
            raise DeferredNumericsError(f"non-finite gradient in parameter {bad} (that step was skipped)", 1)

    def flush(self) -> None:
        """Raise now if the last step's gradients were non-finite (deferred mode; a no-op otherwise)."""
        self._raise_pending()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._raise_pending()  # before the gradients that name the bad parameter are cleared
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None) -> None:
        if not self.defer:
            bad = self.first_bad()
            if bad is not None:
                raise NumericsError(f"non-finite gradient in parameter {bad}")
            self.optimizer.step()
            return
        flag = self._flag()
        saved = self._snapshot() if flag is not None else []
        for opt in self.device_skippable:
            opt.found_inf = flag  # the fused kernels skip the update when it is 1
        try:
            self.optimizer.step()
        finally:
            for opt in self.device_skippable:
                opt.found_inf = None
        if flag is not None:
            bad = flag.bool()
            with torch.no_grad():
                for t, old in saved:  # undo the unfused optimisers' step where the flag is set
                    t.copy_(torch.where(bad, old, t))
            self._pending = _HostFlag(flag)

    def _snapshot(self) -> List[Any]:
        """(tensor, copy) of every parameter and state tensor of the restorable optimisers."""
        out = []
        with torch.no_grad():
            for opt in self.restorable:
                for group in opt.param_groups:
                    for p in group["params"]:
                        tensors = [p, *(v for v in opt.state.get(p, {}).values() if torch.is_tensor(v))]
                        out.extend((t, t.detach().clone()) for t in tensors)
        return out

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
