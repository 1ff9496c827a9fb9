"""Offline ranking metrics on scores in file order: AUC, GAUC and logloss.

AUC counts tied scores as half a correct pair. torchmetrics' binary_auroc was the first choice, but it squashes
logits through a float32 sigmoid, which merges nearly equal scores into ties and moves AUC in the 5th decimal; the
rank formula below is exact and vectorised. GAUC averages per-user AUCs weighted by
the user's row count and skips users whose rows all share one label — the same definitions as the independent
scorer `shared/tools/score_amazon_sr.py`, so our numbers can be checked against it.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney AUC: one user group."""
    return gauc(np.zeros(len(labels), dtype=np.int8), np.asarray(labels), np.asarray(scores))


def gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Vectorised: one lexsort, tie-averaged ranks inside each user, one reduceat per quantity."""
    if len(labels) == 0:
        return float("nan")
    _, user_idx = np.unique(users, return_inverse=True)
    order = np.lexsort((scores, user_idx))
    u, s, y = user_idx[order], np.asarray(scores, dtype=np.float64)[order], labels[order].astype(np.float64)
    n = len(u)
    group_start = np.r_[0, np.flatnonzero(u[1:] != u[:-1]) + 1]
    tie_start = np.r_[0, np.flatnonzero((u[1:] != u[:-1]) | (s[1:] != s[:-1])) + 1]
    tie_end = np.r_[tie_start[1:], n]
    avg_pos = np.repeat((tie_start + tie_end - 1) / 2.0, tie_end - tie_start)  # average 0-based position of ties
    start_of_row = np.repeat(group_start, np.diff(np.r_[group_start, n]))
    rank = avg_pos - start_of_row + 1.0
    n_rows = np.diff(np.r_[group_start, n]).astype(np.float64)
    n_pos = np.add.reduceat(y, group_start)
    rank_sum = np.add.reduceat(rank * y, group_start)
    n_neg = n_rows - n_pos
    ok = (n_pos > 0) & (n_neg > 0)
    if not ok.any():
        return float("nan")
    group_auc = (rank_sum[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2) / (n_pos[ok] * n_neg[ok])
    return float((group_auc * n_rows[ok]).sum() / n_rows[ok].sum())


def logloss(labels: np.ndarray, logits: np.ndarray) -> float:
    if len(labels) == 0:
        return float("nan")
    t = torch.from_numpy(np.asarray(logits, dtype=np.float64))
    return float(torch.nn.functional.binary_cross_entropy_with_logits(t, torch.from_numpy(labels.astype(np.float64))))


def metric_block(labels: np.ndarray, logits: np.ndarray, users: np.ndarray,
                 cold: Optional[np.ndarray] = None) -> Dict[str, float]:
    out = {"rows": int(len(labels)), "auc": auc(labels, logits), "gauc": gauc(users, labels, logits),
           "logloss": logloss(labels, logits)}
    if cold is not None:
        out["cold_rows"] = int(cold.sum())
        out["cold_auc"] = auc(labels[cold], logits[cold])
    return out
