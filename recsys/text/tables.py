"""Reading a prepared text table: `<prepared_dir>/text_tables/<name>.parquet` with columns row, key, text.

`row` runs 1..n (row 0 is reserved for "no text" and maps to a zero vector); the arrays returned here are ordered
by `row`, so position i holds row i+1.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np

from recsys.errors import DataError

REQUIRED_COLUMNS = ("row", "key", "text")


@dataclass
class TextTable:
    name: str
    path: Path
    keys: List[str]  # keys[i] belongs to row i+1
    texts: List[Optional[str]]  # None = no text (zero vector)

    @property
    def n_rows(self) -> int:
        return len(self.texts)


def has_text(text: Optional[str]) -> bool:
    """Missing or blank texts get the zero vector instead of the encoding of an empty string."""
    return text is not None and text.strip() != ""


def read_text_table(path: Path, name: str, prepare_hint: str = "python jobs/prepare_data.py --spec <spec>") -> TextTable:
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError(f"text table '{name}' not found at {path}: run `{prepare_hint}` first")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: unreadable parquet ({exc})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: text table lacks column(s) {missing} (has {table.column_names})")
    try:
        rows = np.asarray(table.column("row").to_numpy(zero_copy_only=False), dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: column 'row' is not integer ({exc})") from None
    n = len(rows)
    order = np.argsort(rows, kind="stable")
    if n and not np.array_equal(rows[order], np.arange(1, n + 1)):
        bad = int(np.nonzero(rows[order] != np.arange(1, n + 1))[0][0])
        raise DataError(f"{path}: column 'row' must hold 1..{n} exactly once each; sorted position {bad} holds "
                        f"{int(rows[order][bad])}")
    keys = table.column("key").to_pylist()
    texts = table.column("text").to_pylist()
    for col, values in (("key", keys), ("text", texts)):
        wrong = next((i for i, v in enumerate(values) if v is not None and not isinstance(v, str)), None)
        if wrong is not None:
            raise DataError(f"{path}: column '{col}' must be string; row {int(rows[wrong])} holds "
                            f"{type(values[wrong]).__name__}")
    return TextTable(name=name, path=path, keys=[keys[i] for i in order], texts=[texts[i] for i in order])
