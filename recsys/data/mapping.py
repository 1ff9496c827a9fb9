"""Chunk -> numpy arrays: everything the model needs, mapped with vectorised arrow/numpy (no per-row Python).

`FeatureMapper` loads vocabularies, side tables, text tables and dense stats once; `map(table)` turns a table of
impression rows into a dict of numpy arrays that share the leading row dimension (so they can be permuted,
concatenated and sliced generically); `check(table)` finds bad rows. `assemble` builds the `Batch`.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data import arrowops, paths, schema
from recsys.data.batch import Batch, RequestGroups, text_rows_kjt
from recsys.data.features import KjtOrder, context_features, is_bucketized, sequence_kjt_keys
from recsys.data.hashing import hash_buckets, hash_user_keys
from recsys.spec.config import Spec

log = logging.getLogger("recsys.data.mapping")

Arrays = Dict[str, np.ndarray]
SIDE_ROW = "side/"  # + side-table name: each impression row's row of that side table (its last row: no match)


def bucket_rows(values: np.ndarray, boundaries) -> np.ndarray:
    """Embedding rows of bucketized values: 1 + number of boundaries <= v; 0 for NaN/inf (missing)."""
    rows = np.searchsorted(np.asarray(boundaries, dtype=np.float64), values, side="right") + 1
    return np.where(np.isfinite(values), rows, 0).astype(np.int64)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


class FeatureMapper:
    def __init__(self, spec: Spec, schema=None, side_tables: Optional[Dict[str, pa.Table]] = None):
        """`schema`: the ResolvedSchema to map with (default: the one prepare wrote for `spec`); `side_tables`:
        side-table name -> table (default: read from the data folder), e.g. a serving bundle's catalogue."""
        from recsys.data.resolved import schema_for

        self.spec = spec
        self.schema = schema if schema is not None else schema_for(spec)
        self._hashers: Dict[str, object] = {}  # one function object per hash table (memo key of arrowops)
        # keys with a hash index built once (arrowops.KeyIndex): a request's few ids are looked up by dict
        self.vocab: Dict[str, arrowops.KeyIndex] = {t.name: arrowops.KeyIndex(self.schema.vocab[t.name])
                                                    for t in spec.tables
                                                    if t.index == "vocab" and t.name not in spec.bucket_tables()}
        self.text_keys: Dict[str, arrowops.KeyIndex] = {
            tt.name: arrowops.KeyIndex(self.schema.text_keys(tt.name)) for tt in spec.text.tables
            if any(f.kind == "text" and f.text_table == tt.name for f in spec.features)}
        self.dense_stats = self.schema.dense_stats
        self.counts = self.schema.counts  # statistics.counts' train counts, read by `with_counts`
        # a KeyIndex too: `pc.index_in` against even these 3 values cost ~40 us per request (its hash set is built
        # on every call)
        self.domain_values = arrowops.KeyIndex(pa.array([d.match_value for d in spec.domains], pa.string()))
        self._load_side_features(side_tables)
        from recsys.data.statistics import match_value_rows

        self.match_values = match_value_rows(spec, self)  # statistics.matches: each history row's value row

    def with_counts(self, a: Arrays) -> Arrays:
        """The mapped arrays of a batch with the count features' columns (`recsys.data.statistics`) appended to
        `dense`. Called on the batch as the model gets it: after id dropout, whose hidden ids read "unknown"."""
        from recsys.data.statistics import with_counts

        return with_counts(self.spec, self.counts, a, self.match_values)

    # -- ids -> rows ---------------------------------------------------------------------------------------
    def rows(self, table: str, arr) -> np.ndarray:
        """Embedding rows of ids in `table`: vocab position + 1 (0 unseen/empty) or stable hash bucket."""
        t = self.spec.table(table)
        if t.index == "hash":
            return arrowops.apply_distinct(arr, self._hashers.setdefault(
                table, lambda s, n=int(t.num_buckets): hash_buckets(s, n)))
        return arrowops.lookup(arr, self.vocab[table], missing=-1) + 1

    def _jagged(self, f, arr) -> Tuple[np.ndarray, np.ndarray]:
        """(flat rows, lengths) of a sparse/sequence column (list, separated string or scalar)."""
        if _is_list(arr.type):
            flat, lens = arrowops.list_parts(arr)
            return self.rows(f.table, flat), lens
        if getattr(f, "separator", None):
            s = arrowops.as_strings(arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr)
            flat, lens = arrowops.list_parts(pc.split_pattern(pc.fill_null(s, ""), f.separator))
            nonempty = np.asarray(pc.greater(pc.utf8_length(flat), 0))
            owner = np.repeat(np.arange(len(lens)), lens)
            lens = np.bincount(owner[nonempty], minlength=len(lens)).astype(np.int64)
            return self.rows(f.table, flat.filter(pa.array(nonempty))), lens
        r = self.rows(f.table, arr)
        if f.kind == "sequence":
            return r, np.ones(len(r), dtype=np.int64)
        present = ~arrowops.apply_distinct(arr, _empty)  # a sparse feature with an empty value has no value
        return r[present], present.astype(np.int64)

    def table_row_range(self, table: str) -> Tuple[int, int]:
        """Inclusive range of the embedding rows `rows(table, ...)` gives (bucketized tables: `bucket_rows`)."""
        buckets = self.spec.bucket_tables()
        if table in buckets:
            return 0, buckets[table] - 1
        t = self.spec.table(table)
        return (0, int(t.num_buckets) - 1) if t.index == "hash" else (0, len(self.vocab[table]))

    def value_bounds(self) -> Dict[str, Tuple[int, int]]:
        """Inclusive (lowest, highest) value of every integer array `map` returns whose range the spec, the
        vocabularies and the side tables fix: all but `user` (hashed keys) and `row_id` (the caller's). A consumer
        that keeps mapped rows (the loader's `_MappedStore`) stores each array in the narrowest type of its range
        without scanning the values; tests/data/test_mapped_store.py checks every key against mapped data."""
        out: Dict[str, Tuple[int, int]] = {"domain": (-1, len(self.spec.domains) - 1)}
        out.update({SIDE_ROW + name: (0, len(keys)) for name, keys in self.side_keys.items()})
        out.update({k: (int(a.min()), int(a.max())) if a.size else (0, 0) for k, (_, a) in self.side_derived().items()})
        for f in self.spec.features:
            if getattr(f, "source", None):
                out.update({key: (1, 1) for key, name in self._side_keys_of(f) if name is None})
            elif f.kind == "dense" and f.bucketized:
                out["sp/" + f.name], out["sp/" + f.name + "#len"] = (0, len(f.boundaries) + 1), (1, 1)
            elif f.kind == "id":
                out["id/" + f.name] = self.table_row_range(f.table)
            elif f.kind in ("sparse", "sequence"):
                prefix, width = ("sp/", f.max_values) if f.kind == "sparse" else ("seq/", f.max_len)
                out[prefix + f.name], out[prefix + f.name + "#len"] = self.table_row_range(f.table), (0, width)
            elif f.kind == "text":
                out["txt/" + f.name] = (0, len(self.text_keys[f.text_table]))
        return out

    @staticmethod
    def _side_keys_of(f) -> List[Tuple[str, Optional[str]]]:
        """(array key, side array it gathers or None for all-ones lengths) of a feature read from a side table;
        [] for a plain dense one (it joins the stacked `dense` array)."""
        if f.kind == "id":
            return [("id/" + f.name, f.name)]
        if f.kind == "sparse":
            return [("sp/" + f.name, f.name), ("sp/" + f.name + "#len", f.name + "#len")]
        if f.kind == "dense" and f.bucketized:
            return [("sp/" + f.name, f.name), ("sp/" + f.name + "#len", None)]
        return []

    def side_derived(self) -> Dict[str, Tuple[str, np.ndarray]]:
        """Arrays `map` reads from a side table -> (the key of the side-table row of each impression row, the
        per-side-row array): `out[key] == array[out[row_key]]`. A consumer keeping mapped rows stores the row and
        rebuilds these (amazon-sr: 2 stored bytes a row instead of 66 for brands and categories)."""
        return {key: (SIDE_ROW + f.source, self.side_arrays[name]) for f in self.spec.features
                if getattr(f, "source", None) in self.side_keys for key, name in self._side_keys_of(f)
                if name is not None}

    # -- side tables: precompute per side row, one extra last row = "no match" ------------------------------
    def _load_side_features(self, given: Optional[Dict[str, pa.Table]]) -> None:
        self.side_keys: Dict[str, arrowops.KeyIndex] = {}
        self.side_arrays: Dict[str, np.ndarray] = {}
        self.side_filled: Dict[str, int] = {}  # "<side table>.<column>" -> values filled (missing / non-finite)
        for st in self.spec.data.side_tables:
            if not self.side_features(st.name):
                continue
            if given is not None:
                tab, where = given[st.name], f"catalogue {st.name}"
            else:
                p = where = paths.side_table_path(self.spec, st.name)
                schema.check_file(p, schema.side_columns(self.spec, st.name))
                tab = pq.read_table(p, columns=list(schema.side_columns(self.spec, st.name)))
            self.side_keys[st.name] = arrowops.KeyIndex(arrowops.as_strings(tab[st.key].combine_chunks()))
            # + one last row for "no match": zero rows, and a dense feature's train mean
            for name, arr in self.side_feature_arrays(st.name, tab).items():
                self.side_arrays[name] = np.concatenate([arr, np.zeros((1,) + arr.shape[1:], arr.dtype)])
            for f in self.side_features(st.name):
                if f.kind == "dense" and not f.bucketized:
                    mean = self.dense_stats.get(f.name, {}).get("mean", 0.0)
                    self.side_arrays[f.name][-1] = self._transform(f, np.array([mean]))[0]
                    bad = int((~np.isfinite(pc.cast(tab[f.column], pa.float64()).to_numpy(zero_copy_only=False))).sum())
                    if bad:  # side values are content: filled, never quarantined, but counted and said
                        self.side_filled[f"{st.name}.{f.column}"] = bad
                        log.warning("%s: %d of %d values of column %r are missing, NaN or infinite; filled with the "
                                    "train mean %.4g", where, bad, tab.num_rows, f.column, mean)

    def side_features(self, side_table: str) -> list:
        return [f for f in self.spec.features if getattr(f, "source", None) == side_table]

    def side_feature_arrays(self, side_table: str, tab: pa.Table) -> Arrays:
        """Mapped arrays of the features read from a side table, one row per row of `tab` (side-table columns):
        dense values (missing -> the train mean), id rows, padded sparse rows and their lengths (`name#len`)."""
        out: Arrays = {}
        for f in self.side_features(side_table):
            col = tab[f.column]
            if f.kind == "dense" and f.bucketized:  # one row per value (0 = missing), as map() reads it
                v = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
                out[f.name] = bucket_rows(v, f.boundaries)[:, None]
            elif f.kind == "dense":
                v = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
                mean = self.dense_stats.get(f.name, {}).get("mean", 0.0)
                v = np.where(np.isfinite(v), v, mean)  # side values are content: fill, never quarantine
                out[f.name] = self._transform(f, v).astype(np.float32)
            elif f.kind == "id":
                out[f.name] = self.rows(f.table, col)
            else:
                flat, lens = self._jagged(f, col)
                padded, kept = arrowops.pad(flat, lens, f.max_values, keep_last=False)
                out[f.name], out[f.name + "#len"] = padded, kept
        return out

    def _transform(self, f, v: np.ndarray) -> np.ndarray:
        if f.transform == "log1p":
            v = np.log1p(np.maximum(v, 0.0))
        if f.transform in ("standardize",):
            s = self.dense_stats.get(f.name, {"mean": 0.0, "std": 1.0})
            v = (v - s["mean"]) / s["std"]
        return v

    # -- rows -> arrays ------------------------------------------------------------------------------------
    def domain_index(self, table: pa.Table) -> np.ndarray:
        return arrowops.lookup(table[self.spec.data.domain_column], self.domain_values, missing=-1)

    def map(self, table: pa.Table, row_ids: np.ndarray, side_rows_only: bool = False) -> Arrays:
        """`side_rows_only`: leave out the arrays `side_derived` rebuilds from the side-table rows (for a consumer
        that stores the rows and rebuilds them itself: the loader's store)."""
        return self._map(table, table, None, row_ids, side_rows_only)

    def map_requests(self, context: pa.Table, candidates: pa.Table, owner: np.ndarray) -> Arrays:
        """Arrays of ranking requests without repeating their context: `context` has one row per request (the domain
        column and the user/query columns), `candidates` one row per candidate (the item columns), `owner` the
        request of each candidate. Every context feature (history, query text, user) is mapped once per request and
        repeated per candidate as arrays, the same rows `map` gives for the repeated table."""
        n = candidates.num_rows
        return self._map(context, candidates, np.asarray(owner, dtype=np.int64), np.arange(n, dtype=np.int64))

    def _map(self, context: pa.Table, rows: pa.Table, owner: Optional[np.ndarray], row_ids: np.ndarray,
             side_rows_only: bool = False) -> Arrays:
        """`rows` holds the impression rows; a column it lacks is read from `context` and repeated by `owner`."""
        spec, d = self.spec, self.spec.data
        n = rows.num_rows

        def column(name: str):  # (arrow column, row selection that brings its values to the impression rows)
            if owner is not None and name not in rows.column_names:
                return context[name], owner
            return rows[name], None

        def per_row(a: np.ndarray, sel: Optional[np.ndarray]) -> np.ndarray:
            return a if sel is None else a[sel]

        labels = rows[d.label_column] if d.label_column in rows.column_names else pa.array(np.zeros(n, np.int8))
        dom, dom_sel = column(d.domain_column)
        user, user_sel = column(d.user_column)
        out: Arrays = {"row_id": row_ids.astype(np.int64),
                       "labels": np.array(pc.cast(labels, pa.float32()).to_numpy(zero_copy_only=False),
                                         dtype=np.float32),  # copy: arrow buffers are read-only
                       "domain": per_row(arrowops.lookup(dom, self.domain_values, missing=-1), dom_sel),
                       "user": per_row(arrowops.apply_distinct(user, hash_user_keys), user_sel)}
        side_idx: Dict[str, np.ndarray] = {}
        for st in d.side_tables:
            if st.name in self.side_keys:
                col, sel = column(st.join_on)
                pos = arrowops.lookup(col, self.side_keys[st.name], missing=-1)
                side_idx[st.name] = per_row(np.where(pos < 0, len(self.side_keys[st.name]), pos), sel)
                out[SIDE_ROW + st.name] = side_idx[st.name]  # what `side_derived` rebuilds its arrays from
        dense: List[np.ndarray] = []
        layouts: Dict[Tuple[str, bool], arrowops.PadLayout] = {}  # per (column, keep_last): shared by its features
        for f in spec.features:
            src = getattr(f, "source", None)
            if src:  # read from a side table, already brought to the impression rows by side_idx
                if f.kind == "dense" and not f.bucketized:
                    dense.append(self.side_arrays[f.name][side_idx[src]])
                    continue
                for key, name in self._side_keys_of(f):
                    if name is not None and not side_rows_only:  # else rebuilt from the side rows (side_derived)
                        out[key] = self.side_arrays[name][side_idx[src]]
                    elif name is None:  # a bucketized dense: one row per value (row 0 = missing)
                        out[key] = np.ones(n, dtype=np.int64)
                continue
            col, sel = column(f.column)
            for key, a in self._map_column(f, col, layouts).items():
                if key == "dense":
                    dense.append(per_row(a, sel))
                else:
                    out[key] = per_row(a, sel)
        out["dense"] = np.stack(dense, axis=1).astype(np.float32) if dense else np.zeros((n, 0), np.float32)
        return out

    def _map_column(self, f, col, layouts: Optional[Dict[Tuple[str, bool], arrowops.PadLayout]] = None) -> Arrays:
        """Arrays of one feature read from an impression column (not a side table), one row per value of `col`.
        `layouts`: padding layouts of the columns mapped so far, reused by a feature of the same column."""

        def padded(flat: np.ndarray, lens: np.ndarray, width: int, keep_last: bool):
            if layouts is None:
                return arrowops.pad(flat, lens, width, keep_last)
            key = (f.column, keep_last)
            if key not in layouts or not layouts[key].fits(lens, width):
                layouts[key] = arrowops.PadLayout(lens, width, keep_last)
            return arrowops.pad(flat, lens, width, keep_last, layouts[key])

        if f.kind == "dense" and f.bucketized:
            v = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
            return {"sp/" + f.name: bucket_rows(v, f.boundaries)[:, None],
                    "sp/" + f.name + "#len": np.ones(len(v), dtype=np.int64)}
        if f.kind == "dense":
            v = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
            return {"dense": self._transform(f, v).astype(np.float32)}
        if f.kind == "id":
            return {"id/" + f.name: self.rows(f.table, col)}
        if f.kind == "sparse":
            flat, lens = self._jagged(f, col)
            rows, kept = padded(flat, lens, f.max_values, False)
            return {"sp/" + f.name: rows, "sp/" + f.name + "#len": kept}
        if f.kind == "sequence":
            flat, lens = self._jagged(f, col)
            rows, kept = padded(flat, lens, f.max_len, True)
            return {"seq/" + f.name: rows, "seq/" + f.name + "#len": kept}
        keys = self.text_keys[f.text_table]  # text
        if f.sequence:
            flat, lens = arrowops.list_parts(col)
            rows, _ = padded(arrowops.lookup(flat, keys) + 1, lens, f.max_len, True)
            return {"txt/" + f.name: rows}
        return {"txt/" + f.name: arrowops.lookup(col, keys) + 1}

    # -- bad rows ------------------------------------------------------------------------------------------
    def check(self, table: pa.Table) -> np.ndarray:
        """Reason code per row (0 = good); codes index `REASONS`."""
        d, n = self.spec.data, table.num_rows
        reason = np.zeros(n, dtype=np.int16)

        def flag(mask: np.ndarray, code: int) -> None:
            reason[(reason == 0) & mask] = code

        lab = pc.cast(table[d.label_column], pa.float64()).to_numpy(zero_copy_only=False)
        flag(~np.isin(np.nan_to_num(lab, nan=-1.0), [0.0, 1.0]), 1)
        unknown = self.domain_index(table) < 0
        if d.ignore_domains:  # held-out domains: dropped by the loader (no domain index), but not bad rows
            unknown &= ~np.asarray(pc.fill_null(pc.is_in(table[d.domain_column],
                                                         value_set=pa.array(d.ignore_domains)), False))
        flag(unknown, 2)
        required = [d.user_column] + [st.join_on for st in d.side_tables] + \
                   [f.column for f in self.spec.features if f.kind == "id" and not f.source and f.side != "query"]
        for col in dict.fromkeys(required):
            flag(arrowops.apply_distinct(table[col], _empty), 3)
        for f in self.spec.features:
            if f.kind == "dense" and not f.source and not f.bucketized:  # a bucket has a row for missing values
                v = pc.cast(table[f.column], pa.float64()).to_numpy(zero_copy_only=False)
                flag(~np.isfinite(v), 4)
        for name in table.column_names:
            col = table[name]
            if _is_list(col.type):
                bad = np.asarray(pc.fill_null(pc.is_null(col), True))
                flat, lens = arrowops.list_parts(col)
                if flat.null_count:
                    owner = np.repeat(np.arange(n), lens)
                    bad[owner[~np.asarray(flat.is_valid())]] = True
                flag(bad, 5)
        return reason


