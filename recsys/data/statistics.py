"""Counts from the train split's positives, as features (spec `statistics.counts`).

What an item's id embedding learns of its popularity and of what is bought with it is slow to learn for the rare
items of a small domain; a count states it. On amazon-sr's search domain, among the candidates of the query's own
category, a logistic regression over the default model's score, the candidate's train purchases and its train
co-purchases with the history ranked at 0.693 where the model alone ranked at 0.674 (benchmarks/search_headroom.py,
docs/search_quality.md).

Two kinds of count per row (`recsys.spec.config.CountFeature`): the candidate's purchases (train positives), and
its co-purchases: how many users bought both it and one of the row's `last` newest history items, summed over them.

Leakage: a training row's own positive must not be in its count (the model would learn "one less than the item's
usual count = a positive"). Counts are therefore kept per fold of users (`statistics.folds`, by the hash of the
user key the loader already computes for GAUC), and a row of user u reads the counts of the OTHER folds: its own
purchase and its own other rows never count, and training, evaluation and serving rows all count over the same
share of users, so the feature means the same thing in all three.

Cold start: a row whose candidate id is unseen (row 0: items not in the train vocabulary, and the training rows
that id dropout hides) gets count 0 and its "unknown" flag set; history positions at row 0 are skipped. Id dropout
thus also trains the model for the counts of cold items, as it does for their embeddings.

The counts are built by prepare (`build`), stored in the resolved schema (`statistics/<table>.npz`, sha256-checked
with the rest of the schema, loaded without pickle) and so carried by checkpoints' schema hash and serving bundles.

History matches (spec `statistics.matches`) need no train data: how many of the row's history items share the
candidate's value of a side-table feature (its brand: "the user bought this brand before", known for cold items
too). Each history item's value is read from the same side table through its id (`match_value_rows`, built by the
FeatureMapper from its side tables and vocabularies, so a serving bundle's catalogue gives the same values).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys.errors import DataError
from recsys.spec.config import COLUMNS_PER_STATISTIC, IdFeature, Spec

log = logging.getLogger("recsys.data.statistics")

# Pairs grow with the square of a user's items: a user with more distinct train items adds no co-purchases
# (counted and logged). 200 items = at most 39,800 pairs from one user.
MAX_ITEMS_FOR_PAIRS = 200


@dataclass
class TableCounts:
    """The counts over one id table's rows, per user fold."""

    buys: np.ndarray  # [folds, rows] int32: train positives of each row, by the buyer's fold
    pair_keys: np.ndarray  # [pairs] int64, sorted: a * rows + b for rows a != b one user bought both of
    pair_counts: np.ndarray  # [pairs, folds] int32: users of each fold who bought both

    def __post_init__(self):
        # totals over the folds, read for every batch
        self._buys_total = self.buys.sum(0, dtype=np.int64)
        self._pairs_total = self.pair_counts.sum(1, dtype=np.int64)

    @property
    def folds(self) -> int:
        return int(self.buys.shape[0])

    @property
    def rows(self) -> int:
        return int(self.buys.shape[1])

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, buys=self.buys, pair_keys=self.pair_keys, pair_counts=self.pair_counts)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "TableCounts":
        """Read and check a counts file (arrays only: never unpickled)."""
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in ("buys", "pair_keys", "pair_counts")}
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"{path}: not a counts file ({e})") from None
        buys, keys, counts = arrays["buys"], arrays["pair_keys"], arrays["pair_counts"]
        if (buys.ndim != 2 or keys.ndim != 1 or counts.shape != (len(keys), buys.shape[0])
                or buys.dtype != np.int32 or keys.dtype != np.int64 or counts.dtype != np.int32):
            raise DataError(f"{path}: counts of unexpected shapes or types {buys.shape} {buys.dtype}, "
                            f"{keys.shape} {keys.dtype}, {counts.shape} {counts.dtype}")
        rows = buys.shape[1]
        if ((buys < 0).any() or (counts < 0).any() or (len(keys) and (keys[0] < 0 or keys[-1] >= rows * rows
                                                                      or (np.diff(keys) <= 0).any()))):
            raise DataError(f"{path}: counts out of range (negative counts, or pair keys unsorted or beyond "
                            f"{rows} rows)")
        return cls(buys, keys, counts)

    def buys_outside(self, rows: np.ndarray, fold: np.ndarray) -> np.ndarray:
        """Purchases of `rows` by users outside `fold` (same shapes)."""
        return self._buys_total[rows] - self.buys[fold, rows]

    def pairs_outside(self, a: np.ndarray, b: np.ndarray, fold: np.ndarray) -> np.ndarray:
        """Users outside `fold` who bought both `a` and `b` (broadcast shapes)."""
        key = np.broadcast_arrays(a.astype(np.int64) * self.rows + b)[0]
        if not len(self.pair_keys):
            return np.zeros(key.shape, np.int64)
        # searched in sorted order, numpy's binary search starts each key from the previous key's answer: on
        # amazon-sr (20k lookups a batch among 3.1M pairs) 1.3 ms instead of 2.7 ms
        flat = key.reshape(-1)
        order = np.argsort(flat)
        j = np.empty(len(flat), np.int64)
        j[order] = np.searchsorted(self.pair_keys, flat[order])
        j = np.minimum(j, len(self.pair_keys) - 1).reshape(key.shape)
        found = self.pair_keys[j] == key
        return np.where(found, self._pairs_total[j] - self.pair_counts[j, np.broadcast_to(fold, key.shape)], 0)


