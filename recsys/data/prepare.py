"""prepare: run the adapter, then build vocabularies, text tables and stats.json into `prepared_dir`.

Vocabularies (`vocab/<table>.parquet`: key, row, count) are built from the TRAIN split only (all its rows: the
`row_filter` and `single_domain` are loader-time choices and must not change table sizes), after joining side
tables, over every feature that reads the table (ids, sparse values, history items). Rows 1..n go to keys seen
>= min_count times, most frequent first (ties by key); row 0 is unseen/missing/empty. `num_buckets` on a vocab
table caps it (the n-1 most frequent keys keep rows) and fixes its size.

Text tables (`text_tables/<name>.parquet`: row 1..n, key, text): all rows of a side table (cold items keep their
text) or, for `source: rows`, the distinct non-empty key values over ALL splits (texts are content, not labels).

stats.json: rows / positives per split and domain, row counts per split, train mean/std of every dense feature
(after the side-table join), vocabulary sizes. Every output is skipped when it is newer than its inputs and was
built from the same spec fields (fingerprints in `manifest.json`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Dict, Iterator, List

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys.data import arrowops, paths, schema, statistics
from recsys.data.adapters import get_adapter
from recsys.errors import DataError
from recsys.logs import CONSOLE
from recsys.spec.config import Spec

log = logging.getLogger("recsys.data.prepare")


# ------------------------------------------------------------------------------------------------ small helpers
def _write(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(path)


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Manifest:
    """Skip logic: an output is fresh when it exists, is newer than every input and its fingerprint matches."""

    def __init__(self, spec: Spec):
        self.path = paths.prepared_dir(spec) / "manifest.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {}

    def fresh(self, out: Path, inputs: List[Path], fp: str) -> bool:
        if not out.exists() or self.data.get(str(out)) != fp:
            return False
        return out.stat().st_mtime >= max(p.stat().st_mtime for p in inputs)

    def record(self, out: Path, fp: str) -> None:
        self.data[str(out)] = fp
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1, sort_keys=True))


def iter_chunks(path: Path, columns: List[str], rows: int) -> Iterator[pa.RecordBatch]:
    pf = pq.ParquetFile(path)
    yield from pf.iter_batches(batch_size=rows, columns=columns)


def _side_tables(spec: Spec) -> Dict[str, pa.Table]:
    out = {}
    for st in spec.data.side_tables:
        p = paths.side_table_path(spec, st.name)
        schema.check_file(p, schema.side_columns(spec, st.name))
        out[st.name] = pq.read_table(p, columns=list(schema.side_columns(spec, st.name)))
    return out


def _values_of(f, batch: pa.RecordBatch, side: Dict[str, pa.Table], spec: Spec) -> pa.Array:
    """Flat string values feature `f` takes over the rows of `batch` (side tables joined)."""
    if getattr(f, "source", None):
        st = next(s for s in spec.data.side_tables if s.name == f.source)
        keys = arrowops.as_strings(side[f.source][st.key].combine_chunks())
        pos = arrowops.lookup(batch.column(st.join_on), keys)
        col = side[f.source][f.column].take(pa.array(pos[pos >= 0]))
    else:
        col = batch.column(f.column)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        col = pc.list_flatten(col)
    col = arrowops.as_strings(col)
    if getattr(f, "separator", None):
        col = pc.list_flatten(pc.split_pattern(col, f.separator))
    return col


# ------------------------------------------------------------------------------------------------ vocabularies
def build_vocab(spec: Spec, table: str, side: Dict[str, pa.Table]) -> pa.Table:
    feats = [f for f in spec.features if f.kind in ("id", "sparse", "sequence") and f.table == table]
    row_cols = sorted({f.column for f in feats if not getattr(f, "source", None)} |
                      {st.join_on for f in feats for st in spec.data.side_tables if getattr(f, "source", None) == st.name})
    counts: List[pa.Table] = []
    for batch in iter_chunks(paths.split_path(spec, "train"), row_cols, spec.data.row_group_size):
        for f in feats:
            vals = _values_of(f, batch, side, spec)
            vals = pc.filter(vals, pc.fill_null(pc.greater(pc.utf8_length(vals), 0), False))
            vc = pc.value_counts(vals)
            counts.append(pa.table({"key": vc.field("values"), "count": pc.cast(vc.field("counts"), pa.int64())}))
    if counts:
        agg = pa.concat_tables(counts).group_by("key").aggregate([("count", "sum")]).rename_columns(["key", "count"])
    else:
        agg = pa.table({"key": pa.array([], pa.string()), "count": pa.array([], pa.int64())})
    t = spec.table(table)
    agg = agg.filter(pc.greater_equal(agg["count"], t.min_count))
    agg = agg.sort_by([("count", "descending"), ("key", "ascending")])
    if t.num_buckets is not None and agg.num_rows > t.num_buckets - 1:
        agg = agg.slice(0, t.num_buckets - 1)
    return pa.table({"key": agg["key"], "row": pa.array(np.arange(1, agg.num_rows + 1, dtype=np.int64)),
                     "count": agg["count"]})


def table_num_rows(spec: Spec) -> Dict[str, int]:
    """Embedding rows per table: vocab -> len+1 (or num_buckets when set), hash -> num_buckets."""
    out: Dict[str, int] = dict(spec.bucket_tables())  # bucketized dense features: len(boundaries) + 2
    for t in spec.tables:
        if t.name in out:
            continue
        if t.index == "hash" or t.num_buckets is not None:
            out[t.name] = int(t.num_buckets)
            continue
        p = paths.vocab_path(spec, t.name)
        if not p.exists():
            raise DataError(f"{p}: vocabulary missing; run jobs/prepare_data.py --spec <spec> first")
        out[t.name] = pq.ParquetFile(p).metadata.num_rows + 1
    return out


# ------------------------------------------------------------------------------------------------- text tables
def build_text_table(spec: Spec, name: str, side: Dict[str, pa.Table]) -> pa.Table:
    tt = next(t for t in spec.text.tables if t.name == name)
    if tt.source != "rows":
        tab = side[tt.source]
        keys = arrowops.as_strings(tab[tt.key].combine_chunks())
        texts = pc.fill_null(arrowops.as_strings(tab[tt.text or tt.key].combine_chunks()), "")
        _, first = np.unique(np.asarray(keys.to_numpy(zero_copy_only=False), dtype=object).astype(str),
                             return_index=True)  # drop duplicate keys, keep the first
        first = np.sort(first)
        keys, texts = keys.take(pa.array(first)), texts.take(pa.array(first))
    else:
        uniq: List[pa.Array] = []
        for split in spec.data.splits:
            for batch in iter_chunks(paths.split_path(spec, split), [tt.key], spec.data.row_group_size):
                col = batch.column(0)
                if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                    col = pc.list_flatten(col)
                uniq.append(pc.unique(arrowops.as_strings(col)))
        keys = pc.unique(pa.chunked_array(uniq, pa.string())) if uniq else pa.array([], pa.string())
        keys = pc.filter(keys, pc.fill_null(pc.greater(pc.utf8_length(keys), 0), False))
        keys = pc.take(keys, pc.sort_indices(keys))
        texts = keys
    return pa.table({"row": pa.array(np.arange(1, len(keys) + 1, dtype=np.int64)), "key": keys, "text": texts})


# ------------------------------------------------------------------------------------------------------- stats
def build_stats(spec: Spec, side: Dict[str, pa.Table]) -> dict:
    d = spec.data
    stats: dict = {"splits": {}, "dense": {}}
    for split in d.splits:
        per: Dict[str, Dict[str, int]] = {}
        total = 0
        for batch in iter_chunks(paths.split_path(spec, split), [d.domain_column, d.label_column], d.row_group_size):
            tab = pa.table({"domain": arrowops.as_strings(pc.cast(batch.column(0), pa.string())
                                                         if pa.types.is_dictionary(batch.column(0).type)
                                                         else batch.column(0)),
                            "label": pc.cast(batch.column(1), pa.float64())})
            agg = tab.group_by("domain").aggregate([("label", "count"), ("label", "sum")]).to_pylist()
            for r in agg:
                e = per.setdefault(r["domain"], {"rows": 0, "positives": 0})
                e["rows"] += int(r["label_count"])
                e["positives"] += int(round(r["label_sum"] or 0))
            total += batch.num_rows
        stats["splits"][split] = {"rows": total, "domains": per}
    for f in spec.features_of("dense"):
        s1 = s2 = n = 0.0
        cols = [f.column] if not f.source else [next(s.join_on for s in d.side_tables if s.name == f.source)]
        for batch in iter_chunks(paths.split_path(spec, "train"), cols, d.row_group_size):
            if f.source:
                st = next(s for s in d.side_tables if s.name == f.source)
                pos = arrowops.lookup(batch.column(0), arrowops.as_strings(side[f.source][st.key].combine_chunks()))
                x = side[f.source][f.column].take(pa.array(pos[pos >= 0]))
            else:
                x = batch.column(0)
            v = pc.cast(x, pa.float64()).to_numpy(zero_copy_only=False)
            v = v[np.isfinite(v)]
            if f.transform == "log1p":
                v = np.log1p(np.maximum(v, 0.0))
            s1, s2, n = s1 + v.sum(), s2 + (v * v).sum(), n + len(v)
        mean = s1 / n if n else 0.0
        std = math.sqrt(max(s2 / n - mean * mean, 0.0)) if n else 1.0
        stats["dense"][f.name] = {"mean": mean, "std": std if std > 1e-12 else 1.0, "count": int(n)}
    return stats


# ---------------------------------------------------------------------------------------------------- prepare
def prepare(spec: Spec, force: bool = False) -> dict:
    """Run the adapter and build every derived file; returns stats.json's content."""
    t0 = time.time()
    get_adapter(spec).prepare_rows(spec)
    inputs = [paths.split_path(spec, s) for s in spec.data.splits] + \
             [paths.side_table_path(spec, s.name) for s in spec.data.side_tables]
    man = _Manifest(spec)
    side: Dict[str, pa.Table] = {}

    def load_side() -> Dict[str, pa.Table]:
        if not side:
            side.update(_side_tables(spec))
        return side

    def rebuild(out: Path, fp: str, what: str, build) -> None:
        """Write `build()` to `out` unless it is newer than the inputs and was built from the same settings."""
        if not force and man.fresh(out, inputs, fp):
            log.info("%s up to date", what)
            return
        table = build()
        _write(table, out)
        man.record(out, fp)
        log.info("%s: %d rows -> %s", what, table.num_rows, out)

    data_fp = spec.data.model_dump(exclude={"row_filter", "max_bad_fraction"})
    for t in spec.tables:
        if t.index != "vocab" or t.name in spec.bucket_tables():  # bucket tables need no vocabulary
            continue
        out = paths.vocab_path(spec, t.name)
        fp = _fingerprint([data_fp, t.model_dump(), [f.model_dump() for f in spec.features
                                                     if getattr(f, "table", None) == t.name]])
        rebuild(out, fp, f"vocab {t.name}", lambda t=t: build_vocab(spec, t.name, load_side()))
    for tt in spec.text.tables:
        out = paths.text_table_path(spec, tt.name)
        fp = _fingerprint([data_fp, tt.model_dump()])
        rebuild(out, fp, f"text table {tt.name}", lambda tt=tt: build_text_table(spec, tt.name, load_side()))
    for table, item in statistics.counted_items(spec).items():
        out = paths.counts_path(spec, table)
        fp = _fingerprint([data_fp, spec.statistics.folds, spec.table(table).model_dump(), item.column])
        vocab = [paths.vocab_path(spec, table)] if paths.vocab_path(spec, table).exists() else []
        if not force and man.fresh(out, inputs + vocab, fp):
            log.info("counts %s up to date", table)
            continue
        positives = statistics.train_positives(spec, paths.split_path(spec, "train"), item.column)
        counts = statistics.build(spec, table, positives, statistics.vocab_rows_of(spec, table),
                                  table_num_rows(spec)[table])
        counts.save(out)
        man.record(out, fp)
        log.info("counts %s: %d positives, %d co-purchase pairs -> %s", table, positives.num_rows,
                 len(counts.pair_keys), out)
    out = paths.stats_path(spec)
    fp = _fingerprint([data_fp, [f.model_dump() for f in spec.features_of("dense")], [d.model_dump() for d in
                                                                                       spec.domains]])
    if not force and man.fresh(out, inputs, fp):
        log.info("stats up to date")
        stats = json.loads(out.read_text())
    else:
        stats = build_stats(spec, load_side())
        stats["tables"] = table_num_rows(spec)
        out.write_text(json.dumps(stats, indent=1, sort_keys=True))
        man.record(out, fp)
        log.info("stats -> %s", out)
    from recsys.spec.loader import check_domains_have_rows

    # a declared domain without training rows is a spec error (a typo in `value`, a wrong domain column)
    check_domains_have_rows(spec, {d: e["rows"] for d, e in stats["splits"]["train"]["domains"].items()})
    from recsys.data.resolved import write_schema

    log.info("resolved schema -> %s", write_schema(spec, stats))
    log.info("prepare done in %.1fs", time.time() - t0, extra=CONSOLE)
    return stats
