"""The training step an epoch drives: TorchRec's `TrainPipelineSparseDist`, or on one CPU process a plain step.

The pipeline overlaps a batch's input distribution (the KJT all-to-all) and its host-to-device copy with the previous
batch's compute. One process on CPU has nothing to overlap: the all-to-all is with itself, there is no copy, and
every stage runs on the thread that drives the step. There the pipeline's own work (per-batch contexts, the
fx-rewritten forwards, the input distribution split into its awaitable stages) is pure cost: the peers'
configuration on amazon-sr (one process, 2-core Xeon, pre-built batches) steps in 12.8 ms through the pipeline and
12.1 ms through `OneProcessStep` (benchmarks/throughput.py). `OneProcessStep` runs the same forward, loss sum,
backward and optimiser step per batch, in the same batch order, so training is the same
(tests/train/test_step.py); its `batches` and `detach` are what the trainer reads of the pipeline.
"""
from __future__ import annotations

from typing import Any, Iterator, List

import torch
from torch import nn


class OneProcessStep:
    """`progress(it)` trains on the next batch of `it` and returns the model's output, as
    `TrainPipelineSparseDist.progress` does; StopIteration once `it` is exhausted. `batches[0]` is the batch the
    next `progress` trains on (empty before the first call, as the pipeline's)."""

    def __init__(self, model: nn.Module, optimizer: Any):
        self.model = model
        self.optimizer = optimizer
        self.batches: List[Any] = []
        self._started = False

    def progress(self, it: Iterator[Any]) -> Any:
        if not self._started:
            self._started = True
            self._read(it)
        if not self.batches:
            raise StopIteration
        batch = self.batches.pop(0)
        if self.model.training:
            self.optimizer.zero_grad()
        losses, output = self.model(batch)
        if self.model.training:
            torch.sum(losses, dim=0).backward()
            self.optimizer.step()
        self._read(it)  # the batch of the next step, for `batches[0]` (the trainer names it in a numerics error)
        return output

    def _read(self, it: Iterator[Any]) -> None:
        try:
            self.batches.append(next(it))
        except StopIteration:
            pass

    def detach(self) -> nn.Module:
        """The pipeline's `detach` restores the modules' own forwards; this step never replaced them."""
        return self.model


def make_train_step(model: nn.Module, optimizer: Any, device: torch.device, world_size: int):
    """`OneProcessStep` for one process on CPU, TorchRec's `TrainPipelineSparseDist` otherwise (several ranks, or a
    GPU, where it overlaps communication and copies with compute)."""
    if world_size == 1 and device.type == "cpu":
        return OneProcessStep(model, optimizer)
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    return TrainPipelineSparseDist(model, optimizer, device, execute_all_batches=True)
