"""`--dry-run`: everything a training job checks before its first step, without training."""
from __future__ import annotations

from pathlib import Path
from typing import List

from recsys.data import paths
from recsys.data.paths import side_table_path, split_path
from recsys.data.schema import check_file, row_columns, side_columns
from recsys.data.statistics import tables_counted
from recsys.models.build import spec_table_rows
from recsys.errors import DataError
from recsys.spec.config import Spec
from recsys.spec.loader import job_command
from recsys.train.preflight import preflight, train_rows_per_domain
from recsys.train.report import plan_table
from recsys.train.sharding import plan_for


def missing_prepared(spec: Spec) -> List[Path]:
    """Outputs of jobs/prepare_data.py this spec needs that do not exist (split files of adapters that build
    them, vocabularies, stats, text tables)."""
    need: List[Path] = []
    if spec.data.adapter == "movielens":  # this adapter writes the split files and side tables itself
        need += [split_path(spec, s) for s in spec.data.splits]
        need += [side_table_path(spec, st.name) for st in spec.data.side_tables]
    need += [paths.vocab_path(spec, t.name) for t in spec.tables if t.index == "vocab" and t.num_buckets is None
             and t.name not in spec.bucket_tables()]
    if spec.features_of("dense"):
        need.append(paths.stats_path(spec))
    need += [paths.counts_path(spec, t) for t in tables_counted(spec)]
    if spec.text.mode != "none":
        need += [paths.text_table_path(spec, n) for n in spec.used_text_tables()]
    return [p for p in need if not p.exists()]


def check_prepared(spec: Spec) -> None:
    """DataError naming the missing files and the command that builds them."""
    missing = missing_prepared(spec)
    if missing:
        shown = ", ".join(str(p) for p in missing[:3]) + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else "")
        raise DataError(f"prepared data missing: {shown}; run `{job_command(spec, 'prepare_data.py')}` first")


def dry_run(spec: Spec, world_size: int = 1, device: str = "auto", resume: bool = False) -> str:
    """Validates data schemas (every split and side table), the batch against the ranks, the train split's rows
    per domain, table sizes and the sharding plan, and with `resume` the checkpoint a resume would load; returns a
    report. Raises the same clear errors the job would raise, before any process group or model exists."""
    import torch

    device_type = "cuda" if (device == "cuda" or (device == "auto" and torch.cuda.is_available())) else "cpu"
    lines: List[str] = [f"spec {spec.name}: OK"]
    check_prepared(spec)
    lines.append(f"prepared data in {paths.prepared_dir(spec)}: OK")
    for split in spec.data.splits:
        path = split_path(spec, split)
        schema = check_file(path, row_columns(spec, split))
        lines.append(f"data {split}: {path} OK ({len(schema.names)} columns)")
    for st in spec.data.side_tables:
        path = side_table_path(spec, st.name)
        check_file(path, side_columns(spec, st.name))
        lines.append(f"side table {st.name}: {path} OK")
    preflight(spec, world_size)
    lines.append(f"train rows per domain: " + ", ".join(f"{k}={v:,}" for k, v in
                                                          sorted(train_rows_per_domain(spec).items())))
    rows = spec_table_rows(spec)
    text_rows, text_dim = None, None
    if spec.text.mode != "none":
        # mode llm reads the frozen text tables (projected from the vectors jobs/encode_text.py cached), mode random
        # the token ids
        from recsys.models.build import text_tables_for

        text = text_tables_for(spec)  # a missing cache says which job to run, with the user's --set overrides
        lines.append("text tables: " + ", ".join(f"{n}={tuple(a.shape)}" for n, a in text.items()))
        if spec.text.frozen and text:
            text_rows = {n: int(a.shape[0]) for n, a in text.items()}
            text_dim = int(next(iter(text.values())).shape[1])
    result = plan_for(spec, rows, world_size, device_type, text_rows=text_rows, text_dim=text_dim)
    lines.append(plan_table(result))
    if resume:
        lines.append(check_resume_target(spec, world_size))
    return "\n".join(lines)


def check_resume_target(spec: Spec, world_size: int) -> str:
    """What `--resume` would load: the newest checkpoint that verifies (digests, manifest, metadata read safely)
    and can continue this spec (tables, world size, batch, seed, spec values)."""
    from recsys.spec.loader import resolve_path, resolved_values
    from recsys.train import checkpoint

    root = resolve_path(spec, spec.train.output_dir) / "checkpoints"
    found = checkpoint.latest_good(root)
    if found is None:
        return f"resume: no checkpoint in {root}; training would start fresh"
    manifest = checkpoint.verify(found)
    checkpoint.saved_keys(found)  # the metadata, through the restricted unpickler
    checkpoint.check_resumable(found, manifest, tables=checkpoint.table_shapes(spec, spec_table_rows(spec)), world_size=world_size,
                               batch_size=spec.train.batch_size, seed=spec.train.seed,
                               spec_values=resolved_values(spec))
    return f"resume: {found} OK (epoch {manifest.get('epoch')}, global step {manifest.get('global_step')})"
