"""Per-domain AUC and normalised entropy (NE) of the training stream, over a sliding window of the most recent
samples, with TorchRec's metric module (`torchrec.metrics.RecMetricModule`, one task per domain: a row counts for
its domain's task with weight 1 and for the others with weight 0). The window is global (all ranks' samples);
`compute()` is collective. These are the training-time curves for TensorBoard; the numbers that select epochs and
go into tables come from recsys/train/evaluation.py, exact over a whole split.

Cost: the module runs after every training step, so it is kept small. The three domains' tasks are one fused
computation (`FUSED_TASKS_COMPUTATION`: one [tasks, batch] update per metric instead of one per task; the same
window, the same values), and update and compute run on one intra-op thread: their tensors are a few thousand
values, too small to gain from a second thread, and on a busy machine a parallel region waits for the core another
process holds (recsys.hardware.intra_op_threads)."""
from __future__ import annotations

from typing import Dict, Optional

import torch

from recsys.hardware import intra_op_threads
from recsys.spec.config import Spec


class LiveMetrics:
    def __init__(self, spec: Spec, batch_size_per_rank: int, world_size: int, rank: int, device: torch.device,
                 process_group: Optional[object] = None):
        from torchrec.metrics.metric_module import RecMetricModule, generate_metric_module
        from torchrec.metrics.metrics_config import (MetricsConfig, RecComputeMode, RecMetricDef, RecMetricEnum,
                                                     RecTaskInfo)

        self.domains = [d.name for d in spec.domains]
        tasks = [RecTaskInfo(name=d, label_name="label", prediction_name="prediction", weight_name=f"weight_{d}")
                 for d in self.domains]
        window = spec.train.live_metrics_window
        config = MetricsConfig(
            rec_tasks=tasks,
            rec_metrics={RecMetricEnum.AUC: RecMetricDef(rec_tasks=tasks, window_size=window),
                         RecMetricEnum.NE: RecMetricDef(rec_tasks=tasks, window_size=window)},
            rec_compute_mode=RecComputeMode.FUSED_TASKS_COMPUTATION,
            compute_interval_steps=1)  # the loop decides when to compute (every train.log_every_steps)
        self.module = generate_metric_module(RecMetricModule, config, batch_size=batch_size_per_rank,
                                             world_size=world_size, my_rank=rank, state_metrics_mapping={},
                                             device=device, process_group=process_group)

    def update(self, logits: torch.Tensor, labels: torch.Tensor, domain: torch.Tensor) -> None:
        with intra_op_threads(1):
            out = {"prediction": torch.sigmoid(logits.detach().float()), "label": labels.detach().float()}
            for i, d in enumerate(self.domains):
                out[f"weight_{d}"] = (domain == i).float()
            self.module.update(out)

    def compute(self) -> Dict[str, float]:
        """`<domain>/auc` and `<domain>/ne` over the window (collective: every rank calls it at the same step)."""
        with intra_op_threads(1):
            raw = self.module.compute()
        raw = raw.resolve() if hasattr(raw, "resolve") else raw
        out: Dict[str, float] = {}
        for key, value in raw.items():  # e.g. "auc-<domain>|window_auc", "ne-<domain>|window_ne"
            metric_task, _, name = key.partition("|")
            metric, _, task = metric_task.partition("-")
            if name == f"window_{metric}" and task in self.domains:
                v = float(value.reshape(-1)[0])
                if v == v:
                    out[f"{task}/{metric}"] = v
        return out
