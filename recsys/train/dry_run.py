"""`--dry-run`: everything a training job checks before its first step, without training."""
from __future__ import annotations

from typing import List

from recsys.data.paths import side_table_path, split_path
from recsys.data.schema import check_file, row_columns, side_columns
from recsys.models.build import spec_table_rows
from recsys.spec.config import Spec
from recsys.train.sharding import plan_for


def dry_run(spec: Spec, world_size: int = 1, device: str = "auto") -> str:
    """Validates data schemas (every split and side table), table sizes and the sharding plan; returns a report.
    Raises the same clear errors the job would raise, before any process group or model exists."""
    import torch

    device_type = "cuda" if (device == "cuda" or (device == "auto" and torch.cuda.is_available())) else "cpu"
    lines: List[str] = [f"spec {spec.name}: OK"]
    for split in spec.data.splits:
        path = split_path(spec, split)
        schema = check_file(path, row_columns(spec, split))
        lines.append(f"data {split}: {path} OK ({len(schema.names)} columns)")
    for st in spec.data.side_tables:
        path = side_table_path(spec, st.name)
        check_file(path, side_columns(spec, st.name))
        lines.append(f"side table {st.name}: {path} OK")
    rows = spec_table_rows(spec)
    lines.append("tables: " + ", ".join(f"{t}={n:,}" for t, n in rows.items()))
    result = plan_for(spec, rows, world_size, device_type)
    lines.append(f"sharding plan for {world_size} {device_type} rank(s):")
    for t in result.tables:
        lines.append(f"  {t.name}: {t.sharding_type} / {t.compute_kernel} on ranks {list(t.ranks)}")
    return "\n".join(lines)
