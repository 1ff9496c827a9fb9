"""Training-time per-domain AUC / NE (torchrec.metrics RecMetricModule, windowed) agree with the exact metrics of
recsys.metrics computed on the same last-N samples."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys.metrics import auc


def _ne(p: np.ndarray, y: np.ndarray) -> float:
    eps = 1e-12
    ll = -np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps))
    r = y.mean()
    return ll / -(r * np.log(r) + (1 - r) * np.log(1 - r))


def test_window_auc_and_ne_match_exact_metrics_per_domain(tiny_spec):
    from recsys.train.live_metrics import LiveMetrics

    spec = tiny_spec("train.live_metrics_window=2048")
    batch = 512
    live = LiveMetrics(spec, batch, world_size=1, rank=0, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    logits, labels, domains = [], [], []
    for step in range(10):  # 5120 samples: the window holds the last 2048 (4 batches)
        d = torch.randint(0, len(spec.domains), (batch,), generator=g)
        y = torch.randint(0, 2, (batch,), generator=g).float()
        # the score's quality drifts over time, so a window and the whole stream differ
        x = (y * 2 - 1) * (0.2 + 0.15 * step) + torch.randn(batch, generator=g) + 0.3 * d
        live.update(x, y, d)
        logits.append(x), labels.append(y), domains.append(d)
    got = live.compute()
    x, y, d = (torch.cat(t)[-2048:].numpy() for t in (logits, labels, domains))
    p = 1 / (1 + np.exp(-x))
    for i, dom in enumerate(spec.domains):
        m = d == i
        assert got[f"{dom.name}/auc"] == pytest.approx(auc(y[m], p[m]), abs=1e-4)
        assert got[f"{dom.name}/ne"] == pytest.approx(_ne(p[m], y[m]), rel=1e-3)
    whole = torch.cat(logits).numpy(), torch.cat(labels).numpy(), torch.cat(domains).numpy()
    m0 = whole[2] == 0
    assert abs(got[f"{spec.domains[0].name}/auc"] - auc(whole[1][m0], 1 / (1 + np.exp(-whole[0][m0])))) > 1e-3


def test_live_metrics_update_runs_on_one_thread(tiny_spec, monkeypatch):
    """The training-window metrics' tensor work runs on one intra-op thread (see recsys.train.live_metrics)."""
    import torch

    from recsys.train.live_metrics import LiveMetrics

    spec = tiny_spec("train.live_metrics_window=1024")
    live = LiveMetrics(spec, 256, world_size=1, rank=0, device=torch.device("cpu"))
    seen = []
    original = live.module.update
    monkeypatch.setattr(live.module, "update", lambda out: (seen.append(torch.get_num_threads()), original(out)))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        live.update(torch.randn(256), torch.randint(0, 2, (256,)).float(), torch.randint(0, len(spec.domains), (256,)))
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
