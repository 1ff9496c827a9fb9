"""A commented starting spec for one's own parquet files (`jobs/init_spec.py`).

Reads the train file's schema and a sample of its rows and guesses, column by column, what each one is:
the domain, label and user columns (named on the command line or found by their usual names), ids (strings or
integers named `*id`), multi-valued categoricals (list columns, or strings with a `|`/`,` separator), behaviour
sequences (integer/string lists whose values are ids of another column), numbers (with a suggested transform:
`bucketize` for age/year-like columns, `log1p` for skewed non-negative counts, else `standardize`), free text
(long strings with spaces) and boolean slice columns. Every guess is written with a comment saying why, so the
result reads as a checklist; as written it loads, prepares and trains.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys.errors import DataError

SAMPLE_ROWS = 20_000
DOMAIN_NAMES = ("domain", "surface", "scenario", "channel")
LABEL_NAMES = ("label", "clicked", "click", "is_click", "y", "target")
USER_NAMES = ("user_id", "uid", "user", "userid")
AGE_LIKE = re.compile(r"(^|_)(age|year|years|birth|yob|tenure|days?)($|_)")


@dataclass
class Guess:
    kind: str  # id | sparse | sequence | dense | text | slice | skip
    column: str
    side: str = "item"
    why: str = ""
    extra: Dict[str, object] = field(default_factory=dict)


def _sample(path: Path) -> pa.Table:
    pf = pq.ParquetFile(path)
    parts, n = [], 0
    for rg in range(pf.num_row_groups):
        t = pf.read_row_group(rg)
        parts.append(t)
        n += t.num_rows
        if n >= SAMPLE_ROWS:
            break
    return pa.concat_tables(parts).slice(0, SAMPLE_ROWS) if parts else pf.schema_arrow.empty_table()


def _pick(names: List[str], wanted: Optional[str], candidates, what: str, flag: str) -> str:
    if wanted:
        if wanted not in names:
            raise DataError(f"{flag} {wanted!r}: no such column (columns: {', '.join(names)})")
        return wanted
    for c in candidates:
        if c in names:
            return c
    raise DataError(f"no {what} column found among {', '.join(names)}; name it with {flag}")


def _side(column: str, user_column: str) -> str:
    c = column.lower()
    if c == user_column.lower() or c.startswith(("user", "u_")) or "hist" in c or "recent" in c:
        return "user"
    if c.startswith("query") or c.endswith("query") or "search" in c:
        return "query"
    return "item"


def _is_id_name(c: str) -> bool:
    c = c.lower()
    return c == "id" or c.endswith("_id") or c.endswith("id") and len(c) <= 8


def _dense_transform(column: str, v: np.ndarray) -> Guess:
    v = v[np.isfinite(v)]
    if AGE_LIKE.search(column.lower()) and len(v):
        qs = np.unique(np.round(np.quantile(v, [0.1, 0.25, 0.5, 0.75, 0.9]), 2))
        return Guess("dense", column, why="age/year-like: bucketized at the sample's 10/25/50/75/90% quantiles",
                     extra={"transform": "bucketize", "boundaries": [float(x) for x in qs]})
    if len(v) and v.min() >= 0 and np.quantile(v, 0.99) > 10 * max(np.quantile(v, 0.5), 1.0):
        return Guess("dense", column, why="non-negative and skewed (p99 > 10x median)", extra={"transform": "log1p"})
    return Guess("dense", column, why="numeric", extra={"transform": "standardize"})


def guess_columns(sample: pa.Table, domain: str, label: str, user: str) -> List[Guess]:
    out: List[Guess] = []
    id_values: Dict[str, set] = {}
    for name in sample.column_names:
        col, t = sample[name], sample[name].type
        if name in (domain, label):
            continue
        if name == user:
            out.append(Guess("id", name, "user", "the user column"))
        elif pa.types.is_boolean(t):
            out.append(Guess("slice", name, why="boolean: reported as a slice (AUC on its true rows)"))
        elif pa.types.is_list(t) or pa.types.is_large_list(t):
            out.append(Guess("sparse", name, _side(name, user), "list column: multi-valued categorical"))
        elif pa.types.is_integer(t) and _is_id_name(name):
            out.append(Guess("id", name, _side(name, user), "integer named like an id"))
        elif pa.types.is_integer(t) or pa.types.is_floating(t):
            g = _dense_transform(name, pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False))
            g.side = _side(name, user)
            out.append(g)
        elif pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
            s = [x for x in col.to_pylist() if x]
            if not s:
                out.append(Guess("skip", name, why="empty in the sample"))
                continue
            mean_len = float(np.mean([len(x) for x in s]))
            spaces = float(np.mean([" " in x for x in s]))
            seps = {sep: float(np.mean([sep in x for x in s])) for sep in ("|", ",", ";")}
            sep = max(seps, key=seps.get)
            if spaces > 0.5 and mean_len > 12:
                out.append(Guess("text", name, _side(name, user), f"free text (mean {mean_len:.0f} characters)"))
            elif seps[sep] > 0.3:
                out.append(Guess("sparse", name, _side(name, user), f"'{sep}'-separated values",
                                 extra={"separator": sep}))
            else:
                out.append(Guess("id", name, _side(name, user), "string values"))
        else:
            out.append(Guess("skip", name, why=f"type {t} is not read"))
    for g in out:
        if g.kind == "id":
            id_values[g.column] = set(map(str, sample[g.column].drop_null().to_pylist()[:SAMPLE_ROWS]))
    # a list column whose values are ids of an id column is that column's behaviour sequence
    for g in out:
        if g.kind != "sparse" or "separator" in g.extra:
            continue
        flat = pc.list_flatten(sample[g.column]).drop_null().to_pylist()
        values = set(map(str, flat[:SAMPLE_ROWS]))
        best = max(((len(values & ids) / max(len(values), 1), c) for c, ids in id_values.items()), default=(0, None))
        if best[1] is not None and best[0] > 0.5 and pa.types.is_integer(sample[g.column].type.value_type) or \
                (best[1] is not None and best[0] > 0.8):
            g.kind, g.side = "sequence", "user"
            g.extra = {"target": best[1]}
            g.why = f"list of {best[1]} values ({best[0]:.0%} of them seen in {best[1]}): a behaviour sequence"
    return out


def _fmt(v) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def render(data_dir: Path, domain: Optional[str] = None, label: Optional[str] = None, user: Optional[str] = None,
           name: Optional[str] = None, text_mode: str = "llm") -> str:
    """The commented YAML of a starting spec for the parquet files in `data_dir`."""
    data_dir = Path(data_dir)
    splits = {s: f"{s}.parquet" for s in ("train", "valid", "test") if (data_dir / f"{s}.parquet").exists()}
    for need in ("train", "valid"):
        if need not in splits:
            raise DataError(f"{data_dir / (need + '.parquet')}: missing; the parquet adapter reads train.parquet, "
                            f"valid.parquet (epoch selection) and optionally test.parquet")
    sample = _sample(data_dir / "train.parquet")
    names = sample.column_names
    domain = _pick(names, domain, DOMAIN_NAMES, "domain", "--domain-column")
    label = _pick(names, label, LABEL_NAMES, "label", "--label-column")
    user = _pick(names, user, USER_NAMES, "user", "--user-column")
    doms = sorted(map(str, pc.unique(pq.read_table(data_dir / "train.parquet", columns=[domain])[domain])
                      .drop_null().to_pylist()))
    guesses = guess_columns(sample, domain, label, user)
    name = name or re.sub(r"[^A-Za-z0-9_]", "_", data_dir.resolve().name) or "my_data"
    if name[0].isdigit():
        name = "d_" + name
    raw = str(data_dir.resolve())  # absolute: right wherever the spec file is saved

    L: List[str] = [
        f"# Starting spec written by jobs/init_spec.py from {data_dir} ({sample.num_rows:,} sampled train rows).",
        "# Every guess says why; check them, then: prepare_data.py -> encode_text.py -> pretrain.py (README,",
        "# 'Bring your own data'). Relative paths resolve against the folder above feature_specs/ when the spec is",
        "# saved there, else against the spec's own folder.",
        f"name: {name}",
        "data:",
        "  adapter: parquet          # the files are already one row per impression; only their schema is checked",
        f"  raw_dir: {raw}",
        f"  prepared_dir: data_cache/{name}   # vocabularies, stats, text tables, logs",
        "  splits: {" + ", ".join(f"{k}: {v}" for k, v in splits.items()) + "}",
        f"  domain_column: {domain}   # its value picks the row's domain (domains[].value, default the name)",
        f"  label_column: {label}     # 0/1",
        f"  user_column: {user}       # GAUC groups by it; `bucket({user}, 100) < 10` in row_filter keeps ~10% of users",
    ]
    slices = [g.column for g in guesses if g.kind == "slice"]
    L.append(f"  slice_columns: [{', '.join(slices)}]   # boolean columns: AUC on their true rows is reported too")
    L.append(f"  # row_filter: bucket({user}, 100) < 10   # few-shot: train on ~10% of users (or `column op number`)")
    L.append("domains:   # kind: rec or search (a search domain also reads query-side features); edit the guesses")
    for d in doms:
        safe = re.sub(r"[^A-Za-z0-9_]", "_", d)
        safe = safe if safe and not safe[0].isdigit() else "d_" + safe
        kind = "search" if "search" in d.lower() or "query" in d.lower() else "rec"
        L.append(f"  - {{name: {safe}, kind: {kind}" + (f", value: '{d}'" if safe != d else "") + "}")

    L.append("features:")
    tables: List[str] = []
    text_tables: List[str] = []
    id_table: Dict[str, str] = {}
    for g in guesses:
        if g.kind == "id":
            id_table[g.column] = g.column
    for g in guesses:
        col = g.column
        if g.kind == "id":
            L.append(f"  - {{kind: id, name: {col}, column: {col}, side: {g.side}, table: {col}}}   # {g.why}")
            tables.append(f"  - {{name: {col}, dim: 16}}")
        elif g.kind == "sparse":
            sep = f", separator: '{g.extra['separator']}'" if "separator" in g.extra else ""
            L.append(f"  - {{kind: sparse, name: {col}, column: {col}, side: {g.side}, table: {col}{sep}}}   # {g.why}")
            tables.append(f"  - {{name: {col}, dim: 8}}")
        elif g.kind == "sequence":
            tgt = g.extra["target"]
            L.append(f"  - {{kind: sequence, name: {col}, column: {col}, side: user, table: {id_table[tgt]}, "
                     f"max_len: 20, target: {tgt}}}   # {g.why}")
        elif g.kind == "dense":
            tr = g.extra["transform"]
            if tr == "bucketize":
                L.append(f"  - {{kind: dense, name: {col}, column: {col}, side: {g.side}, transform: bucketize, "
                         f"boundaries: {_fmt(g.extra['boundaries'])}, table: {col}_bucket}}   # {g.why}")
                tables.append(f"  - {{name: {col}_bucket, dim: 4}}")
            else:
                L.append(f"  - {{kind: dense, name: {col}, column: {col}, side: {g.side}, transform: {tr}}}"
                         f"   # {g.why}")
        elif g.kind == "text":
            L.append(f"  - {{kind: text, name: {col}_text, column: {col}, side: {g.side}, text_table: {col}}}"
                     f"   # {g.why}")
            text_tables.append(f"    - {{name: {col}, source: rows, key: {col}}}   # the column's values are the texts")
        elif g.kind == "skip":
            L.append(f"  # {col}: not used ({g.why})")
    L.append("tables:   # one embedding table per id/sparse column; row 0 = ids never seen in train")
    L.extend(tables)
    L.append("text:")
    if text_tables:
        L.append(f"  mode: {text_mode}   # llm: frozen all-MiniLM-L6-v2 vectors (run jobs/encode_text.py); random: "
                 "trainable hashed tokens; hybrid: both side by side; none")
        if text_mode == "hybrid":  # amazon-sr's selection: 16-wide words, most of 64's gain at ~1.4x its speed
            L.append("  random_dim: 16   # width of the trainable word vectors beside the LLM vectors")
        L.append("  tables:")
        L.extend(text_tables)
    else:
        L.append("  mode: none   # no free-text column found")
    L += [
        "model:",
        "  dim: 32",
        "  hidden: [128, 64]",
        "train:",
        "  batch_size: 1024",
        "  epochs: 2",
        f"  output_dir: runs/{name}",
    ]
    return "\n".join(L) + "\n"
