"""The few lines a training job shows on the console: the sharding plan as one short table, one line per epoch,
and the best epoch's validation table (everything else goes to the run's log file, see recsys/logs.py)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from recsys.train.evaluation import markdown_table
from recsys.train.sharding import PlanResult

_KERNEL_SHORT = {"fused": "fused", "dense": "dense", "quant": "quant"}


def _ranks(ranks: List[int], world_size: int) -> str:
    if len(ranks) == world_size and world_size > 1:
        return "all"
    return ",".join(str(r) for r in ranks)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} B"


def plan_table(result: PlanResult, precision: Optional[str] = None) -> str:
    """One row per embedding table: rows, dim, how it is sharded, on which ranks, its size."""
    head = (f"sharding plan for {result.world_size} {result.device_type} rank(s)"
            + (f", dense precision {precision}" if precision else "") + ":")
    rows = [("table", "rows", "dim", "sharding", "kernel", "ranks", "size")]
    for t in result.tables:
        rows.append((t.name, f"{t.rows:,}", str(t.dim), t.sharding_type, _KERNEL_SHORT.get(t.compute_kernel,
                                                                                          t.compute_kernel),
                     _ranks(list(t.ranks), result.world_size), _size(t.bytes)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {1, 2, 6}
    lines = [head]
    for k, r in enumerate(rows):
        lines.append("  " + "  ".join(c.rjust(w) if i in right else c.ljust(w)
                                      for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if k == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def epoch_line(epoch: int, epochs: int, metric_name: str, metric: float, improved: bool, loss: Optional[float],
               samples_per_s: Optional[float], seconds: float) -> str:
    parts = [f"epoch {epoch + 1}/{epochs}"]
    if loss is not None:
        parts.append(f"train loss {loss:.4f}")
    if samples_per_s is not None:
        parts.append(f"{samples_per_s:,.0f} samples/s")
    parts.append(f"valid {metric_name} {metric:.4f}{' (best)' if improved else ''}")
    parts.append(f"{seconds:.0f}s")
    return "  ".join(parts)


def summary_table(summary: Dict[str, Any]) -> str:
    """The best epoch's valid metrics as markdown, headed by where its checkpoint is."""
    best = summary.get("best_epoch", -1)
    entry = next((h for h in summary.get("history", []) if h.get("epoch") == best), None)
    value = summary.get("best_valid_metric")
    head = (f"best epoch {best + 1} (valid {summary.get('select_metric')} "
            f"{'n/a' if value is None else format(value, '.4f')}): {summary.get('best_checkpoint')}")
    if entry is None:
        return head
    return head + "\n\n" + markdown_table(entry["valid"])
