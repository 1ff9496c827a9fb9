"""Batch scoring: a parquet file of impression rows in -> the same rows' keys and scores out, streamed.

Rows are read in record batches (never the whole file), scored by `Ranker.score_table` (the same function the HTTP
service uses) and written in input order. Reading and mapping the next block run in a background thread while the
model scores the current one, whose matmuls use every core (torch intra-op threads).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.data import schema as row_schema
from recsys.errors import DataError
from recsys.serving.ranker import Ranker, sigmoid

log = logging.getLogger("recsys.serving.score")


def key_columns(ranker: Ranker, available: Sequence[str]) -> List[str]:
    """Columns copied to the output so each score can be joined back: domain, user, ids, query, label."""
    spec = ranker.spec
    d = spec.data
    want = [d.domain_column, d.user_column, *[st.join_on for st in d.side_tables],
            *[f.column for f in spec.features if f.kind == "id" and not getattr(f, "source", None)], d.label_column]
    return [c for c in dict.fromkeys(want) if c in available]


def score_file(ranker: Ranker, src: Path, out: Path, block_rows: int = 65536, keep: Optional[Sequence[str]] = None,
               progress: bool = True) -> Dict[str, float]:
    """Score every row of `src` into `out` (keys + `logit` + `score`; NaN where the model scores nothing)."""
    from tqdm import tqdm

    spec = ranker.spec
    src, out = Path(src), Path(out)
    needed = row_schema.row_columns(spec, "test", with_row_filter=False)
    needed.pop(spec.data.label_column, None)  # labels are optional when scoring
    file_schema = row_schema.check_file(src, needed)
    pf = pq.ParquetFile(src)
    keep = list(keep) if keep is not None else key_columns(ranker, file_schema.names)
    missing = [c for c in keep if c not in file_schema.names]
    if missing:
        raise DataError(f"{src}: --keep column(s) {missing} not in the file (has {file_schema.names})")
    read_cols = list(dict.fromkeys([*needed, *keep]))
    n = pf.metadata.num_rows
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    writer = None
    t0 = time.perf_counter()
    scored = 0
    label = spec.data.label_column
    with tqdm(total=n, unit="row", desc=f"score {src.name}", disable=not progress, mininterval=1.0) as bar:
        for batch in _prefetch(pf.iter_batches(batch_size=block_rows, columns=read_cols)):
            table = pa.Table.from_batches([batch])
            if label not in table.column_names:  # scoring data without labels: the mapper wants the column
                table = table.append_column(label, pa.array(np.zeros(table.num_rows, np.int8)))
            logits = ranker.score_table(table)
            outt = table.select(keep).append_column("logit", pa.array(logits.astype(np.float32))) \
                .append_column("score", pa.array(sigmoid(logits).astype(np.float32)))
            if writer is None:
                writer = pq.ParquetWriter(tmp, outt.schema, compression="zstd")
            writer.write_table(outt)
            scored += int(np.isfinite(logits).sum())
            bar.update(table.num_rows)
    if writer is None:  # empty input: still an output file with the columns
        writer = pq.ParquetWriter(tmp, pa.schema([*[file_schema.field(c) for c in keep],
                                                  pa.field("logit", pa.float32()), pa.field("score", pa.float32())]))
    writer.close()
    os.replace(tmp, out)
    secs = time.perf_counter() - t0
    return {"rows": n, "scored": scored, "seconds": secs, "rows_per_s": n / secs if secs else 0.0}


def _prefetch(it, depth: int = 2):
    """Read the next record batches in a thread while the current one is scored (arrow releases the GIL)."""
    import queue
    import threading

    q: "queue.Queue" = queue.Queue(maxsize=depth)
    end = object()
    stop = threading.Event()

    def run() -> None:
        try:
            for x in it:
                if stop.is_set():
                    return
                q.put(x)
            q.put(end)
        except BaseException as e:  # noqa: BLE001 -- re-raised in the consumer
            q.put(e)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    try:
        while True:
            x = q.get()
            if x is end:
                return
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()
        while th.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                th.join(timeout=0.01)
