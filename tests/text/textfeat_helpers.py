"""Helpers for text tests (unique module name: tests/ folders are not packages)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from recsys.spec.config import Spec

WORDS = ("the a of for and with to printer printers 3d pla filament spool racing video game games red blue green "
         "fast slow lab glove gloves microscope cable tool kit nitrile box large small").split()


def build_tiny_bert(folder: Path, seed: int = 0) -> Path:
    from tiny_llm import build_tiny_bert as build  # tests/tiny_llm.py: the one builder of the suite

    return build(folder, seed=seed, words=WORDS)


def write_text_table(prepared: Path, name: str, keys: List[str], texts: List[Optional[str]],
                     rows: Optional[List[int]] = None) -> Path:
    path = prepared / "text_tables" / f"{name}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = rows if rows is not None else list(range(1, len(keys) + 1))
    pq.write_table(pa.table({"row": pa.array(rows, pa.int64()), "key": pa.array(keys, pa.string()),
                             "text": pa.array(texts, pa.string())}), path)
    return path


def make_spec(tmp: Path, model: str, mode: str = "llm", encoder: Optional[Dict] = None) -> Spec:
    return Spec.model_validate(spec_dict(tmp, model, mode, encoder))


def spec_dict(tmp: Path, model: str, mode: str = "llm", encoder: Optional[Dict] = None) -> Dict:
    enc = {"model": model, "device": "cpu", "batch_size": 4, "max_length": 32}
    enc.update(encoder or {})
    return {
        "name": "text_test",
        "data": {"adapter": "parquet", "raw_dir": str(tmp / "raw"), "prepared_dir": str(tmp / "prepared"),
                 "side_tables": [{"name": "items", "path": "items.parquet", "key": "item_id",
                                  "join_on": "item_id"}]},
        "domains": [{"name": "rec", "kind": "rec"}, {"name": "search", "kind": "search"}],
        "features": [
            {"kind": "id", "name": "item_id", "column": "item_id", "side": "item", "table": "item"},
            {"kind": "id", "name": "query_id", "column": "query", "side": "query", "table": "query"},
            {"kind": "text", "name": "item_text", "column": "item_id", "side": "item", "text_table": "items"},
            {"kind": "text", "name": "query_text", "column": "query", "side": "query", "text_table": "queries"},
        ],
        "tables": [{"name": "item", "dim": 8}, {"name": "query", "dim": 8}],
        "text": {"mode": mode, "cache_dir": str(tmp / "cache"), "encoder": enc,
                 "tables": [{"name": "items", "source": "items", "key": "item_id", "text": "text"},
                            {"name": "queries", "source": "rows", "key": "query"}]},
    }
