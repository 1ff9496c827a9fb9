"""What a training job checks before any process group exists, so that what training would trip on is reported as
one line (and by `--dry-run`) rather than as a crash mid-run: the global batch against the number of ranks, and a
train split that holds rows of every trained domain. Every rank computes the same answer from the same files."""
from __future__ import annotations

from typing import Dict

import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys.data.paths import split_path
from recsys.errors import DataError
from recsys.spec.config import Spec
from recsys.spec.loader import check_domains_have_rows, raise_spec_issue


def check_batch_sizes(spec: Spec, world_size: int) -> None:
    """Each rank takes batch_size // world_size rows of every batch: at least one."""
    for key in ("batch_size", "eval_batch_size"):
        value = getattr(spec.train, key)
        if value < world_size:
            raise_spec_issue(spec, ("train", key), f"{value} is smaller than the number of ranks ({world_size}); "
                                                   f"every rank needs at least one row of each batch")


def train_rows_per_domain(spec: Spec) -> Dict[str, int]:
    """Rows of the train split per value of the domain column, after `data.row_filter` (read from two columns)."""
    from recsys.data.loader import _OPS, row_filter_values  # the loader's own filter rule

    path = split_path(spec, "train")
    if not path.is_file():
        raise DataError(f"{path}: train split not found (run `python jobs/prepare_data.py` with this spec first)")
    col = spec.data.domain_column
    domains = pq.read_table(path, columns=[col])[col]
    if spec.data.row_filter:
        vals, op, num = row_filter_values(path, spec.data.row_filter)
        domains = domains.filter(_OPS[op](vals, num))
    counts = pc.value_counts(domains)
    return {str(v["values"]): int(v["counts"]) for v in counts.to_pylist() if v["values"] is not None}


def check_train_rows(spec: Spec) -> None:
    """DataError when the train split has no rows at all; SpecError naming every trained domain without rows (a
    misspelled domain name or value selects nothing)."""
    counts = train_rows_per_domain(spec)
    if sum(counts.values()) == 0:
        extra = f" after data.row_filter {spec.data.row_filter!r}" if spec.data.row_filter else ""
        raise DataError(f"{split_path(spec, 'train')}: the train split has no rows{extra}; there is nothing to train")
    check_domains_have_rows(spec, counts, "train")


def preflight(spec: Spec, world_size: int) -> None:
    check_batch_sizes(spec, world_size)
    check_train_rows(spec)
