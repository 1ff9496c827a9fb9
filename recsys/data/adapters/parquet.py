"""`parquet` adapter: the split files and side tables in `raw_dir` already are canonical; only check their schema
against what the spec reads."""
from __future__ import annotations

import logging

from recsys.data import paths, schema
from recsys.spec.config import Spec

log = logging.getLogger("recsys.data.adapters.parquet")


def validate(spec: Spec) -> None:
    for split in spec.data.splits:
        schema.check_file(paths.split_path(spec, split), schema.row_columns(spec, split))
    for st in spec.data.side_tables:
        schema.check_file(paths.side_table_path(spec, st.name), schema.side_columns(spec, st.name))


def prepare_rows(spec: Spec) -> None:
    """Nothing to build: rows are read as they are."""
    validate(spec)
    log.info("rows are read as they are from %s", paths.raw_dir(spec))