def tables_counted(spec: Spec) -> List[str]:
    """The id tables some count reads, sorted."""
    return sorted(counted_items(spec))


def counted_items(spec: Spec) -> Dict[str, IdFeature]:
    """Counted table -> the id feature whose impression column its purchases are read from (the first count's)."""
    out: Dict[str, IdFeature] = {}
    features = {f.name: f for f in spec.features if f.kind == "id"}
    for c in spec.statistics.counts:
        f = features[c.item]
        out.setdefault(f.table, f)
    return out


def user_folds(user_hashes: np.ndarray, folds: int) -> np.ndarray:
    return (np.asarray(user_hashes, dtype=np.int64) % folds).astype(np.int64)


def build(spec: Spec, table: str, positives: pa.Table, rows_of: Callable[[pa.Array], np.ndarray],
          rows: int) -> TableCounts:
    """Counts of `table` from `positives` (columns `user`: the user hash as the loader computes it, `item`: raw
    ids); `rows_of` maps raw ids to the table's rows (0 = unseen, not counted)."""
    folds = spec.statistics.folds
    item = rows_of(positives["item"].combine_chunks())
    fold = user_folds(positives["user"].to_numpy(), folds)
    seen = item > 0
    buys = np.zeros((folds, rows), np.int64)
    np.add.at(buys, (fold[seen], item[seen]), 1)
    # one (user, row) per user and item, grouped by user
    user = positives["user"].to_numpy()[seen]
    pairs_of_user = np.unique(np.stack([user, item[seen]], 1), axis=0)
    starts = np.r_[0, np.flatnonzero(np.diff(pairs_of_user[:, 0])) + 1, len(pairs_of_user)]
    keys: List[np.ndarray] = []
    key_folds: List[np.ndarray] = []
    skipped = 0
    for s, e in zip(starts[:-1], starts[1:]):
        its = pairs_of_user[s:e, 1]
        if len(its) > MAX_ITEMS_FOR_PAIRS:
            skipped += 1
            continue
        if len(its) > 1:
            a, b = np.meshgrid(its, its, indexing="ij")
            off = a != b
            keys.append(a[off] * rows + b[off])
            key_folds.append(np.full(int(off.sum()), pairs_of_user[s, 0] % folds))
    if skipped:
        log.warning("counts of %s: %d users with more than %d distinct train items add no co-purchases", table,
                    skipped, MAX_ITEMS_FOR_PAIRS)
    if keys:
        all_keys, all_folds = np.concatenate(keys), np.concatenate(key_folds)
        pair_keys, inverse = np.unique(all_keys, return_inverse=True)
        pair_counts = np.zeros((len(pair_keys), folds), np.int64)
        np.add.at(pair_counts, (inverse.reshape(-1), all_folds), 1)
    else:
        pair_keys, pair_counts = np.zeros(0, np.int64), np.zeros((0, folds), np.int64)
    return TableCounts(buys.astype(np.int32), pair_keys.astype(np.int64), pair_counts.astype(np.int32))


def vocab_rows_of(spec: Spec, table: str) -> Callable[[pa.Array], np.ndarray]:
    """Raw ids -> rows of `table` as the loader maps them (FeatureMapper.rows), from the prepared vocabulary."""
    from recsys.data import arrowops, paths
    from recsys.data.hashing import hash_buckets

    t = spec.table(table)
    if t.index == "hash":
        return lambda arr: hash_buckets(arr, int(t.num_buckets))
    keys = arrowops.KeyIndex(pq.read_table(paths.vocab_path(spec, table), columns=["key"])["key"].combine_chunks())
    return lambda arr: arrowops.lookup(arr, keys, missing=-1) + 1


