"""Test helper: turn a Batch back into plain per-row values and recompute them from the parquet rows."""
from __future__ import annotations

from typing import Dict, List

import pyarrow.parquet as pq

from recsys.data import paths
from recsys.data.features import kjt_keys, sequence_keys


def lookup_tables(spec) -> Dict[str, Dict[str, int]]:
    out = {}
    for t in spec.tables:
        v = pq.read_table(paths.vocab_path(spec, t.name)).to_pydict()
        out[t.name] = dict(zip(v["key"], v["row"]))
    for tt in spec.text.tables:
        v = pq.read_table(paths.text_table_path(spec, tt.name)).to_pydict()
        out["text:" + tt.name] = dict(zip(v["key"], v["row"]))
    return out


def batch_rows(spec, batch) -> List[dict]:
    """Per row: every KJT key's value list, text rows, label, domain, row_id."""
    kjt = batch.sparse.to_dict()
    rows = []
    for i in range(batch.size):
        r = {k: kjt[k].values()[kjt[k].offsets()[i]: kjt[k].offsets()[i + 1]].tolist() for k in kjt_keys(spec)}
        r.update({"text:" + n: t[i].tolist() for n, t in batch.text.items()})
        r.update(label=float(batch.labels[i]), domain=int(batch.domain[i]), row_id=int(batch.row_id[i]),
                 dense=batch.dense[i].tolist())
        rows.append(r)
    return rows


def expected_row(spec, tables, row: dict, side: Dict[str, dict]) -> dict:
    """What the loader should produce for one parquet row (plain Python, independent of the loader's code)."""
    exp = {}
    for f in spec.features:
        src = row if not getattr(f, "source", None) else side[f.source].get(row["item_id"], {})
        if f.kind == "id":
            exp[f.name] = [tables[f.table].get(str(src.get(f.column, "")), 0)]
        elif f.kind == "sparse":
            raw = str(src.get(f.column) or "")
            vals = [x for x in (raw.split(f.separator) if f.separator else [raw]) if x][: f.max_values]
            exp[f.name] = [tables[f.table].get(x, 0) for x in vals]
        elif f.kind == "sequence":
            hist = list(row[f.column])[-f.max_len:]
            for i in range(f.max_len):
                exp[sequence_keys(f.name, f.max_len)[i]] = [tables[f.table].get(hist[i], 0)] if i < len(hist) else []
        elif f.kind == "text":
            tt = tables["text:" + f.text_table]
            if f.sequence:
                hist = list(row[f.column])[-f.max_len:]
                exp["text:" + f.name] = [tt.get(h, 0) for h in hist] + [0] * (f.max_len - len(hist))
            else:
                exp["text:" + f.name] = tt.get(str(row[f.column]), 0)
    exp["label"] = float(row["label"])
    exp["domain"] = [d.match_value for d in spec.domains].index(row["domain"])
    return exp
