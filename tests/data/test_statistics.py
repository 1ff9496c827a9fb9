"""Train counts as features (spec `statistics.counts`, recsys.data.statistics): the counts leave out the row's own
user fold, co-purchases read the newest history items, unseen ids read "unknown", the files are checked, the spec
references are validated, and the loader's batches carry the columns after id dropout. History matches (spec
`statistics.matches`): how many history items share the candidate's side-table value, against brute force."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from recsys.data import statistics as S
from recsys.data.hashing import hash_user_keys
from recsys.errors import DataError, SpecError
from recsys.spec.loader import load_spec

REPO = Path(__file__).resolve().parents[2]
ML_SPEC = REPO / "feature_specs" / "movielens.yaml"
COUNTS = "statistics.counts=[{name: item_buys, item: item_id}, {name: co_buys, item: item_id, history: hist_items, last: 3}]"


def _spec(*extra: str):
    return load_spec(ML_SPEC, [COUNTS, *extra])


# ----------------------------------------------------------------------------------------- counts, by brute force
USERS = [f"u{i}" for i in range(12)]
RNG = np.random.default_rng(0)
BOUGHT = {u: sorted(set(RNG.integers(1, 9, size=RNG.integers(1, 6)).tolist())) for u in USERS}  # rows 1..8


def _counts(folds: int = 3) -> S.TableCounts:
    users = [u for u in USERS for _ in BOUGHT[u]]
    items = [f"i{r}" for u in USERS for r in BOUGHT[u]]
    positives = pa.table({"user": hash_user_keys(pa.array(users)), "item": pa.array(items)})
    spec = _spec(f"statistics.folds={folds}")
    return S.build(spec, "item", positives, lambda arr: np.array([int(s[1:]) for s in arr.to_pylist()]), rows=10)


def _fold(u: str, folds: int) -> int:
    return int(hash_user_keys(pa.array([u]))[0] % folds)


def test_counts_leave_out_the_users_of_the_rows_fold():
    counts = _counts(folds=3)
    for u, row in itertools.product(USERS, range(10)):
        f = _fold(u, 3)
        others = [v for v in USERS if _fold(v, 3) != f]
        want_buys = sum(row in BOUGHT[v] for v in others)
        assert counts.buys_outside(np.array([row]), np.array([f]))[0] == want_buys
        for other in range(1, 10):
            want_pairs = sum(row in BOUGHT[v] and other in BOUGHT[v] for v in others) if other != row else 0
            got = counts.pairs_outside(np.array([row]), np.array([other]), np.array([f]))[0]
            assert got == want_pairs, (u, row, other)


def test_count_columns_read_the_newest_history_and_flag_unseen_candidates():
    spec = _spec("statistics.folds=3")
    counts = _counts(folds=3)
    user = hash_user_keys(pa.array(["u0", "u1", "u2", "u3"]))
    seq = np.array([[1, 2, 3, 4, 0], [5, 6, 0, 0, 0], [1, 0, 2, 0, 0], [7, 8, 1, 0, 0]])
    a = {"labels": np.zeros(4, np.float32), "user": user, "id/item_id": np.array([2, 3, 5, 0]),
         "seq/hist_items": seq, "seq/hist_items#len": np.array([4, 2, 3, 3]), "dense": np.zeros((4, 1), np.float32)}
    cols = S.count_columns(spec, {"item": counts}, a, {})
    assert cols.shape == (4, 4)
    fold = user % 3
    for r in range(3):
        c = a["id/item_id"][r]
        assert cols[r, 0] == pytest.approx(np.log1p(counts.buys_outside(np.array([c]), fold[r:r + 1])[0]))
        newest = [h for h in seq[r, max(0, a["seq/hist_items#len"][r] - 3):a["seq/hist_items#len"][r]] if h > 0]
        want = sum(counts.pairs_outside(np.array([c]), np.array([h]), fold[r:r + 1])[0] for h in newest)
        assert cols[r, 2] == pytest.approx(np.log1p(want)), r  # row 0: positions 1..3, row 2: the hidden id skipped
        assert cols[r, 1] == cols[r, 3] == 0.0
    assert cols[3].tolist() == [0.0, 1.0, 0.0, 1.0]  # unseen candidate: no count, flagged unknown
    merged = S.with_counts(spec, {"item": counts}, a, {})
    assert merged["dense"].shape == (4, 5) and np.array_equal(merged["dense"][:, 1:], cols)
    assert a["dense"].shape == (4, 1)  # the input is left as it was


def test_match_columns_count_the_history_items_that_share_the_candidates_value():
    spec = _spec("statistics.matches=[{name: genre_matches, feature: item_genres, history: hist_items}]")
    values = {"genre_matches": np.array([0, 5, 5, 6, 0, 7, 5])}  # item rows 0..6 -> their first genre row
    seq = np.array([[1, 2, 3, 0], [4, 4, 1, 1], [5, 0, 6, 2], [1, 2, 6, 0], [1, 1, 1, 1]])
    a = {"labels": np.zeros(5, np.float32), "user": hash_user_keys(pa.array([f"u{i}" for i in range(5)])),
         "id/item_id": np.array([1, 2, 0, 3, 4]), "seq/hist_items": seq,
         "seq/hist_items#len": np.array([3, 4, 3, 2, 2]),
         "sp/item_genres": np.array([[5, 2], [0, 0], [7, 5], [5, 0], [6, 0]]),
         "sp/item_genres#len": np.array([2, 0, 2, 1, 1]),
         "dense": np.zeros((5, 1), np.float32)}
    cols = S.count_columns(spec, {"item": _counts(folds=spec.statistics.folds)}, a, values)
    assert cols.shape == (5, 6)  # two counts, then the match: log1p(matches), unknown flag
    # row 0: history 1, 2 (genre 5) and 3 (6) against genre 5 -> 2; row 1: no value -> unknown; row 2: candidate
    # unseen (id dropout, a cold item) yet its genre 7 is known: the hidden history position 0 never matches, 5 does;
    # row 3: padding beyond the length (6) is not read; row 4: the history's genre 5 against 6
    assert cols[:, 4].tolist() == pytest.approx(np.log1p([2, 0, 1, 2, 0]).tolist())
    assert cols[:, 5].tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert cols[2, 1] == 1.0  # while the counts call the unseen candidate unknown


@pytest.mark.parametrize("matches, more, message", [
    ("[{name: m, feature: item_id, history: hist_items}]", [], "'item_id' is not a sparse feature read from a side"),
    ("[{name: m, feature: item_genres, history: user_id}]", [], "'user_id' is not a sequence feature"),
    ("[{name: m, feature: item_genres, history: hist_genres}]", [], "which no id feature of that table reads"),
    ("[{name: m, feature: item_genres, history: hist_items}]",
     ["tables.item.index=hash", "tables.item.num_buckets=100"], "needs a vocabulary"),
    ("[{name: item_buys, feature: item_genres, history: hist_items}]", [], "already a feature's or a count's"),
    ("[{name: m, feature: item_genres, history: hist_items}, {name: m, feature: item_genres, history: hist_items}]",
     [], "duplicate match name"),
])
def test_bad_match_references_are_named(matches, more, message):
    features = ("features=[{kind: id, name: item_id, column: item_id, side: item, table: item}, {kind: id, name: "
                "user_id, column: user_id, side: user, table: user}, {kind: sequence, name: hist_items, column: "
                "hist_item_ids, side: user, table: item, max_len: 20, target: item_id}, {kind: sequence, name: "
                "hist_genres, column: hist_item_ids, side: user, table: genre, max_len: 20}, {kind: sparse, name: "
                "item_genres, column: genres, source: movies, separator: '|', side: item, table: genre}]")
    with pytest.raises(SpecError, match=rf"statistics\.matches.*{message}"):
        _spec(features, f"statistics.matches={matches}", *more)


def test_counts_files_round_trip_and_bad_files_are_refused(tmp_path):
    counts = _counts()
    counts.save(tmp_path / "item.npz")
    back = S.TableCounts.load(tmp_path / "item.npz")
    assert np.array_equal(back.buys, counts.buys) and np.array_equal(back.pair_counts, counts.pair_counts)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="junk.npz"):
        S.TableCounts.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "pickled.npz", buys=np.array([{"x": 1}], dtype=object), pair_keys=np.zeros(0, np.int64),
             pair_counts=np.zeros((0, 3), np.int32))
    with pytest.raises(DataError, match="pickled.npz"):  # object arrays would need pickle: never loaded
        S.TableCounts.load(tmp_path / "pickled.npz")
    np.savez(tmp_path / "shape.npz", buys=counts.buys, pair_keys=counts.pair_keys, pair_counts=counts.pair_counts[:, :1])
    with pytest.raises(DataError, match="unexpected shapes"):
        S.TableCounts.load(tmp_path / "shape.npz")
    np.savez(tmp_path / "order.npz", buys=counts.buys, pair_keys=counts.pair_keys[::-1].copy(),
             pair_counts=counts.pair_counts)
    with pytest.raises(DataError, match="order.npz: counts out of range"):  # unsorted keys would be misread
        S.TableCounts.load(tmp_path / "order.npz")


@pytest.mark.parametrize("counts, message", [
    ("[{name: c, item: hist_items}]", "'hist_items' is not an id feature"),
    ("[{name: c, item: item_id, history: user_id}]", "'user_id' is not a sequence feature"),
    ("[{name: c, item: user_id, history: hist_items}]", "a co-count pairs ids of one table"),
    ("[{name: item_id, item: item_id}]", "already a feature's"),
    ("[{name: c, item: item_id}, {name: c, item: item_id}]", "duplicate count name"),
    ("[{name: c, item: movie_row}]", "reads side table 'movies'"),
])
def test_bad_count_references_are_named(counts, message):
    side_id = ("features=[{kind: id, name: movie_row, column: item_id, source: movies, side: item, table: item}, "
               "{kind: id, name: item_id, column: item_id, side: item, table: item}, {kind: id, name: user_id, "
               "column: user_id, side: user, table: user}, {kind: sequence, name: hist_items, column: hist_item_ids, "
               "side: user, table: item, max_len: 20, target: item_id}]")
    with pytest.raises(SpecError, match=message):
        load_spec(ML_SPEC, [side_id, f"statistics.counts={counts}"])


# ---------------------------------------------------------------------------------------------- prepared data
@pytest.fixture(scope="module")
def counted(ml_prepared, tmp_path_factory):
    import shutil

    from recsys.data.prepare import prepare

    prepared = tmp_path_factory.mktemp("counted")
    shutil.copytree(ml_prepared, prepared, dirs_exist_ok=True)
    spec = _spec(f"data.prepared_dir={prepared}", "tables.item.id_dropout=0.3")
    prepare(spec)
    return spec


def test_prepare_puts_the_counts_in_the_schema(counted):
    from recsys.data.resolved import schema_for

    schema = schema_for(counted)
    assert set(schema.counts) == {"item"} and "statistics/item.npz" in schema.info["files"]
    assert schema.counts["item"].rows == schema.table_rows["item"]
    assert schema.counts["item"].buys.sum() > 0 and len(schema.counts["item"].pair_keys) > 0


def test_batches_carry_the_counts_after_id_dropout(counted):
    from recsys.data.loader import BatchLoader
    from recsys.data.resolved import schema_for

    n_dense = len([f for f in counted.features_of("dense") if not f.bucketized])
    batch = next(iter(BatchLoader(counted, "train", 512, seed=3)))
    assert batch.dense.shape[1] == n_dense + 4
    cols = batch.dense[:, n_dense:].numpy()
    item = batch.sparse.to_dict()["item_id"].values().numpy()
    assert np.array_equal(cols[:, 1] == 1.0, item == 0)  # unknown exactly where dropout hid the candidate
    assert (cols[item == 0][:, [0, 2]] == 0).all() and (cols[item > 0, 0] > 0).mean() > 0.5
    plain = next(iter(BatchLoader(counted, "valid", 512, seed=3)))  # eval: nothing dropped
    assert (plain.dense[:, n_dense + 1].numpy() == (plain.sparse.to_dict()["item_id"].values().numpy() == 0)).all()
    assert schema_for(counted).counts["item"].folds == counted.statistics.folds


def test_batches_carry_the_history_matches_of_the_side_table(counted):
    """A match read from the loader's batches equals one computed from the raw catalogue and the raw history ids."""
    import pyarrow.parquet as pq

    from recsys.data import paths
    from recsys.data.features import sequence_kjt_keys
    from recsys.data.loader import BatchLoader
    from recsys.data.resolved import schema_for
    from recsys.spec.config import MatchFeature

    spec = counted.model_copy(update={"statistics": counted.statistics.model_copy(update={"matches": [
        MatchFeature(name="genre_matches", feature="item_genres", history="hist_items")]})})
    schema = schema_for(spec)
    genre_row = {k: i + 1 for i, k in enumerate(schema.vocab["genre"].to_pylist())}
    movies = pq.read_table(paths.side_table_path(spec, "movies"), columns=["item_id", "genres"]).to_pylist()
    first_genre = {m["item_id"]: genre_row.get((m["genres"] or "").split("|")[0], 0) for m in movies}
    item_key = dict(enumerate(schema.vocab["item"].to_pylist(), start=1))
    n_dense = len([f for f in spec.features_of("dense") if not f.bucketized])
    batch = next(iter(BatchLoader(spec, "valid", 256, seed=3)))
    col = n_dense + 4
    got = batch.dense[:, col:col + 2].numpy()
    kjt = batch.sparse.to_dict()
    hist_feature = next(f for f in spec.features if f.name == "hist_items")
    positions = [kjt[k].to_dense() for k in sequence_kjt_keys(hist_feature)]  # one KJT key a history position
    cand = [v.tolist()[:1] for v in kjt["item_genres"].to_dense()]
    for r in range(batch.size):
        c = cand[r][0] if cand[r] else 0
        hist = [h for p in positions for h in p[r].tolist()]
        want = sum(1 for h in hist if h > 0 and c > 0 and first_genre.get(item_key[h], 0) == c)
        assert got[r].tolist() == pytest.approx([np.log1p(want), float(c == 0)]), r
    assert (got[:, 0] > 0).mean() > 0.3  # the check above is not all zeros