REASONS = ["ok", "label_not_0_1", "unknown_domain", "empty_required_id", "bad_dense_value", "malformed_list"]


def _empty(s: pa.Array) -> np.ndarray:
    return np.asarray(pc.fill_null(pc.equal(pc.utf8_length(s), 0), True))


def drop_ids(spec: Spec, a: Arrays, rng: np.random.Generator) -> Arrays:
    """Train-time id dropout (`tables[].id_dropout`): each id or history id of such a table becomes the unseen row 0
    with that probability. Returns new arrays; the input is not modified."""
    rate = {t.name: t.id_dropout for t in spec.tables if t.id_dropout > 0}
    if not rate:
        return a
    out = dict(a)
    for f in spec.features:
        key = {"id": "id/", "sequence": "seq/"}.get(f.kind)
        if key is None or f.table not in rate:
            continue
        v = a[key + f.name]
        out[key + f.name] = np.where(rng.random(v.shape) < rate[f.table], 0, v).astype(v.dtype)
    return out


def assemble(spec: Spec, a: Arrays, owner: Optional[np.ndarray] = None, order: Optional[KjtOrder] = None) -> Batch:
    """Numpy arrays of one batch -> Batch (KJT key-major: every key's lengths for all rows, then the next key).

    `owner` (serving: the request of each row, requests contiguous) groups the rows (`RequestGroups`): the context
    features' values enter the KJTs from each request's first row only, the other rows get none (the model reads
    them from the first row). `order`: the order of the features in the KJTs (`KjtOrder`, the one the model's
    sharded embedding modules read, so they need not permute them); None: the spec's (`kjt_keys`,
    `text_kjt_keys`). Integer arrays may come in narrower types (the loader's store of mapped rows keeps them so);
    every index tensor of the Batch is int64."""
    blocks: Dict[str, Tuple[List[str], np.ndarray, np.ndarray]] = {}  # feature -> (its keys, values, lengths)
    b = len(a["labels"])
    groups = RequestGroups.from_owner(owner) if owner is not None else None
    shared = set(context_features(spec)) if groups is not None else set()
    first = groups.first_mask if groups is not None else None

    def rows_of(name: str) -> Optional[np.ndarray]:  # the rows whose values of feature `name` enter the KJT
        return first if name in shared else None

    for f in spec.features:
        keep = rows_of(f.name)
        if f.kind == "id":
            blocks[f.name] = ([f.name], a["id/" + f.name] if keep is None else a["id/" + f.name][keep],
                              np.ones(b, dtype=np.int64) if keep is None else keep.astype(np.int64))
        elif f.kind == "sparse" or is_bucketized(f):
            padded, lens = a["sp/" + f.name], a["sp/" + f.name + "#len"]
            if keep is not None:
                lens = np.where(keep, lens, 0)
            blocks[f.name] = ([f.name], padded[np.arange(padded.shape[1])[None, :] < lens[:, None]], lens)
    seq_lengths: Dict[str, torch.Tensor] = {}
    for f in spec.features:
        if f.kind == "sequence":
            padded, lens = a["seq/" + f.name], a["seq/" + f.name + "#len"]
            keep = rows_of(f.name)
            kjt_lens = lens if keep is None else np.where(keep, lens, 0)
            keys = sequence_kjt_keys(f)
            if f.pooling == "mean":  # one key: each row's whole history
                blocks[f.name] = (keys, padded[np.arange(padded.shape[1])[None, :] < kjt_lens[:, None]],
                                  kjt_lens.astype(np.int64))
            else:
                mask_t = np.arange(padded.shape[1])[:, None] < kjt_lens[None, :]  # [L, B]: key-major over positions
                blocks[f.name] = (keys, padded.T[mask_t], mask_t.ravel().astype(np.int64))
            seq_lengths[f.name] = _long(lens)  # every row's own length
    order = order or KjtOrder()
    parts = [blocks[n] for n in order.sparse or blocks]  # blocks fill in kjt_keys order
    kjt = KeyedJaggedTensor(keys=[k for keys, _, _ in parts for k in keys],
                            values=torch.from_numpy(np.concatenate([v for _, v, _ in parts]).astype(np.int64)),
                            lengths=torch.from_numpy(np.concatenate([n for _, _, n in parts]).astype(np.int64)))
    text = {f.name: _long(a["txt/" + f.name]) for f in spec.features_of("text")}
    text_ids = (text_rows_kjt({n: text[n] for n in order.text})
                if order.text is not None and text and groups is None else None)
    return Batch(sparse=kjt, dense=torch.from_numpy(np.ascontiguousarray(a["dense"])), text=text,
                 seq_lengths=seq_lengths, labels=torch.from_numpy(np.ascontiguousarray(a["labels"])),
                 domain=_long(a["domain"]), row_id=_long(a["row_id"]), user=_long(a["user"]), text_ids=text_ids,
                 groups=groups)


def _long(a: np.ndarray) -> torch.Tensor:
    """An int64 tensor of an integer array (shares its memory when it already is contiguous int64)."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
