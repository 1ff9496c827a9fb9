"""`amazon_sr` adapter: the fixed benchmark files (built by shared/data/make_amazon_sr.py) are read as they are.

Besides the generic spec checks, the bench's own columns must be present with their documented types, because
evaluation slices (`cold_item`) and few-shot subsets (`user_bucket`) rely on them even when no feature reads them.
"""
from __future__ import annotations

import logging

from recsys.data import paths, schema
from recsys.data.adapters import parquet as generic
from recsys.spec.config import Spec

log = logging.getLogger("recsys.data.adapters.amazon_sr")

BENCH_ROW_COLUMNS = {
    "domain": schema.STRING_LIKE, "label": schema.LABEL, "user_id": schema.STRING_LIKE,
    "item_id": schema.STRING_LIKE, "query": schema.STRING_LIKE, "hist_item_ids": schema.LIST,
    "position": schema.NUMERIC, "user_bucket": schema.NUMERIC, "cold_item": schema.NUMERIC,
}
BENCH_ITEM_COLUMNS = {"item_id": schema.STRING_LIKE, "title": schema.STRING_LIKE, "text": schema.STRING_LIKE}


def validate(spec: Spec) -> None:
    for split in spec.data.splits:
        schema.check_file(paths.split_path(spec, split), BENCH_ROW_COLUMNS)
    for st in spec.data.side_tables:
        if st.name == "items":
            schema.check_file(paths.side_table_path(spec, st.name), BENCH_ITEM_COLUMNS)
    generic.validate(spec)


def prepare_rows(spec: Spec) -> None:
    validate(spec)
    log.info("amazon-sr rows are read as they are from %s", paths.raw_dir(spec))
