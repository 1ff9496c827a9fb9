"""Compute precision of the dense layers (`train.precision`: `auto`, `fp32` or `bf16`).

`bf16` runs the dense matmuls (aspect projections, L1 gating, the L2 tower and heads) under autocast in bfloat16
while weights, optimiser state, the embedding tables, the history attention and the text cosines stay float32.
On CPUs with AVX512-BF16 or AMX (and on GPUs with bf16 units) a bf16 GEMM of the tower's shape is faster than fp32
(~4.6x with AMX on an Intel Xeon, 2.1-3.0x with AVX512-BF16 alone on an AMD EPYC, docs/cpu_speed.md); on a CPU
without them (AVX2, plain AVX512) oneDNN emulates it and it is ~100x *slower*. So `auto` (the default) picks bf16
only where the device runs it natively and fp32 elsewhere; an explicit setting is honoured. End to end the gain
depends on how much of the step the GEMMs are: +15% on the AMX Xeon, even (1.03-1.06x) on that EPYC.
The history attention is left in fp32 because casting its [B, L, D] inputs costs more than its small products
save, and the cosine interactions that carry cold items keep full precision. The setting applies to training
steps only: a model in eval mode (validation, evaluate, score, serving) always runs fp32, so its predictions do not
depend on which CPU trained or evaluates it."""
from __future__ import annotations

import contextlib
import functools
from typing import Tuple

import torch

from recsys import hardware
from recsys.models.fx import fx_tracing


def bf16_native(device_type: str) -> Tuple[bool, str]:
    """(whether `device_type` runs bf16 matmuls in hardware, the reason in words)."""
    if device_type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
        return ok, f"{name} {'has' if ok else 'lacks'} native bf16"
    if device_type == "cpu":
        cpu = hardware.cpu_info()
        if cpu.bf16_native:
            return True, f"CPU {cpu.model} has {'/'.join(sorted(cpu.flags))} (torch capability {cpu.capability})"
        return False, (f"CPU {cpu.model} has no AVX512-BF16/AMX/Arm-BF16 (torch capability {cpu.capability}): "
                       f"bf16 matmuls would be emulated, far slower than fp32")
    return False, f"device type {device_type!r}: bf16 not known to be native"


def resolve_precision(setting: str, device_type: str) -> Tuple[str, str]:
    """(`fp32` or `bf16`, why) for a `train.precision` setting on a device type."""
    if setting in ("fp32", "bf16"):
        return setting, f"train.precision: {setting} set explicitly"
    if setting != "auto":
        raise ValueError(f"train.precision: unknown setting {setting!r} (auto, fp32, bf16)")
    native, why = bf16_native(device_type)
    return ("bf16" if native else "fp32"), f"train.precision: auto -> {'bf16' if native else 'fp32'} ({why})"


@functools.lru_cache(maxsize=None)
def effective_precision(setting: str, device_type: str) -> str:
    """resolve_precision's answer, cached per (setting, device type): forward calls it every step."""
    return resolve_precision(setting, device_type)[0]


def dense_autocast(precision: str, like: torch.Tensor, training: bool):
    """Autocast context for the dense layers; `like` is any parameter of the model (its device picks the autocast
    backend and, for `auto`, the precision); `training` is the calling module's mode (eval mode runs fp32). While
    TorchRec's train pipeline fx-traces forward (only to find the embedding modules' inputs; the traced graph is not
    run) parameters are proxies, so no autocast is entered."""
    if precision == "fp32" or not training or fx_tracing():
        return contextlib.nullcontext()
    if effective_precision(precision, like.device.type) != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(like.device.type, dtype=torch.bfloat16)
