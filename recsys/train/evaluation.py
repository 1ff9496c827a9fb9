"""Scores for a whole split in file order, and the metric tables built from them.

Each rank scores its share of the split; (row_id, logit) pairs are gathered on every rank and placed by row_id, so
the result is the split's row order whatever the sharding. Labels, domains, users and slice flags are read from the
split file itself (not from the model's batches), which keeps the metrics honest and identical to what the
independent scorer computes from the saved predictions.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Dict, List

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from recsys.data.features import active_domains
from recsys.errors import RecsysError
from recsys.metrics import metric_block
from recsys.spec.config import Spec
from recsys.train.dist import DistContext

log = logging.getLogger("recsys.train.evaluation")


@torch.no_grad()
def predict(model: torch.nn.Module, spec: Spec, split: str, ctx: DistContext) -> np.ndarray:
    """Logits for every row of `split` in file order; NaN for rows the model does not score (inactive domains)."""
    from recsys.data.loader import BatchLoader
    from recsys.data.paths import split_path
    from recsys.train.sharding import sharded_kjt_order

    loader = BatchLoader(spec, split, batch_size=max(1, spec.train.eval_batch_size // ctx.world_size),
                         rank=ctx.rank, world_size=ctx.world_size, seed=spec.train.seed, shuffle=False,
                         eval_mode=True, kjt_order=sharded_kjt_order(model, spec))
    was_training = model.training
    model.eval()
    rows: List[np.ndarray] = []
    logits: List[np.ndarray] = []
    for batch in loader:
        batch = batch.to(ctx.device)
        _, out = model(batch)
        keep = batch.row_id >= 0  # padding rows that equalise the ranks' batch counts carry row_id -1
        rows.append(batch.row_id[keep].cpu().numpy())
        logits.append(out[1][keep].float().cpu().numpy())
    model.train(was_training)
    mine = (np.concatenate(rows) if rows else np.zeros(0, np.int64),
            np.concatenate(logits) if logits else np.zeros(0, np.float32))
    parts = [mine]
    if dist.is_initialized() and ctx.world_size > 1:
        parts = [None] * ctx.world_size
        dist.all_gather_object(parts, mine)
    n = pq.ParquetFile(split_path(spec, split)).metadata.num_rows
    scores = np.full(n, np.nan, dtype=np.float64)
    for r, s in parts:
        scores[r] = s
    return scores


def split_columns(spec: Spec, split: str) -> Dict[str, np.ndarray]:
    from recsys.data.paths import split_path

    d = spec.data
    cols = [d.domain_column, d.label_column, d.user_column] + list(d.slice_columns)
    t = pq.read_table(split_path(spec, split), columns=cols)
    return {c: t[c].to_numpy(zero_copy_only=False) for c in cols}


def metrics_from_scores(spec: Spec, split: str, scores: np.ndarray) -> Dict[str, Any]:
    d = spec.data
    cols = split_columns(spec, split)
    dom, label, user = cols[d.domain_column].astype(str), cols[d.label_column].astype(np.int64), cols[d.user_column]
    cold = cols[d.slice_columns[0]].astype(bool) if d.slice_columns else None
    scored = ~np.isnan(scores)
    out: Dict[str, Any] = {"split": split, "domains": {}}
    for ds in spec.domains:
        if ds.name not in active_domains(spec):
            continue
        m = (dom == ds.match_value) & scored
        out["domains"][ds.name] = metric_block(label[m], scores[m], user[m], cold[m] if cold is not None else None)
        out["domains"][ds.name]["kind"] = ds.kind
    m = scored
    out["overall"] = metric_block(label[m], scores[m], user[m], cold[m] if cold is not None else None)
    return out


def evaluate_split(model: torch.nn.Module, spec: Spec, split: str, ctx: DistContext) -> Dict[str, Any]:
    scores = predict(model, spec, split, ctx)
    return metrics_from_scores(spec, split, scores)


def markdown_table(metrics: Dict[str, Any]) -> str:
    head = "| domain | kind | rows | AUC | GAUC | logloss | cold rows | cold AUC |\n|---|---|---|---|---|---|---|---|"
    lines = [head]
    f = lambda v: "n/a" if v is None or v != v else f"{v:.4f}"  # noqa: E731
    for name, m in list(metrics["domains"].items()) + [("overall", metrics["overall"])]:
        lines.append(f"| {name} | {m.get('kind', '-')} | {m['rows']} | {f(m['auc'])} | {f(m['gauc'])} | "
                     f"{f(m['logloss'])} | {m.get('cold_rows', 0)} | {f(m.get('cold_auc'))} |")
    return "\n".join(lines)


def json_safe(x: Any) -> Any:
    """JSON has no NaN/inf: such numbers are written as null (json.dumps would write the bare word NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [json_safe(v) for v in x]
    return x


def check_output_file(path, flag: str) -> None:
    """RecsysError when `path` cannot be written as a file (a folder there): checked when the job starts, not
    after the evaluation it would lose."""
    from pathlib import Path

    p = Path(path)
    if p.is_dir() or str(path).endswith(("/", os.sep)):
        raise RecsysError(f"{flag} {path}: is a folder; give a file name, e.g. {p / 'predictions.npy'}")


def publish(spec: Spec, split: str, scores: np.ndarray, source: str, out=None, save_predictions=None,
            **extra: Any) -> Dict[str, Any]:
    """Rank 0's end of an evaluation: metrics from the scores, optional JSON and raw-score files (the independent
    scorer's input), and the markdown table on stdout."""
    import json
    from pathlib import Path

    metrics = metrics_from_scores(spec, split, scores)
    metrics.update(source=source, **extra)
    if save_predictions:
        check_output_file(save_predictions, "--save-predictions")
        Path(save_predictions).parent.mkdir(parents=True, exist_ok=True)
        with open(save_predictions, "wb") as fh:  # exactly this name (np.save on a path appends .npy)
            np.save(fh, scores.astype(np.float32), allow_pickle=False)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(json_safe(metrics), indent=1, allow_nan=False))
    print(f"{spec.name} / {split} / {source}\n")
    print(markdown_table(metrics))
    return metrics
