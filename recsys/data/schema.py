"""Schema checks: which columns a spec needs from the split files and side tables, and whether a parquet file has
them with usable types. A problem raises `DataError` naming the file and the column before any batch is built."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from recsys.errors import DataError
from recsys.spec.config import Spec

# Column kinds: what the loader can map.
STRING_LIKE = "string or integer"
LABEL = "integer or boolean"
LIST = "list of strings or integers"
NUMERIC = "number"
SPARSE = "string, integer or list"


def _base(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def _is_stringish(t: pa.DataType) -> bool:
    t = _base(t)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)


def type_ok(kind: str, t: pa.DataType) -> bool:
    if kind == STRING_LIKE:
        return _is_stringish(t)
    if kind == LABEL:
        return pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_floating(t)
    if kind == NUMERIC:
        return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
    if kind == LIST:
        return (pa.types.is_list(t) or pa.types.is_large_list(t)) and _is_stringish(t.value_type)
    if kind == SPARSE:
        return _is_stringish(t) or type_ok(LIST, t)
    raise ValueError(kind)


def row_filter_column(spec: Spec) -> Optional[str]:
    if not spec.data.row_filter:
        return None
    from recsys.data.loader import parse_row_filter

    return parse_row_filter(spec.data.row_filter)[0]


def row_columns(spec: Spec, split: str, with_row_filter: bool = True) -> Dict[str, str]:
    """Columns of the impression rows the loader reads -> required kind."""
    cols: Dict[str, str] = {spec.data.domain_column: STRING_LIKE, spec.data.label_column: LABEL,
                            spec.data.user_column: STRING_LIKE}
    for st in spec.data.side_tables:
        cols[st.join_on] = STRING_LIKE
    for f in spec.features:
        if getattr(f, "source", None) is not None:
            continue
        if f.kind == "id":
            cols[f.column] = STRING_LIKE
        elif f.kind == "sparse":
            cols[f.column] = SPARSE
        elif f.kind == "sequence":
            cols[f.column] = LIST
        elif f.kind == "dense":
            cols[f.column] = NUMERIC
        elif f.kind == "text":
            cols[f.column] = LIST if f.sequence else STRING_LIKE
    rf = row_filter_column(spec)
    if rf and with_row_filter and split == "train":
        cols[rf] = STRING_LIKE if "bucket(" in spec.data.row_filter else NUMERIC
    return cols


def side_columns(spec: Spec, table: str) -> Dict[str, str]:
    """Columns of a side table the loader or prepare reads -> required kind."""
    st = next(s for s in spec.data.side_tables if s.name == table)
    cols: Dict[str, str] = {st.key: STRING_LIKE}
    for f in spec.features:
        if getattr(f, "source", None) == table:
            cols[f.column] = {"id": STRING_LIKE, "sparse": SPARSE, "dense": NUMERIC}[f.kind]
    for t in spec.text.tables:
        if t.source == table:
            cols[t.key] = STRING_LIKE
            cols[t.text or t.key] = STRING_LIKE
    return cols


def check_file(path: Path, required: Dict[str, str]) -> pa.Schema:
    """Schema of `path` after checking every required column exists with a usable type."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    for col, kind in required.items():
        idx = schema.get_field_index(col)
        if idx < 0:
            raise DataError(f"{path}: missing column {col!r} (needs {kind}); has {schema.names}")
        if not type_ok(kind, schema.field(idx).type):
            raise DataError(f"{path}: column {col!r} has type {schema.field(idx).type}, expected {kind}")
    return schema
