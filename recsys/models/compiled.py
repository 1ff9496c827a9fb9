"""torch.compile of the dense layers in training (`train.compile`: `auto`, or true / false, YAML's on / off).

A small model's CPU step is mostly per-op overhead: the peers' configuration runs some 500 ATen ops per step on
[B, 16..128] tensors (projections, LayerNorms, gating, the tower, the heads, the JS regulariser's softmax and
pairwise terms), each paying dispatch and one pass over memory. Inductor fuses the elementwise chains between the
GEMMs into a few C++ loops, forward and backward. What is compiled: L0's aspect projections (each Linear +
LayerNorm, with the concatenations before and the stacking after: `UserQueryItemEncoder.project`) as one graph, and
L1 + L2 as another (`SRFoundationModel.dense`). The embedding lookups (FBGEMM kernels behind
TorchRec's sharded modules, which the train pipeline rewires) and the history attention (its own fused autograd
function) stay as they are.

The compiled path runs only in training mode, only for the batch size it was first compiled for, and never while
TorchRec's train pipeline fx-traces the model (that trace only locates the embedding modules' inputs). Evaluation,
serving, the last partial batch of an epoch and fx tracing take the plain forward: no recompilation per shape, and
what evaluation computes does not depend on this setting.

`auto` compiles where it can pay: on CPU (GPU steps were not measured with it), where inductor's C++ compiler is
installed, and for a run of at least COMPILE_MIN_STEPS training steps in the process. The first compile takes tens
of seconds of one core (a 2-core Xeon: ~30 s; later runs on the same machine reuse inductor's on-disk cache, a few
seconds) and saves a few milliseconds per step, so short runs (tests, smoke runs, one amazon-sr pass of ~900 steps)
stay plain. The decision is from the device, the installed compiler and the run's length, never from a timing.
"""
from __future__ import annotations

import functools
import shutil
from typing import Callable, Optional, Tuple, Union

import torch
from torch import nn
from torch.utils import _pytree

from recsys.models.fx import fx_tracing

# Training steps a process must plan before `auto` compiles: a fresh compile (~30 s of one core measured on a 2-core
# Xeon) against ~3 ms saved per step of the peers' configuration there; below ~10k steps it does not repay itself.
COMPILE_MIN_STEPS = 10_000


@functools.lru_cache(maxsize=None)
def cpp_compiler() -> Optional[str]:
    """The C++ compiler inductor's CPU backend would call, if installed (its config names it; `None` there means
    its own search list, of which g++ and clang++ are the usual members)."""
    from torch._inductor import config

    names = config.cpp.cxx if isinstance(config.cpp.cxx, tuple) else (config.cpp.cxx,)
    for name in [n for n in names if n] or ["g++", "clang++"]:
        path = shutil.which(name)
        if path:
            return path
    return None


def resolve_compile(setting: Union[str, bool], device_type: str,
                    planned_steps: Optional[int]) -> Tuple[bool, str]:
    """(whether to compile the dense layers, why) for a `train.compile` setting (`auto`, True, False).
    `planned_steps`: the training steps this process will run (None: unknown, which `auto` treats as too few to
    repay a compile)."""
    if setting is False:
        return False, "train.compile: off set explicitly"
    compiler = cpp_compiler() if device_type == "cpu" else "n/a"
    if setting is True:
        if device_type == "cpu" and compiler is None:
            return False, "train.compile: on, but no C++ compiler for inductor's CPU backend is installed: plain"
        return True, "train.compile: on set explicitly"
    if setting != "auto":
        raise ValueError(f"train.compile: unknown setting {setting!r} (auto, true/on, false/off)")
    if device_type != "cpu":
        return False, f"train.compile: auto -> off (device {device_type}: only CPU steps were measured compiled)"
    if compiler is None:
        return False, "train.compile: auto -> off (no C++ compiler for inductor's CPU backend)"
    if planned_steps is None or planned_steps < COMPILE_MIN_STEPS:
        return False, (f"train.compile: auto -> off ({planned_steps or 'an unknown number of'} training steps < "
                       f"{COMPILE_MIN_STEPS:,}: the compile would cost more than it saves)")
    return True, f"train.compile: auto -> on ({planned_steps:,} training steps on CPU, compiler {compiler})"


def _batch_size(args, kwargs) -> Optional[int]:
    for leaf in _pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return None


def compile_in_training(module: nn.Module, method: str = "forward") -> None:
    """Route `module.<method>` through torch.compile while `module` trains at the batch size of its first compiled
    call; every other call (eval mode, another batch size, fx tracing) runs the plain method. The plain method
    stays reachable as the class's own (`type(module).<method>`), state dicts are untouched."""
    plain: Callable = getattr(module, method)
    compiled = torch.compile(plain, dynamic=False)
    size: list = []  # the batch size compiled for, set by the first compiled call

    @functools.wraps(plain)
    def run(*args, **kwargs):
        if module.training and not fx_tracing() and not torch.compiler.is_compiling():
            b = _batch_size(args, kwargs)
            if not size:
                size.append(b)
            if b == size[0]:
                return compiled(*args, **kwargs)
        return plain(*args, **kwargs)

    setattr(module, method, run)


def compile_dense_layers(model: nn.Module) -> None:
    """The dense layers of an SRFoundationModel: L0's aspect projections as one graph, L1 + L2 as another (two
    compiled regions a step: each region's entry costs guards and an autograd node)."""
    compile_in_training(model.l0, "project")
    compile_in_training(model, "dense")