def test_a_schema_whose_counts_do_not_fit_its_table_is_refused(counted, tmp_path):
    import json
    import shutil

    from recsys.data.resolved import SCHEMA_FILE, load_schema, resolved_dir
    from recsys.fileio import sha256_file

    copy = tmp_path / "schema"
    shutil.copytree(resolved_dir(counted), copy)
    info = json.loads((copy / SCHEMA_FILE).read_text())
    short = S.TableCounts.load(copy / "statistics" / "item.npz")
    S.TableCounts(short.buys[:, :-1].copy(), short.pair_keys[:0], short.pair_counts[:0]).save(
        copy / "statistics" / "item.npz")
    info["files"]["statistics/item.npz"] = sha256_file(copy / "statistics" / "item.npz")  # consistent, yet wrong
    (copy / SCHEMA_FILE).write_text(json.dumps(info))
    with pytest.raises(DataError, match="item.npz: counts of .* rows, table 'item' has"):
        load_schema(copy)


def test_which_counts_the_model_reads_does_not_move_the_schema():
    from recsys.data.resolved import schema_fingerprint

    base = schema_fingerprint(_spec())
    last = "statistics.counts=[{name: item_buys, item: item_id}, {name: co, item: item_id, history: hist_items, last: 9}]"
    assert schema_fingerprint(load_spec(ML_SPEC, [last])) == base  # names, `last`: the model's reading
    assert schema_fingerprint(_spec("statistics.folds=4")) != base  # folds: what the counts file holds
    assert schema_fingerprint(load_spec(ML_SPEC, ["statistics.counts=[]"])) != base