def train_positives(spec: Spec, path: Path, item_column: str) -> pa.Table:
    """(user hash, raw item id) of every positive row of the train file `path`."""
    from recsys.data import arrowops
    from recsys.data.hashing import hash_user_keys

    d = spec.data
    t = pq.read_table(path, columns=[d.label_column, d.user_column, item_column])
    t = t.filter(pc.equal(pc.cast(t[d.label_column], pa.float64()), 1.0))
    users = arrowops.as_strings(pc.cast(t[d.user_column].combine_chunks(), pa.string()))
    items = arrowops.as_strings(pc.cast(t[item_column].combine_chunks(), pa.string()))
    return pa.table({"user": arrowops.apply_distinct(users, hash_user_keys), "item": items})


def match_value_rows(spec: Spec, mapper) -> Dict[str, np.ndarray]:
    """Per `statistics.matches` entry: for every row of its history's table (0 = unseen, then vocabulary order),
    that item's value row of the match's feature (its first value; 0 = none), read from the side table the
    candidate's value comes from (`mapper`: a FeatureMapper, which holds the side table and the vocabularies), so
    a history item and a candidate with the same value get the same row."""
    from recsys.data import arrowops

    features = {f.name: f for f in spec.features}
    out: Dict[str, np.ndarray] = {}
    for m in spec.statistics.matches:
        feat, hist = features[m.feature], features[m.history]
        keys = mapper.schema.vocab[hist.table]  # a vocabulary table: spec validation (check_references) says so
        side_keys = mapper.side_keys[feat.source]
        side_row = arrowops.lookup(keys, side_keys, missing=-1)
        side_row = np.where(side_row < 0, len(side_keys), side_row)  # the side arrays' last row: no match
        values, lens = mapper.side_arrays[feat.name], mapper.side_arrays[feat.name + "#len"]
        first = np.where(lens[side_row] > 0, values[side_row, 0], 0).astype(np.int64)
        out[m.name] = np.concatenate([np.zeros(1, np.int64), first])
    return out


def count_columns(spec: Spec, counts: Dict[str, TableCounts], a: Dict[str, np.ndarray],
                  match_values: Dict[str, np.ndarray]) -> np.ndarray:
    """[rows, spec.statistics.columns] float32 for mapped arrays `a` (after id dropout): per count, log1p(count)
    and the "unknown" flag (the candidate's id is row 0); then per match, log1p(matches) and the "unknown" flag
    (the candidate has no value). `match_values`: `match_value_rows`."""
    table_of = {f.name: f.table for f in spec.features if f.kind in ("id", "sequence")}
    out = np.zeros((len(a["labels"]), spec.statistics.columns), np.float32)

    def put(i: int, value: np.ndarray, known: np.ndarray) -> None:
        """Statistic i's columns (counts first, then matches): log1p of its value where known, the unknown flag."""
        out[:, COLUMNS_PER_STATISTIC * i] = np.log1p(np.where(known, np.maximum(value, 0), 0))
        out[:, COLUMNS_PER_STATISTIC * i + 1] = ~known

    fold = user_folds(a["user"], spec.statistics.folds) if spec.statistics.counts else None
    for j, c in enumerate(spec.statistics.counts):
        tc = counts[table_of[c.item]]
        cand = a["id/" + c.item].astype(np.int64)
        if c.history is None:
            v = tc.buys_outside(cand, fold)
        else:
            seq = a["seq/" + c.history]
            lens = a["seq/" + c.history + "#len"].astype(np.int64)
            # newest `last` positions: a history is kept oldest first, its newest value at position len - 1
            pos = lens[:, None] - c.last + np.arange(c.last)[None, :]
            h = np.where(pos >= 0, np.take_along_axis(seq, np.maximum(pos, 0), 1), 0).astype(np.int64)
            both = tc.pairs_outside(cand[:, None], h, fold[:, None])
            v = np.where(h > 0, both, 0).sum(1)
        put(j, v, cand > 0)
    for j, m in enumerate(spec.statistics.matches):
        cand = np.where(a["sp/" + m.feature + "#len"] > 0, a["sp/" + m.feature][:, 0], 0).astype(np.int64)
        seq = a["seq/" + m.history].astype(np.int64)
        filled = np.arange(seq.shape[1])[None, :] < a["seq/" + m.history + "#len"][:, None]
        # history positions hidden by id dropout read row 0, whose value is "none": they never match
        hist = np.where(filled, match_values[m.name][seq], 0)
        put(len(spec.statistics.counts) + j, ((hist == cand[:, None]) & (hist > 0)).sum(1), cand > 0)
    return out


def with_counts(spec: Spec, counts: Dict[str, TableCounts], a: Dict[str, np.ndarray],
                match_values: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """`a` with the count and match columns appended to its dense array (after the dense features' columns, the
    order the model reads: `recsys.models.encoding`). Returns a new dict; `a` is not modified."""
    if not spec.statistics.columns:
        return a
    return {**a, "dense": np.concatenate([a["dense"], count_columns(spec, counts, a, match_values)], axis=1)}
